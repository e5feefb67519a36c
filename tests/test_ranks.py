"""lslo.ranks: the resource policy reproduces the paper's 2;2;8+GPS plan; the subspace policy follows its rule."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from lslo.errors import LsloError
from lslo.ranks import assign_ranks, language_demand, read_rank_plan

TABLE = "config/languages.tsv"
GPS = {"groups": ["H", "M"], "ratio": 0.9, "start": 2, "duration": 8}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_resource_policy_is_the_papers_2_2_8_gps(tmp_path):
    out = tmp_path / "plan.json"
    plan = assign_ranks("resource", TABLE, "lang12", {"H": 2, "M": 2, "V": 8}, GPS, out_json=out, epochs=15)
    assert json.loads(out.read_text()) == plan
    assert plan["ranks"] == {"en": 2, "fr": 2, "de": 2, "it": 2, "zh": 2, "nl": 2, "ja": 2, "ko": 2,
                             "oc": 8, "or": 8, "sd": 8, "wo": 8}
    assert plan["prune"]["fr"] == 0.9 and plan["prune"]["ko"] == 0.9 and plan["prune"]["wo"] == 0.0
    assert plan["gps"] == {"start": 2, "duration": 8, "matrices": ["A", "B"], "pool": "tensor"}  # the defaults
    assert plan["groups"]["oc"] == "V"


@pytest.mark.parametrize("scope", [{"matrices": ["B"], "pool": "tensor"}, {"matrices": ["A", "B"], "pool": "language"},
                                   {"matrices": ["B"], "pool": "language"}])
def test_the_gps_scope_travels_in_the_plan_to_fine_tuning(tmp_path, scope):
    out = tmp_path / "plan.json"
    plan = assign_ranks("resource", TABLE, "lang12", {"H": 2, "M": 2, "V": 8}, {**GPS, **scope}, out_json=out,
                        epochs=15)
    assert plan["gps"] == {"start": 2, "duration": 8, **scope}
    codes = list(plan["ranks"])
    assert read_rank_plan(out, codes, 15)[2] == {"start": 2, "duration": 8, **scope}
    # a plan written before the scope was recorded reads as the default scope
    old = {**plan, "gps": {"start": 2, "duration": 8}}
    out.write_text(json.dumps(old))
    assert read_rank_plan(out, codes, 15)[2] == {"start": 2, "duration": 8, "matrices": ["A", "B"], "pool": "tensor"}
    # a hand-edited plan with a scope it does not know: one line naming the field
    out.write_text(json.dumps({**plan, "gps": {**plan["gps"], "pool": "layer"}}))
    with pytest.raises(LsloError, match=re.escape("field 'gps.pool': 'layer' is not one of ['tensor', 'language']")):
        read_rank_plan(out, codes, 15)
    out.write_text(json.dumps({**plan, "gps": {**plan["gps"], "matrices": ["B", "C"]}}))
    with pytest.raises(LsloError, match=re.escape("field 'gps.matrices.1': 'C' is not one of ['A', 'B']")):
        read_rank_plan(out, codes, 15)


def test_no_gps_prunes_nothing():
    plan = assign_ranks("resource", TABLE, "lang12", {"H": 8, "M": 8, "V": 8}, None)
    assert set(plan["ranks"].values()) == {8} and set(plan["prune"].values()) == {0.0} and plan["gps"] is None


@pytest.mark.parametrize(
    "group_ranks, gps, epochs, message",
    [
        ({"H": 0, "M": 2, "V": 8}, None, None, "ranks.H"),
        ({"H": 2, "M": 2, "X": 8}, None, None, "unknown resource group 'X'"),
        ({"H": 2, "M": 2}, None, None, "no rank for resource group(s) ['V']"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "ratio": 1.0}, 15, "ratio P is 1.0"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "ratio": -0.1}, 15, "ratio"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "start": 8}, 15, "exceeds the 15 training epochs"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "groups": ["Q"]}, 15, "gps.groups"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "matrices": ["C"]}, 15, "gps.matrices is ['C']"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "matrices": []}, 15, "gps.matrices is []"),
        ({"H": 2, "M": 2, "V": 8}, {**GPS, "pool": "global"}, 15, "gps.pool is 'global'"),
    ],
)
def test_bad_plans_are_rejected(group_ranks, gps, epochs, message):
    with pytest.raises(LsloError, match=re.escape(message)):
        assign_ranks("resource", TABLE, "lang12", group_ranks, gps, epochs=epochs)


def test_lang30_needs_a_rank_for_low_resource():
    with pytest.raises(LsloError, match=r"\['L'\]"):
        assign_ranks("resource", TABLE, "lang30", {"H": 2, "M": 2, "V": 8}, None)


def synthetic_scores(pruned_fraction: dict, target: float, seed: int = 0) -> pd.DataFrame:
    """ISE-like scores: every B matrix of a language pruned at its fraction (+ noise that cancels per language)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lang, fraction in pruned_fraction.items():
        noise = rng.integers(-20, 21, size=4)
        noise = noise - noise.mean().astype(int)
        noise[-1] -= noise.sum()  # per-language sums stay exact
        for i, (side, module) in enumerate([("enc", "q"), ("enc", "fc1"), ("dec", "c-k"), ("dec", "fc2")]):
            n_params = 1024
            n_pruned = int(round(fraction * n_params)) + int(noise[i])
            rows.append((lang, "?", side, i + 1, module, n_params, n_pruned, n_pruned - target * n_params))
    return pd.DataFrame(rows, columns=["language", "group", "side", "layer", "module", "n_params", "n_pruned",
                                       "score"])


def test_subspace_policy_follows_its_rule(tmp_path):
    fractions = {"en": 0.85, "fr": 0.8, "de": 0.75, "it": 0.95, "zh": 0.72, "nl": 0.9, "ja": 0.71, "ko": 0.65,
                 "oc": 0.75, "or": 0.4, "sd": 0.45, "wo": 0.5}
    scores = tmp_path / "scores.tsv"
    synthetic_scores(fractions, target=0.7).to_csv(scores, sep="\t", index=False)
    plan = assign_ranks("subspace", TABLE, "lang12", None, {"start": 2, "duration": 8}, scores_tsv=scores,
                        subspace_options={"small_rank": 2, "large_rank": 8}, epochs=15)
    # excess = fraction - P computed by hand; ratio = min(0.9, fraction) for excess > 0
    for lang, fraction in fractions.items():
        assert plan["scores"][lang] == pytest.approx(fraction - 0.7, abs=1e-3)
        small = fraction - 0.7 > 1e-3
        assert plan["ranks"][lang] == (2 if small else 8), lang
        assert plan["prune"][lang] == pytest.approx(min(0.9, fraction) if small else 0.0, abs=1e-3), lang
    assert plan["ranks"]["oc"] == 2  # an Occitan-like V language with a small subspace gets the small rank


def test_language_demand_recovers_target_and_rejects_inconsistent_scores():
    scores = synthetic_scores({"en": 0.8, "wo": 0.6}, target=0.7)
    demand, target = language_demand(scores)
    assert target == pytest.approx(0.7)
    assert demand.loc["en", "excess"] == pytest.approx(0.1, abs=1e-3)
    scores.loc[0, "score"] += 50
    with pytest.raises(LsloError, match="different target ratios"):
        language_demand(scores)


def test_subspace_policy_needs_scores_for_every_language(tmp_path):
    scores = tmp_path / "scores.tsv"
    synthetic_scores({"en": 0.8}, target=0.7).to_csv(scores, sep="\t", index=False)
    with pytest.raises(LsloError, match="no scores for language"):
        assign_ranks("subspace", TABLE, "lang12", None, None, scores_tsv=scores)
    with pytest.raises(LsloError, match="rank policy is 'magic'"):
        assign_ranks("magic", TABLE, "lang12", None, None)
