"""Acceptance against the size k of the shipped draft distribution q′ (top-k of q, renormalized).

    python -m speccascade.bench.sparse_k [--positions 4000]

Teacher-forced on held-out text of the default pair: at every position, α_acc(k) = Σ min(p, q′_k)
with p and q processed at the same temperature (REFERENCE.md §2). Prints a markdown table.
"""
from __future__ import annotations

import argparse

import torch

from speccascade import sampling
from speccascade.models.corpus import read_text, split_files
from speccascade.models.evaluate import _ids
from speccascade.models.loader import default_pair_paths, load_model, load_tokenizer

KS = (1, 8, 16, 32, 64, 128, 256, 512)


@torch.inference_mode()
def acceptance_vs_k(positions: int = 4000, temperatures=(1.0, 0.8), ks=KS, window: int = 256):
    target_dir, draft_dir = default_pair_paths()
    target, draft = load_model(target_dir), load_model(draft_dir)
    tokenizer = load_tokenizer(target_dir)
    sums = {(t, k): 0.0 for t in temperatures for k in (*ks, 0)}
    count = 0
    for path in split_files()[1]:
        ids = _ids(tokenizer, read_text(path))[: window + 1]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids[:-1]])
        p_logits, q_logits = target(x).logits.float(), draft(x).logits.float()  # [1, n, vocab]
        for t in temperatures:
            params = [sampling.SamplingParams(temperature=t)]
            p = sampling.process_logits(p_logits, params)[0]  # [n, vocab]
            q = sampling.process_logits(q_logits, params)[0]
            sums[t, 0] += torch.minimum(p, q).sum().item()
            for k in ks:
                q_k = sampling.sparse_to_dense(*sampling.truncate_top_k(q, k), q.shape[-1])
                sums[t, k] += torch.minimum(p, q_k).sum().item()
        count += x.shape[1]
        if count >= positions:
            break
    return {key: value / count for key, value in sums.items()}, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table, count = acceptance_vs_k(args.positions)
    temps = sorted({t for t, _ in table}, reverse=True)
    print(f"held-out positions: {count}")
    print("| q′ | " + " | ".join(f"α_acc at T = {t:g}" for t in temps) + " | bytes per position |")
    print("|---|" + "---|" * (len(temps) + 1))
    for k in (0, *KS):
        name = "full q (8192 fp16 logits)" if k == 0 else f"top-{k}"
        size = "16384" if k == 0 else str(8 * k)
        print(f"| {name} | " + " | ".join(f"{table[t, k]:.3f}" for t in temps) + f" | {size} |")


if __name__ == "__main__":
    main()
