"""Measure a draft/target pair: held-out loss, line completion, acceptance and step costs.

    speccascade models eval [--target DIR --draft DIR] [--out card.json]

Line completion: at a sampled line of a held-out file, the model sees the file up to that line (as
many whole lines as fit in PROMPT_TOKENS) and greedily writes on; its next line is compared with
the file's. Exact match compares stripped lines, edit similarity is difflib's ratio. Whole-line
exact match is rare for models this small (about 1 % of lines), so it takes thousands of tasks and
a paired sign test to tell two models apart.
"""
from __future__ import annotations

import difflib
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from speccascade.models.corpus import read_text, split_files


LINE_TOKENS = 32  # enough for the rest of the prompt's line, the newline and the whole next line
# The default pair trains on 256-token windows: a prompt of PROMPT_TOKENS plus the tokens generated
# after it (LINE_TOKENS, or ACCEPTANCE_TOKENS when measuring acceptance) stays inside them.
PROMPT_TOKENS = 192
ACCEPTANCE_TOKENS = 64
CHUNK = 32  # sequences per engine call (and KV slots: 32 × 2048 tokens of the 135 M target)


@dataclass(frozen=True)
class LineTask:
    prompt: str     # file text up to the end of the previous non-blank line
    answer: str     # the line itself, stripped


def line_completion_tasks(tokenizer, n: int = 200, seed: int = 0,
                          max_prompt_tokens: int = PROMPT_TOKENS) -> list[LineTask]:
    """n deterministic tasks from held-out files: lines with ≥ 8 non-blank characters.

    The prompt keeps as many whole lines before the task line as fit in max_prompt_tokens, so
    prompt and answer stay inside the context the models were trained on (a model asked to
    read past it is measured on positions it never saw).
    """
    rng = random.Random(seed)
    _, held_out = split_files()
    candidates = []
    for path in held_out:
        lines = read_text(path).splitlines(keepends=True)
        for i in range(5, len(lines)):
            if len(lines[i].strip()) >= 8:
                candidates.append((path, i))
    tasks = []
    for path, i in rng.sample(candidates, n):
        lines = read_text(path).splitlines(keepends=True)
        # The prompt ends at the last non-blank character before the line. Byte-level BPE merges a
        # newline with the indentation after it, and a space with the word after it, so a prompt
        # cut at the newline or after the indentation ends in a token the model never saw there
        # (the token-healing problem); this cut is a clean token boundary.
        first = i - 1
        while first > 0 and len(_ids(tokenizer, "".join(lines[first - 1:i]).rstrip())) \
                <= max_prompt_tokens:
            first -= 1
        prefix = "".join(lines[first:i]).rstrip()
        ids = _ids(tokenizer, prefix)
        if len(ids) > max_prompt_tokens:  # one very long line: keep its end
            prefix = tokenizer.decode(ids[-max_prompt_tokens:])
        tasks.append(LineTask(prefix, lines[i].strip()))
    return tasks


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def exact_match(prediction: str, answer: str) -> float:
    return float(prediction.strip() == answer.strip())


def edit_similarity(prediction: str, answer: str) -> float:
    return difflib.SequenceMatcher(None, prediction.strip(), answer.strip()).ratio()


def predicted_line(text: str) -> str:
    """The model's next line: the first non-blank line after the end of the prompt's line."""
    return next((line for line in text.split("\n")[1:] if line.strip()), "")


@torch.inference_mode()
def held_out_loss(model, tokenizer, max_tokens: int = 60_000, window: int = 256) -> float:
    """Mean next-token cross-entropy (nats/token) on held-out files."""
    _, held_out = split_files()
    total, count = 0.0, 0
    for path in held_out:
        ids = _ids(tokenizer, read_text(path))
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start: start + window + 1]])
            if chunk.shape[1] < 2:
                continue
            logits = model(chunk[:, :-1]).logits.float()
            total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
            if count >= max_tokens:
                return total / count
    return total / count


@torch.inference_mode()
def draft_loss_fields(draft, tokenizer, max_tokens: int = 20_000) -> dict:
    """The draft's held-out loss, when it has a full head. A reduced-vocabulary head
    (models.vocab_head) gives q = 0 to every other token, so its cross-entropy is unbounded and
    says nothing: report instead the share of held-out next tokens its head can propose."""
    from speccascade.models.vocab_head import ReducedVocabHead

    head = draft.get_output_embeddings()
    if not isinstance(head, ReducedVocabHead):
        return {"draft_loss": held_out_loss(draft, tokenizer, max_tokens=max_tokens)}
    _, held_out = split_files()
    kept = torch.zeros(head.vocab_size, dtype=torch.bool)
    kept[head.token_ids.cpu()] = True
    inside = count = 0
    for path in held_out:
        ids = torch.tensor(_ids(tokenizer, read_text(path))[1:], dtype=torch.long)
        inside += kept[ids].sum().item()
        count += len(ids)
        if count >= max_tokens:
            break
    return {"draft_head_size": len(head.token_ids),
            "draft_head_held_out_coverage": inside / max(count, 1)}


@torch.inference_mode()
def agreement(target, draft, tokenizer, max_tokens: int = 20_000) -> tuple[float, float]:
    """On held-out text, teacher-forced: (α_acc = E[Σ_v min(p(v), q(v))] at temperature 1,
    greedy agreement = P(argmax q = argmax p))."""
    _, held_out = split_files()
    acc, same, count = 0.0, 0, 0
    for path in held_out:
        ids = _ids(tokenizer, read_text(path))[:257]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids[:-1]])
        p, q = target(x).logits.float().softmax(-1), draft(x).logits.float().softmax(-1)
        acc += torch.minimum(p, q).sum(-1).sum().item()
        same += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += x.shape[1]
        if count >= max_tokens:
            break
    return acc / count, same / count


@torch.inference_mode()
def step_ms(model, context: int = 128, new_tokens: int = 1, repeats: int = 30,
            batch: int = 1) -> float:
    """Median time of one cached forward of new_tokens positions for each of `batch` sequences
    after a context-token prefill."""
    from speccascade.models.runner import ModelRunner

    runner = ModelRunner(model, max_live_seqs=batch, max_seq_len=context + new_tokens + 8)
    seqs = [(f"s{b}", list(range(10 + b, 10 + b + context + new_tokens))) for b in range(batch)]
    runner.forward([(name, tokens[:context], 1) for name, tokens in seqs])
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        runner.forward([(name, tokens, new_tokens) for name, tokens in seqs])
        times.append((time.perf_counter() - start) * 1000)
        for name, _ in seqs:
            runner.rollback(name, context)
    return sorted(times[3:])[repeats // 2]


def step_costs(target, draft, gamma: int, rounds: int = 5, batch: int = 1,
               repeats: int = 30) -> dict:
    """Median step costs over `rounds` interleaved measurements: a burst of load from elsewhere on
    a shared machine then skews one round of both models, not the ratio c."""
    samples: dict[str, list[float]] = {"target_step_ms": [], "draft_step_ms": [], "verify_step_ms": []}
    for _ in range(rounds):
        samples["target_step_ms"].append(step_ms(target, batch=batch, repeats=repeats))
        samples["draft_step_ms"].append(step_ms(draft, batch=batch, repeats=repeats))
        samples["verify_step_ms"].append(step_ms(target, new_tokens=gamma + 1, batch=batch,
                                                 repeats=repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def generate_in_chunks(engine, prompts: list, **fields) -> list:
    """Results for every prompt (text or token ids), CHUNK sequences at a time (bounded KV)."""
    results = []
    mode = fields["mode"].name
    for start in tqdm(range(0, len(prompts), CHUNK), desc=f"{mode.lower()} generate",
                      unit="chunk", leave=False):
        results += engine.generate([engine.request(p, f"{mode}{start + i}", **fields)
                                    for i, p in enumerate(prompts[start: start + CHUNK])])
    return results


def sign_test(a_hits: list[float], b_hits: list[float]) -> tuple[int, int, float]:
    """Paired exact sign test on tasks where exactly one model is right: (a only, b only,
    one-sided p-value of a winning that many under 'a and b are equally good')."""
    a_only = sum(1 for a, b in zip(a_hits, b_hits) if a and not b)
    b_only = sum(1 for a, b in zip(a_hits, b_hits) if b and not a)
    n = a_only + b_only
    p = sum(math.comb(n, k) for k in range(a_only, n + 1)) / 2 ** n if n else 1.0
    return a_only, b_only, p


def held_out_prompts(tokenizer, kind: str, n: int, max_prompt_tokens: int = PROMPT_TOKENS):
    """n held-out prompts of one kind ("chat": through the chat template; "code": raw code) as
    token ids, never trained on (models.corpus.distill_prompts' held-out side)."""
    from speccascade.models.corpus import distill_prompts, prompt_ids

    chosen = [p for p in distill_prompts(held_out=True) if p.kind == kind][:n]
    return [prompt_ids(tokenizer, p)[-max_prompt_tokens:] for p in chosen]


@torch.inference_mode()
def sum_min_pq(target, draft, sequences: list[tuple[list[int], list[int]]],
               temperature: float) -> float:
    """Mean over generated positions of Σ_v min(p(v), q(v)) with both models' logits divided by
    `temperature`, teacher-forced on (prompt, output) pairs: the per-token acceptance
    probability of speculative sampling at that temperature (REFERENCE.md §2)."""
    total, count = 0.0, 0
    for prompt, output in sequences:
        if not output:
            continue
        x = torch.tensor([prompt + output[:-1]])
        first = len(prompt) - 1
        p = (target(x).logits[0, first:].float() / temperature).softmax(-1)
        q = (draft(x).logits[0, first:].float() / temperature).softmax(-1)
        total += torch.minimum(p, q).sum(-1).sum().item()
        count += len(output)
    return total / max(count, 1)


def acceptance(engine, prompts: list[list[int]], gamma: int, new_tokens: int,
               temperature: float = 0.0) -> dict:
    """Speculative decoding at γ on the prompts: mean accepted length per round (accepted + the
    bonus/correction token), the per-token α explaining it, E = (1 − α^(γ+1)) / (1 − α), and
    vLLM's accepted / drafted."""
    from speccascade.bench.bounds import alpha_from_mean_accepted_length
    from speccascade.engine.loop import Mode
    from speccascade.sampling import SamplingParams

    results = generate_in_chunks(engine, prompts, mode=Mode.SPECULATIVE, max_new_tokens=new_tokens,
                                 num_draft_tokens=gamma,
                                 sampling=SamplingParams(temperature=temperature, seed=1))
    rounds = sum(r.stats.rounds for r in results)
    accepted = sum(r.stats.accepted for r in results)
    mean_length = (accepted + rounds) / rounds
    return {"mean_accepted_length": mean_length,
            "alpha": alpha_from_mean_accepted_length(mean_length, gamma),
            "accepted_per_drafted": accepted / max(1, sum(r.stats.drafted for r in results)),
            "results": results}


def evaluate(target_dir, draft_dir, *, tasks: int = 200, prompts: int = 32, threads: int = 1,
             dtype: str = "float32", gamma: int = 4, temperature: float = 0.8,
             new_tokens: int = ACCEPTANCE_TOKENS) -> dict:
    """The card: step costs (batch 1 and 8), acceptance on held-out chat and code prompts (greedy,
    and sampled at `temperature`), held-out losses and line completion with paired intervals."""
    from speccascade.engine.engine import Engine
    from speccascade.engine.loop import Mode

    torch.set_num_threads(threads)
    engine = Engine.from_paths(target_dir, draft_dir, dtype=dtype, max_live_seqs=CHUNK)
    target = engine.verifier.worker.runner.model
    draft = engine.drafter.worker.runner.model
    tok = engine.tokenizer
    card: dict = {"target": _shown(target_dir), "draft": _shown(draft_dir), "dtype": dtype,
                  "threads": threads, "gamma": gamma, "temperature": temperature,
                  "target_params_m": sum(p.numel() for p in target.parameters()) / 1e6,
                  "draft_params_m": sum(p.numel() for p in draft.parameters()) / 1e6}
    with tqdm(total=5, desc="evaluate pair", unit="stage") as bar:  # costs, chat, code, loss, lines
        for batch in (1, 8):
            costs = step_costs(target, draft, gamma, batch=batch, repeats=30 if batch == 1 else 10)
            suffix = "" if batch == 1 else f"_batch{batch}"
            for name, value in costs.items():
                card[name + suffix] = value
            card["cost_ratio_c" + suffix] = costs["draft_step_ms"] / costs["target_step_ms"]
            card["verify_in_target_steps" + suffix] = costs["verify_step_ms"] / costs["target_step_ms"]
        bar.update()
        lengths, rounds_all = {}, {}
        kinds = ("chat", "code") if tok.chat_template else ("code",)
        for kind in kinds:
            ids = held_out_prompts(tok, kind, prompts)
            card[f"{kind}_prompts"] = len(ids)
            for label, temp in (("greedy", 0.0), ("sampled", temperature)):
                measured = acceptance(engine, ids, gamma, new_tokens, temp)
                results = measured.pop("results")
                for name, value in measured.items():
                    card[f"{kind}_{label}_{name}"] = value
                rounds = sum(r.stats.rounds for r in results)
                lengths.setdefault(label, []).append(measured["mean_accepted_length"] * rounds)
                rounds_all.setdefault(label, []).append(rounds)
                if label == "sampled":
                    card[f"{kind}_sampled_sum_min_pq"] = sum_min_pq(
                        target, draft, [(p, r.token_ids) for p, r in zip(ids, results)], temp)
            bar.update()
        from speccascade.bench.bounds import alpha_from_mean_accepted_length

        for label in ("greedy", "sampled"):  # both kinds together, weighted by rounds
            mean_length = sum(lengths[label]) / sum(rounds_all[label])
            card[f"{label}_mean_accepted_length"] = mean_length
            card[f"{label}_acceptance_gamma{gamma}"] = alpha_from_mean_accepted_length(mean_length,
                                                                                      gamma)
        card["sampled_sum_min_pq"] = statistics.mean(card[f"{kind}_sampled_sum_min_pq"]
                                                     for kind in kinds)
        card["mean_accepted_length"] = card["greedy_mean_accepted_length"]
        card["target_loss"] = held_out_loss(target, tok, max_tokens=20_000)
        card.update(draft_loss_fields(draft, tok))
        bar.update()
        line_tasks = line_completion_tasks(tok, tasks)
        answers = [t.answer for t in line_tasks]
        hits, sims = {}, {}
        for mode in (Mode.TARGET, Mode.DRAFT):
            results = generate_in_chunks(engine, [t.prompt for t in line_tasks], mode=mode,
                                         max_new_tokens=LINE_TOKENS)
            preds = [predicted_line(r.text) for r in results]
            name = mode.name.lower()
            hits[name] = list(map(exact_match, preds, answers))
            sims[name] = list(map(edit_similarity, preds, answers))
            card[f"{name}_line_exact_match"] = sum(hits[name]) / len(line_tasks)
            card[f"{name}_line_edit_similarity"] = sum(sims[name]) / len(line_tasks)
        card["line_tasks"] = len(line_tasks)
        card["line_exact_match_target_only"], card["line_exact_match_draft_only"], \
            card["line_exact_match_sign_test_p"] = sign_test(hits["target"], hits["draft"])
        for metric, values in (("exact_match", hits), ("edit_similarity", sims)):
            ci = paired_bootstrap_ci(values["target"], values["draft"])
            card[f"line_{metric}_target_minus_draft"] = [ci["diff"], ci["lo"], ci["hi"]]
        bar.update()
    if "draft_loss" in card:
        card["loss_gap_nats"] = card["draft_loss"] - card["target_loss"]
    return card


def _shown(path) -> str:
    """The path relative to the working directory when inside it: a committed card names no machine."""
    from speccascade.models.fetch import cache_dir

    path, cache = Path(path).resolve(), cache_dir().resolve()
    if path.is_relative_to(cache):
        return f"$SPECCASCADE_CACHE/{path.relative_to(cache).as_posix()}"
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(args) -> None:
    card = evaluate(args.target, args.draft, tasks=args.tasks, threads=args.threads,
                    dtype="float32" if args.dtype == "auto" else args.dtype)
    text = json.dumps(card, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


# --------------------------------------------------------------------------------------------
# Telling configurations apart (bench/frontier.py): a line's end, the target's log-likelihood of
# many continuations at once, and a paired bootstrap.
# --------------------------------------------------------------------------------------------


def line_complete(text: str) -> bool:
    """True once `text` holds the whole predicted line (a non-blank line after the first newline,
    itself ended by a newline): nothing generated after that changes the line-completion score."""
    return any(line.strip() for line in text.split("\n")[1:-1])


def line_token_count(tokenizer, token_ids: list[int]) -> int:
    """How many of token_ids it takes to complete the predicted line (all of them if they never do)."""
    for k in range(1, len(token_ids) + 1):
        if line_complete(tokenizer.decode(token_ids[:k])):
            return k
    return len(token_ids)


@torch.inference_mode()
def continuation_log_likelihoods(target, prompt: list[int], outputs: list[list[int]]) -> list[float]:
    """Mean log p_target(token | prefix) per token (nats) of each output after one shared prompt;
    NaN for an empty output. One prompt forward, then every distinct output in one batch over the
    prompt's cache: configurations that agree (most of them, near the SD end) are scored once."""
    distinct = sorted({tuple(o) for o in outputs if o})
    scores: dict[tuple, float] = {}
    if distinct:
        out = target(torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(distinct))
        width = max(map(len, distinct))
        # Right padding needs no mask: a causal position never attends to the pads after it.
        ids = torch.tensor([list(o) + [0] * (width - len(o)) for o in distinct])  # [n, width]
        logits = target(ids, past_key_values=cache).logits.float()  # [n, width, vocab]
        first = out.logits[0, -1].float().expand(len(distinct), 1, -1)  # [n, 1, vocab]
        logprobs = torch.cat([first, logits[:, :-1]], 1).log_softmax(-1)  # [n, width, vocab]
        picked = logprobs.gather(-1, ids[..., None])[..., 0]  # [n, width]
        lengths = torch.tensor([len(o) for o in distinct])
        valid = torch.arange(width)[None] < lengths[:, None]  # [n, width]
        means = (picked * valid).sum(1) / lengths
        scores = dict(zip(distinct, means.tolist()))
    return [scores[tuple(o)] if o else math.nan for o in outputs]


def paired_bootstrap_ci(a, b, *, resamples: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> dict:
    """Percentile bootstrap of mean(a) − mean(b) over tasks resampled in pairs (the same tasks
    for both), and of the relative loss (mean(b) − mean(a)) / |mean(b)| with b the reference.
    Tasks where either value is NaN are left out. A fixed seed makes the interval reproducible."""
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    keep = ~(x.isnan() | y.isnan())
    x, y = x[keep], y[keep]
    n = len(x)
    if n == 0:
        return {"tasks": 0, "diff": math.nan, "lo": math.nan, "hi": math.nan,
                "rel_loss": math.nan, "rel_loss_lo": math.nan, "rel_loss_hi": math.nan}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)  # [resamples, n]
    mx, my = x[idx].mean(1), y[idx].mean(1)  # [resamples]
    diff = mx - my
    rel = (my - mx) / my.abs().clamp_min(1e-12)
    tail = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = diff.quantile(tail).tolist()
    rel_lo, rel_hi = rel.quantile(tail).tolist()
    mean_b = y.mean().item()
    return {"tasks": n, "diff": (x.mean() - y.mean()).item(), "lo": lo, "hi": hi,
            "rel_loss": (mean_b - x.mean().item()) / max(abs(mean_b), 1e-12),
            "rel_loss_lo": rel_lo, "rel_loss_hi": rel_hi}


# --------------------------------------------------------------------------------------------
# Short answers through the chat template (bench/workload.py's "facts" family): the reply's
# first line, its end, and whether it holds a known answer.
# --------------------------------------------------------------------------------------------

FACT_TOKENS = 24  # a one-sentence reply ("The capital of Kenya is Nairobi.") with room to spare


def reply_complete(text: str) -> bool:
    """True once `text` (an assistant reply) holds its first non-blank line, ended by a newline:
    nothing generated after that changes the fact score."""
    return any(line.strip() for line in text.split("\n")[:-1])


def reply_line(text: str) -> str:
    """The reply's first non-blank line, stripped ("" if there is none)."""
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def reply_token_count(tokenizer, token_ids: list[int]) -> int:
    """How many of token_ids it takes to complete the reply's first line (all if they never do)."""
    for k in range(1, len(token_ids) + 1):
        if reply_complete(tokenizer.decode(token_ids[:k])):
            return k
    return len(token_ids)


def _folded(text: str) -> str:
    """Lower case without accents: "Bogotá" and "bogota" compare equal."""
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(c)).lower()


def answer_correct(reply: str, answers) -> float:
    """1.0 if any accepted answer occurs in the reply as a whole word or phrase (case and accents
    ignored), else 0.0. "The capital of Kenya is Nairobi." is right; "boxs" is not "boxes"."""
    import re

    text = _folded(reply)
    return float(any(re.search(rf"(?<!\w){re.escape(_folded(a))}(?!\w)", text) for a in answers))
