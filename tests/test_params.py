"""Exact parameter counts: shapes vs live models vs HF, and the `lslo params` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

from conftest import LANGUAGES, make_tiny_config, make_tiny_model, randomize_lora
from lslo.cli import PRESETS, main
from lslo.errors import LsloError
from lslo.model import LSLoSpec, inject_lslo
from lslo.params import base_param_count, count_from_shape, count_params
from lslo.pruning import prune

ROOT = Path(__file__).resolve().parents[1]
LANG12 = {"H": ["en", "fr", "de", "it"], "M": ["zh", "nl", "ja", "ko"], "V": ["oc", "or", "sd", "wo"]}
LANG12_ARG = "H=en,fr,de,it;M=zh,nl,ja,ko;V=oc,or,sd,wo"


def hf_param_count(config) -> int:
    with torch.device("meta"):  # shapes only, no memory
        model = M2M100ForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_base_count_equals_hf_model(preset):
    assert base_param_count(PRESETS[preset]) == hf_param_count(M2M100Config(**PRESETS[preset]))


def test_m2m124_is_615m():
    assert base_param_count(PRESETS["m2m124-615m"]) == 614_990_848


def lang12_expected(ranks_by_group, prune_by_group=None, d=1024, ffn=4096, layers=12):
    """Independent count: loop over every site of the 615M shape, A [r, in] + B [out, r] per language
    (the full fc layout: fc1 and fc2 LoRAs on the whole d x ffn matrices)."""
    site_dims = {"enc": [(d, d)] * 3 + [(d, ffn), (ffn, d)], "dec": [(d, d)] * 6 + [(d, ffn), (ffn, d)]}
    trainable = effective = 0
    for side in ("enc", "dec"):
        for _layer in range(layers):
            for d_in, d_out in site_dims[side]:
                for group, langs in LANG12.items():
                    r = ranks_by_group[group]
                    p = (prune_by_group or {}).get(group, 0.0)
                    for _lang in langs:
                        for n in (r * d_in, d_out * r):
                            trainable += n
                            effective += n - round(p * n)
    return trainable, effective


def run_cli(capsys, *args):
    rc = main(["params", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_json_lang12_exact(capsys):
    rc, out, _ = run_cli(capsys, "--preset", "m2m124-615m", "--groups", LANG12_ARG, "--ranks", "H=2,M=2,V=8",
                         "--modules", "all", "--fc-lora", "full", "--json")
    assert rc == 0
    counts = json.loads(out)
    trainable, _ = lang12_expected({"H": 2, "M": 2, "V": 8})
    assert counts["trainable"] == counts["effective"] == trainable
    assert counts["base"] == 614_990_848
    assert counts["percent"] == pytest.approx(100 * trainable / 614_990_848)
    assert counts["by_group"]["V"]["trainable"] == 4 * counts["by_group"]["H"]["trainable"]


def test_cli_language_table_and_prune(capsys):
    rc, out, _ = run_cli(capsys, "--preset", "m2m124-615m", "--languages", "lang12", "--language-table",
                         str(ROOT / "config" / "languages.tsv"), "--ranks", "H=2,M=2,V=8", "--prune",
                         "H=0.9,M=0.9", "--fc-lora", "full", "--json")
    assert rc == 0
    counts = json.loads(out)
    trainable, effective = lang12_expected({"H": 2, "M": 2, "V": 8}, {"H": 0.9, "M": 0.9})
    assert (counts["trainable"], counts["effective"]) == (trainable, effective)
    assert {g: sorted(v) for g, v in LANG12.items()} == {
        g: sorted(lang for lang in counts["by_language"] if lang in LANG12[g]) for g in counts["by_group"]}
    rc, out, _ = run_cli(capsys, "--preset", "m2m124-615m", "--groups", LANG12_ARG, "--ranks", "4")
    assert rc == 0 and "total" in out and "by language" in out


def test_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lslo.cli", "params", "--preset", "nllb-600m", "--groups",
                          "H=eng_Latn;V=wol_Latn", "--ranks", "8", "--modules", "fc", "--fc-lora", "full", "--json"],
                         capture_output=True, text=True, check=True).stdout
    d, ffn = 1024, 4096
    assert json.loads(out)["trainable"] == 2 * 12 * 2 * 2 * 8 * (d + ffn)  # langs x layers x sides x fc1/fc2


# The paper's #Params column (Tables 1, 2, 4) against the authors' layout: d x r + r x d per LoRA, every LoRA
# 1024 x 1024, fc1/fc2 included. (subset, ranks per group, modules, exact count from the issue / the formula).
PAPER_ROWS = [
    ("lang12", "H=2,M=2,V=8", "all", 15_335_424),      # "15.3M"
    ("lang12", "H=2,M=2,V=8", "attn", 10_616_832),     # "10.6M"
    ("lang12", "H=2,M=2,V=32", "fc", 14_155_776),      # "14.1M"
    ("lang12", "H=2,M=2,V=16", "fc", 7_864_320),       # printed "7.7M": the one row that differs
    ("lang30", "H=2,M=2,L=8,V=8", "all", 46_006_272),  # "46M"
    ("lang30", "H=8,M=8,L=8,V=8", "all", 76_677_120),  # "76.7M"
]


GROUP_SIZES = {"lang12": {"H": 4, "M": 4, "V": 4}, "lang30": {"H": 7, "M": 9, "L": 8, "V": 6}}  # paper Tables 5, 6


@pytest.mark.parametrize("subset, ranks, modules, expected", PAPER_ROWS)
def test_cli_slice_layout_gives_the_papers_counts(capsys, subset, ranks, modules, expected):
    rc, out, _ = run_cli(capsys, "--preset", "m2m124-615m", "--languages", subset, "--language-table",
                         str(ROOT / "config" / "languages.tsv"), "--ranks", ranks, "--modules", modules, "--json")
    assert rc == 0
    assert json.loads(out)["trainable"] == expected
    # the same number from the per-rank-unit figure: 12 layers x sites x (1024 + 1024) (13 sites on all modules,
    # 9 attention, 4 fc), times the rank summed over the languages
    rank_sum = sum(GROUP_SIZES[subset][group] * int(r) for group, r in (p.split("=") for p in ranks.split(",")))
    assert expected == 12 * {"all": 13, "attn": 9, "fc": 4}[modules] * 2048 * rank_sum


def test_cli_fc_layouts_differ_by_the_ffn_width(capsys):
    """slice -> full widens fc1's B and fc2's A from 1024 to 4096: r x 3072 more per fc site, 2 fc sites x 24
    layers per rank unit."""
    counts = {}
    for layout in ("slice", "full"):
        rc, out, _ = run_cli(capsys, "--preset", "m2m124-615m", "--groups", LANG12_ARG, "--ranks", "H=2,M=2,V=8",
                             "--fc-lora", layout, "--json")
        counts[layout] = json.loads(out)["trainable"]
    assert counts["full"] == lang12_expected({"H": 2, "M": 2, "V": 8})[0]
    assert counts["full"] - counts["slice"] == 24 * 2 * 3072 * (4 * 2 + 4 * 2 + 4 * 8)


@pytest.mark.parametrize("args, message", [
    (["--preset", "m2m999"], "unknown preset"),
    (["--preset", "m2m124-615m", "--ranks", "H=0,M=2,V=8"], "rank"),
    (["--preset", "m2m124-615m", "--ranks", "H=2,M=2,X=8"], "unknown group or language 'X'"),
    (["--preset", "m2m124-615m", "--ranks", "8", "--modules", "fc3"], "unknown module"),
    (["--preset", "m2m124-615m", "--ranks", "8", "--prune", "H=1.0"], "1.0"),
    (["--preset", "m2m124-615m", "--ranks", "99999999999"], "exceeds the dimensions"),
    (["--preset", "m2m124-615m", "--ranks", "1025", "--modules", "attn"], "at most 1024"),
    (["--preset", "m2m124-615m", "--ranks", "8", "--fc-lora", "half"], ""),
])
def test_cli_bad_input(capsys, args, message):
    if "--ranks" not in args:
        args = [*args, "--ranks", "8"]
    try:
        rc, _, err = run_cli(capsys, *args, "--groups", LANG12_ARG)
    except SystemExit as exit_:  # argparse refuses a choice outside --fc-lora's
        rc, err = exit_.code, capsys.readouterr().err
    assert rc == 2 and message in err


@pytest.mark.parametrize("groups, message", [
    ("H=en,fr;H=de", "group 'H' given twice"),
    ("H=en,fr;M=fr,de", "['fr'] listed more than once"),
])
def test_cli_refuses_ambiguous_groups(capsys, groups, message):
    rc, out, err = run_cli(capsys, "--preset", "m2m124-615m", "--groups", groups, "--ranks", "8")
    assert rc == 2 and message in err and not out


def test_shape_errors():
    config = make_tiny_config()
    with pytest.raises(LsloError, match="xx"):
        count_from_shape(config, ["en"], {"en": 2, "xx": 2})
    with pytest.raises(LsloError, match="rank"):
        count_from_shape(config, ["en"], {"en": 0})
    with pytest.raises(LsloError, match="index mode"):
        count_from_shape(config, ["en"], 2, index_mode="both")
    with pytest.raises(LsloError, match="out of range"):
        count_from_shape(config, ["en"], 2, layers={"enc": [5]})


# --------------------------------------------------------------------------- shapes vs live model


RANKS = {"en": 2, "fr": 2, "de": 3, "oc": 8, "wo": 5}
GROUPS = {"H": ["en", "fr", "de"], "V": ["oc", "wo"]}


@pytest.mark.parametrize("spec, mode", [
    (dict(modules="all", index_plan={"enc": ["src", "tgt"], "dec": ["tgt", "src"]}), "single"),
    (dict(modules="fc", layers={"enc": [1], "dec": [0, 1]}, index_plan="tgt"), "single"),
    (dict(modules=["q", "c-v", "fc2"], index_plan="learn"), "learn"),
])
@pytest.mark.parametrize("layout", [dict(fc_lora="slice"), dict(fc_lora="full"),
                                    dict(fc_lora="slice", fc_lora_offset=4, fc_lora_width=8)])
def test_shape_count_equals_live_count(spec, mode, layout):
    config = make_tiny_config(encoder_ffn_dim=24, decoder_ffn_dim=40)
    model = inject_lslo(make_tiny_model(encoder_ffn_dim=24, decoder_ffn_dim=40),
                        LSLoSpec(languages=LANGUAGES, ranks=RANKS, **spec, **layout))
    randomize_lora(model)
    prune(model, 0.7, GROUPS["H"])  # per-matrix GPS pruning, as count_from_shape assumes
    live = count_params(model, groups=GROUPS)
    shape = count_from_shape(config, LANGUAGES, RANKS, modules=spec["modules"], layers=spec.get("layers"),
                             index_mode=mode, prune={lang: 0.7 for lang in GROUPS["H"]}, groups=GROUPS, **layout)
    assert live == shape
    assert live["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert live["base"] == hf_param_count(config)
    assert live["effective"] < live["trainable"]
