"""Build the default pair's DRAFT, distilled from the default TARGET (SmolLM2-135M-Instruct), on a CPU.

    speccascade models build [--out DIR] [--from-stage STAGE] [--quick]

Recipe (DistillSpec; REFERENCE.md §14): sequence-level distillation — the target's own outputs on
many varied training prompts (chat instructions through its chat template, raw code, raw prose;
models.corpus.distill_prompts, held-out prompts never used) — plus token-level distillation on the
target's distribution at every generated position (its top-K log-probabilities at temperature 1,
recorded while generating, so the teacher costs nothing more). Half the prompts are answered
greedily and half sampled at T 0.8, the two ways the service decodes.

The draft is the target cut short: its first few decoder layers (copied, then trained), its final
norm, its embedding and a reduced-vocabulary head (FR-Spec: the target's head rows of the most
frequent tokens, models.vocab_head). Starting from the target's own layers and token geometry, a
few hundred steps on a CPU reach what a from-scratch draft does not in hours. The embedding and the
head rows stay frozen, so the shipped draft holds only its layers: its config names the target's
embedding, read at load (models.loader).

Stages, each resumable (a killed run redoes only unfinished work), all in the work folder:
`generate` (shards of the target's outputs) → `rank` (the tokens by frequency in them) → `shape`
(the depth: the deepest whose step, timed at one thread, is ≤ max_cost_ratio of the target's) →
`draft` (checkpoints every `checkpoint_every` steps; a restart continues from the last) → `head`
(the head size that maximises the expected speedup, from measured agreement and cost). Seeds are
fixed: the same machine and thread count give the same draft. The work folder is outside git
(`$SPECCASCADE_CACHE/build`); the draft is written as bf16 safetensors with the ranking and a copy
of the tokenizer to `OUT/draft`, the record to `OUT/build_log.json`.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from speccascade.models.loader import DEFAULT_PAIR_DIR

HEAD_SIZES = (2048, 4096, 8192, 16384)  # FR-Spec head sizes measured (prefixes of the ranking)


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    threads: int = 1
    prompts: int = 1024              # training prompts answered by the target (≈ 2.5 min / 128)
    shard_prompts: int = 128         # prompts per saved shard (the unit of resumption)
    gen_batch: int = 32              # sequences decoded together
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    top_k: int = 32                  # teacher log-probabilities kept per generated position
    sample_temperature: float = 0.8  # odd prompts are sampled at this temperature, even ones greedy
    max_cost_ratio: float = 0.12     # c = draft step / target step (the goal)
    depths: tuple = (1, 2, 3, 4)     # candidate numbers of the target's layers kept
    default_head_size: int = 8192    # the head timed when choosing the depth
    train_head_size: int = 16384     # the head trained on (the served one is a prefix of it)
    head_eval_prompts: int = 16      # held-out prompts per kind for the head stage
    head_eval_tokens: int = 64
    steps: int = 600
    batch: int = 12
    lr: float = 1e-3
    warmup_steps: int = 20
    hard_weight: float = 0.1         # cross-entropy on the target's chosen token, beside the soft KL
    checkpoint_every: int = 25


def quick_config() -> BuildConfig:
    """A smoke build in a few minutes (tests): a handful of prompts and steps."""
    return replace(BuildConfig(), prompts=8, shard_prompts=4, gen_batch=4, max_new_tokens=8,
                   steps=4, batch=2, checkpoint_every=2, warmup_steps=1, depths=(1, 2),
                   head_eval_prompts=2, head_eval_tokens=4)


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast is ~3× faster than fp32 on CPUs with AVX-512 BF16 or AMX, and several times
    slower where it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def work_dir() -> Path:
    from speccascade.models.fetch import cache_dir

    return cache_dir() / "build"


# -- stage 1: the target's own outputs --------------------------------------------------------

@torch.inference_mode()
def generate_shard(runner, tok, prompts, first_index: int, cfg: BuildConfig) -> list[dict]:
    """Continuous batching over one shard: every prompt answered by the target (greedy for even
    global indices, sampled for odd ones), with its top-K log-probabilities at each new token."""
    from speccascade.models.corpus import prompt_ids

    eos = tok.eos_token_id
    records = [None] * len(prompts)
    pending = list(range(len(prompts)))
    active: dict[int, dict] = {}
    bar = tqdm(total=len(prompts), desc=f"generate {first_index // cfg.shard_prompts}",
               unit="prompt", leave=False)

    def finish(i):
        state = active.pop(i)
        runner.release(f"p{i}")
        records[i] = {"kind": prompts[i].kind, "prompt": state["prompt"],
                      "output": state["output"], "greedy": state["greedy"],
                      "topk_ids": torch.stack(state["topk_ids"]).to(torch.int32),
                      "topk_logprobs": torch.stack(state["topk_lp"]).to(torch.float16)}
        bar.update()

    def take(i, logits):
        state = active[i]
        logprobs = logits.float().log_softmax(-1)
        lp, ids = logprobs.topk(cfg.top_k)
        state["topk_ids"].append(ids)
        state["topk_lp"].append(lp)
        if state["greedy"]:
            token = int(logits.argmax())
        else:
            probs = (logits.float() / cfg.sample_temperature).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=state["gen"]))
        state["output"].append(token)
        if token == eos or len(state["output"]) >= cfg.max_new_tokens:
            finish(i)

    while pending or active:
        free = cfg.gen_batch - len(active)
        if pending and (free >= cfg.gen_batch // 4 or not active):
            new = pending[:free]
            del pending[:free]
            new.sort(key=lambda i: len(prompts[i].text))
            for i in new:
                ids = prompt_ids(tok, prompts[i])[-cfg.max_prompt_tokens:]
                g = first_index + i
                active[i] = {"prompt": ids, "output": [], "greedy": g % 2 == 0,
                             "gen": torch.Generator().manual_seed(cfg.seed * 1_000_003 + g),
                             "topk_ids": [], "topk_lp": []}
            # Prefill in groups of similar length (rows are padded to the longest in a forward).
            for at in range(0, len(new), 8):
                group = new[at: at + 8]
                out = runner.forward([(f"p{i}", active[i]["prompt"], 1) for i in group])
                for i, logits in zip(group, out):
                    take(i, logits[-1])
            continue
        rows = list(active)
        out = runner.forward([(f"p{i}", active[i]["prompt"] + active[i]["output"], 1)
                              for i in rows])
        for i, logits in zip(rows, out):
            take(i, logits[-1])
    bar.close()
    return records


def stage_generate(cfg: BuildConfig, work: Path, log: dict) -> None:
    from speccascade.models.corpus import distill_prompts
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_model, load_tokenizer
    from speccascade.models.runner import ModelRunner

    target_path = ensure_target()
    prompts = distill_prompts(held_out=False, limit=cfg.prompts, seed=cfg.seed)
    shards = [(at, prompts[at: at + cfg.shard_prompts])
              for at in range(0, len(prompts), cfg.shard_prompts)]
    todo = [(at, ps) for at, ps in shards if not (work / f"shard_{at:06d}.pt").exists()]
    if not todo:
        return
    tok = load_tokenizer(target_path)
    target = load_model(target_path, "float32")
    runner = ModelRunner(target, max_live_seqs=cfg.gen_batch,
                         max_seq_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
    started = time.time()
    tokens = 0
    for at, ps in tqdm(todo, desc="generate (target's outputs)", unit="shard"):
        records = generate_shard(runner, tok, ps, at, cfg)
        tmp = work / f"shard_{at:06d}.pt.partial"
        torch.save(records, tmp)
        tmp.rename(work / f"shard_{at:06d}.pt")  # a shard exists only once complete
        tokens += sum(len(r["output"]) for r in records)
    log["generate_minutes_this_run"] = (time.time() - started) / 60
    log["generate_tokens_per_s_this_run"] = tokens / max(time.time() - started, 1e-9)


def load_shards(work: Path) -> list[dict]:
    return [r for path in sorted(work.glob("shard_*.pt")) for r in torch.load(path)]


# -- stage 2: the head's vocabulary, frequency-ranked ----------------------------------------

def stage_rank(work: Path, records: list[dict], tok, log: dict) -> list[int]:
    """Every token, most frequent in the target's outputs (and their prompts) first: FR-Spec's
    ranking, from training shards only. End-of-turn/text tokens lead, so any head can stop."""
    from speccascade.models.vocab_head import frequency_ranking

    path = work / "ranking.json"
    if not path.exists():
        always = tuple(sorted({t for t in (tok.eos_token_id, tok.pad_token_id,
                                           tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}))
        seqs = [r["output"] + r["prompt"] for r in records]
        path.write_text(json.dumps(frequency_ranking(seqs, len(tok), always)))
    ranking = json.loads(path.read_text())
    outputs = torch.cat([torch.tensor(r["output"]) for r in records])
    position = torch.full((len(ranking),), len(ranking))
    position[torch.tensor(ranking)] = torch.arange(len(ranking))
    rank_of_output = position[outputs]
    log["ranking_output_coverage"] = {str(n): (rank_of_output < n).float().mean().item()
                                      for n in HEAD_SIZES}
    return ranking


# -- stage 3: the draft's depth, by measurement ----------------------------------------------

def make_draft(target, layers: int, head_ids: list[int] | None = None):
    """The target cut to its first `layers` decoder layers (copies), with its final norm, its
    embedding and, when head_ids is given, its head cut to those rows (models.vocab_head)."""
    import copy

    from speccascade.models.vocab_head import reduce_head

    draft = copy.deepcopy(target)
    draft.model.layers = torch.nn.ModuleList(draft.model.layers[:layers])
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    if head_ids is not None:
        reduce_head(draft, head_ids)
    return draft


def stage_shape(cfg: BuildConfig, work: Path, ranking: list[int], log: dict) -> int:
    """Time the target's one-token step and each candidate depth's (with the default head size
    cut) through the runner at one thread, in the dtype `auto` would serve them in, interleaved
    (median of 5 rounds); pick the deepest draft whose c ≤ max_cost_ratio."""
    import statistics

    from speccascade.models.evaluate import step_ms
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_model

    path = work / "shape.json"
    if not path.exists():
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        target = load_model(ensure_target(), "float32").to(dtype)
        drafts = {k: make_draft(target, k, ranking[:cfg.default_head_size]) for k in cfg.depths}
        samples: dict = {"target": [], **{k: [] for k in drafts}}
        for _ in tqdm(range(5), desc="shape: step costs", unit="round"):
            samples["target"].append(step_ms(target, repeats=10))
            for k, d in drafts.items():
                samples[k].append(step_ms(d, repeats=10))
        target_ms = statistics.median(samples["target"])
        rows = [{"layers": k, "head_size": cfg.default_head_size,
                 "step_ms": statistics.median(samples[k]),
                 "c": statistics.median(samples[k]) / target_ms} for k in drafts]
        fits = [r for r in rows if r["c"] <= cfg.max_cost_ratio]
        chosen = max(fits or rows[:1], key=lambda r: r["layers"])
        path.write_text(json.dumps({"dtype": str(dtype), "target_step_ms": target_ms,
                                    "candidates": rows, "chosen": chosen}, indent=1))
    record = json.loads(path.read_text())
    log["shape"] = record
    print(f"draft depth: {record['chosen']}")
    return record["chosen"]["layers"]


# -- stage 4: the draft, distilled -----------------------------------------------------------

def _batches(records: list[dict], cfg: BuildConfig, steps: int, start: int):
    """Step s's batch: a seeded permutation per epoch, so a resumed run sees the same batches."""
    per_epoch = max(1, len(records) // cfg.batch)
    for step in range(start, steps):
        epoch, at = divmod(step, per_epoch)
        order = list(range(len(records)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        yield step, [records[i] for i in order[at * cfg.batch: (at + 1) * cfg.batch]]


def distill_loss(model, head: torch.Tensor, slot: torch.Tensor, batch: list[dict],
                 cfg: BuildConfig, pad_id: int):
    """Soft cross-entropy against the teacher's top-K, plus hard_weight × CE on the token the
    teacher emitted, on generated positions only, over the training head's N tokens.

    head: [N, d] rows of the target's head; slot: [V] a token's row in it, or −1. Teacher tokens
    outside the head cannot be proposed: their mass is dropped and the rest renormalized."""
    seqs = [r["prompt"] + r["output"] for r in batch]
    width = max(map(len, seqs)) - 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s) - 1] = torch.tensor(s[:-1])
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, width, d]; pads only trail
    # Position t predicts token t + 1: the output's j-th token is predicted at len(prompt) - 1 + j.
    rows = torch.cat([torch.full((len(r["output"]),), b) for b, r in enumerate(batch)])
    cols = torch.cat([torch.arange(len(r["output"])) + len(r["prompt"]) - 1 for r in batch])
    logq = (hidden[rows, cols] @ head.T).float().log_softmax(-1)  # [P, N]
    topk = slot[torch.cat([r["topk_ids"] for r in batch]).long()]  # [P, K], −1 outside the head
    p = torch.cat([r["topk_logprobs"].float() for r in batch]).exp() * (topk >= 0)  # [P, K]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
    soft = -(p * logq.gather(1, topk.clamp_min(0))).sum(-1).mean()
    chosen = slot[torch.cat([torch.tensor(r["output"]) for r in batch])]  # [P]
    hard = F.nll_loss(logq[chosen >= 0], chosen[chosen >= 0])
    return soft + cfg.hard_weight * hard, soft.item(), hard.item()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_draft(cfg: BuildConfig, work: Path, layers: int, ranking: list[int], log: dict):
    """Train the cut target's layers and final norm; the embedding and the head rows stay the
    target's (frozen), so the draft ships without them. Returns the trained model (float32)."""
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_model, load_tokenizer

    records = load_shards(work)
    if not records:
        raise RuntimeError(f"no generated shards in {work}: run the generate stage")
    target_path = ensure_target()
    tok = load_tokenizer(target_path)
    torch.manual_seed(cfg.seed + 1)
    model = make_draft(load_model(target_path, "float32"), layers)
    model.model.embed_tokens.weight.requires_grad_(False)
    train_ids = torch.tensor(ranking[:cfg.train_head_size])
    head = model.model.embed_tokens.weight[train_ids].detach()  # [N, d], tied head rows
    slot = torch.full((len(ranking),), -1, dtype=torch.long)
    slot[train_ids] = torch.arange(len(train_ids))
    params = [p for p in model.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = work / "draft_checkpoint.pt"
    start, history, segments = 0, [], [[0, cfg.steps]]
    if ckpt.exists():
        state = torch.load(ckpt)
        if state["layers"] == layers and state["step"] <= cfg.steps:
            model.model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, history = state["step"], state["history"]
            # A schedule changed mid-run (steps) continues on the new cosine from this step: the
            # log keeps every (step, schedule) segment, since such a draft differs from a fresh run.
            segments = state.get("segments", [[0, state["steps"]]])
            if segments[-1][1] != cfg.steps:
                segments.append([start, cfg.steps])
            print(f"resuming the draft at step {start}")
    use_bf16 = cpu_has_fast_bf16()
    started = time.time()
    model.train()
    bar = tqdm(_batches(records, cfg, cfg.steps, start), total=cfg.steps, initial=start,
               desc="draft (distilled)", unit="step")
    for step, batch in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss, soft, hard = distill_loss(model, head, slot, batch, cfg, tok.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append((soft, hard))
        if step % 10 == 0:
            recent = history[-10:]
            bar.set_postfix(soft=f"{sum(s for s, _ in recent) / len(recent):.3f}",
                            hard=f"{sum(h for _, h in recent) / len(recent):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            torch.save({"model": model.model.state_dict(), "opt": opt.state_dict(),
                        "step": step + 1, "history": history, "layers": layers,
                        "steps": cfg.steps, "segments": segments},
                       work / "draft_checkpoint.pt.partial")
            (work / "draft_checkpoint.pt.partial").rename(ckpt)
    model.eval()
    tail = history[-50:]
    log.update({"draft_minutes_this_run": (time.time() - started) / 60, "bf16_autocast": use_bf16,
                "draft_schedule_segments": segments, "draft_layers": layers,
                "train_head_size": cfg.train_head_size,
                "draft_final_soft_ce": sum(s for s, _ in tail) / len(tail),
                "draft_final_hard_ce": sum(h for _, h in tail) / len(tail),
                "draft_soft_ce_first_50": sum(s for s, _ in history[:50]) / min(50, len(history))})
    return model, tok


# -- stage 5: the head's size, by measurement; the draft written ------------------------------

@torch.inference_mode()
def stage_head(cfg: BuildConfig, work: Path, model, ranking: list[int], log: dict) -> int:
    """FR-Spec's trade, measured: for each head size N, the draft's step cost c(N) (one thread,
    interleaved with the target's) and its greedy agreement a(N) with the target on held-out
    prompts' outputs by the target (teacher-forced); pick the N that maximises SD's expected
    speedup at γ = 4, (1 − a^(γ+1)) / ((1 − a)(γ·c + 1)) (REFERENCE.md §2)."""
    import statistics

    from speccascade.models.evaluate import held_out_prompts, step_ms
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_model, load_tokenizer
    from speccascade.models.vocab_head import reduce_head

    path = work / "head.json"
    if path.exists():
        record = json.loads(path.read_text())
        log["head"] = record
        return record["chosen"]["head_size"]
    target_path = ensure_target()
    tok = load_tokenizer(target_path)
    target = load_model(target_path, "float32")
    # The target's greedy continuations of held-out prompts (chat and code), teacher-forced.
    sequences = []
    for kind in ("chat", "code"):
        for prompt in held_out_prompts(tok, kind, cfg.head_eval_prompts):
            x = torch.tensor([prompt])
            out = target.generate(x, max_new_tokens=cfg.head_eval_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
            sequences.append((prompt, out))
    p_argmax = [target(torch.tensor([pr + o[:-1]])).logits[0, len(pr) - 1:].argmax(-1)
                for pr, o in sequences if o]
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    rows, gamma = [], 4
    timing = {"target": []}
    heads = {}
    for n in HEAD_SIZES:
        draft = make_draft(model, len(model.model.layers))
        reduce_head(draft, ranking[:n])
        heads[n] = draft
        same = total = 0
        for (pr, o), want in zip([s for s in sequences if s[1]], p_argmax):
            got = draft(torch.tensor([pr + o[:-1]])).logits[0, len(pr) - 1:].argmax(-1)
            same += (got == want).sum().item()
            total += len(want)
        rows.append({"head_size": n, "greedy_agreement": same / total})
        timing[n] = []
    timed = {n: d.to(dtype) for n, d in heads.items()}
    target = target.to(dtype)
    for _ in tqdm(range(5), desc="head: step costs", unit="round"):
        timing["target"].append(step_ms(target, repeats=10))
        for n, d in timed.items():
            timing[n].append(step_ms(d, repeats=10))
    target_ms = statistics.median(timing["target"])
    for row in rows:
        a, c = row["greedy_agreement"], statistics.median(timing[row["head_size"]]) / target_ms
        row.update(c=c, expected_speedup_gamma4=(1 - a ** (gamma + 1)) / ((1 - a) * (gamma * c + 1)))
    chosen = max(rows, key=lambda r: r["expected_speedup_gamma4"])
    record = {"dtype": str(dtype), "target_step_ms": target_ms, "eval_positions": total,
              "rows": rows, "chosen": chosen}
    path.write_text(json.dumps(record, indent=1))
    log["head"] = record
    return chosen["head_size"]


def save_draft(model, tok, ranking: list[int], head_size: int, out: Path) -> None:
    """The draft as shipped: bf16 safetensors of its layers and final norm (no embedding: its
    config's `shared_embedding` names the target's, checked by SHA-256 at load), the full ranking
    (head_token_ids.json; config `draft_head_size` picks its prefix) and the tokenizer."""
    import hashlib
    import shutil

    from safetensors.torch import save_file

    from speccascade.models.fetch import TARGET_NAME
    from speccascade.models.vocab_head import HEAD_IDS_FILE

    draft_dir = out / "draft"
    tmp = out / "draft.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    embedding = model.model.embed_tokens.weight.detach()
    state = {name: t.detach().to(torch.bfloat16).contiguous()
             for name, t in model.state_dict().items()
             if name not in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.shared_embedding = {
        "checkpoint": TARGET_NAME, "tensor": "model.embed_tokens.weight",
        "sha256": hashlib.sha256(embedding.float().numpy().tobytes()).hexdigest()}
    config.draft_head_size = head_size
    config.tie_word_embeddings = True
    config.dtype = "bfloat16"
    config.save_pretrained(tmp)
    (tmp / HEAD_IDS_FILE).write_text(json.dumps(ranking))
    tok.save_pretrained(tmp)
    shutil.rmtree(draft_dir, ignore_errors=True)
    tmp.rename(draft_dir)


STAGES = ("generate", "rank", "shape", "draft", "head")
STAGE_FILES = {"rank": ("ranking.json",), "shape": ("shape.json",),
               "draft": ("draft_checkpoint.pt",), "head": ("head.json",)}
# A shard holds prompts [i, i + shard_prompts) of one fixed order: more prompts add shards.
GENERATION_FIELDS = ("seed", "shard_prompts", "max_prompt_tokens", "max_new_tokens",
                     "top_k", "sample_temperature")


def build(out_dir: Path = DEFAULT_PAIR_DIR, cfg: BuildConfig = BuildConfig(),
          from_stage: str | None = None, work: Path | None = None) -> Path:
    """Distill the default draft into out_dir/draft. Without from_stage, finished work in the
    work folder is reused (a killed build resumes where it stopped); from_stage discards that
    stage's work and every later stage's, and redoes them. Changed generation settings discard
    everything."""
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"from_stage must be one of {STAGES}, got {from_stage!r}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir, work = Path(out_dir), Path(work or work_dir())
    work.mkdir(parents=True, exist_ok=True)
    generation = {k: v for k, v in asdict(cfg).items() if k in GENERATION_FIELDS}
    recorded = work / "generation.json"
    if recorded.exists() and json.loads(recorded.read_text()) != json.loads(json.dumps(generation)):
        print("generation settings changed: the target's outputs are generated afresh")
        from_stage = "generate"
    for stage in STAGES[STAGES.index(from_stage):] if from_stage else ():
        for path in (work.glob("shard_*") if stage == "generate"
                     else (work / name for name in STAGE_FILES[stage])):
            path.unlink(missing_ok=True)
    recorded.write_text(json.dumps(generation, indent=1))
    started = time.time()
    log: dict = {"config": asdict(cfg), "work_dir": "$SPECCASCADE_CACHE/build",
                 "threads": cfg.threads}
    stage_generate(cfg, work, log)
    records = load_shards(work)
    log["train_prompts"] = len(records)
    log["train_generated_tokens"] = sum(len(r["output"]) for r in records)
    log["train_prompt_kinds"] = {k: sum(r["kind"] == k for r in records)
                                 for k in ("chat", "code", "prose")}
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_tokenizer

    ranking = stage_rank(work, records, load_tokenizer(ensure_target()), log)
    layers = stage_shape(cfg, work, ranking, log)
    model, tok = stage_draft(cfg, work, layers, ranking, log)
    head_size = stage_head(cfg, work, model, ranking, log)
    save_draft(model, tok, ranking, head_size, out_dir)
    log["draft_params_m"] = sum(p.numel() for p in model.model.layers.parameters()) / 1e6
    log["draft_size_bytes"] = (out_dir / "draft" / "model.safetensors").stat().st_size
    log["minutes_this_run"] = (time.time() - started) / 60
    (out_dir / "build_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"built {out_dir / 'draft'} in {(time.time() - started) / 60:.1f} min")
    return out_dir


def cli_build(args) -> None:
    """`speccascade models build` (the CLI's arguments: out, quick, from_stage)."""
    cfg = quick_config() if args.quick else BuildConfig()
    cfg = replace(cfg, threads=args.threads, **({"steps": args.steps} if args.steps else {}))
    work = Path(args.out) / "work" if args.quick else None
    build(args.out, cfg, from_stage=args.from_stage, work=work)
