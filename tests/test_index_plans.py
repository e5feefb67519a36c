"""The learned index plan against the paper's (lslo.index_plans), in Table 3's notes and in the summary."""

import pandas as pd
import pytest

from lslo.errors import LsloError
from lslo.index_plans import plan_comparison, plan_differences, read_index_plan
from lslo.io import write_json
from lslo.tables import make_table

# The paper's plan written out by hand (§6.1: "the LSLo modules in the first 9 layers of encoder will be
# source-indexed and in other layers of encoder and decoder will be target-indexed").
PAPER = {"enc": ["src"] * 9 + ["tgt"] * 3, "dec": ["tgt"] * 12}


def two_layers_differ() -> dict:
    """The paper's plan with encoder layer 10 (1-based) and decoder layer 3 source-indexed."""
    enc, dec = list(PAPER["enc"]), list(PAPER["dec"])
    enc[9], dec[2] = "src", "src"
    return {"enc": enc, "dec": dec}


def test_the_papers_plan_is_equal(tmp_path):
    write_json(PAPER, tmp_path / "plan.json")
    plan = read_index_plan(tmp_path / "plan.json")
    assert plan_comparison(plan) == ("The learned index plan (encoder src×9 tgt×3, decoder tgt×12) equals the "
                                     "paper's plan (encoder src×9 tgt×3, decoder tgt×12; §6.1).")


def test_a_plan_two_layers_off_names_both_layers(tmp_path):
    write_json(two_layers_differ(), tmp_path / "plan.json")
    plan = read_index_plan(tmp_path / "plan.json")
    assert plan_differences(plan, PAPER) == [("enc", 10, "src", "tgt"), ("dec", 3, "src", "tgt")]
    line = plan_comparison(plan)
    assert "differs from the paper's plan (encoder src×9 tgt×3, decoder tgt×12; §6.1) in 2 of 24 layers" in line
    assert line.endswith("encoder layer 10: src (paper tgt); decoder layer 3: src (paper tgt).")
    assert "encoder src×10 tgt×2, decoder tgt×2 src×1 tgt×9" in line  # the learned plan itself, as runs


def test_another_depth_is_compared_with_the_scaled_rule():
    # 8 + 4 layers: the top quarter of the encoder (layers 7, 8) target-indexed, the decoder target-indexed
    rule = {"enc": ["src"] * 6 + ["tgt"] * 2, "dec": ["tgt"] * 4}
    assert "equals the paper's rule scaled to this model's 8 + 4 layers" in plan_comparison(rule)
    off = {"enc": ["src"] * 7 + ["tgt"], "dec": ["tgt"] * 4}
    line = plan_comparison(off)
    assert "in 1 of 12 layers: encoder layer 7: src (scaled rule tgt)." in line
    assert "the paper's own plan, at 12 + 12 layers, is encoder src×9 tgt×3, decoder tgt×12" in line
    # the demo's 2 + 2 layers: a quarter of 2 is no layer, so the whole encoder is source-indexed
    assert "top quarter of the encoder target-indexed: encoder src×2, decoder tgt×2" in plan_comparison(
        {"enc": ["src", "src"], "dec": ["tgt", "tgt"]})


@pytest.mark.parametrize("content, message", [
    ({"enc": ["src"]}, "not an index plan"),
    ({"enc": ["src", "learn"], "dec": ["tgt"]}, "enc is \\['src', 'learn'\\]; expected a non-empty list"),
    ({"enc": [], "dec": ["tgt"]}, "enc is \\[\\]"),
])
def test_a_bad_plan_stops_naming_the_file(tmp_path, content, message):
    write_json(content, tmp_path / "plan.json")
    with pytest.raises(LsloError, match=f"plan.json: {message}"):
        read_index_plan(tmp_path / "plan.json")


def groups_tsv(path, value: float):
    pd.DataFrame({"pair": ["H2H", "AVG"], "spbleu": [value, value], "chrf": 0.0,
                  "n_directions": [2, 2]}).to_csv(path, sep="\t", index=False)
    return path


def test_table3_notes_compare_the_learned_plan(tmp_path):
    groups = {label: groups_tsv(tmp_path / f"{i}.tsv", 10.0 + i) for i, label in enumerate(["WL", "SRC", "TGT"])}
    write_json(two_layers_differ(), tmp_path / "plan.json")
    make_table(groups, {}, tmp_path / "t3.tsv", tmp_path / "t3.md", "Table 3", "spm", index_plan=tmp_path / "plan.json")
    md = (tmp_path / "t3.md").read_text(encoding="utf-8")
    assert f"- WL: {plan_comparison(two_layers_differ())}\n" in md
    make_table(groups, {}, tmp_path / "t1.tsv", tmp_path / "t1.md", "Table 1", "spm")
    assert "index plan" not in (tmp_path / "t1.md").read_text(encoding="utf-8")
    # a bad plan stops the table before any file of it is written
    write_json({"enc": ["src"]}, tmp_path / "bad.json")
    with pytest.raises(LsloError, match="bad.json: not an index plan"):
        make_table(groups, {}, tmp_path / "u.tsv", tmp_path / "u.md", "Table 3", "spm",
                   index_plan=tmp_path / "bad.json")
    assert not (tmp_path / "u.tsv").exists() and not (tmp_path / "u.md").exists()
