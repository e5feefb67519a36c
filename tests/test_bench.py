"""benchmarks/bench.py runs end to end (tiny shape) and reports every system and target."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_quick_report_has_every_system_and_target(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    report = bench.main(["--quick", "--no-directions", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == report
    for name in bench.TRAIN_SYSTEMS + bench.DECODE_SYSTEMS:
        assert re.search(rf"^\| {name} \| \d+\.\d ", report, re.M), name
    verdicts = re.findall(r"^\| (LSLo|merged)[^|]*\| (\d+\.\d+) \| (<=|>=) (\d+\.\d+) \| (PASS|MISS) \|$",
                          report, re.M)
    assert len(verdicts) == len(bench.TARGETS)
    for _, ratio, op, bound, verdict in verdicts:  # the verdict follows from the printed ratio and bound
        ok = float(ratio) <= float(bound) if op == "<=" else float(ratio) >= float(bound)
        assert verdict == ("PASS" if ok else "MISS")


def test_a_failing_system_is_dropped_and_named(bench):
    """One system that raises (a kernel a GPU does not support) leaves the others timed and says why."""
    calls = {"ok": 0}

    def broken():
        raise RuntimeError("grouped_mm: expected data_ptr to be aligned to 16 bytes\nmore")

    def ok():
        calls["ok"] += 1

    times = bench.time_interleaved({"broken": broken, "ok": ok}, warmup=1, steps=2, device=bench.torch.device("cpu"))
    assert list(times) == ["ok"] and len(times["ok"]) == 2 and calls["ok"] == 3
    assert bench.FAILED["broken"] == "RuntimeError: grouped_mm: expected data_ptr to be aligned to 16 bytes"


def test_auto_choices_report_lists_each_measured_choice(bench, monkeypatch):
    import torch

    from lslo.kernels import KERNEL_TIMER

    key = (torch.device("cuda"), torch.bfloat16, 1024, 4096, (2, 2, 8, 8), 8192, True, ("gathered", "grouped"))
    monkeypatch.setattr(KERNEL_TIMER, "choices", {key: "grouped"})
    assert "| 1024 | 4096 | 4 (max 8) | 8192 | True | grouped |" in bench.auto_choices_report()


def test_lslo_spec_adapts_to_an_older_lslo(bench, monkeypatch):
    """bench.py --against runs this file against an older lslo (6c9756c: no fc_lora, no init, no paper_index_plan):
    the spec is built with what that LSLoSpec has, the plan written out, and each omission is noted."""
    import dataclasses
    import types

    import lslo

    @dataclasses.dataclass
    class OldSpec:  # 6c9756c's fields
        languages: list
        ranks: dict
        modules: object = "all"
        layers: dict | None = None
        index_plan: object = None
        alpha: float | None = None
        dropout: float = 0.0

    monkeypatch.setitem(sys.modules, "lslo.model", types.SimpleNamespace(LSLoSpec=OldSpec))
    monkeypatch.setattr(lslo, "model", sys.modules["lslo.model"], raising=False)
    monkeypatch.setattr(bench, "ADAPTED", [])
    spec = bench.lslo_spec(["en", "wo"], {"en": "H", "wo": "V"}, 8)
    assert spec.index_plan == {"enc": ["src"] * 6 + ["tgt"] * 2, "dec": ["tgt"] * 8}
    assert spec.ranks == {"en": 2, "wo": 8}
    assert len(bench.ADAPTED) == 2 and any("fc_lora" in a for a in bench.ADAPTED)


def test_lslo_spec_of_this_checkout_is_the_paper_plan_in_the_default_slice_layout(bench, monkeypatch):
    from lslo.model import LSLoSpec, paper_index_plan

    monkeypatch.setattr(bench, "ADAPTED", [])
    spec = bench.lslo_spec(["en", "wo"], {"en": "H", "wo": "V"}, 8)
    default = LSLoSpec(languages=["en", "wo"], ranks={"en": 2, "wo": 8})
    assert (spec.index_plan, spec.fc_lora, spec.init) == (paper_index_plan(8, 8), "slice", default.init)
    assert bench.ADAPTED == []
