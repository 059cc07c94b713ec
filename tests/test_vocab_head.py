"""The reduced-vocabulary draft head (models.vocab_head, FR-Spec): logits equal the full head's on
the kept tokens and q is exactly zero elsewhere; the frequency ranking is deterministic; a draft
checkpoint that ships a ranking loads with the cut head, and speculative decoding with it stays
exact (greedy token for token, sampled in distribution)."""
from __future__ import annotations

import json

import torch
from test_sampling import ROUNDS, position_checks, random_distribution, run_rounds

from speccascade.engine.engine import Engine
from speccascade.engine.loop import Mode
from speccascade.models.loader import load_model
from speccascade.models.vocab_head import (FILL, HEAD_IDS_FILE, ReducedVocabHead,
                                           frequency_ranking, reduce_head)


def test_head_keeps_the_full_logits_on_its_tokens_and_zero_mass_elsewhere():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(50, 8, generator=gen)  # [V, d]
    ids = torch.tensor([7, 3, 41, 0, 22])
    head = ReducedVocabHead(full[ids], ids, 50)
    hidden = torch.randn(2, 3, 8, generator=gen)  # [B, T, d]
    logits = head(hidden)  # [B, T, V]
    assert logits.shape == (2, 3, 50)
    torch.testing.assert_close(logits[..., ids], hidden @ full[ids].T)
    outside = torch.ones(50, dtype=torch.bool)
    outside[ids] = False
    assert (logits[..., outside] == FILL).all()
    q = (logits / 0.7).softmax(-1)
    assert (q[..., outside] == 0).all()
    assert torch.isfinite((logits / 0.7).log_softmax(-1)).all()  # entropies and KLs stay finite


def test_frequency_ranking_counts_breaks_ties_by_id_and_leads_with_stop_tokens():
    ranking = frequency_ranking([[5, 5, 5, 2, 2, 9], [2, 9, 9, 1]], vocab_size=12, always=(11,))
    assert ranking[:5] == [11, 2, 5, 9, 1]  # 11 forced first; 2, 5 and 9 tie at 3: by id
    assert sorted(ranking) == list(range(12))  # every token ranked: any prefix is a valid head
    assert ranking[5:] == [0, 3, 4, 6, 7, 8, 10]


def test_sampled_verification_with_a_cut_draft_head_follows_p():
    """q from a cut head (zero on most tokens) still verifies to exactly p (REFERENCE.md §2)."""
    gen = torch.Generator().manual_seed(3)
    gamma, vocab = 2, 12
    p = random_distribution(gamma + 1, vocab, gen).float()  # [γ+1, V]
    # A head whose kept logits are log(0.8 p + 0.2 noise): hidden state j reads row j.
    mix = 0.8 * p[:gamma] + 0.2 * random_distribution(gamma, vocab, gen).float()  # [γ, V]
    ids = torch.tensor([0, 1, 4, 5, 6, 8, 9, 11])
    head = ReducedVocabHead(mix.log().T[ids], ids, vocab)  # weight [N, d = γ]
    q = head(torch.eye(gamma)).softmax(-1)  # [γ, V], zero off the head
    assert (q > 0).sum(-1).max() == len(ids)
    checks = position_checks(run_rounds(p, q, ROUNDS, gen), p)
    assert all(c["ok"] for c in checks), checks


def test_a_draft_with_a_ranking_loads_cut_and_speculates_exactly(tiny_pair, tmp_path):
    import shutil

    target_dir, draft_dir = tiny_pair
    cut = tmp_path / "draft"
    shutil.copytree(draft_dir, cut)
    vocab = json.loads((cut / "config.json").read_text())["vocab_size"]
    ranking = list(range(vocab))[::-1]
    (cut / HEAD_IDS_FILE).write_text(json.dumps(ranking))
    config = json.loads((cut / "config.json").read_text())
    config["draft_head_size"] = vocab // 3
    (cut / "config.json").write_text(json.dumps(config))
    model = load_model(cut, "float64")
    assert isinstance(model.lm_head, ReducedVocabHead)
    assert model.lm_head.token_ids.tolist() == ranking[: vocab // 3]
    full = load_model(draft_dir, "float64")
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(x).logits[..., model.lm_head.token_ids],
                               full(x).logits[..., model.lm_head.token_ids])
    # The card reports a cut head's coverage of held-out tokens, not an unbounded cross-entropy.
    from speccascade.models.evaluate import draft_loss_fields
    from speccascade.models.loader import load_tokenizer

    fields = draft_loss_fields(model, load_tokenizer(cut), max_tokens=2000)
    assert "draft_loss" not in fields and fields["draft_head_size"] == vocab // 3
    assert 0 < fields["draft_head_held_out_coverage"] < 1
    engine = Engine.from_paths(target_dir, cut, dtype="float64")
    prompts = ["def f1(x):", "x = 3 *", "def f17(x):\n    return"]
    for i, prompt in enumerate(prompts):
        [target] = engine.generate([engine.request(prompt, f"t{i}", mode=Mode.TARGET,
                                                   max_new_tokens=32)])
        [spec] = engine.generate([engine.request(prompt, f"s{i}", mode=Mode.SPECULATIVE,
                                                 max_new_tokens=32, num_draft_tokens=3)])
        assert spec.token_ids == target.token_ids and spec.stats.drafted > 0


def test_reduce_head_unties_and_keeps_the_input_embedding(tiny_pair):
    model = load_model(tiny_pair[1], "float64")
    embedding = model.get_input_embeddings().weight.clone()
    reduce_head(model, [3, 1, 2])
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # every token still read
    assert model.lm_head.weight.shape == (3, embedding.shape[1])
