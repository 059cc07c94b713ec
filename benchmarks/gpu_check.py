"""`make gpu-check`: the slab KV cache on a device in a production dtype, and a short timing table.

    PYTHONPATH=services python benchmarks/gpu_check.py --device cuda --dtype bfloat16 --out FILE

On a tiny random pair and on the default pair: batched vs one-at-a-time runner logits (max
difference, argmax agreement), greedy SPECULATIVE vs TARGET through the in-process engine (in bf16
logits depend slightly on the batch shape, so paths may part at a near-tie: reported as tokens
until the first divergence, not asserted), the service on the tiny pair (health, dtype, KV tokens
back at zero), and forward times at B = 1 and 8. Fails (exit 1) only on errors and on a runner
mismatch beyond the dtype's rounding. `--device cpu` is the dry run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from conftest import make_tokenizer, save_tiny_model  # noqa: E402
from kv_profile import _Probe  # noqa: E402

from speccascade.engine.engine import Engine  # noqa: E402
from speccascade.engine.loop import Mode  # noqa: E402
from speccascade.models.loader import default_pair_paths, load_model  # noqa: E402
from speccascade.models.runner import ModelRunner  # noqa: E402


def runner_check(path, dtype, device) -> tuple[float, float]:
    """(max |batched - alone| / max |alone|, argmax agreement) on 8 ragged sequences."""
    batched = ModelRunner(load_model(path, dtype, device), max_live_seqs=8)
    alone = ModelRunner(load_model(path, dtype, device), max_live_seqs=1)
    gen = torch.Generator().manual_seed(0)
    vocab = batched.model.config.vocab_size
    seqs = {f"s{i}": torch.randint(0, vocab, (5 + 11 * i,), generator=gen).tolist()
            for i in range(8)}
    worst, agree, total = 0.0, 0, 0
    for step in range(3):
        got = batched.forward([(k, v, 3) for k, v in seqs.items()])
        for (seq_id, tokens), logits in zip(seqs.items(), got):
            alone.release("x")
            ref = alone.forward([("x", tokens, 3)])[0]
            worst = max(worst, ((logits - ref).abs().max() / ref.abs().max()).item())
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            total += logits.shape[0]
        for i, k in enumerate(seqs):  # roll back some, extend all
            seqs[k] = seqs[k][: len(seqs[k]) - (i + step) % 3] + [(7 * i + step) % vocab] * 4
    return worst, agree / total


def engine_check(target, draft, dtype, device, prompts, new_tokens) -> dict:
    engine = Engine.from_paths(target, draft, dtype=dtype, device=device)
    out = {}
    for mode in (Mode.TARGET, Mode.SPECULATIVE):
        started = time.perf_counter()
        out[mode] = engine.generate([engine.request(p, request_id=f"{mode.name}{i}", mode=mode,
                                                    max_new_tokens=new_tokens)
                                     for i, p in enumerate(prompts)])
        out[mode, "s"] = time.perf_counter() - started
    same, first = 0, []
    for t, s in zip(out[Mode.TARGET], out[Mode.SPECULATIVE]):
        same += t.token_ids == s.token_ids
        first.append(next((i for i, (a, b) in enumerate(zip(t.token_ids, s.token_ids)) if a != b),
                          min(len(t.token_ids), len(s.token_ids))))
    tokens = sum(len(t.token_ids) for t in out[Mode.TARGET])
    return {"identical": f"{same}/{len(prompts)}",
            "first_divergence_median": statistics.median(first),
            "target_tok_s": tokens / out[Mode.TARGET, "s"],
            "speculative_tok_s": sum(len(s.token_ids) for s in out[Mode.SPECULATIVE])
            / out[Mode.SPECULATIVE, "s"]}


def service_check(pair, dtype, device) -> dict:
    from conftest import running_service, tiny_service_config

    gpus = 0.25 if device.startswith("cuda") else 0.0
    replica = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25, "num_gpus": gpus}}
    config = tiny_service_config(pair, drafter=replica, verifier=replica,
                                 target={"path": str(pair[0]), "dtype": dtype, "device": device},
                                 draft={"path": str(pair[1]), "dtype": dtype, "device": device})
    with running_service(config, num_cpus=2) as client:
        health = client.health()
        assert health.serving, health.detail
        prompts = ["def f1(x):", "x = 3 *", "def f7(x):\n    return", "return x"]
        target = [client.generate(p, max_new_tokens=24, mode="target").token_ids for p in prompts]
        spec = [client.generate(p, max_new_tokens=24, mode="speculative").token_ids
                for p in prompts]
        stats = client.stats()
        assert all(r.kv_tokens_used == 0 for r in stats.replicas), stats
        return {"dtype": f"{health.target_dtype}/{health.draft_dtype}",
                "identical": f"{sum(a == b for a, b in zip(target, spec))}/{len(prompts)}",
                "kv_tokens_total": [r.kv_tokens_total for r in stats.replicas]}


def timings(dtype, device, rounds=20) -> list[str]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    target, draft = default_pair_paths()
    rows = []
    for name, path, new in (("target", target, 5), ("target", target, 1), ("draft", draft, 1)):
        probes = {b: _Probe(ModelRunner, path, dtype, device, b, new, sync) for b in (1, 8)}
        for _ in range(rounds):
            for probe in probes.values():
                probe.round()
        (w1, _, _, _), (w8, m8, outside8, _) = probes[1].result(), probes[8].result()
        rows.append(f"| {name}, {new} new token{'s' if new > 1 else ''} | {w1:.2f} | {w8:.2f} | "
                    f"{8 * w1 / w8:.2f}x | {100 * outside8 / m8:.1f} % |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="benchmarks/gpu_check.md")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [f"# gpu-check: {where}, {args.dtype}, torch {torch.__version__}", ""]
    tolerance = {"float32": 1e-4, "float64": 1e-9}.get(args.dtype, 0.05)  # relative
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer()
        tiny = (save_tiny_model(Path(tmp) / "target", tok, seed=1, hidden=48, layers=3),
                save_tiny_model(Path(tmp) / "draft", tok, seed=2, hidden=32, layers=1))
        default = default_pair_paths()
        lines += ["| pair | runner max rel. diff | argmax agree | greedy SPEC == TARGET | "
                  "first divergence (median) | TARGET tok/s | SPEC tok/s |",
                  "|---|---|---|---|---|---|---|"]
        for label, pair in (("tiny random", tiny), ("default", default)):
            worst, agree = runner_check(pair[0], args.dtype, args.device)
            failed |= worst > tolerance
            prompts = [f"def f{i}(x):\n    return" for i in range(8)]
            e = engine_check(*pair, args.dtype, args.device, prompts, 48)
            lines.append(f"| {label} | {worst:.3g} | {agree:.3f} | {e['identical']} | "
                         f"{e['first_divergence_median']} | {e['target_tok_s']:.0f} | "
                         f"{e['speculative_tok_s']:.0f} |")
            print(lines[-1], flush=True)
        s = service_check(tiny, args.dtype, args.device)
        lines += ["", f"Service on the tiny pair: dtype {s['dtype']}, greedy SPEC == TARGET "
                  f"{s['identical']}, KV tokens total per replica {s['kv_tokens_total']}, "
                  "all back at 0 used.", ""]
        print(lines[-2], flush=True)
    lines += ["Default pair, one model forward through the runner (ms, medians, interleaved):", "",
              "| forward | B=1 | B=8 | tokens/s B=8 / B=1 | runner outside model, B=8 |",
              "|---|---|---|---|---|", *timings(args.dtype, args.device)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
