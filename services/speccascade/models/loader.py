"""Load Hugging Face causal-LM checkpoints from local paths only (never a download)."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DEFAULT_PAIR_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_pair"


class IncompatiblePairError(ValueError):
    """Draft and target do not share a tokenizer/vocabulary: speculative decoding is undefined."""


def default_pair_paths() -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the embedded default pair (see `speccascade models build`)."""
    return DEFAULT_PAIR_DIR / "target", DEFAULT_PAIR_DIR / "draft"


def _local_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local Hugging Face checkpoint (no config.json); "
                                "models are only loaded from local paths")
    return path


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(_local_dir(path), local_files_only=True,
                                                 dtype=DTYPES[dtype])
    return model.to(device).eval()


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


def load_pair(target_path, draft_path, dtype: str = "float32", device: str = "cpu"):
    """(target_model, draft_model, tokenizer), after checking that they are compatible."""
    check_pair(target_path, draft_path)
    return (load_model(target_path, dtype, device), load_model(draft_path, dtype, device),
            load_tokenizer(target_path))
