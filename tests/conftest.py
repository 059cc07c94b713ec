"""Shared fixtures: tiny random Hugging Face checkpoints saved to disk, loaded like real ones."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

TINY_TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200))


# A minimal chat template (tiny_pair's tokenizer has it; the HTTP chat tests use it).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tokenizer(vocab_size: int = 300, chat_template: str | None = None):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TINY_TEXT], vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos,
                                        bos_token=eos, pad_token=eos, unk_token=eos)
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_model(out: Path, tokenizer, *, seed: int, hidden: int = 32, layers: int = 2,
                    dtype=torch.float64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    # A larger init than the default 0.02 gives peaked, well-separated logits: greedy never
    # hinges on a near-tie, so batched and one-at-a-time forwards pick the same token.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(target_dir, draft_dir): different random weights, one shared tokenizer."""
    root = tmp_path_factory.mktemp("tiny_pair")
    tok = make_tokenizer(chat_template=TINY_CHAT_TEMPLATE)
    return (save_tiny_model(root / "target", tok, seed=1, hidden=48, layers=3),
            save_tiny_model(root / "draft", tok, seed=2, hidden=32, layers=1))


@pytest.fixture(scope="session")
def tiny_twins(tmp_path_factory) -> tuple[Path, Path]:
    """(target_dir, draft_dir) with identical weights: every greedy draft must be accepted."""
    root = tmp_path_factory.mktemp("tiny_twins")
    tok = make_tokenizer()
    return (save_tiny_model(root / "target", tok, seed=1, hidden=48, layers=3),
            save_tiny_model(root / "draft", tok, seed=1, hidden=48, layers=3))


# -- a real local service (Ray Serve + gRPC on loopback) for the e2e test modules --------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_service_config(tiny_pair, **overrides):
    """A ServiceConfig for conftest's tiny pair: two drafter and two verifier replicas, free ports.
    float64 keeps batched and one-at-a-time forwards bit-identical on these random weights."""
    from speccascade.serve.config import ServiceConfig

    target, draft = tiny_pair
    replica = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25},
               "health_check_period_s": 1.0}
    return ServiceConfig.load({
        "target": {"path": str(target), "dtype": "float64"},
        "draft": {"path": str(draft), "dtype": "float64"},
        "grpc_port": free_port(), "http_port": free_port(),
        "drafter": replica, "verifier": replica,
        "router": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 512},
        **overrides})


@contextlib.contextmanager
def running_service(config, *, num_cpus: float = 4, timeout: float = 60):
    """Start the service, yield a SpecCascadeClient to it, always tear Ray down."""
    from speccascade.client import SpecCascadeClient
    from speccascade.serve import launch

    try:
        client = SpecCascadeClient(launch.start(config, num_cpus=num_cpus), timeout=timeout)
        try:
            yield client
        finally:
            client.close()
    finally:
        launch.stop()
