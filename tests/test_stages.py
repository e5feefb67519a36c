"""The training stages end to end on a tiny world: weight learning, subspace estimation, fine-tuning (GPS)."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch

from lslo.adapters import load_adapters, read_adapters
from lslo.data import write_parallel
from lslo.variant import read_variant
from lslo.finetune import emptied_matrices, run_finetune
from lslo.io import write_json
from lslo.subspace import run_subspace
from lslo.weight_learning import run_weight_learning
from test_train import GROUPS, LANGUAGES, make_world

OPTIONS = dict(epochs=2, lr=1e-2, max_tokens=200, warmup_updates=2, max_epoch_examples=40, dev_sentences=0, seed=2)
N_SITES = 2 * 5 + 2 * 8  # tiny model: 2 encoder layers x (q k v fc1 fc2) + 2 decoder layers x 8 modules


@pytest.fixture(scope="module")
def stage_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    model_dir, table, lang_table = make_world(root)
    write_parallel(table, root / "train.tsv")
    write_parallel(table.head(6), root / "dev.tsv")
    return root, dict(model_dir=model_dir, train_tsv=root / "train.tsv", dev_tsv=root / "dev.tsv",
                      language_table=lang_table, languages="tiny")


def test_weight_learning_writes_weights_summing_to_one_and_the_plan(stage_world):
    root, common = stage_world
    run_weight_learning(**common, modules="all", rank=4, options=OPTIONS, out_weights=root / "wl" / "weights.tsv",
                        out_plan=root / "wl" / "plan.json", checkpoint_dir=root / "wl" / "ckpt")
    weights = pd.read_csv(root / "wl" / "weights.tsv", sep="\t")
    assert list(weights.columns) == ["side", "layer", "w_src", "w_tgt"]
    assert sorted(zip(weights["side"], weights["layer"])) == [("dec", 1), ("dec", 2), ("enc", 1), ("enc", 2)]
    assert ((weights["w_src"] + weights["w_tgt"] - 1).abs() < 1e-6).all()
    assert (weights["w_src"] != 0.5).any()  # the softmax logits were trained
    plan = json.loads((root / "wl" / "plan.json").read_text())
    for row in weights.itertuples():
        assert plan[row.side][row.layer - 1] == ("src" if row.w_src >= row.w_tgt else "tgt")


@pytest.mark.parametrize("mode", ["ise", "lsp"])
def test_subspace_scores_one_row_per_language_and_b_matrix(stage_world, mode):
    root, common = stage_world
    plan = {"enc": ["src", "tgt"], "dec": ["tgt", "tgt"]}
    out = root / mode / "scores.tsv"
    run_subspace(**common, plan=plan, rank=4, options=OPTIONS, mode=mode, target_ratio=0.7,
                 gps={"start": 1, "duration": 1}, out_scores=out, checkpoint_dir=root / mode / "ckpt")
    scores = pd.read_csv(out, sep="\t")
    assert list(scores.columns) == ["language", "group", "side", "layer", "module", "n_params", "n_pruned", "score"]
    assert len(scores) == len(LANGUAGES) * N_SITES
    assert scores.groupby("language").size().eq(N_SITES).all()
    assert scores["group"].tolist() == scores["language"].map(GROUPS).tolist()
    assert (scores["score"] - (scores["n_pruned"] - 0.7 * scores["n_params"])).abs().max() < 1e-6
    pool = ["side", "layer"] if mode == "ise" else ["language"]  # §4.2: per layer; §7.3: per language
    totals = scores.groupby(pool)[["n_params", "n_pruned"]].sum()
    assert (totals["n_pruned"] == (0.7 * totals["n_params"]).round()).all()
    if mode == "ise":  # a global pool: languages are pruned unevenly
        assert scores.groupby("language")["score"].sum().abs().max() > 0


def test_finetune_gps_reaches_the_target_for_h_and_m_and_leaves_v_unpruned(stage_world):
    root, common = stage_world
    ranks = {"ranks": {"en": 2, "fr": 2, "de": 2, "oc": 4, "wo": 4},
             "prune": {"en": 0.6, "fr": 0.6, "de": 0.6, "oc": 0.0, "wo": 0.0}, "gps": {"start": 1, "duration": 1}}
    write_json(ranks, root / "ranks.json")
    out = root / "ft"
    run_finetune(method="lslo", **common, index_plan="src", plan_json=None, ranks_json=root / "ranks.json",
                 modules="all", options=dict(OPTIONS, dev_sentences=2), out_dir=out,
                 out_metrics=out / "metrics.tsv", checkpoint_dir=out / "ckpt")
    stored = json.loads((out / "variant.json").read_text())
    assert stored["adapters"] == "adapters.safetensors"  # relative to variant.json: a copied directory is whole
    variant = read_variant(out / "variant.json")
    assert variant["method"] == "lslo" and variant["model"] is None and variant["languages"] == LANGUAGES
    tensors, _ = read_adapters(variant["adapters"])
    hf = __import__("transformers").M2M100ForConditionalGeneration.from_pretrained(variant["base_model"])
    model = load_adapters(hf, variant["adapters"])
    from lslo.pruning import lora_matrices

    seen = set()
    for item in lora_matrices(model):
        n, pruned = item.weight.numel(), int((item.mask() == 0).sum())
        expected = round(0.6 * n) if GROUPS[item.language] in "HM" else 0
        assert pruned == expected, (item.site, item.language, item.matrix)
        assert int((item.weight == 0).sum()) >= expected
        seen.add(item.language)
        if item.side == "enc":
            assert item.index == "src"  # SRC plan: encoder source-indexed, decoder target-indexed
        else:
            assert item.index == "tgt"
    assert seen == set(LANGUAGES)
    metrics = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert metrics["epoch"].tolist() == [1, 2]
    assert metrics["pruning_ratio"].tolist()[0] == 0 and metrics["pruning_ratio"].iloc[1] > 0
    assert (metrics["effective_params"] < metrics["trainable_params"]).tolist() == [False, True]
    assert metrics["dev_H2H"].notna().all() and metrics["dev_V2V"].notna().all()


def finetune_with_gps(stage_world, name, gps, epochs=2):
    """A tiny LSLo fine-tune with H and M pruned to 0.6 under `gps` (the rank plan's block); returns the model
    with its saved adapters and the output directory."""
    root, common = stage_world
    ranks = {"ranks": {"en": 2, "fr": 2, "de": 2, "oc": 4, "wo": 4},
             "prune": {"en": 0.6, "fr": 0.6, "de": 0.6, "oc": 0.0, "wo": 0.0}, "gps": gps}
    write_json(ranks, root / f"{name}.json")
    out = root / name
    run_finetune(method="lslo", **common, index_plan="src", plan_json=None, ranks_json=root / f"{name}.json",
                 modules="all", options=dict(OPTIONS, epochs=epochs), out_dir=out, out_metrics=out / "metrics.tsv",
                 checkpoint_dir=out / "ckpt")
    variant = read_variant(out / "variant.json")
    hf = __import__("transformers").M2M100ForConditionalGeneration.from_pretrained(variant["base_model"])
    return load_adapters(hf, variant["adapters"]), out


def _pools_of(model, matrices):
    """The pruned languages' matrices, one pool per language (for lslo.finetune.emptied_matrices)."""
    from lslo.pruning import lora_matrices

    pools: dict = {}
    for item in lora_matrices(model, [lang for lang, group in GROUPS.items() if group in "HM"], matrices):
        pools.setdefault((item.language,), []).append(item)
    return pools


@pytest.mark.parametrize("matrices, pool", [(["B"], "tensor"), (["A", "B"], "language"), (["B"], "language")])
def test_finetune_gps_prunes_the_plans_matrices_in_the_plans_pools(stage_world, caplog, matrices, pool):
    """gps.matrices: the matrices not listed are trained but never masked; gps.pool: tensor = round(P n) of each
    matrix, language = round(P n) of all of a language's listed matrices together (one threshold)."""
    from lslo.pruning import lora_matrices

    with caplog.at_level(logging.WARNING, logger="lslo.finetune"):
        model, _ = finetune_with_gps(stage_world, f"ft-{pool}-{''.join(matrices)}",
                                     {"start": 1, "duration": 1, "matrices": matrices, "pool": pool})
    # a language whose every B (or A) entry is pruned gets one warning naming it: its LoRA adds nothing
    warned = sorted((m.args[2], m.args[1]) for m in caplog.records if m.name == "lslo.finetune")
    assert warned == sorted(emptied_matrices(_pools_of(model, matrices)))
    if (pool, matrices) == ("language", ["A", "B"]):
        assert warned  # B starts at zero and stays smaller than A: one pool over both takes all of B (§4.2)
    per_language: dict = {}
    uneven = []
    for item in lora_matrices(model):
        n, pruned = item.weight.numel(), int((item.mask() == 0).sum())
        if GROUPS[item.language] not in "HM" or item.matrix not in matrices:
            assert item.language not in getattr(item.bank, f"{item.matrix}_mask"), (item.site, item.matrix)
            if item.matrix == "A":  # random init, trained: no entry zeroed (B may keep untrained zeros)
                assert bool((item.weight != 0).all()), (item.site, item.language)
            continue
        if pool == "tensor":
            assert pruned == round(0.6 * n), (item.site, item.language, item.matrix)
        uneven.append(pruned != round(0.6 * n))
        total = per_language.setdefault(item.language, [0, 0])
        total[0], total[1] = total[0] + n, total[1] + pruned
    assert sorted(per_language) == ["de", "en", "fr"]
    if pool == "language":
        for language, (n, pruned) in per_language.items():
            assert pruned == round(0.6 * n), language
        assert any(uneven)  # one threshold per language, not one per matrix


def test_finetune_default_gps_scope_is_every_a_and_b_per_tensor(stage_world):
    """A plan without matrices/pool (written before they existed) and one with the defaults spelled out train the
    same adapters, bit for bit."""
    old, _ = finetune_with_gps(stage_world, "ft-old-plan", {"start": 1, "duration": 1})
    new, _ = finetune_with_gps(stage_world, "ft-explicit",
                               {"start": 1, "duration": 1, "matrices": ["A", "B"], "pool": "tensor"})
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        assert torch.equal(old_state[key], new_state[key]), key


@pytest.mark.parametrize("field, value", [("pool", "language"), ("matrices", ["B"])])
def test_a_resume_with_another_gps_scope_does_not_reuse_the_checkpoints(stage_world, caplog, field, value):
    from lslo.checkpoint import COMPLETE

    gps = {"start": 1, "duration": 1, "matrices": ["A", "B"], "pool": "tensor"}
    _, out = finetune_with_gps(stage_world, f"ft-resume-{field}", gps)
    (out / "ckpt" / COMPLETE).unlink()  # as if killed after epoch 1
    (out / "ckpt" / "epoch002.pt").unlink()
    with caplog.at_level(logging.INFO, logger="lslo.checkpoint"):
        finetune_with_gps(stage_world, f"ft-resume-{field}", {**gps, field: value})
    lines = [r.getMessage() for r in caplog.records if r.name == "lslo.checkpoint" and "set aside" in r.getMessage()]
    assert len(lines) == 1 and f"settings.gps.{field}" in lines[0], lines
    assert (out / "ckpt.set-aside-1" / "epoch001.pt").exists()


def test_finetune_pretrain_and_full(stage_world):
    root, common = stage_world
    run_finetune(method="pretrain", **common, index_plan="learned", plan_json=None, ranks_json=None, modules="all",
                 options=dict(OPTIONS, dev_sentences=2), out_dir=root / "pre", out_metrics=root / "pre" / "m.tsv",
                 checkpoint_dir=root / "pre" / "ckpt")
    variant = json.loads((root / "pre" / "variant.json").read_text())
    assert variant["adapters"] is None and variant["model"] is None
    assert pd.read_csv(root / "pre" / "m.tsv", sep="\t")["epoch"].tolist() == [0]

    run_finetune(method="full", **common, index_plan="learned", plan_json=None, ranks_json=None, modules="all",
                 options=dict(OPTIONS, epochs=1, max_updates=2), out_dir=root / "full",
                 out_metrics=root / "full" / "m.tsv", checkpoint_dir=root / "full" / "ckpt")
    assert json.loads((root / "full" / "variant.json").read_text())["model"] == "model"
    variant = read_variant(root / "full" / "variant.json")
    from transformers import M2M100ForConditionalGeneration

    tuned = M2M100ForConditionalGeneration.from_pretrained(variant["model"])
    base = M2M100ForConditionalGeneration.from_pretrained(variant["base_model"])
    assert not torch.equal(tuned.model.shared.weight, base.model.shared.weight)  # every parameter trains
    assert (root / "full" / "model" / "vocab.json").is_file()
    metrics = pd.read_csv(root / "full" / "m.tsv", sep="\t")
    assert metrics["step"].tolist() == [2] and metrics["trainable_params"].iloc[0] == sum(
        p.numel() for p in base.parameters())
