"""A rehearsal: every stage of a real config, on its real model and data, cut to a few updates and sentences,
measured, and projected to the full run (config `rehearse`; README "Running the paper's setups").

Under `rehearse` the workflow writes everything below results/rehearsal/ (rules/common.smk RESULTS) and
- each training stage (weight learning, both subspace modes, every fine-tune variant; demo pretraining) stops after
  `updates` updates (train.max_updates) at the config's own batch size, and scores its dev set on at most
  `sentences` sentences;
- decoding takes the first `sentences` test sentences of every direction, at most `max_new_tokens` new tokens each;
- scoring, tables and figures run on what that gives.
Each job runs inside `measured_job`, which writes the job's clock (its wall time, peak memory, the bytes of its
outputs and checkpoints, and the seconds of each update, dev scoring and decoding batch) to
results/rehearsal/clocks/.
`rehearsal_report` turns the clocks into results/rehearsal/report.md: what each job took, and what the full run of
the same config will take, from the number of updates the trainer's own epoch plan (lslo.train.epoch_plan) gives on
the real data and the number of sentences the real config decodes.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil

import lslo.finetune
import lslo.inference
import lslo.train
from lslo.checkpoint import KEEP_CHECKPOINTS
from lslo.data import Corpus, read_parallel
from lslo.errors import LsloError
from lslo.languages import nllb_codes, read_language_table
from lslo.tokenizer import load_tokenizer
from lslo.options import STOP_OPTION
from lslo.train import TrainOptions, epoch_plan, shard

# ---------------------------------------------------------------------------------------------- one job, measured

def tree_bytes(path) -> int:
    """Bytes of a file, or of every file below a directory (0 when absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def peak_rss_bytes() -> int:
    """The peak resident memory of this process or of any process it waited for (torchrun's), in bytes."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return scale * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                       resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


class Clock:
    """The seconds of each training update, each dev scoring and each decoding batch of one job."""

    def __init__(self):
        self.updates_s: list[float] = []
        self.epochs = 0
        self.dev_s: list[float] = []
        self.dev_sentences: list[int] = []
        self.checkpoint_s: list[float] = []
        self.decode_batches: list[dict] = []
        self._in_dev = False

    def now(self) -> float:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # kernels run asynchronously: time what ran, not what was queued
        return time.perf_counter()

    @contextlib.contextmanager
    def installed(self) -> Iterator["Clock"]:
        """Time the library's own steps while the job runs (the names the training loop and decoding call)."""
        clock = self
        update_step, epoch_metrics, save_checkpoint = (lslo.train.update_step, lslo.train.epoch_metrics,
                                                       lslo.train.save_checkpoint)
        dev_scores, translate_batch = lslo.train.dev_scores, lslo.inference.Translator.translate_batch

        def timed_update(*args, **kwargs):
            start = clock.now()
            counted = update_step(*args, **kwargs)
            if counted is not None:  # an fp16 update skipped after overflows is not an update
                clock.updates_s.append(clock.now() - start)
            return counted

        def counted_epoch(*args, **kwargs):
            clock.epochs += 1
            return epoch_metrics(*args, **kwargs)

        def timed_checkpoint(*args, **kwargs):
            start = clock.now()
            try:
                return save_checkpoint(*args, **kwargs)
            finally:
                clock.checkpoint_s.append(clock.now() - start)

        def timed_dev(*args, **kwargs):
            start, clock._in_dev, before = clock.now(), True, len(clock.decode_batches)
            try:
                return dev_scores(*args, **kwargs)
            finally:
                clock._in_dev = False
                clock.dev_s.append(clock.now() - start)
                clock.dev_sentences.append(sum(b["sentences"] for b in clock.decode_batches[before:]))
                del clock.decode_batches[before:]

        def timed_batch(translator, batch_ids, srcs, tgts, options, max_new_tokens):
            start = clock.now()
            hyps = translate_batch(translator, batch_ids, srcs, tgts, options, max_new_tokens)
            clock.decode_batches.append({"s": clock.now() - start, "sentences": len(batch_ids),
                                         "max_new_tokens": max_new_tokens,
                                         "longest_source": max(len(ids) for ids in batch_ids)})
            return hyps

        patches = [(lslo.train, "update_step", timed_update), (lslo.train, "epoch_metrics", counted_epoch),
                   (lslo.train, "save_checkpoint", timed_checkpoint),
                   (lslo.train, "dev_scores", timed_dev), (lslo.finetune, "dev_scores", timed_dev),
                   (lslo.inference.Translator, "translate_batch", timed_batch)]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, wrapper in patches:
                setattr(owner, name, wrapper)
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


@contextlib.contextmanager
def measured_job(clock_json, outputs, job: dict, checkpoint_dir=None, timed: bool = False) -> Iterator[None]:
    """Run a job's body and write its clock to `clock_json`: job (rule, wildcards), the seconds since the job's
    process started, peak RSS (and peak CUDA memory when the job used a GPU), bytes of `outputs` and of
    `checkpoint_dir`, and, with `timed`, the seconds of each update, epoch, dev scoring and decoding batch (Clock).
    Nothing is written when the body fails. (psutil: Snakemake's own dependency, present wherever a rule runs.)"""
    clock = Clock()
    with clock.installed() if timed else contextlib.nullcontext():
        yield
    wall = time.time() - psutil.Process().create_time()  # the job process's whole life, interpreter start included
    torch = sys.modules.get("torch")
    on_gpu = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    record = {
        **job,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "threads": torch.get_num_threads() if torch is not None else None,
        "wall_s": wall,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "output_bytes": sum(tree_bytes(path) for path in outputs),
        "checkpoint_bytes": tree_bytes(checkpoint_dir) if checkpoint_dir else 0,
        "updates_s": clock.updates_s,
        "epochs": clock.epochs,
        "dev_s": clock.dev_s,
        "dev_sentences": clock.dev_sentences,
        "checkpoint_s": clock.checkpoint_s,
        "decode_batches": clock.decode_batches,
    }
    Path(clock_json).parent.mkdir(parents=True, exist_ok=True)
    Path(clock_json).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the full run

# The options an epoch's batches depend on (lslo.train.epoch_plan); lr, ranks, dropout, ... do not change them.
PLAN_OPTIONS = ("seed", "temperature", "max_epoch_examples", "max_tokens", "mixed_directions")


def planned_updates(corpus, options, world_size: int = 1, batches_cache: dict | None = None) -> tuple[int, int]:
    """(updates, epochs) the trainer runs with `options` on `corpus` (lslo.data.Corpus): the batches of each epoch
    from the trainer's own epoch plan (lslo.train.epoch_plan: temperature sampling, token-budget batches), sharded
    over `world_size` processes and grouped update_freq to an update, until max_updates. An epoch in which
    max_updates is reached is run (and dev-scored), the next ones are not (lslo.train.training_epochs).
    batches_cache: {(PLAN_OPTIONS values, epoch, world_size): batches}, shared by stages whose plans agree."""
    batches_cache = {} if batches_cache is None else batches_cache
    plan = tuple(getattr(options, name) for name in PLAN_OPTIONS)
    update_freq = options.update_freq_for(world_size)
    limit = getattr(options, STOP_OPTION, None)
    updates = 0
    for epoch in range(1, options.epochs + 1):
        key = (plan, epoch, world_size)
        if key not in batches_cache:
            batches_cache[key] = len(shard(epoch_plan(corpus, options, epoch), 0, world_size))
        updates += math.ceil(batches_cache[key] / update_freq)
        if limit is not None and updates >= limit:
            return limit, epoch
    return updates, options.epochs


def seconds_per_update(clock: dict) -> float | None:
    """Mean seconds of the updates after the first (which also allocates the optimizer state and warms caches);
    the first update's when it is the only one; None when the job trained nothing."""
    timed = clock["updates_s"][1:] or clock["updates_s"]
    return sum(timed) / len(timed) if timed else None


def project_training(clock: dict, updates: int, epochs: int, dev_scale: float) -> float:
    """Seconds of the full run of a training job: what the rehearsal spent outside updates, dev scoring and epoch
    checkpoints (starting, loading, tokenizing, writing the outputs; the same in the full run) + updates x seconds
    per update + its dev scorings (one per epoch, and any outside the epochs) x their measured seconds, scaled by
    dev_scale (full / rehearsed dev sentences) + one epoch checkpoint per epoch x its measured seconds."""
    checkpoints = clock.get("checkpoint_s", [])
    spent = sum(clock["updates_s"]) + sum(clock["dev_s"]) + sum(checkpoints)
    dev_calls = len(clock["dev_s"]) - clock["epochs"] + epochs
    dev_each = sum(clock["dev_s"]) / len(clock["dev_s"]) if clock["dev_s"] else 0.0
    checkpoint_each = sum(checkpoints) / len(checkpoints) if checkpoints else 0.0
    return ((clock["wall_s"] - spent) + updates * (seconds_per_update(clock) or 0.0)
            + dev_calls * dev_each * dev_scale + epochs * checkpoint_each)


def decode_steps(max_new_tokens: int, longest_source: int) -> int:
    """Decoder steps of a batch, taken as the longest source's length (a translation about as long as its source,
    in tokens) unless the cap on new tokens ends it first."""
    return min(max_new_tokens, longest_source)


def project_decoding(clock: dict, sentence_scale: float, max_len_a: float, max_len_b: int) -> float:
    """Seconds of the full run of a decode job: the rehearsal's time outside decoding + each batch's seconds x
    (its decoder steps under the full run's length cap / under the rehearsal's) x sentence_scale (full / rehearsed
    sentences per direction)."""
    batches = clock["decode_batches"]
    decoding = sum(b["s"] for b in batches)
    full = sum(b["s"] * decode_steps(int(max_len_a * b["longest_source"] + max_len_b), b["longest_source"])
               / decode_steps(b["max_new_tokens"], b["longest_source"]) for b in batches)
    return (clock["wall_s"] - decoding) + full * sentence_scale


def checkpoint_epochs(epochs: int) -> int:
    """Epoch checkpoints on disk after `epochs` epochs (lslo.checkpoint keeps the newest KEEP_CHECKPOINTS)."""
    return min(epochs, KEEP_CHECKPOINTS)


def project_disk(clock: dict, epochs: int | None = None, scale: float = 1.0) -> int:
    """Bytes the full run's job leaves: its outputs x scale (hyps grow with the sentences), and for a training job
    its checkpoints, per kept epoch as measured."""
    disk = clock["output_bytes"] * scale
    if epochs is not None and clock["epochs"]:
        disk += clock["checkpoint_bytes"] / checkpoint_epochs(clock["epochs"]) * checkpoint_epochs(epochs)
    return int(round(disk))


# ---------------------------------------------------------------------------------------------- report.md

def job_name(clock: dict) -> str:
    return "/".join([clock["rule"], *map(str, clock["wildcards"].values())])


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    hours, rest = divmod(int(round(s)), 3600)
    return f"{hours}:{rest // 60:02d} h" if hours else f"{rest // 60}:{rest % 60:02d} min"


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def rows_of(n_rows: int, limit: int | None) -> int:
    """Sentences used of `n_rows` under a first-N limit (None: all)."""
    return n_rows if limit is None else min(limit, n_rows)


def projected_row(clock: dict, plan: dict, corpus_updates, devtest_rows: int) -> dict:
    """One report row: the job as measured, and the full run's work, seconds and bytes (plan: rules/common.smk's
    rehearsal_plans entry of the job)."""
    row = {"job": job_name(clock), "wall": clock["wall_s"], "rss": clock["peak_rss_bytes"],
           "gpu": clock["peak_gpu_bytes"], "disk": clock["output_bytes"] + clock["checkpoint_bytes"],
           "rate": "", "work": "as rehearsed", "time": clock["wall_s"], "full_disk": project_disk(clock)}
    kind = plan.get("kind")
    if kind == "train":
        updates, epochs = corpus_updates(plan["options"]) if plan["trains"] else (0, 0)
        dev_scale = (rows_of(devtest_rows, plan["dev_sentences"])
                     / max(rows_of(devtest_rows, plan["rehearsed_dev_sentences"]), 1))
        per_update = seconds_per_update(clock)
        untimed = plan["trains"] and per_update is None  # trained in torchrun's processes (resources gpu > 1)
        row.update(rate="not timed (several processes)" if untimed else
                   f"{per_update:.3g} s/update" if per_update else "",
                   work=f"{plural(updates, 'update')}, {plural(epochs, 'epoch')}" if plan["trains"]
                   else "dev scores only",
                   time=None if untimed else project_training(clock, updates, epochs, dev_scale),
                   full_disk=project_disk(clock, epochs))
    elif kind == "pretrain":  # the demo's pretraining: exactly `updates` updates, no epochs, no dev scores
        per_update = seconds_per_update(clock)
        row.update(rate=f"{per_update:.3g} s/update" if per_update else "not timed",
                   work=plural(plan["updates"], "update"),
                   time=None if per_update is None else
                   clock["wall_s"] - sum(clock["updates_s"]) + plan["updates"] * per_update)
    elif kind == "decode":
        rehearsed = rows_of(devtest_rows, plan["rehearsed_sentences"])
        full = rows_of(devtest_rows, plan["sentences"])
        scale = full / max(rehearsed, 1)
        decoded = sum(b["sentences"] for b in clock["decode_batches"])
        seconds = sum(b["s"] for b in clock["decode_batches"])
        row.update(rate=f"{seconds / decoded:.3g} s/sentence" if decoded else "",
                   work=f"{int(round(decoded * scale)):,} sentences",
                   time=project_decoding(clock, scale, plan["max_len_a"], plan["max_len_b"]),
                   full_disk=project_disk(clock, scale=scale))
    return row


def rehearsal_report(clock_jsons, plans: dict, train_tsv, devtest_tsv, model_dir, language_table, languages,
                     rehearsal: dict, out_md) -> list[dict]:
    """results/rehearsal/report.md from the jobs' clocks; plans: {clock path: what the full run does in that job}.
    Returns the rows."""
    clocks = {str(path): json.loads(Path(path).read_text(encoding="utf-8")) for path in clock_jsons}
    missing = sorted(set(clocks) - set(plans))
    if missing:
        raise LsloError(f"{missing[0]}: a rehearsal clock with no plan of the full run")
    table = read_language_table(language_table)
    devtest_rows = len(read_parallel(devtest_tsv, languages))
    train = read_parallel(train_tsv, languages)
    corpus, cache, batches_cache = None, {}, {}

    def corpus_updates(options: dict) -> tuple[int, int]:
        nonlocal corpus
        if corpus is None:  # tokenized once, as the training stages tokenize it (lslo.train.train)
            tokenizer = load_tokenizer(model_dir, nllb_codes(table, languages))
            corpus = Corpus.multiparallel(train, list(languages), tokenizer)
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            cache[key] = planned_updates(corpus, TrainOptions.from_dict(options, "train"),
                                         batches_cache=batches_cache)
        return cache[key]

    rows = [projected_row(clock, plans[path], corpus_updates, devtest_rows) for path, clock in clocks.items()]
    devices = sorted({f"{c['device']} ({c['threads']} thread{'s' if c['threads'] > 1 else ''})"
                      if c["threads"] else c["device"]
                      for c in clocks.values()})
    write_report(rows, out_md, rehearsal, devices, model_dir, languages, len(train))
    return rows


def write_report(rows: list[dict], out_md, rehearsal: dict, devices: list[str], model_dir, languages,
                 train_sentences: int) -> None:
    lines = [
        "# Rehearsal: what each job took, and what the full run will take",
        "",
        f"Model `{model_dir}`; {len(languages)} languages ({' '.join(languages)}), "
        f"{len(languages) * (len(languages) - 1)} directions, {train_sentences:,} training sentences per language. "
        f"Rehearsed with {rehearsal['updates']} updates per training stage, {rehearsal['sentences']} sentences "
        f"per direction (test) and per dev scoring, at most {rehearsal['max_new_tokens']} new tokens per test "
        f"sentence, on {', '.join(devices)}.",
        "",
        "| job | rehearsal | peak RSS | peak GPU | disk | measured | full run | full run time | full run disk |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: r["job"]):
        lines.append(f"| {row['job']} | {duration(row['wall'])} | {size(row['rss'])} | {size(row['gpu'])} | "
                     f"{size(row['disk'])} | {row['rate']} | {row['work']} | {duration(row['time'])} | "
                     f"{size(row['full_disk'])} |")
    gpu = [row["gpu"] for row in rows if row["gpu"] is not None]
    untimed = [row["job"] for row in rows if row["time"] is None]
    lines += [
        f"| **all jobs, one after another** | {duration(sum(r['wall'] for r in rows))} | "
        f"{size(max(r['rss'] for r in rows))} | {size(max(gpu) if gpu else None)} | "
        f"{size(sum(r['disk'] for r in rows))} | | | "
        f"{duration(None if untimed else sum(r['time'] for r in rows))} | "
        f"{size(sum(r['full_disk'] for r in rows))} |",
        "",
        "Peak RSS and peak GPU are the job's own (GPU: torch.cuda.max_memory_allocated), at the config's batch size "
        "for training; decoding batches hold at most the rehearsed sentences. Disk: the job's outputs and training "
        "checkpoints. Full run time: the job's time outside updates, dev scoring, epoch checkpoints and decoding as "
        "measured (process start included), plus the full run's updates (lslo.train.epoch_plan on the training "
        "data) x the seconds per update after the first, its dev scorings x their measured seconds scaled by dev "
        "sentences, an epoch checkpoint per epoch, and its test sentences x the measured decoding seconds scaled by "
        "decoder steps, a translation taken as long as its source under the config's length cap. Jobs without a "
        "rate run in full in the rehearsal. One process per job: a job that trains on N GPUs divides its update "
        "time by about N.",
    ]
    if untimed:  # its updates ran in torchrun's processes, where this process's clock does not reach
        lines += ["", f"Not timed, so no full run time: {', '.join(untimed)}. Rehearse them in one process "
                      "(resources gpu=1) to time their updates."]
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(out_md).write_text("\n".join(lines) + "\n", encoding="utf-8")
