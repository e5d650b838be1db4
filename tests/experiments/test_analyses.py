"""LogitLens, the Engram-off switch and the fact/context token split."""

import numpy as np
import pytest
import torch

from engram import CompressedTokenizer, EngramConfig
from engram.experiments.logit_lens import layer_kl, logit_lens
from engram.experiments.sensitivity import (
    BigramStats,
    SplitRule,
    engram_disabled,
    engram_off_eval,
    split_eval,
    split_masks,
)
from engram.experiments.token_classes import identifier_ends
from engram.model import EngramLM, ModelConfig

V = 97


def _model(hc_mult=1, multi_branch=True, family="engram", seed=0):
    torch.manual_seed(seed)
    engram = (
        EngramConfig(
            engram_vocab_size=[53, 59],
            n_embed_per_ngram=8,
            n_head_per_ngram=2,
            layer_ids=[0, 2],
            pad_id=0,
            multi_branch=multi_branch,
        )
        if family == "engram"
        else None
    )
    cfg = ModelConfig(
        family=family,
        vocab_size=V,
        hidden_size=16,
        num_layers=3,
        num_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=32,
        max_seq_len=32,
        hc_mult=hc_mult,
        engram=engram,
    )
    model = EngramLM(cfg, CompressedTokenizer.identity(V) if family == "engram" else None)
    with torch.no_grad():  # trained-looking conv weights, so the ShortConv path carries signal too
        for e in model.engram_layers.values():
            if e.short_conv is not None:
                e.short_conv.conv.weight.normal_(std=0.3)
    return model.eval()


def _ids(b=3, t=24, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_logit_lens_kl_is_zero_at_the_last_block_and_positive_before():
    model = _model()
    kl = layer_kl(model, _ids())
    assert kl[-1].item() == pytest.approx(0.0, abs=1e-4)
    assert (kl[:-1] > 1e-3).all()


def test_logit_lens_averages_over_windows_of_a_token_array():
    model = _model(family="moe")
    curve = logit_lens(model, np.arange(200) % V, batch_size=2, seq_len=16, max_batches=3)
    assert len(curve) == 3 and curve[-1] == pytest.approx(0.0, abs=1e-6) and min(curve[:-1]) > 0


@pytest.mark.parametrize("hc_mult,multi_branch", [(1, True), (2, True), (2, False)])
def test_engram_off_equals_a_model_whose_engram_output_is_zero(hc_mult, multi_branch):
    model = _model(hc_mult, multi_branch)
    ids = _ids()
    with torch.no_grad():
        on = model(ids).logits
        with engram_disabled(model):
            off = model(ids).logits
        ref = _model(hc_mult, multi_branch)  # same weights (same seed), value projection zeroed:
        for e in ref.engram_layers.values():  # v = 0 -> gated value 0 -> conv(RMSNorm(0)) = 0 -> Y = 0
            e.value_proj.weight.zero_()
            e.value_proj.bias.zero_()
        zeroed = ref(ids).logits
    assert not torch.allclose(on, off, atol=1e-4)  # the switch changes the output ...
    torch.testing.assert_close(off, zeroed, atol=1e-5, rtol=1e-5)  # ... exactly as a zero Engram output would
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, on)  # and is gone after the block


def test_engram_off_refuses_a_model_without_engram():
    with pytest.raises(ValueError, match="no Engram"):
        with engram_disabled(_model(family="moe")):
            pass


def test_bigram_stats_count_continuations():
    toks = np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, 5, 6])
    s = BigramStats.from_tokens(toks, 10)
    count, top, top_count = s.lookup(np.array([1, 2, 9]), np.array([2, 3, 9]))
    assert count.tolist() == [3, 2, 0]  # (1,2) followed by 3, 3, 4; (2,3) by 1, 1; (9,9) unseen
    assert top.tolist() == [3, 1, -1] and top_count.tolist() == [2, 2, 0]
    assert s.trigram_count(np.array([1, 1]), np.array([2, 2]), np.array([4, 5])).tolist() == [1, 0]


def test_split_marks_local_facts_and_in_context_copies_disjointly():
    # vocabulary: 1 "self", 2 ".", 3 "x", 7 " foo" (an identifier), 8 "=", 9 "(" ; training says "self" -> "."
    train = np.array([1, 2, 3, 8, 1, 2, 3, 8, 1, 2, 3, 8, 1, 2, 3, 8, 1, 2, 3, 8, 1, 2, 9] * 3)
    stats = BigramStats.from_tokens(train, 10)
    is_word = np.zeros(10, dtype=bool)
    is_word[[1, 3, 7]] = True
    # window: 7 8 3 8 1 2 3 8 9 9 9 9 7 ; the "2" after (8, 1) is a fact, the final 7 copies the first token
    seq = np.array([[7, 8, 3, 8, 1, 2, 3, 8, 9, 9, 9, 9, 7, 0]])
    x, y = seq[:, :-1], seq[:, 1:]
    fact, context = split_masks(x, y, stats, is_word, SplitRule(min_count=3, min_prob=0.5))
    assert fact[0, 4] and y[0, 4] == 2  # x = (8, 1) -> "."
    assert context[0, 11] and y[0, 11] == 7  # copies the identifier 7 from position 0
    assert not (fact & context).any()
    assert not fact[:, 0].any() and not context[:, 0].any()


def test_engram_off_eval_reports_both_splits():
    model = _model()
    tokens = np.concatenate([np.arange(40) % V] * 6)
    stats = BigramStats.from_tokens(tokens, V)
    is_word = np.ones(V, dtype=bool)
    r = engram_off_eval(model, tokens, stats, is_word, batch_size=2, seq_len=16, max_batches=2)
    assert set(r) == {"fact", "context", "all"}
    assert r["all"]["n"] == 2 * 2 * 16
    assert r["fact"]["n"] > 0 and 0 <= r["fact"]["acc_off"] <= 1
    assert r["all"]["loss_off"] != pytest.approx(r["all"]["loss_on"])
    on = split_eval(model, tokens, stats, is_word, batch_size=2, seq_len=16, max_batches=2)
    assert on["fact"]["acc"] == r["fact"]["acc_on"] and on["all"]["loss"] == pytest.approx(r["all"]["loss_on"])
    base = split_eval(_model(family="moe"), tokens, stats, is_word, batch_size=2, seq_len=16, max_batches=2)
    assert base["fact"]["n"] == r["fact"]["n"]  # a model without Engram is scored on the same tokens


def test_identifier_ends_mark_the_last_piece_of_multi_piece_words():
    is_word = np.array([False, True, True, True, False])
    leading = np.array([False, True, False, False, False])
    # 1 = " foo" (new word), 2/3 = continuations, 4 = "(" ; sequence: " foo" "bar" "baz" "(" " foo" "("
    ids = np.array([[1, 2, 3, 4, 1, 4]])
    assert identifier_ends(ids, is_word, leading).tolist() == [[False, False, True, False, False, False]]
