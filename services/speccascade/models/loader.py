"""Load Hugging Face causal-LM checkpoints from local paths only (never a download)."""
from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path

import torch

from speccascade.models.vocab_head import head_token_ids, reduce_head

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DEFAULT_PAIR_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_pair"


class IncompatiblePairError(ValueError):
    """Draft and target do not share a tokenizer/vocabulary: speculative decoding is undefined."""


def default_pair_paths() -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the default pair: SmolLM2-135M-Instruct, converted at install
    into the cache folder (models.fetch; the folder may not exist before `make install`), and
    the draft distilled from it, shipped in the assets (`speccascade models build`)."""
    from speccascade.models.fetch import target_dir

    return target_dir(), DEFAULT_PAIR_DIR / "draft"


def _local_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        from speccascade.models.fetch import target_dir

        hint = (" (the default target: `make install` or `python -m speccascade.models.fetch` "
                "fetches and converts it)" if path == target_dir() else "")
        raise FileNotFoundError(f"{path} is not a local Hugging Face checkpoint (no config.json); "
                                f"models are only loaded from local paths{hint}")
    return path


def native_bf16(device: str) -> str | None:
    """Why `device` computes bf16 natively ("cuda", or the CPU flags that say so), else None.
    Without it bf16 is emulated: 8x slower than fp32 on such a CPU (REFERENCE.md §8)."""
    if device.startswith("cuda"):
        return "cuda" if torch.cuda.is_bf16_supported() else None
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return "cpu " + "+".join(found) if found else None


def _forward_ms(model, batch: int = 4, tokens: int = 8, repeats: int = 5) -> float:
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=next(model.parameters()).device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):  # two warm-up forwards
            started = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[2:])


def load_model(path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """A model in eval mode on `device`. dtype "auto": bfloat16 where the device computes it
    natively and, on a CPU, only if a quick forward measured faster than float32 (a tiny draft may
    not gain); float32 elsewhere. The choice is logged and kept in `model.dtype_choice`."""
    from transformers import AutoModelForCausalLM

    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + ['auto']}, got {dtype!r}")
    load = "float32" if dtype == "auto" else dtype
    path = _local_dir(path)
    import json

    from transformers.utils import logging as hf_logging

    shares = "shared_embedding" in json.loads((path / "config.json").read_text())
    verbosity = hf_logging.get_verbosity()
    if shares:  # its embedding is missing from the file by design: attached below, checked
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     dtype=DTYPES[load])
    finally:
        hf_logging.set_verbosity(verbosity)
    attach_shared_embedding(model, path)
    kept = head_token_ids(path)
    if kept is not None:
        reduce_head(model, kept)
    model = model.to(device).eval()
    model.dtype_choice = dtype
    if dtype == "auto":
        native = native_bf16(device)
        if native is None:
            model.dtype_choice = "float32 (auto: no native bf16)"
        elif native == "cuda":
            model = model.to(torch.bfloat16)
            model.dtype_choice = "bfloat16 (auto: cuda)"
        else:
            bf16 = copy.deepcopy(model).to(torch.bfloat16)
            fp32_ms, bf16_ms = _forward_ms(model), _forward_ms(bf16)
            model = bf16 if bf16_ms < fp32_ms else model
            model.dtype_choice = (f"{'bfloat16' if bf16_ms < fp32_ms else 'float32'} (auto: "
                                  f"{native}; bf16 {bf16_ms:.2f} ms vs fp32 {fp32_ms:.2f} ms)")
        log.warning("%s: dtype %s", path, model.dtype_choice)
    return model


def attach_shared_embedding(model, path: Path) -> None:
    """A draft may ship without its input embedding (the default draft: its config's
    `shared_embedding` names the checkpoint in the cache folder whose embedding it reads, as EAGLE
    and Medusa heads do); copy that tensor in, checked by shape and SHA-256."""
    import hashlib

    from safetensors import safe_open

    shared = getattr(model.config, "shared_embedding", None)
    if not shared:
        return
    from speccascade.models.fetch import cache_dir

    source = cache_dir() / shared["checkpoint"]
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"draft {path} reads its embedding from {source}, which is not "
                                "installed (`make install` or `python -m speccascade.models.fetch`)")
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor(shared["tensor"])
    digest = hashlib.sha256(embedding.float().numpy().tobytes()).hexdigest()
    if digest != shared["sha256"]:
        raise IncompatiblePairError(f"{source}'s {shared['tensor']} is not the embedding draft "
                                    f"{path} was trained with (SHA-256 {digest[:12]}…, expected "
                                    f"{shared['sha256'][:12]}…)")
    target = model.get_input_embeddings().weight
    with torch.no_grad():
        target.copy_(embedding.to(target.dtype))
    model.tie_weights()  # a tied head follows the embedding


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_local_dir(path), local_files_only=True)


def check_pair(target_path: str | Path, draft_path: str | Path) -> None:
    """Fail clearly unless both checkpoints use the same vocabulary (tokenizer and logits width)."""
    from transformers import AutoConfig

    target_tok, draft_tok = load_tokenizer(target_path), load_tokenizer(draft_path)
    if target_tok.get_vocab() != draft_tok.get_vocab():
        only_t = len(set(target_tok.get_vocab()) - set(draft_tok.get_vocab()))
        raise IncompatiblePairError(
            f"draft {draft_path} and target {target_path} have different tokenizers "
            f"({len(draft_tok)} vs {len(target_tok)} tokens, {only_t} target tokens missing "
            "from the draft); speculative decoding needs one shared vocabulary")
    t_vocab = AutoConfig.from_pretrained(_local_dir(target_path), local_files_only=True).vocab_size
    d_vocab = AutoConfig.from_pretrained(_local_dir(draft_path), local_files_only=True).vocab_size
    if t_vocab != d_vocab:
        raise IncompatiblePairError(f"target logits have {t_vocab} entries, draft logits "
                                    f"{d_vocab}; the pair must share one vocabulary size")


def load_pair(target_path, draft_path, dtype: str = "auto", device: str = "cpu"):
    """(target_model, draft_model, tokenizer), after checking that they are compatible."""
    check_pair(target_path, draft_path)
    return (load_model(target_path, dtype, device), load_model(draft_path, dtype, device),
            load_tokenizer(target_path))
