"""Pruning: GPS (eq. 4), L1 pools against torch.nn.utils.prune, masks under Adam, importance score (eq. 6)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from conftest import LANGUAGES, make_batch, make_tiny_model, randomize_lora
from lslo.errors import LsloError
from lslo.model import LSLoSpec, inject_lslo
from lslo.pruning import (gps_ratio, lora_matrices, prune, pruning_ratio, reapply_masks, subspace_scores,
                          validate_gps)
from lslo.ranks import GPS_POOLS, gps_scope

RANKS = {"en": 2, "fr": 2, "de": 3, "oc": 8, "wo": 8}


def lslo_model(seed=0, index_plan=None, **spec):
    plan = index_plan or {"enc": ["src", "tgt"], "dec": ["tgt", "src"]}
    model = inject_lslo(make_tiny_model(seed), LSLoSpec(languages=LANGUAGES, ranks=RANKS, index_plan=plan, **spec))
    randomize_lora(model, seed=seed + 1)  # B is zero at init; pruning needs distinct magnitudes
    return model


def mask_of(item) -> torch.Tensor:
    return item.mask().bool()


def reference_container(tensor):
    """A module holding a copy of `tensor` as its `weight`, for torch's own pruning functions."""
    module = nn.Module()
    module.weight = nn.Parameter(tensor.detach().clone())
    return module


# --------------------------------------------------------------------------- GPS


def test_gps_ratio_equals_eq4_every_epoch():
    target, start, duration = Fraction(9, 10), 2, 8
    for epoch in range(1, 16):
        if epoch <= start:
            expected = Fraction(0)
        elif epoch <= start + duration:
            remaining = 1 - Fraction(epoch - start, duration)
            expected = target - target * remaining * remaining * remaining
        else:
            expected = target
        assert gps_ratio(epoch, 0.9, start, duration) == pytest.approx(float(expected), abs=1e-12), epoch
    assert gps_ratio(3, 0.9, 2, 8) == pytest.approx(0.9 * 169 / 512)  # 1 - (7/8)^3 = 169/512
    assert gps_ratio(10, 0.9, 2, 8) == pytest.approx(0.9)


def test_gps_validation():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(LsloError, match=str(bad)):
            gps_ratio(3, bad, 2, 8)
    with pytest.raises(LsloError, match="start"):
        gps_ratio(3, 0.9, -1, 8)
    with pytest.raises(LsloError, match="duration"):
        gps_ratio(3, 0.9, 2, 0)
    with pytest.raises(LsloError, match="1-based"):
        gps_ratio(0, 0.9, 2, 8)
    validate_gps(0.9, 2, 8, 10)
    with pytest.raises(LsloError, match="exceeds"):
        validate_gps(0.9, 2, 8, 9)


# --------------------------------------------------------------------------- pools against torch's pruning


def test_matrix_scope_equals_l1_unstructured():
    model = lslo_model()
    before = {(i.site, i.index, i.language, i.matrix): i.weight.detach().clone() for i in lora_matrices(model)}
    prune(model, 0.7, ["en", "oc"], scope="matrix")
    for item in lora_matrices(model):
        key = (item.site, item.index, item.language, item.matrix)
        if item.language not in ("en", "oc"):
            assert item.language not in getattr(item.bank, f"{item.matrix}_mask")
            assert torch.equal(item.weight, before[key])
            continue
        reference = reference_container(before[key])
        torch_prune.l1_unstructured(reference, "weight", amount=0.7)
        assert torch.equal(mask_of(item), reference.weight_mask.bool()), key
        assert torch.equal(item.weight.detach(), reference.weight.detach())  # raw entries zeroed too


@pytest.mark.parametrize("fc_lora", ["slice", "full"])
@pytest.mark.parametrize("scope", ["layer", "language"])
def test_global_scopes_equal_global_unstructured(scope, fc_lora):
    model = lslo_model(seed=3, fc_lora=fc_lora)
    before = {id(i.weight): i.weight.detach().clone() for i in lora_matrices(model)}
    pools = prune(model, 0.6, LANGUAGES, scope=scope)
    assert len(pools) == (4 if scope == "layer" else len(LANGUAGES))
    for key, items in pools.items():
        assert all(item.matrix == "B" for item in items)  # §4.2: B matrices only
        if scope == "layer":
            assert {(i.side, i.layer) for i in items} == {key} and {i.language for i in items} == set(LANGUAGES)
        references = [reference_container(before[id(item.weight)]) for item in items]
        torch_prune.global_unstructured([(r, "weight") for r in references],
                                        pruning_method=torch_prune.L1Unstructured, amount=0.6)
        for item, reference in zip(items, references):
            assert torch.equal(mask_of(item), reference.weight_mask.bool()), (key, item.site, item.language)
    for item in lora_matrices(model, matrices=("A",)):
        assert item.language not in item.bank.A_mask


def tie_at(model, languages, value=0.25, fraction=0.4, seed=0):
    """Give a random `fraction` of the languages' LoRA entries the magnitude `value` (random signs): a block of
    equal |w| wide enough to straddle a pool's threshold, so the tie-break is what decides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for item in lora_matrices(model, languages):
            chosen = torch.rand(item.weight.shape, generator=g) < fraction
            signs = torch.where(torch.rand(item.weight.shape, generator=g) < 0.5, -1.0, 1.0)
            item.weight[chosen] = (value * signs)[chosen]


@pytest.mark.parametrize("matrices", [["A", "B"], ["B"]])
def test_gps_language_pool_prunes_the_kth_smallest_of_all_its_matrices(matrices):
    """pool: language = one L1 threshold over all of a language's chosen matrices at every site: the k = round(P n)
    entries below the k-th smallest |w| of the whole pool (numpy's sort), ties at the threshold broken as torch's
    global_unstructured breaks them; the matrices not chosen keep their weights and have no mask."""
    model = lslo_model(seed=21)
    pruned_languages, ratio = ["en", "oc"], 0.5
    tie_at(model, pruned_languages)
    before = {id(i.weight): i.weight.detach().clone() for i in lora_matrices(model)}
    pools = prune(model, ratio, pruned_languages, scope=GPS_POOLS["language"], matrices=matrices)
    assert sorted(pools) == [("en",), ("oc",)]
    for language in pruned_languages:
        items = list(lora_matrices(model, [language], matrices))
        assert pools[(language,)] == items
        magnitudes = np.concatenate([before[id(i.weight)].abs().numpy().ravel() for i in items])
        pruned = np.concatenate([(~mask_of(i)).numpy().ravel() for i in items])
        k = round(ratio * magnitudes.size)
        threshold = np.sort(magnitudes, kind="stable")[k - 1]
        assert (magnitudes < threshold).sum() < k < (magnitudes <= threshold).sum()  # the ties decide
        assert pruned.sum() == k
        assert pruned[magnitudes < threshold].all() and not pruned[magnitudes > threshold].any()
        # which of the tied entries go: as torch's own global pruning over the same tensors in the same order
        references = [reference_container(before[id(i.weight)]) for i in items]
        torch_prune.global_unstructured([(r, "weight") for r in references],
                                        pruning_method=torch_prune.L1Unstructured, amount=ratio)
        for item, reference in zip(items, references):
            assert torch.equal(mask_of(item), reference.weight_mask.bool()), (language, item.site, item.matrix)
            assert torch.equal(item.weight.detach(), reference.weight.detach())
        # one threshold for the whole language: its matrices are pruned unevenly (the tensor pool is exact each)
        fractions = {round(float((~mask_of(i)).float().mean()), 6) for i in items}
        assert len(fractions) > 1
    for item in lora_matrices(model):
        if item.language in pruned_languages and item.matrix in matrices:
            continue
        assert item.language not in getattr(item.bank, f"{item.matrix}_mask")
        assert torch.equal(item.weight.detach(), before[id(item.weight)])


def test_gps_b_only_leaves_a_untouched_and_prunes_each_b_to_the_ratio():
    model = lslo_model(seed=23)
    before = {id(i.weight): i.weight.detach().clone() for i in lora_matrices(model)}
    prune(model, 0.7, ["en", "fr"], scope=GPS_POOLS["tensor"], matrices=gps_scope(["B"])["matrices"])
    for item in lora_matrices(model):
        if item.matrix == "B" and item.language in ("en", "fr"):
            reference = reference_container(before[id(item.weight)])
            torch_prune.l1_unstructured(reference, "weight", amount=0.7)
            assert torch.equal(mask_of(item), reference.weight_mask.bool())
            assert int((~mask_of(item)).sum()) == round(0.7 * item.weight.numel())
        else:
            assert item.language not in getattr(item.bank, f"{item.matrix}_mask")
            assert torch.equal(item.weight.detach(), before[id(item.weight)])
    assert pruning_ratio(model, ["en", "fr"], matrices=("A",)) == 0.0


def test_gps_scope_defaults_order_and_errors():
    assert gps_scope() == {"matrices": ["A", "B"], "pool": "tensor"}  # torch's l1_unstructured on every A and B
    assert gps_scope(["B", "A"], "language") == {"matrices": ["A", "B"], "pool": "language"}
    assert gps_scope(("B",)) == {"matrices": ["B"], "pool": "tensor"}
    for bad in (["C"], [], ["B", "B"], "B", [["A"]]):
        with pytest.raises(LsloError, match=r"^gps\.matrices is "):
            gps_scope(bad)
    for bad in ("global", "matrix", "layer", ["language"], 1):
        with pytest.raises(LsloError, match=r"^gps\.pool is .*expected one of \['tensor', 'language'\]"):
            gps_scope(pool=bad)


def test_exact_fraction_per_group():
    model = lslo_model(seed=5)
    groups = {"H": ["en", "fr", "de"], "V": ["oc", "wo"]}
    prune(model, 0.9, groups["H"])
    sizes = [item.weight.numel() for item in lora_matrices(model, groups["H"])]
    expected = sum(round(0.9 * n) for n in sizes) / sum(sizes)
    assert pruning_ratio(model, groups["H"]) == expected
    assert pruning_ratio(model, groups["V"]) == 0.0
    for item in lora_matrices(model, groups["H"]):
        n = item.weight.numel()
        assert int((~mask_of(item)).sum()) == round(0.9 * n)
    # one global pool per layer (fresh model): exactly round(P n) of each pool
    for items in prune(lslo_model(seed=6), 0.5, LANGUAGES, scope="layer").values():
        n = sum(i.weight.numel() for i in items)
        assert sum(int((~mask_of(i)).sum()) for i in items) == round(0.5 * n)
    # pruning again at a lower ratio never unprunes
    assert pruning_ratio(model, groups["H"]) == expected
    prune(model, 0.3, groups["H"])
    assert pruning_ratio(model, groups["H"]) == expected


def test_gps_masks_only_grow_and_reach_target():
    model = lslo_model(seed=7)
    pruned_before = {id(i.weight): torch.zeros_like(i.weight, dtype=torch.bool) for i in lora_matrices(model)}
    for epoch in range(1, 16):
        ratio = gps_ratio(epoch, 0.9, 2, 8)
        prune(model, ratio, ["en", "fr"])
        for item in lora_matrices(model, ["en", "fr"]):
            pruned = ~mask_of(item)
            assert not (pruned_before[id(item.weight)] & ~pruned).any(), (epoch, item.site)
            assert int(pruned.sum()) == round(ratio * pruned.numel())
            pruned_before[id(item.weight)] = pruned
    assert gps_ratio(15, 0.9, 2, 8) == 0.9


def test_pruned_entries_stay_zero_under_adam():
    model = lslo_model(seed=11)
    batch = make_batch([("en", "oc"), ("fr", "wo"), ("oc", "en"), ("wo", "fr")])
    labels = batch["input_ids"].flip(1)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)

    def step():
        optimizer.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    src_lang=batch["src"], tgt_lang=batch["tgt"])
        out.loss.backward()
        optimizer.step()

    for _ in range(3):  # build Adam momentum before pruning
        step()
    prune(model, 0.8, LANGUAGES)
    masks = {id(i.weight): mask_of(i).clone() for i in lora_matrices(model)}
    for _ in range(4):
        step()
    for item in lora_matrices(model):
        assert torch.equal(mask_of(item), masks[id(item.weight)])
        effective = item.bank.effective_A(item.language) if item.matrix == "A" else item.bank.effective_B(item.language)
        assert not effective[~masks[id(item.weight)]].any()
    drifted = [item.weight[~masks[id(item.weight)]].abs().sum() for item in lora_matrices(model)]
    assert sum(drifted) > 0  # Adam's momentum moves masked raw entries; the forward never sees them
    reapply_masks(model)
    for item in lora_matrices(model):
        assert not item.weight[~masks[id(item.weight)]].any()


# --------------------------------------------------------------------------- importance score (eq. 6)


def test_score_sign_and_pool_balance():
    model = lslo_model(seed=13)
    with torch.no_grad():
        for item in lora_matrices(model, ["oc"], matrices=("B",)):
            item.weight.mul_(1e-3)  # tiny B: layer-wise global pruning takes more of oc
    pools = prune(model, 0.7, LANGUAGES, scope="layer")
    scores = subspace_scores(model, 0.7)
    assert list(scores.columns) == ["language", "side", "layer", "module", "index", "n_params", "n_pruned", "score"]
    assert len(scores) == sum(len(items) for items in pools.values())
    assert (scores.loc[scores.language == "oc", "score"] > 0).all()
    assert set(scores.layer) == {1, 2} and set(scores.module) == {"q", "k", "v", "c-q", "c-k", "c-v", "fc1", "fc2"}
    row = scores.iloc[0]
    assert row.score == pytest.approx(row.n_pruned - 0.7 * row.n_params)
    for (side, layer), items in pools.items():  # in one pool the scores sum to round(P n) - P n
        n = sum(i.weight.numel() for i in items)
        pool = scores[(scores.side == side) & (scores.layer == layer + 1)]
        assert pool.score.sum() == pytest.approx(round(0.7 * n) - 0.7 * n)


@pytest.mark.parametrize("fc_lora, fc1_rows", [("slice", 16), ("full", 32)])
def test_scores_count_the_loras_actual_b(fc_lora, fc1_rows):
    """Eq. 6's #B is the LoRA's B: d_model x r for every module in the authors' slice layout (fc1 included),
    ffn x r for fc1 in the full layout (tiny model: d_model 16, ffn 32)."""
    model = lslo_model(seed=17, fc_lora=fc_lora)
    prune(model, 0.5, LANGUAGES, scope="layer")
    scores = subspace_scores(model, 0.5)
    rank = scores.language.map(RANKS)
    rows = scores.module.map(lambda m: fc1_rows if m == "fc1" else 16)
    assert (scores.n_params == rows * rank).all()


def test_bad_input():
    model = lslo_model()
    for ratio in (1.0, -0.2, 2):
        with pytest.raises(LsloError, match=str(ratio)):
            prune(model, ratio, ["en"])
    with pytest.raises(LsloError, match="xx"):
        prune(model, 0.5, ["en", "xx"])
    with pytest.raises(LsloError, match="scope"):
        prune(model, 0.5, ["en"], scope="module")
    with pytest.raises(LsloError, match="matrices"):
        prune(model, 0.5, ["en"], matrices=("C",))
    with pytest.raises(LsloError, match="target"):
        subspace_scores(model, 1.0)
