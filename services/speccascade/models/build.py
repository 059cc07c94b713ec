"""Build the embedded default draft/target pair offline, deterministically.

Recipe (REFERENCE.md §8): a byte-level BPE tokenizer trained on the stdlib training split; a
Llama-shaped target given most of the compute, in two cosine cycles (a warm restart from the first
cycle's checkpoint widens the quality gap over the draft); a much smaller draft distilled from the
target's logits (forward KL), which is what raises greedy agreement. bf16 autocast where the CPU
has native bf16, fp32 elsewhere.

Stages, each resumable with `--from-stage`: tokenizer → target (cycle 1, kept in
`target_stage1/`, not committed) → target_continue (cycle 2) → draft.
Both are saved with `save_pretrained` (safetensors, bf16) beside a copy of the tokenizer, so each is
an ordinary Hugging Face checkpoint that `from_pretrained` loads from a local path.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from speccascade.models.corpus import read_text, split_files, stdlib_root

EOS = "<|endoftext|>"
from speccascade.models.loader import DEFAULT_PAIR_DIR


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    vocab_size: int = 8192
    seq_len: int = 256
    # The context the pair declares: the window it is trained on. Declaring more would promise
    # positions it never saw (measured: greedy α 0.54 on 400-token prompts, 0.76 within 256).
    max_position_embeddings: int = 256
    threads: int = 2
    target: Shape = field(default_factory=lambda: Shape(384, 1024, 8, 6))  # 17 M params
    draft: Shape = field(default_factory=lambda: Shape(192, 512, 3, 3))  # 3.4 M params
    target_steps: int = 1200
    target_batch: int = 16
    target_lr: float = 2e-3
    target_continue_steps: int = 1000  # second cosine cycle, from the first cycle's checkpoint
    target_continue_lr: float = 1e-3
    draft_steps: int = 1200
    draft_batch: int = 16
    draft_lr: float = 3e-3
    # Distil from the target's distribution at this temperature: < 1 sharpens it, spending the
    # draft's small capacity on the target's likeliest tokens, which is what greedy acceptance needs.
    draft_teacher_temperature: float = 0.7
    warmup_steps: int = 40
    max_train_files: int | None = None  # smoke builds only: the first N training files


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast is ~3× faster than fp32 on CPUs with AVX-512 BF16 or AMX, and several times
    slower where it is emulated (measured: 8 s vs 1 s for a target forward on a CPU without it)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (read_text(f) for f in files), vocab_size=vocab_size, min_frequency=2,
        special_tokens=[EOS], show_progress=True,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  pad_token=EOS, unk_token=EOS)
    tok.save_pretrained(out_dir)
    return tok


def encode_corpus(tok, files: list[Path]) -> torch.Tensor:
    """All files joined by EOS into one token stream.  # [num_tokens]"""
    ids: list[int] = []
    texts = [read_text(f) for f in files]
    for enc in tqdm(tok(texts, add_special_tokens=False)["input_ids"], desc="encode", unit="file"):
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def make_model(shape: Shape, cfg: BuildConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def batches(stream: torch.Tensor, batch: int, seq_len: int, steps: int, gen: torch.Generator):
    """Random windows of seq_len + 1 tokens, drawn with a seeded generator.  # [batch, seq_len + 1]"""
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        yield torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()]).long()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream, cfg: BuildConfig, steps: int, batch: int, lr: float, desc: str,
          teacher=None, teacher_temperature: float = 1.0, data_seed: int = 1) -> list[float]:
    """Next-token CE, or forward KL(p_teacher || q_student) when a teacher is given."""
    gen = torch.Generator().manual_seed(cfg.seed + data_seed)
    use_bf16 = cpu_has_fast_bf16()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses: list[float] = []
    bar = tqdm(batches(stream, batch, cfg.seq_len, steps, gen), total=steps, desc=desc, unit="step")
    for step, window in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup_steps)
        inputs, labels = window[:, :-1], window[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(inputs).logits.float()  # [batch, seq_len, vocab]
            if teacher is None:
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
            else:
                with torch.no_grad():
                    p_log = F.log_softmax(teacher(inputs).logits.float() / teacher_temperature,
                                          dim=-1)
                q_log = F.log_softmax(logits, dim=-1)
                loss = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean") / cfg.seq_len
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def save(model, tok, out_dir: Path) -> None:
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    model.float()


def load(path: Path):
    """A checkpoint saved by `save`, back in fp32: every stage reads the saved bf16 weights, so a
    resumed build trains exactly what a full build would."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


STAGES = ("tokenizer", "target", "target_continue", "draft")


def build(out_dir: Path = DEFAULT_PAIR_DIR, cfg: BuildConfig = BuildConfig(),
          from_stage: str = "tokenizer") -> Path:
    """Train the tokenizer, the target (two cycles) and the distilled draft into out_dir.

    from_stage: skip the stages before it and read their outputs from out_dir instead.
    """
    if from_stage not in STAGES:
        raise ValueError(f"from_stage must be one of {STAGES}, got {from_stage!r}")
    todo = set(STAGES[STAGES.index(from_stage):])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.time()
    out_dir = Path(out_dir)
    train_files, held_out = split_files()
    train_files = train_files[: cfg.max_train_files]
    print(f"corpus: {len(train_files)} training files, {len(held_out)} held out")
    log_path = out_dir / "build_log.json"
    log = {} if from_stage == "tokenizer" else json.loads(log_path.read_text())
    log["config"] = asdict(cfg)

    if "tokenizer" in todo:
        tok = train_tokenizer(train_files, cfg.vocab_size, out_dir / "tokenizer")
    else:
        from transformers import AutoTokenizer

        # The tokenizer stage's own folder is not committed; every checkpoint carries a copy.
        saved = out_dir / "tokenizer"
        tok = AutoTokenizer.from_pretrained(saved if saved.exists() else out_dir / "target",
                                            local_files_only=True)
    stream = encode_corpus(tok, train_files)
    print(f"training stream: {len(stream):,} tokens")
    log["train_tokens"] = len(stream)

    if "target" in todo:
        stage_started = time.time()
        target = make_model(cfg.target, cfg, tok)
        losses = train(target, stream, cfg, cfg.target_steps, cfg.target_batch, cfg.target_lr,
                       "target (cycle 1)", data_seed=1)
        save(target, tok, out_dir / "target_stage1")
        log["target_cycle1_minutes"] = (time.time() - stage_started) / 60
        log["target_cycle1_final_loss"] = sum(losses[-20:]) / 20
        log_path.write_text(json.dumps(log, indent=1))  # each stage's record survives a later stop

    if "target_continue" in todo:
        stage_started = time.time()
        target = load(out_dir / "target_stage1")
        losses = train(target, stream, cfg, cfg.target_continue_steps, cfg.target_batch,
                       cfg.target_continue_lr, "target (cycle 2)", data_seed=3)
        save(target, tok, out_dir / "target")
        log["target_cycle2_minutes"] = (time.time() - stage_started) / 60
        log["target_final_loss"] = sum(losses[-20:]) / 20
        log_path.write_text(json.dumps(log, indent=1))

    stage_started = time.time()
    target = load(out_dir / "target")
    target.eval()
    torch.manual_seed(cfg.seed + 1)
    draft = make_model(cfg.draft, cfg, tok)
    draft_losses = train(draft, stream, cfg, cfg.draft_steps, cfg.draft_batch, cfg.draft_lr,
                         "draft (distilled)", teacher=target,
                         teacher_temperature=cfg.draft_teacher_temperature, data_seed=2)
    save(draft, tok, out_dir / "draft")

    log.update({"draft_minutes": (time.time() - stage_started) / 60,
                "bf16_autocast": cpu_has_fast_bf16(),
                "draft_final_kl": sum(draft_losses[-20:]) / 20,
                "held_out_files": [f.relative_to(stdlib_root()).as_posix() for f in held_out]})
    log_path.write_text(json.dumps(log, indent=1))
    print(f"built {out_dir} in {(time.time() - started) / 60:.1f} min")
    return out_dir
