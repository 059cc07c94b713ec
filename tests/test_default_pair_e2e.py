"""The real default pair (SmolLM2-135M-Instruct and its distilled draft) through both doors, as
`make run` serves it: no model paths given, so the service resolves the pair itself, the draft's
shared embedding and reduced-vocabulary head included. fp32, so greedy speculative output must
equal target-only output token for token.

Kept short (a few dozen tokens per call) because each target step of the real model costs tens of
milliseconds here; the tiny pairs carry the exhaustive end-to-end suites.
"""
from __future__ import annotations

import pytest
from conftest import free_port, running_service

from speccascade.models import fetch

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not fetch.is_valid(fetch.target_dir()), reason="default target not installed (make install)")]

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CODE = "def fibonacci(n):"
NEW = 24


@pytest.fixture(scope="module")
def config():
    from speccascade.serve.config import ServiceConfig

    replica = {"ray_actor_options": {"num_cpus": 0.25}}
    return ServiceConfig.load({
        "target": {"dtype": "float32"}, "draft": {"dtype": "float32"},
        "grpc_port": free_port(), "http_port": free_port(),
        "kv_cache_tokens": 4 * 2048,  # four slots of the default context, not 64
        "drafter": replica, "verifier": replica,
        "router": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 512}})


@pytest.fixture(scope="module")
def service(config):
    with running_service(config, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer():
    from speccascade.models.loader import load_tokenizer

    return load_tokenizer(fetch.target_dir())


def test_the_default_pair_is_served(service, config):
    health = service.health()
    assert health.serving, health.detail
    assert health.vocab_size == 49152
    assert health.max_seq_len >= 2048  # the model context the KV budget allows by default


def test_greedy_speculative_equals_target_over_grpc(service, tokenizer):
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    for prompt in (CODE, chat_ids):
        target = service.generate(prompt, max_new_tokens=NEW, mode="target")
        for fields in ({"mode": "speculative", "num_draft_tokens": 4}, {"mode": "speculative"},
                       {"mode": "cascade", "deferral_rule": "CHOW", "deferral_threshold": 0.0}):
            reply = service.generate(prompt, max_new_tokens=NEW, **fields)
            assert list(reply.token_ids) == list(target.token_ids), (prompt, fields)
            assert reply.stats.drafted > 0
    assert "Paris" in service.generate(chat_ids, max_new_tokens=NEW, mode="target").text


def test_openai_chat_and_completion_over_http(service, config):
    from openai import OpenAI

    with OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="unused",
                max_retries=0, timeout=300) as client:
        reply = client.chat.completions.create(model="speccascade", messages=CHAT, max_tokens=NEW,
                                               temperature=0, extra_body={"mode": "speculative"})
        assert "Paris" in reply.choices[0].message.content
        reference = service.generate(CODE, max_new_tokens=NEW, mode="target")
        completion = client.completions.create(model="speccascade", prompt=CODE, max_tokens=NEW,
                                               temperature=0, extra_body={"mode": "speculative"})
        assert completion.choices[0].text == reference.text
