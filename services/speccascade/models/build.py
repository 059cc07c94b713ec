"""Build the default pair's DRAFT, distilled from the default TARGET (SmolLM2-135M-Instruct), on a CPU.

    speccascade models build [--out DIR] [--from-stage STAGE] [--quick]

Recipe (DistillSpec; REFERENCE.md §14): sequence-level distillation — the target's own outputs on
many varied training prompts (chat instructions through its chat template, raw code, raw prose;
models.corpus.distill_prompts, held-out prompts never used) — plus token-level distillation on the
target's distribution at every generated position (its top-K log-probabilities at temperature 1,
recorded while generating, so the teacher costs nothing more). Half the prompts are answered
greedily and half sampled at T 0.8, the two ways the service decodes.

The draft is a small Llama with the target's tokenizer (vocabulary 49 152, tied embeddings). Its
shape is picked by measurement (stage `shape`): the largest candidate whose one-token step, timed
through the runner at one thread, is at most `max_cost_ratio` of the target's and whose bf16
weights fit `max_draft_mb`. Its embedding starts as the target's projected on its first principal
directions, so it starts with the target's token geometry instead of noise.

Stages, each resumable (a killed run redoes only unfinished work): `generate` (shards of the
target's outputs in the work folder) → `shape` → `draft` (checkpoints every `checkpoint_every`
steps; a restart continues from the last). Seeds are fixed: the same machine and thread count
give the same draft. The work folder is outside git (`$SPECCASCADE_CACHE/build`); the draft is
written as bf16 safetensors with a copy of the tokenizer to `OUT/draft`, the record to
`OUT/build_log.json`.
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
from speccascade.models.runner import DEFAULT_MAX_SEQ_LEN


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


CANDIDATE_SHAPES = (Shape(192, 512, 4, 3, 1), Shape(192, 512, 6, 3, 1), Shape(256, 704, 4, 4, 2),
                    Shape(256, 704, 6, 4, 2))


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    threads: int = 1
    prompts: int = 896               # training prompts answered by the target (≈ 3.5 min / 128)
    shard_prompts: int = 128         # prompts per saved shard (the unit of resumption)
    gen_batch: int = 32              # sequences decoded together
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    top_k: int = 32                  # teacher log-probabilities kept per generated position
    sample_temperature: float = 0.8  # odd prompts are sampled at this temperature, even ones greedy
    context: int = DEFAULT_MAX_SEQ_LEN  # the draft's max_position_embeddings
    max_cost_ratio: float = 0.10     # c = draft step / target step (goal ≤ 0.12; margin for noise)
    max_draft_mb: float = 30.0
    candidates: tuple = CANDIDATE_SHAPES
    steps: int = 475
    batch: int = 12
    lr: float = 3e-3
    warmup_steps: int = 20
    hard_weight: float = 0.1         # cross-entropy on the target's chosen token, beside the soft KL
    checkpoint_every: int = 25


def quick_config() -> BuildConfig:
    """A smoke build in a few minutes (tests): a handful of prompts and steps."""
    return replace(BuildConfig(), prompts=8, shard_prompts=4, gen_batch=4, max_new_tokens=8,
                   steps=4, batch=2, checkpoint_every=2, warmup_steps=1,
                   candidates=(Shape(64, 128, 1, 1, 1), Shape(64, 128, 2, 1, 1)))


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


# -- stage 2: the draft's shape, by measurement ----------------------------------------------

def make_draft(shape: Shape, target_config, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=target_config.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=64 if shape.hidden_size >= 192
        else shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        rms_norm_eps=target_config.rms_norm_eps, rope_parameters=target_config.rope_parameters,
        bos_token_id=target_config.bos_token_id, eos_token_id=target_config.eos_token_id,
        pad_token_id=target_config.pad_token_id,
    )
    return LlamaForCausalLM(config)


def stage_shape(cfg: BuildConfig, work: Path, log: dict) -> Shape:
    """Time each candidate's one-token step (runner, one thread, 128-token context, median of 5
    interleaved rounds) against the target's, in the dtype `auto` would serve them in."""
    import statistics

    from speccascade.models.evaluate import step_ms
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_model

    path = work / "shape.json"
    if path.exists():
        record = json.loads(path.read_text())
    else:
        target = load_model(ensure_target(), "float32")
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        target = target.to(dtype)
        torch.manual_seed(cfg.seed)
        drafts = [make_draft(s, target.config, 2048).to(dtype).eval() for s in cfg.candidates]
        samples = {"target": [], **{str(i): [] for i in range(len(drafts))}}
        for _ in tqdm(range(5), desc="shape: step costs", unit="round"):
            samples["target"].append(step_ms(target, repeats=10))
            for i, d in enumerate(drafts):
                samples[str(i)].append(step_ms(d, repeats=10))
        target_ms = statistics.median(samples["target"])
        rows = []
        for i, (shape, d) in enumerate(zip(cfg.candidates, drafts)):
            ms = statistics.median(samples[str(i)])
            params = sum(p.numel() for p in d.parameters())
            rows.append({"shape": asdict(shape), "step_ms": ms, "c": ms / target_ms,
                         "params_m": params / 1e6, "bf16_mb": params * 2 / 1e6})
        fits = [r for r in rows if r["c"] <= cfg.max_cost_ratio and r["bf16_mb"] <= cfg.max_draft_mb]
        chosen = max(fits or rows[:1], key=lambda r: r["params_m"])
        record = {"dtype": str(dtype), "target_step_ms": target_ms, "candidates": rows,
                  "chosen": chosen}
        path.write_text(json.dumps(record, indent=1))
    log["shape"] = record
    print(f"draft shape: {record['chosen']}")
    return Shape(**record["chosen"]["shape"])


# -- stage 3: the draft, distilled -----------------------------------------------------------

def pca_embedding(target_embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """The target's token embeddings on their first `dim` principal directions, scaled to the
    target embedding's per-coordinate spread. # [vocab, dim]"""
    e = target_embedding.float()
    centred = e - e.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v: [hidden, hidden]
    projected = centred @ v[:dim].T
    return projected * (e.std() / projected.std())


def _batches(records: list[dict], cfg: BuildConfig, steps: int, start: int):
    """Step s's batch: a seeded permutation per epoch, so a resumed run sees the same batches."""
    per_epoch = max(1, len(records) // cfg.batch)
    for step in range(start, steps):
        epoch, at = divmod(step, per_epoch)
        order = list(range(len(records)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        yield step, [records[i] for i in order[at * cfg.batch: (at + 1) * cfg.batch]]


def distill_loss(model, batch: list[dict], cfg: BuildConfig, pad_id: int):
    """Soft cross-entropy against the teacher's top-K (renormalized) plus hard_weight × CE on the
    token the teacher emitted, on generated positions only (the head runs on those alone)."""
    seqs = [r["prompt"] + r["output"] for r in batch]
    width = max(map(len, seqs)) - 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s) - 1] = torch.tensor(s[:-1])
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, width, d]; pads only trail
    # Position t predicts token t + 1: the output's j-th token is predicted at len(prompt) - 1 + j.
    rows = torch.cat([torch.full((len(r["output"]),), b) for b, r in enumerate(batch)])
    cols = torch.cat([torch.arange(len(r["output"])) + len(r["prompt"]) - 1 for r in batch])
    logq = model.lm_head(hidden[rows, cols]).float().log_softmax(-1)  # [N, vocab]
    topk_ids = torch.cat([r["topk_ids"] for r in batch]).long()  # [N, K]
    p = torch.cat([r["topk_logprobs"].float() for r in batch]).softmax(-1)  # renormalized top-K
    soft = -(p * logq.gather(1, topk_ids)).sum(-1).mean()
    chosen = torch.cat([torch.tensor(r["output"]) for r in batch])
    hard = F.nll_loss(logq, chosen)
    return soft + cfg.hard_weight * hard, soft.item(), hard.item()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_draft(cfg: BuildConfig, work: Path, shape: Shape, out: Path, log: dict) -> None:
    from speccascade.models.fetch import ensure_target
    from speccascade.models.loader import load_tokenizer

    records = load_shards(work)
    if not records:
        raise RuntimeError(f"no generated shards in {work}: run the generate stage")
    target_path = ensure_target()
    from transformers import AutoConfig
    from safetensors.torch import load_file

    tconfig = AutoConfig.from_pretrained(target_path, local_files_only=True)
    tok = load_tokenizer(target_path)
    torch.manual_seed(cfg.seed + 1)
    # The context the draft declares: the service's context is the smaller of the two models'
    # (the target declares 8192; a slot of that many tokens per live sequence is far more KV than
    # a replica should preallocate by default, see models.runner.DEFAULT_MAX_SEQ_LEN).
    model = make_draft(shape, tconfig, min(cfg.context, tconfig.max_position_embeddings))
    embedding = load_file(str(target_path / "model.safetensors"))["model.embed_tokens.weight"]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(pca_embedding(embedding, shape.hidden_size))
    model.tie_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.05)
    ckpt = work / "draft_checkpoint.pt"
    start, history, segments = 0, [], [[0, cfg.steps]]
    if ckpt.exists():
        state = torch.load(ckpt)
        if state["shape"] == asdict(shape) and state["step"] <= cfg.steps:
            model.load_state_dict(state["model"])
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
            loss, soft, hard = distill_loss(model, batch, cfg, tok.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((soft, hard))
        if step % 10 == 0:
            recent = history[-10:]
            bar.set_postfix(soft=f"{sum(s for s, _ in recent) / len(recent):.3f}",
                            hard=f"{sum(h for _, h in recent) / len(recent):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "history": history, "shape": asdict(shape), "steps": cfg.steps,
                        "segments": segments},
                       work / "draft_checkpoint.pt.partial")
            (work / "draft_checkpoint.pt.partial").rename(ckpt)
    model.eval()
    draft_dir = out / "draft"
    model.to(torch.bfloat16).save_pretrained(draft_dir)
    tok.save_pretrained(draft_dir)
    tail = history[-50:]
    log.update({"draft_minutes_this_run": (time.time() - started) / 60, "bf16_autocast": use_bf16,
                "draft_schedule_segments": segments,
                "draft_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "draft_size_bytes": (draft_dir / "model.safetensors").stat().st_size,
                "draft_final_soft_ce": sum(s for s, _ in tail) / len(tail),
                "draft_final_hard_ce": sum(h for _, h in tail) / len(tail),
                "draft_soft_ce_first_50": sum(s for s, _ in history[:50]) / min(50, len(history))})


STAGES = ("generate", "shape", "draft")
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
    redo = STAGES[STAGES.index(from_stage):] if from_stage else ()
    if "generate" in redo:
        for path in work.glob("shard_*"):
            path.unlink()
    if "shape" in redo:
        (work / "shape.json").unlink(missing_ok=True)
    if "draft" in redo:
        (work / "draft_checkpoint.pt").unlink(missing_ok=True)
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
    shape = stage_shape(cfg, work, log)
    stage_draft(cfg, work, shape, out_dir, log)
    log["minutes_this_run"] = (time.time() - started) / 60
    (out_dir / "build_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"built {out_dir / 'draft'} in {(time.time() - started) / 60:.1f} min")
    return out_dir


def cli_build(args) -> None:
    """`speccascade models build` (the CLI's arguments: out, quick, from_stage)."""
    cfg = quick_config() if args.quick else BuildConfig()
    work = Path(args.out) / "work" if args.quick else None
    build(args.out, cfg, from_stage=args.from_stage, work=work)
