"""bench.py --against: the statistics on synthetic timings, and the comparison of HEAD with itself at the tiny shape."""

import importlib.util
import itertools
import math
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rc():
    return load("revision_compare")


# ---- the exact null distribution and the interval ----------------------------------------------------------
@pytest.mark.parametrize("m,n", [(1, 1), (2, 3), (4, 4), (3, 6), (5, 5)])
def test_null_counts_equal_an_enumeration_of_rank_orders(rc, m, n):
    """Every way to place m "new" values among m+n ranks, U counted pair by pair."""
    counts = [0] * (m * n + 1)
    for new_ranks in itertools.combinations(range(m + n), m):
        old_ranks = [r for r in range(m + n) if r not in new_ranks]
        counts[sum(a > b for a in new_ranks for b in old_ranks)] += 1
    assert rc.mann_whitney_null_counts(m, n) == counts


# Two-sided critical values of U from the published Mann-Whitney tables (reject when U <= value): the interval's
# order statistic is that value + 1.
@pytest.mark.parametrize("m,n,confidence,critical", [(8, 8, 0.95, 13), (8, 8, 0.99, 7), (10, 10, 0.95, 23),
                                                     (15, 15, 0.95, 64), (20, 20, 0.95, 127), (20, 20, 0.99, 105)])
def test_order_statistic_is_the_tables_critical_value_plus_one(rc, m, n, confidence, critical):
    assert rc.order_statistic_rank(m, n, confidence) == critical + 1


def test_interval_by_hand_on_a_small_case(rc):
    """m = n = 8 at 95%: the 14th smallest and the 14th largest of the 64 differences, HL their median."""
    old = [1.00, 1.02, 1.05, 0.98, 1.10, 1.01, 0.97, 1.40]
    new = [1.08, 1.12, 1.06, 1.15, 1.09, 1.30, 1.11, 1.07]
    diffs = []
    for a in new:
        for b in old:
            diffs.append(math.log(a / b))
    diffs.sort()
    shift, lower, upper = rc.shift_interval(new, old, 0.95)
    assert (lower, upper) == pytest.approx((diffs[13], diffs[64 - 14]))
    assert shift == pytest.approx((diffs[31] + diffs[32]) / 2)


def test_interval_excludes_zero_exactly_when_the_exact_test_rejects(rc):
    """A Mann-Whitney interval at level 1 - a excludes a zero shift iff scipy's exact two-sided test rejects at a."""
    from scipy.stats import mannwhitneyu

    rng = random.Random(7)
    outcomes = set()
    for trial in range(300):
        m, n = rng.choice([(5, 5), (8, 12), (15, 15)])
        factor = rng.choice([1.0, 1.03, 1.1])
        old = [rng.lognormvariate(0, 0.05) for _ in range(n)]
        new = [factor * rng.lognormvariate(0, 0.05) for _ in range(m)]
        _, lower, upper = rc.shift_interval(new, old, 0.99)
        excluded = lower > 0 or upper < 0
        p = mannwhitneyu(new, old, alternative="two-sided", method="exact").pvalue
        assert excluded == (p <= 0.01), (trial, p, lower, upper)
        outcomes.add(excluded)
    assert outcomes == {True, False}


def test_too_few_repetitions_give_no_interval(rc):
    result = rc.compare_times([1.0, 1.1], [2.0, 2.1])
    assert result["verdict"] == "too few repetitions" and result["upper"] == math.inf


# ---- detection on synthetic timings with spikes ------------------------------------------------------------
SIMULATIONS, REPS = 200, 15


def synthetic(rng, factor, spikes):
    """REPS timings of ``factor`` x 1.0 with +-5% uniform noise; one repetition in five slowed by a factor uniform
    in [1, 2] (another job taking the machine): spikes "exact", 3 of the 15 at random positions; "independent",
    each repetition with probability 1/5 (so some sides draw 5 or more)."""
    if spikes == "exact":
        spiked = set(rng.sample(range(REPS), REPS // 5))
    else:
        spiked = {i for i in range(REPS) if rng.random() < 0.2}
    return [factor * rng.uniform(0.95, 1.05) * (rng.uniform(1, 2) if i in spiked else 1) for i in range(REPS)]


def verdicts(rc, factor, seed, spikes, **options):
    rng = random.Random(seed)
    return [rc.compare_times(synthetic(rng, factor, spikes), synthetic(rng, 1.0, spikes), **options)["verdict"]
            for _ in range(SIMULATIONS)]


@pytest.mark.parametrize("spikes", ["exact", "independent"])
def test_a_ten_percent_slowdown_is_called_a_regression(rc, spikes):
    found = verdicts(rc, 1.1, 1, spikes)
    assert found.count("regression") >= 0.95 * SIMULATIONS, found.count("regression")


@pytest.mark.parametrize("spikes", ["exact", "independent"])
def test_equal_timings_are_rarely_called_a_change(rc, spikes):
    found = verdicts(rc, 1.0, 2, spikes)
    assert found.count("no significant change") >= 0.95 * SIMULATIONS, found.count("no significant change")


def test_without_leaving_out_the_slowest_independent_spikes_hide_the_slowdown(rc):
    # why TRIM: the same statistic on every repetition misses the 10% slowdown in about 1 run of 5
    found = verdicts(rc, 1.1, 1, "independent", trim=0.0)
    assert found.count("regression") < 0.9 * SIMULATIONS, found.count("regression")


def test_the_ratio_estimates_the_slowdown(rc):
    rng = random.Random(3)
    ratios = [rc.compare_times(synthetic(rng, 1.1, "independent"), synthetic(rng, 1.0, "independent"))["ratio"]
              for _ in range(50)]
    assert 1.07 < sorted(ratios)[25] < 1.13


class FakeWorker:
    """A worker whose builds and calls are scripted: ``broken`` names fail to build, ``crash`` names raise."""

    def __init__(self, seconds, broken=(), crash=()):
        self.seconds, self.broken, self.crash, self.calls = seconds, broken, crash, []

    def ask(self, op, **request):
        if op == "build":
            names = ["a", "b", "c", "d"]
            return {"built": [n for n in names if n not in self.broken], "adapted": [],
                    "failed": {n: "LsloError: no such kernel" for n in self.broken}, "digests": {}}
        self.calls.append(request["name"])
        if request["name"] in self.crash:
            return {"error": "RuntimeError: out of memory"}
        return {"seconds": self.seconds[request["name"]] * (1 + 0.01 * (len(self.calls) % 5))}


def test_a_system_one_side_cannot_build_or_run_is_reported_not_timed(rc):
    new = FakeWorker({"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.0}, crash=("c",))
    old = FakeWorker({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, broken=("d",))
    rows, _ = rc.compare_kind({"new": new, "old": old}, "train", warmup=1, steps=10)
    by_name = {row["system"]: row for row in rows}
    assert by_name["d"]["na"] == "old: LsloError: no such kernel" and "d" not in new.calls + old.calls
    assert by_name["c"]["na"] == "new: RuntimeError: out of memory" and new.calls.count("c") == 1
    assert by_name["a"]["verdict"] == "regression" and 1.9 < by_name["a"]["ratio"] < 2.1
    assert by_name["b"]["verdict"] == "no significant change"
    assert new.calls.count("a") == old.calls.count("a") == 11  # one warm-up and ten timed calls on each side
    table = "\n".join(rc.table(rows, decode=False))
    assert "| d | n/a | n/a | n/a | | n/a: old: LsloError: no such kernel |" in table


# ---- the comparison itself ---------------------------------------------------------------------------------
def git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def worktree_paths():
    return {line for line in git("worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")}


def test_against_head_times_every_system_on_both_sides_and_removes_its_worktree(tmp_path):
    bench = load("bench")
    worktrees = worktree_paths()
    temporary = set(Path(tempfile.gettempdir()).glob("lslo-against-*"))
    out = tmp_path / "against.md"
    report = bench.main(["--against", "HEAD", "--quick", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == report
    assert worktree_paths() == worktrees  # the temporary worktree is gone, and its folder
    assert set(Path(tempfile.gettempdir()).glob("lslo-against-*")) == temporary
    head = git("rev-parse", "HEAD").strip()
    assert f"old: HEAD = {head[:12]}" in report
    for name in bench.TRAIN_SYSTEMS + bench.DECODE_SYSTEMS:
        row = re.search(rf"^\| {name} \| (\d+\.\d) \| (\d+\.\d) \| (\d+\.\d+) \| - \| too few repetitions \|",
                        report, re.M)
        assert row, name
    # the same code on both sides decodes the same tokens
    assert len(re.findall(r"too few repetitions \| yes \|$", report, re.M)) == len(bench.DECODE_SYSTEMS)
    assert "n/a" not in report.split("new/old (HL):")[0]


def test_against_an_unknown_revision_stops_with_one_line():
    bench = load("bench")
    with pytest.raises(SystemExit, match="'no-such-rev' is not a commit"):
        bench.main(["--against", "no-such-rev", "--quick"])
