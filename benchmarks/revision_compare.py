"""``bench.py --against REV``: the training steps and decodings of the checkout and of revision REV, timed in one run.

REV is checked out into a temporary detached git worktree (removed afterwards). Two worker processes run the
checkout's ``bench.py`` (``--worker-of TREE``), one importing ``lslo`` from this checkout and one from REV's tree,
so REV needs no part of this file: ``bench.py`` builds each system with whatever API the tree has, and a system
one tree cannot build is reported "n/a" with the error. Each worker builds every system once; the parent then
asks for one repetition at a time, alternating workers and rotating the order of systems, so machine drift and
other load fall on both revisions alike.

Statistics (those of asv ``continuous`` and pyperf ``compare_to``, on log times): other load only ever slows a
repetition down, so the slowest TRIM of each side's repetitions are left out first; of the rest, the new/old ratio
is the Hodges-Lehmann estimate of the shift, exp(median of all pairwise differences log new_i - log old_j), and
its confidence interval the distribution-free Mann-Whitney interval, order statistics of the same differences at
the exact null distribution of U. A change is called only when the interval excludes a ratio of 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIDENCE = 0.995
# The share of each side's repetitions, the slowest, left out before the rank statistics: a spike (another job on
# the machine) makes a repetition slower, never faster. Without it, a 10% slowdown hidden by a run whose old side
# drew 4-6 spikes in 15 goes unseen (tests/test_revision_compare.py: 80% detected against 99.8% with it). The
# interval is then that of the faster 60%, a little less sure than its nominal level: at 99.5% equal timings are
# called a change in about 2% of simulations.
TRIM = 0.4
# The options a worker needs to build the same systems and batches as the parent was asked for.
WORKER_OPTIONS = ("shape", "batch_tokens", "decode_sentences", "new_tokens", "beams", "threads", "amp")
DECODE_LOOP = "lslo"  # the evaluate stage's beam loop (lslo.beam); HF's loop is not compared across revisions


# ---- statistics -------------------------------------------------------------------------------------------
def mann_whitney_null_counts(m: int, n: int) -> list:
    """Number of rank orders of two samples of sizes m and n (no ties) giving U = 0 .. m*n: the coefficients of
    the Gaussian binomial [m+n choose m]_q = prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i), exact integers."""
    counts = [1] + [0] * (m * n)
    for i in range(1, m + 1):
        for u in range(m * n, n + i - 1, -1):  # times (1 - q^(n+i))
            counts[u] -= counts[u - n - i]
        for u in range(i, m * n + 1):  # divided by (1 - q^i): exact, every partial product is a polynomial
            counts[u] += counts[u - i]
    return counts


def order_statistic_rank(m: int, n: int, confidence: float = CONFIDENCE) -> int:
    """k such that [D_(k), D_(mn+1-k)] (1-based order statistics of the m*n pairwise differences) covers the
    shift with probability >= ``confidence``: the largest k with P(U <= k-1) <= (1-confidence)/2. 0 when no
    interval is that sure with so few repetitions."""
    counts = mann_whitney_null_counts(m, n)
    total, tail, k = math.comb(m + n, m), 0, 0
    for u, c in enumerate(counts):
        tail += c
        if tail / total > (1 - confidence) / 2:
            break
        k = u + 1
    return k


def shift_interval(new: list, old: list, confidence: float = CONFIDENCE) -> tuple:
    """(Hodges-Lehmann shift, lower, upper) of log(new) - log(old); the bounds are -inf/inf when too few
    repetitions allow an interval at ``confidence``."""
    diffs = sorted(math.log(a) - math.log(b) for a in new for b in old)
    k = order_statistic_rank(len(new), len(old), confidence)
    if k == 0:
        return statistics.median(diffs), -math.inf, math.inf
    return statistics.median(diffs), diffs[k - 1], diffs[len(diffs) - k]


def fastest(times: list, trim: float = TRIM) -> list:
    """The repetitions left when the slowest ``trim`` share (rounded down) are left out."""
    return sorted(times)[: len(times) - int(len(times) * trim)]


def compare_times(new: list, old: list, confidence: float = CONFIDENCE, trim: float = TRIM) -> dict:
    """new/old ratio (Hodges-Lehmann), its interval and the verdict, on the fastest (1 - trim) of each side: a
    regression or an improvement only when the interval excludes 1. The medians are of all repetitions."""
    shift, lower, upper = shift_interval(fastest(new, trim), fastest(old, trim), confidence)
    if not math.isfinite(lower):
        verdict = "too few repetitions"
    elif lower > 0:
        verdict = "regression"
    elif upper < 0:
        verdict = "improvement"
    else:
        verdict = "no significant change"
    return {"ratio": math.exp(shift), "lower": math.exp(lower), "upper": math.exp(upper), "verdict": verdict,
            "old_median": statistics.median(old), "new_median": statistics.median(new)}


# ---- the temporary worktree -------------------------------------------------------------------------------
def resolve_commit(repo: Path, rev: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench.py --against: {rev!r} is not a commit of the repository at {repo}")
    return out.stdout.strip()


def describe_checkout(repo: Path) -> str:
    """Short commit of the checkout, "+ uncommitted changes" when lslo/ or benchmarks/ differ from it."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "lslo", "benchmarks"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" + uncommitted changes" if dirty else "")


@contextlib.contextmanager
def temporary_worktree(repo: Path, commit: str):
    """A detached worktree of ``commit`` in a new temporary folder; the worktree and that folder (both made
    here) are removed on exit, nothing else."""
    parent = Path(tempfile.mkdtemp(prefix="lslo-against-"))
    tree = parent / "tree"
    out = subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(tree), commit],
                         capture_output=True, text=True)
    if out.returncode:
        parent.rmdir()
        raise SystemExit(f"bench.py --against: git worktree add {commit[:12]} failed: {out.stderr.strip()}")
    try:
        yield tree
    finally:
        # --force: the worker may have left ignored files (bytecode) in the tree this run created
        out = subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"bench.py --against: could not remove the worktree {tree} ({out.stderr.strip()}); remove it "
                  f"with `git worktree remove --force {tree}`", file=sys.stderr)
        else:
            parent.rmdir()


# ---- workers ----------------------------------------------------------------------------------------------
class Worker:
    """One ``bench.py --worker-of TREE`` process, spoken to in JSON lines (one request, one reply)."""

    def __init__(self, label: str, tree: Path, bench_file: Path, args, log_dir: Path):
        self.label, self.tree = label, tree
        self.log = log_dir / f"worker-{label}.log"
        cmd = [sys.executable, str(bench_file), "--worker-of", str(tree)]
        for name in WORKER_OPTIONS:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if args.shape == "auto":
            raise SystemExit("bench.py --against: the worker needs a shape; run with --shape, or let main pick one")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep), "PYTHONDONTWRITEBYTECODE": "1"}
        with open(self.log, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            text=True, env=env, bufsize=1)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"the {self.label} worker (lslo from {self.tree}) exited with status "
                               f"{self.process.returncode} on {request}:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(bench, tree: str, args) -> None:
    """Worker loop: build systems with ``lslo`` from ``tree``, time one call per request (see Worker)."""
    import torch

    if "lslo" in sys.modules:
        raise RuntimeError("lslo was imported before the worker chose its tree")
    sys.path.insert(0, tree)  # ahead of the checkout that bench.py put first
    import lslo

    if not Path(lslo.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"lslo resolves to {lslo.__file__}, not to the tree under test {tree}")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to the log, not into the replies
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape, languages = bench.SHAPES[args.shape], list(bench.LANG12)
    runners = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "info":
            reply = {"lslo": str(Path(lslo.__file__).parent), "device": str(device)}
        elif request["op"] == "build":
            runners.clear()  # the training systems' memory is free before the decoding systems are built
            runners, reply = _build(bench, request["kind"], shape, languages, args, device)
        elif request["op"] == "run":
            reply = _time_once(bench, runners[request["name"]], device)
        else:
            raise ValueError(f"unknown request {request}")
        replies.write(json.dumps(reply) + "\n")


def _build(bench, kind: str, shape, languages: list, args, device) -> tuple:
    """-> (name -> runner, reply): every system of ``kind`` this tree can build, and why the others failed.
    Decoding systems are run once here (a warm-up) and the reply carries a digest of the tokens decoded."""
    runners, failed, digests = {}, {}, {}
    if kind == "train":
        batch = bench.make_batch(shape, languages, bench.sentences_in(args.batch_tokens), bench.SENTENCE_LEN, device)
        for name in bench.TRAIN_SYSTEMS:
            try:
                _, step = bench.build_train_system(name, shape, languages, bench.LANG12, device, args.amp)
            except Exception as err:  # noqa: BLE001 - any API this tree lacks: the row says why, the rest still run
                failed[name] = _first_line(err)
                continue
            runners[name] = (lambda s: lambda: s(batch))(step)
    else:
        batch = bench.make_batch(shape, languages, args.decode_sentences, bench.SENTENCE_LEN, device)
        for name in bench.DECODE_SYSTEMS:
            try:
                _, decode = bench.build_decode_system(name, shape, languages, bench.LANG12, device, args.amp)
                output = decode(batch, args.new_tokens, args.beams, DECODE_LOOP)
            except Exception as err:  # noqa: BLE001 - as above
                failed[name] = _first_line(err)
                continue
            digests[name] = hashlib.sha256(output.cpu().numpy().tobytes()).hexdigest()[:16]
            runners[name] = (lambda d: lambda: d(batch, args.new_tokens, args.beams, DECODE_LOOP))(decode)
    return runners, {"built": list(runners), "failed": failed, "digests": digests,
                     "adapted": list(dict.fromkeys(bench.ADAPTED))}


def _time_once(bench, runner, device) -> dict:
    bench.sync(device)
    start = time.perf_counter()
    try:
        runner()
    except Exception as err:  # noqa: BLE001 - reported in the system's row
        return {"error": _first_line(err)}
    bench.sync(device)
    return {"seconds": time.perf_counter() - start}


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


# ---- the comparison ---------------------------------------------------------------------------------------
def time_both(workers: dict, names: list, warmup: int, steps: int, failed: dict) -> dict:
    """(side, name) -> seconds. In each repetition every system runs once on each side, systems in an order
    rotated per repetition, the side that goes first alternating; a call that fails drops the system (both
    sides, ``failed`` says why)."""
    sides = list(workers)
    times = {(side, name): [] for side in sides for name in names}
    for rep in range(warmup + steps):
        started = time.perf_counter()
        order = names[rep % len(names):] + names[:rep % len(names)] if names else []
        for i, name in enumerate(order):
            if name in failed:
                continue
            for side in (sides if (rep + i) % 2 == 0 else sides[::-1]):
                reply = workers[side].ask(op="run", name=name)
                if "error" in reply:
                    failed[name] = f"{side}: {reply['error']}"
                    break
                if rep >= warmup:
                    times[side, name].append(reply["seconds"])
        done = [n for n in names if n not in failed and times["new", n]]
        print(f"  repetition {rep + 1}/{warmup + steps} ({time.perf_counter() - started:.0f} s)" + (
            "" if rep < warmup else ", new/old: " + ", ".join(
            f"{n} {times['new', n][-1] / times['old', n][-1]:.2f}" for n in done)), file=sys.stderr, flush=True)
    return times


def compare_kind(workers: dict, kind: str, warmup: int, steps: int) -> tuple:
    """-> (rows, notes) for the systems of one kind ("train" or "decode")."""
    built = {side: worker.ask(op="build", kind=kind) for side, worker in workers.items()}
    failed = {}
    for side, reply in built.items():
        for name, reason in reply["failed"].items():
            failed.setdefault(name, f"{side}: {reason}")
    names = [n for n in built["new"]["built"] if n in built["old"]["built"]]
    times = time_both(workers, names, warmup, steps, failed)
    order = list(dict.fromkeys([*built["new"]["built"], *built["new"]["failed"], *built["old"]["failed"]]))
    rows = []
    for name in order:
        if name in failed:
            rows.append({"system": name, "na": failed[name]})
            continue
        row = {"system": name, **compare_times(times["new", name], times["old", name])}
        if kind == "decode":
            row["same_tokens"] = built["new"]["digests"][name] == built["old"]["digests"][name]
        rows.append(row)
    notes = {side: reply["adapted"] for side, reply in built.items() if reply["adapted"]}
    return rows, notes


def table(rows: list, decode: bool) -> list:
    pct = f"{100 * CONFIDENCE:g}"
    head = f"| system | old median ms | new median ms | new/old (HL) | {pct}% CI | verdict |"
    lines = [head + (" same tokens |" if decode else ""), "|---|---:|---:|---:|---|---|" + ("---|" if decode else "")]
    for r in rows:
        if "na" in r:
            lines.append(f"| {r['system']} | n/a | n/a | n/a | | n/a: {r['na'].replace('|', '/')} |"
                         + (" |" if decode else ""))
            continue
        ci = "-" if not math.isfinite(r["upper"]) else f"[{r['lower']:.3f}, {r['upper']:.3f}]"
        lines.append(f"| {r['system']} | {1000 * r['old_median']:.1f} | {1000 * r['new_median']:.1f} | "
                     f"{r['ratio']:.3f} | {ci} | {r['verdict']} |"
                     + (f" {'yes' if r['same_tokens'] else 'no'} |" if decode else ""))
    return lines


def _run_both(bench, args, repo: Path, commit: str) -> tuple:
    """-> ((training rows, notes), (decoding rows, notes)), workers' info: the two workers, REV in its worktree."""
    with tempfile.TemporaryDirectory(prefix="lslo-against-logs-") as logs, \
            temporary_worktree(repo, commit) as old_tree:
        workers = {}
        try:
            workers["new"] = Worker("new", repo, Path(bench.__file__), args, Path(logs))
            workers["old"] = Worker("old", old_tree, Path(bench.__file__), args, Path(logs))
            info = {side: w.ask(op="info") for side, w in workers.items()}
            print(f"[against {args.against}] training ...", file=sys.stderr, flush=True)
            train = compare_kind(workers, "train", args.warmup, args.steps)
            print(f"[against {args.against}] decoding ...", file=sys.stderr, flush=True)
            decode = compare_kind(workers, "decode", min(args.warmup, 1), args.decode_steps)
        finally:
            for worker in workers.values():
                worker.close()
    return (train, decode), info


def compare(bench, args, argv: list) -> str:
    """Run the comparison that ``bench.py --against REV`` asks for; -> the markdown report."""
    repo = bench.REPO
    commit = resolve_commit(repo, args.against)
    if args.shape == "auto":
        args.shape = "cpu"
    checkout = describe_checkout(repo)
    load_before = os.getloadavg()[0]
    # A terminated run still closes its workers and removes its worktree (the finally blocks of _run_both run).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        ((train_rows, train_notes), (decode_rows, decode_notes)), info = _run_both(bench, args, repo, commit)
    finally:
        signal.signal(signal.SIGTERM, previous)
    import torch

    shape = bench.SHAPES[args.shape]
    machine = bench.machine_info(torch.device(info["new"]["device"]))
    machine["load average (1 min) before / after"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    lines = ["# lslo benchmark: this checkout against another revision", "",
             "Written by `python benchmarks/bench.py " + " ".join(argv) + "`.", "",
             f"new: the checkout, {checkout} (lslo from {info['new']['lslo']}); old: {args.against} = "
             f"{commit[:12]} (a temporary worktree, removed after the run).", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items() if k != "git"), "",
             f"Shape `{shape.name}` (d_model {shape.d_model}, {shape.layers}+{shape.layers} layers, ffn {shape.ffn}, "
             f"vocab {shape.vocab}); {'float32' if bench.AMP[args.amp] is None else args.amp + ' autocast'}. "
             f"Both revisions run the checkout's bench.py, each in its own process; in every repetition each system "
             f"runs once per revision, the systems in rotating order and the revision that goes first alternating.",
             "", f"Training step ({args.steps} repetitions per revision after {args.warmup} warm-up):", ""]
    lines += table(train_rows, decode=False)
    lines += ["", f"Beam-{args.beams} decoding of {args.decode_sentences} sentences, {args.new_tokens} new tokens "
              f"(min = max), lslo's beam loop ({args.decode_steps} repetitions per revision after "
              f"{min(args.warmup, 1) + 1} warm-up; same tokens: both revisions decoded the same ids):", ""]
    lines += table(decode_rows, decode=True)
    notes = {**train_notes}
    for side, items in decode_notes.items():
        notes[side] = list(dict.fromkeys([*notes.get(side, []), *items]))
    if notes:
        lines += ["", "Adapted to an older API:"]
        lines += [f"- {side}: {item}" for side, items in notes.items() for item in items]
    lines += ["", f"new/old (HL): of each side's repetitions, the slowest {100 * TRIM:g}% are left out (load only "
              "slows a repetition); of the rest, exp of the Hodges-Lehmann shift of log times (the median of all "
              f"pairwise differences log new_i - log old_j); {100 * CONFIDENCE:g}% CI: "
              "the distribution-free Mann-Whitney interval of that shift (order statistics of the pairwise "
              "differences at the exact null distribution of U); a regression or an improvement only when the "
              "interval excludes 1. n/a: a system one revision could not build or run (the error says which).", ""]
    return "\n".join(lines)
