"""Each ablation variant differs from the reference exactly as its name says, at the budget it should keep."""

import pytest

from engram.accounting import engram_counts
from engram.experiments.ablation import ablation_variants, allocate_dense, match_table_budget
from engram.experiments.presets import cpu_optim, engram_template, moe_backbone
from engram.model import count_params


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(a, b):
    fa, fb = _flat(a), _flat(b)
    return {k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


@pytest.fixture(scope="module")
def variants():
    backbone = moe_backbone(hc_mult=2, n_routed_experts=8)
    return backbone, {v.name: v for v in ablation_variants(backbone, engram_template(rows=2000), cpu_optim())}


def _table(cfg):
    return engram_counts(cfg.engram, cfg.hidden_size).table_params


EXACT_CHANGES = {
    "no-gating": {"engram.gating"},
    "no-compress": {"engram.compress_tokens"},
    "no-conv": {"engram.short_conv"},
    "no-multi-branch": {"engram.multi_branch"},
    "4-grams": {"engram.max_ngram_size", "engram.engram_vocab_size"},
    "one-row-table": {"engram.engram_vocab_size"},
    "table-lr-1x": set(),
}


@pytest.mark.parametrize("name", sorted(EXACT_CHANGES))
def test_variant_changes_exactly_the_named_fields(variants, name):
    _, vs = variants
    ref, v = vs["reference"], vs[name]
    assert _diff(ref.model.to_dict(), v.model.to_dict()) == EXACT_CHANGES[name]
    assert _diff(ref.optim.to_dict(), v.optim.to_dict()) == ({"table_lr_mult"} if name == "table-lr-1x" else set())


def test_table_lr_variant_is_1x_against_a_5x_reference(variants):
    _, vs = variants
    assert vs["reference"].optim.table_lr_mult == 5.0 and vs["table-lr-1x"].optim.table_lr_mult == 1.0


@pytest.mark.parametrize(
    "name",
    [
        "no-gating",
        "no-compress",
        "no-conv",
        "no-multi-branch",
        "4-grams",
        "block-0",
        "block-1",
        "block-2",
        "block-3",
        "table-lr-1x",
    ],
)
def test_variants_keep_the_reference_table_budget(variants, name):
    _, vs = variants
    ref = _table(vs["reference"].model)
    assert _table(vs[name].model) == pytest.approx(ref, rel=2e-3)


def test_placement_variants_are_one_module_of_twice_the_width(variants):
    backbone, vs = variants
    ref = vs["reference"].model.engram
    for b in range(backbone.num_layers):
        e = vs[f"block-{b}"].model.engram
        assert e.layer_ids == [b]
        assert e.n_embed_per_ngram == 2 * ref.n_embed_per_ngram
        changed = _diff(ref.to_dict(), e.to_dict())
        assert changed <= {"layer_ids", "n_embed_per_ngram", "engram_vocab_size"}


def test_four_grams_spread_the_same_budget_over_three_orders(variants):
    _, vs = variants
    e = vs["4-grams"].model.engram
    assert e.max_ngram_size == 4 and len(e.engram_vocab_size) == 3
    assert e.engram_vocab_size[0] < vs["reference"].model.engram.engram_vocab_size[0]


def test_one_row_table_is_a_capacity_control_with_the_same_dense_part(variants):
    _, vs = variants
    ref, one = vs["reference"].model, vs["one-row-table"].model
    assert one.engram.engram_vocab_size == [2, 2]
    assert _table(one) < 0.02 * _table(ref)
    dense = lambda c: count_params(c).engram - _table(c)  # noqa: E731
    assert dense(one) == dense(ref)


def test_moe_and_dense_baselines_have_no_engram(variants):
    backbone, vs = variants
    assert vs["moe"].model == backbone
    assert vs["dense"].model.family == "dense" and vs["dense"].model.engram is None
    assert _diff(backbone.to_dict(), vs["dense"].model.to_dict()) == {"family"}


def test_dense_engram_iso_matches_the_dense_total_and_extra_adds_the_reference(variants):
    _, vs = variants
    dense = count_params(vs["dense"].model)
    iso = vs["dense+engram-iso"].model
    c = count_params(iso)
    assert c.total == pytest.approx(dense.total, rel=5e-3)
    assert c.engram > 0 and c.routed_expert_params == 0  # every block dense: no MoE layer left
    assert iso.intermediate_size < vs["dense"].model.intermediate_size
    extra = vs["dense+engram-extra"].model
    assert extra.engram == vs["reference"].model.engram
    added = count_params(vs["reference"].model).engram
    assert count_params(extra).total == pytest.approx(dense.total + added, rel=1e-6)


def test_allocate_dense_refuses_a_share_too_small_for_the_projections():
    dense = moe_backbone().replace(family="dense")
    with pytest.raises(ValueError, match="projection"):
        allocate_dense(dense, 0.01, engram_template())


def test_match_table_budget_lands_within_one_prime_step_per_head():
    e = engram_template()
    target = 123_456
    got = engram_counts(match_table_budget(e, target), 64).table_params
    heads = len(e.layer_ids) * e.num_heads_total
    assert abs(got - target) <= heads * e.head_dim * 40  # prime gaps below 2,000 are < 40


def test_the_multi_branch_ablation_needs_mhc():
    with pytest.raises(ValueError, match="hc_mult"):
        ablation_variants(moe_backbone(hc_mult=1), engram_template(), cpu_optim())
