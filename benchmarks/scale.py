"""The paper's scale on this machine: M2M-124 615M's shape, its 256,125-row vocabulary, lang12 and lang30.

What it does, in one run (each heavy part in its own subprocess, one at a time):

1. builds a random-weight M2M100 at the shape of M2M-124 615M (d_model 1024, 12+12 layers, ffn 4096, 16 heads,
   256,125 embedding rows, float32) as an HF checkpoint directory with a tokenizer whose vocabulary reaches that
   size: the SentencePiece pieces of a model trained on the demo world's text, then filler entries up to fairseq
   dict.txt's 255,997 lines, then M2M-124's 124 language tokens (as lslo.convert makes of the release). The
   directory must pass the workflow's own model checks (lslo.check_model);
2. lays out the demo world's text (lslo.demo_benchmark, 30 languages) in the FLORES-101 layout under the paper
   languages' file names (each demo language stands for one paper language: h1 -> eng, ...), and writes lang12 /
   lang30 configs pointing at it;
3. measures one lang12 LSLo training update (lslo.train.train_update: forward, backward, Adam) at the 615M
   shape on ~2000 target tokens of that text, once per training loss (`train.loss`: plain, chunked), each in a
   fresh process: peak RSS (VmHWM) and the median step time after one warm-up;
4. saves one Ft-all epoch checkpoint as the trainer does (lslo.checkpoint.save_checkpoint of
   lslo.train.trainable_state and Adam's state), and the adapters and a checkpoint of LSLo lang30 2;2;8;8, and
   gives the disk the retention policy (lslo.checkpoint.KEEP_CHECKPOINTS per run) takes for lang12 and lang30;
5. runs the workflow's rehearsal of the lang12 config, cut to one variant of each method and 2,000-token updates so
   that it fits 2 cores (snakemake, `rehearse` setting), copies its report table, and projects the full lang12
   and lang30 runs on this machine from its measured jobs;
6. writes everything as tables to benchmarks/RESULTS-scale.md.

    python benchmarks/scale.py                          # the 615M shape (~25 min on 2 cores, ~14 GB disk)
    python benchmarks/scale.py --shape tiny --skip-rehearsal --out /tmp/scale.md   # seconds: checks the script
    python benchmarks/scale.py --updates 2 --losses plain   # fewer timed updates, one loss

The work directory (--workdir; default a fresh benchmarks/.scale-work-* directory that ignores itself in git)
holds the checkpoint, the world and the saved checkpoints; the script removes what it created there unless
--keep is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

LANGUAGE_TABLE = REPO / "config" / "languages.tsv"
GROUP_RANKS = {"H": 2, "M": 2, "L": 8, "V": 8}  # the paper's main setting, H;M;V = 2;2;8 (lang30: H;M;L;V = 2;2;8;8)
LOSSES = ("plain", "chunked")
SENTENCE_LEN = 32  # target tokens per sentence of the random batch (no world text: the GPU check)
MODEL_DIR, WORLD_DIR, FLORES_DIR = "m2m124-random", "demo-world", "flores"
TARGETS = {"memory": 0.6, "time": 1.1}  # chunked / plain
BATCH_POOL_ROWS = 300  # FLORES dev rows the training batch is drawn from (tokenizing all 997 x 12 takes seconds)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    layers: int
    ffn: int
    heads: int
    dict_lines: int  # fairseq dict.txt lines before the language tokens (pieces + filler)
    spm_vocab: int  # upper bound of the SentencePiece model trained on the world

    @property
    def rows(self) -> int:
        """Embedding rows: fairseq's 4 specials + dict.txt lines + M2M-124's language tokens."""
        from lslo.tokenizer import M2M124_LANGUAGE_CODES

        return 4 + self.dict_lines + len(M2M124_LANGUAGE_CODES)


SHAPES = {
    # flores101_mm100_615M: 255,997 dict.txt lines before __af__, 256,125 embedding rows (tests/test_convert.py)
    "m2m124-615m": Shape("m2m124-615m", 1024, 12, 4096, 16, 255_997, 2000),
    "tiny": Shape("tiny", 64, 2, 128, 4, 2_996, 1000),
}


# ---- memory ------------------------------------------------------------------------------------------------
def status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False when refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# ---- 1. the checkpoint ---------------------------------------------------------------------------------------
def model_config(shape: Shape):
    """The HF config lslo.convert makes of a fairseq checkpoint with these transformer arguments."""
    from lslo.convert import hf_config

    args = {"encoder_embed_dim": shape.d_model, "decoder_embed_dim": shape.d_model,
            "encoder_layers": shape.layers, "decoder_layers": shape.layers,
            "encoder_attention_heads": shape.heads, "decoder_attention_heads": shape.heads,
            "encoder_ffn_embed_dim": shape.ffn, "decoder_ffn_embed_dim": shape.ffn,
            "encoder_normalize_before": True, "decoder_normalize_before": True,
            "dropout": 0.1, "attention_dropout": 0.1}
    return hf_config(args, shape.rows, source=f"shape {shape.name}")


def dictionary(spm_model: Path, shape: Shape) -> list[str]:
    """fairseq dictionary order: specials, the SentencePiece pieces, then filler entries up to dict_lines (a
    256k dictionary built for other text has pieces this small model lacks; they are never produced here)."""
    from lslo.tokenizer import spm_vocab

    tokens = spm_vocab(spm_model)
    pieces = len(tokens) - 4
    if pieces > shape.dict_lines:
        raise RuntimeError(f"{spm_model}: {pieces} pieces, more than the {shape.dict_lines} dictionary lines")
    return tokens + [f"madeupword{i:06d}" for i in range(shape.dict_lines - pieces)]


def build_checkpoint(work: Path, shape: Shape, seed: int = 1) -> dict:
    """Random-weight HF checkpoint + tokenizer + spm.model in work/MODEL_DIR (reused when a previous run with
    --keep left it for this shape); returns its facts."""
    import torch
    from transformers import M2M100ForConditionalGeneration

    from lslo.tokenizer import M2M124_LANGUAGE_CODES, build_tokenizer, model_vocab_size

    out = work / MODEL_DIR
    manifest = out / "scale.json"
    if manifest.is_file() and json.loads(manifest.read_text())["shape"] == shape.name:
        return {**json.loads(manifest.read_text()), "reused": True}
    if out.exists():
        shutil.rmtree(out)  # a partial directory of this script's own (work is this script's)
    start = time.perf_counter()
    spm_model = work / "spm.model"
    tokenizer = build_tokenizer(spm_model, M2M124_LANGUAGE_CODES, out, vocab=dictionary(spm_model, shape),
                                num_madeup_words=0)
    shutil.copyfile(spm_model, out / "spm.model")  # eval.spm of the configs
    config = model_config(shape)
    if model_vocab_size(tokenizer) != config.vocab_size:
        raise RuntimeError(f"tokenizer needs {model_vocab_size(tokenizer)} rows, the model has {config.vocab_size}")
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tokenizer.eos_token_id
    build_s = time.perf_counter() - start
    model.save_pretrained(out)
    facts = {"shape": shape.name, "rows": config.vocab_size, "pieces": len(tokenizer.sp_model),
             "vocab_json": tokenizer.encoder_size, "languages": len(tokenizer.lang_code_to_id),
             "parameters": sum(p.numel() for p in model.parameters()),
             "weights_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
             "dir_bytes": dir_bytes(out), "build_s": round(build_s, 1),
             "save_s": round(time.perf_counter() - start - build_s, 1)}
    manifest.write_text(json.dumps(facts))
    return {**facts, "reused": False}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_checkpoint(work: Path) -> list[str]:
    """lslo.check_model's report lines for lang30 (lang12 is a subset); raises when it finds a problem."""
    from lslo.check_model import check_model
    from lslo.languages import read_language_table, select

    table = read_language_table(LANGUAGE_TABLE)
    report = check_model(work / MODEL_DIR, select(table, "lang30"), table)
    if not report.ok:
        raise RuntimeError("the random checkpoint fails lslo.check_model:\n" + "\n".join(report.lines()))
    return report.lines()


# ---- 2. the world in the FLORES layout -------------------------------------------------------------------------
def build_world(work: Path, shape: Shape, seed: int = 1, bitext_scale: float = 0.05) -> dict:
    """The demo world (30 languages) as FLORES-101 files of the paper languages each demo language stands for,
    and the SentencePiece model trained on its text (lslo.demo.train_demo_spm)."""
    from lslo.demo import train_demo_spm
    from lslo.demo_benchmark import LANGUAGES, MAX_LANGUAGES, make_benchmark
    from lslo.languages import file_code, read_language_table, select

    start = time.perf_counter()
    world = make_benchmark(work / WORLD_DIR, n_languages=MAX_LANGUAGES, seed=seed, bitext_scale=bitext_scale)
    table = read_language_table(LANGUAGE_TABLE)
    stands_for = {row[5]: row[0] for row in LANGUAGES}  # paper code -> demo code
    lang30 = select(table, "lang30")
    missing = [code for code in lang30 if code not in stands_for]
    if missing:
        raise RuntimeError(f"no demo language stands for {missing}")
    flores = work / FLORES_DIR
    for split in ("dev", "devtest"):
        (flores / split).mkdir(parents=True, exist_ok=True)
        for code in lang30:
            shutil.copyfile(world / split / f"{stands_for[code]}.{split}",
                            flores / split / f"{file_code(table, code, 'flores101')}.{split}")
    train_demo_spm(world, work / "spm.model", vocab_size=shape.spm_vocab, seed=seed)
    return {"languages": len(lang30), "files": len(list(flores.rglob("*.dev*"))), "s": time.perf_counter() - start}


def write_configs(work: Path) -> dict:
    """config/lang12.yaml and config/lang30.yaml with data.flores, model and eval.spm set to this world and
    checkpoint, everything else as the paper's configs have it."""
    from lslo.config import load_yaml

    import yaml

    paths = {}
    for name in ("lang12", "lang30"):
        config = load_yaml(REPO / "config" / f"{name}.yaml")
        config["data"]["flores"] = str(work / FLORES_DIR)
        config["data"]["language_table"] = str(LANGUAGE_TABLE)
        config["model"] = str(work / MODEL_DIR)
        config["eval"]["spm"] = str(work / MODEL_DIR / "spm.model")
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return paths


def rehearsal_config(work: Path, variants: list[str], batch_tokens: int | None) -> Path:
    """lang12.yaml cut so that its rehearsal fits 2 CPU cores: only `variants` (one of each kind of training job:
    the others of the paper's lang12 differ in ranks, index plan, modules or GPS schedule, not in the work of an
    update), in Table 1 and Figure 3 only, decoded in one shard, and (batch_tokens) `batch_tokens` tokens per
    update instead of the paper's 4000 x 4, and on a machine without CUDA, fp32 decoding. Everything else is
    lang12.yaml's."""
    from lslo.config import load_yaml

    import yaml

    config = load_yaml(work / "lang12.yaml")
    unknown = sorted(set(variants) - set(config["variants"]))
    if unknown:
        raise SystemExit(f"--rehearsal-variants: {unknown} not variants of config/lang12.yaml")
    config["variants"] = {name: config["variants"][name] for name in variants}
    config["tables"] = {"table1": list(variants)}
    config["figure3"] = list(variants)
    config["eval"]["shards"] = 1
    import torch

    if not torch.cuda.is_available():  # eval.dtype fp16 (the authors' decoding) is refused off CUDA
        config["eval"]["dtype"] = "fp32"
    if batch_tokens:
        config["train"].update(max_tokens=batch_tokens, tokens_per_update=batch_tokens)
    path = work / "lang12-rehearsal.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def stage_of(config: dict, variant: str | None) -> tuple[str, dict]:
    """(the rehearsed job a full-config job is projected from, that job's train options as rules/common.smk
    composes them: the `train` block, then the stage's or variant's own)."""
    base = {"dev_search": config["eval"]["search"], **config["train"]}
    if variant is None:
        return "", base
    spec = config["variants"][variant]
    return spec["method"], {**base, **(spec.get("train") or {})}


METHOD_NAMES = {"full": "Ft-all", "lslo": "LSLo", "pretrain": "Pretrain"}


def project_full_runs(work: Path, clocks: Path, representatives: dict, batch_tokens: int | None) -> list[dict]:
    """The full lang12 and lang30 runs on this machine, projected from the rehearsal's measured jobs: every
    training job from the rehearsed job of its kind (weight learning, subspace ISE / LSP, Ft-all, LSLo, Pretrain's
    dev scores) with lslo.rehearsal.project_training, at that config's own updates and epochs (the trainer's epoch
    plan on that config's languages, at the rehearsed batch), dev sentences and directions; every variant's
    decoding from the rehearsed decoding of its method with lslo.rehearsal.project_decoding, scaled to all test
    sentences of that config's directions. representatives: {method: rehearsed variant}. Rows: config, job kind,
    jobs, work per job, hours per job, hours."""
    return [row for name in ("lang12", "lang30")
            for row in project_config(work, name, clocks, representatives, batch_tokens)]


def project_config(work: Path, name: str, clocks: Path, representatives: dict, batch_tokens: int | None
                   ) -> list[dict]:
    from lslo.config import load_yaml
    from lslo.data import Corpus, prepare_data, read_parallel
    from lslo.languages import groups as language_groups
    from lslo.languages import nllb_codes, read_language_table, select
    from lslo.rehearsal import planned_updates, project_decoding, project_training
    from lslo.tokenizer import load_tokenizer
    from lslo.train import TrainOptions

    def clock(job: str) -> dict:
        return json.loads((clocks / f"{job}.json").read_text(encoding="utf-8"))

    table = read_language_table(LANGUAGE_TABLE)
    config = load_yaml(work / f"{name}.yaml")
    codes = select(table, config["data"]["languages"])
    directions = len(codes) * (len(codes) - 1)
    group_of = language_groups(table, codes)
    # dev scores decode the H2H and V2V directions only (lslo.train.dev_scores: Figure 3's)
    dev_directions = sum(n * (n - 1) for n in (sum(g == group for g in group_of.values()) for group in "HV"))
    with tempfile.TemporaryDirectory() as tmp:
        train_tsv, test_tsv = Path(tmp) / "train.tsv", Path(tmp) / "devtest.tsv"
        prepare_data(flores_root=work / FLORES_DIR, layout="flores101", language_table_path=LANGUAGE_TABLE,
                     languages=codes, out_train=train_tsv, out_test=test_tsv)
        train, test_rows = read_parallel(train_tsv, codes), len(read_parallel(test_tsv, codes))
    corpus = Corpus.multiparallel(train, codes, load_tokenizer(work / MODEL_DIR, nllb_codes(table, codes)))
    batch = {"max_tokens": batch_tokens, "tokens_per_update": batch_tokens} if batch_tokens else {}
    base = {"dev_search": config["eval"]["search"], **config["train"]}  # as rules/common.smk's train_options
    rows, cache = [], {}  # cache: the epoch plans of this corpus, shared by stages whose batches agree

    def training(kind: str, job: str, options: dict, count: int, trains: bool = True) -> None:
        options = {**options, **batch}
        updates, epochs = (planned_updates(corpus, TrainOptions.from_dict(options, "train"), batches_cache=cache)
                           if trains else (0, 0))
        measured = clock(job)
        dev = options.get("dev_sentences", TrainOptions.dev_sentences)
        rehearsed_dev = statistics.mean(measured["dev_sentences"]) if measured["dev_sentences"] else 1
        dev_scale = (test_rows if dev is None else min(dev, test_rows)) * dev_directions / max(rehearsed_dev, 1)
        hours = project_training(measured, updates, epochs, dev_scale) / 3600
        rows.append({"config": name, "kind": kind, "jobs": count, "hours_each": hours, "hours": hours * count,
                     "work": f"{updates:,} updates, {epochs} epochs" if trains else "dev scores only"})

    training("weight learning", "weight_learning", {**base, **(config["weight_learning"].get("train") or {})}, 1)
    for mode in ("ise", "lsp"):
        training(f"subspace {mode.upper()}", f"subspace/{mode}", {**base, **(config["subspace"].get("train") or {})},
                 1)
    groups = {}  # variants whose training options agree train alike: (method, options) -> variants
    for variant, spec in config["variants"].items():
        options = {**base, **(spec.get("train") or {})}
        groups.setdefault((spec["method"], json.dumps(options, sort_keys=True)), []).append(variant)
    for (method, options), variants in groups.items():
        options = json.loads(options)
        every_dev = "dev_sentences" in options and options["dev_sentences"] is None
        training(METHOD_NAMES[method] + (" (every dev sentence, each epoch)" if every_dev else ""),
                 f"finetune/{representatives[method]}", options, len(variants), trains=method != "pretrain")
    for method, label in METHOD_NAMES.items():
        count = sum(spec["method"] == method for spec in config["variants"].values())
        measured = clock(f"decode/{representatives[method]}/0")
        rehearsed = sum(b["sentences"] for b in measured["decode_batches"])
        sentences = min(config["eval"].get("max_sentences") or test_rows, test_rows) * directions
        hours = project_decoding(measured, sentences / rehearsed, config["eval"]["max_len_a"],
                                 config["eval"]["max_len_b"]) / 3600
        rows.append({"config": name, "kind": f"decode, {label}", "jobs": count, "hours_each": hours,
                     "hours": hours * count, "work": f"{sentences:,} sentences"})
    return rows


# ---- 3. one LSLo training update per loss ------------------------------------------------------------------------
def has_loss_option() -> bool:
    """Whether lslo.train offers `train.loss` (plain | chunked) in this checkout."""
    from lslo.train import TrainOptions

    return "loss" in {f.name for f in dataclasses.fields(TrainOptions)}


def step_options(target_tokens: int, loss: str, amp: str | None):
    """lang12's training options (config/lang12.yaml's train block) for one micro-batch per update, with
    train.loss = `loss` and AMP as asked (None: off; "fp16" as lang12 trains on GPUs)."""
    from lslo.config import load_yaml
    from lslo.train import TrainOptions

    block = dict(load_yaml(REPO / "config" / "lang12.yaml")["train"])
    block.update(max_tokens=max(target_tokens, 64), tokens_per_update=None, update_freq=1, amp=amp is not None)
    if amp is not None:
        block["amp_dtype"] = amp
    if loss != "plain" or has_loss_option():
        if not has_loss_option():
            raise RuntimeError(f"train.loss '{loss}' asked, but lslo.options.TrainOptions has no `loss` option in "
                               "this checkout")
        block["loss"] = loss
    return TrainOptions.from_dict(block, "scale.train")


def world_batch(work: Path, tokenizer, codes: list[str], target_tokens: int, seed: int) -> dict:
    """Sentences of the world's FLORES dev text in lang12's mixed directions, collated as the trainer does: one
    epoch's draw (temperature 5), ordered by length as lslo.data.make_batches orders it (so padding stays small),
    and from the middle of that order as many sentences as hold target_tokens label tokens."""
    from lslo.data import Corpus, TemperatureSampler, collate, read_flores
    from lslo.languages import read_language_table

    table = read_flores(work / FLORES_DIR, codes, read_language_table(LANGUAGE_TABLE), "train", "flores101")
    corpus = Corpus.multiparallel(table.head(BATCH_POOL_ROWS), codes, tokenizer)
    drawn = TemperatureSampler(corpus.sizes(), 5.0, seed=seed).epoch()
    drawn.sort(key=lambda e: max(corpus.lengths(e)))
    chosen, n = [], 0
    for example in drawn[len(drawn) // 2:]:
        chosen.append(example)
        n += corpus.lengths(example)[1]
        if n >= target_tokens:
            break
    return collate(chosen, corpus, tokenizer, codes)


def random_batch(lang_ids: list[int], target_tokens: int, vocab: int, seed: int) -> dict:
    """Random sentences of SENTENCE_LEN tokens in lang12's mixed directions: [__src__ ids </s>] ->
    [__tgt__ ids </s>], collated as lslo.data.collate does (used where no world text is at hand: the GPU check)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, n_lang = max(target_tokens // SENTENCE_LEN, 1), len(lang_ids)
    src = torch.arange(n) % n_lang
    tgt = (src + torch.randint(1, n_lang, (n,), generator=g)) % n_lang
    ids = torch.tensor(lang_ids)
    input_ids = torch.randint(4, min(vocab, 4000), (n, SENTENCE_LEN), generator=g)
    labels = torch.randint(4, min(vocab, 4000), (n, SENTENCE_LEN), generator=g)
    input_ids[:, 0], input_ids[:, -1], labels[:, 0], labels[:, -1] = ids[src], 2, ids[tgt], 2
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "src_lang": src, "tgt_lang": tgt, "n_tokens": int(labels.numel())}


def lslo_lang12(hf_model, codes: list[str], groups: dict, options):
    """The lang12 LSLo model of the paper's main setting: ranks H;M;V = 2;2;8, every module, the paper's index
    plan at the model's depth, the options' LoRA layout (the authors' slice fc LoRAs and init)."""
    from lslo.model import LSLoSpec, inject_lslo, paper_index_plan

    layers = hf_model.config.encoder_layers
    spec = LSLoSpec(languages=codes, ranks={c: GROUP_RANKS[groups[c]] for c in codes}, modules="all",
                    index_plan=paper_index_plan(layers, hf_model.config.decoder_layers), **options.lora_layout())
    return inject_lslo(hf_model, spec)


def measure_step(loss: str, updates: int, target_tokens: int, device: str = "cpu", amp: str | None = None,
                 work: Path | None = None, shape: Shape | None = None, threads: int = 2, seed: int = 1) -> dict:
    """One lang12 LSLo training update, `updates` times after one warm-up, in this process: the checkpoint in
    work/MODEL_DIR with a batch of the world's text, or (work None) a random-weight model of `shape` built on
    `device` with a random batch. CPU: peak RSS (VmHWM, whole process; and its rise over the RSS before the
    timed updates); CUDA: torch.cuda.max_memory_allocated over the timed updates."""
    import torch
    from transformers import M2M100ForConditionalGeneration

    from lslo.languages import groups as group_of
    from lslo.languages import read_language_table, select
    from lslo.train import get_lr, load_base, make_trainer, train_update

    if device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    table = read_language_table(LANGUAGE_TABLE)
    codes = select(table, "lang12")
    groups = group_of(table, codes)
    options = step_options(target_tokens, loss, amp)
    baseline_mb = status_mb("VmRSS")
    if work is not None:
        hf_model, tokenizer = load_base(work / MODEL_DIR, codes, LANGUAGE_TABLE)
        batch = world_batch(work, tokenizer, codes, target_tokens, seed)
    else:
        torch.manual_seed(seed)
        with dev:
            hf_model = M2M100ForConditionalGeneration(model_config(shape))
        from lslo.tokenizer import M2M124_LANGUAGE_CODES

        first = 4 + shape.dict_lines
        batch = random_batch([first + M2M124_LANGUAGE_CODES.index(c) for c in codes], target_tokens,
                             shape.rows, seed)
    model = lslo_lang12(hf_model, codes, groups, options)
    trainer = make_trainer(model, options, device=dev)
    gc.collect()
    model_mb = status_mb("VmRSS") if dev.type == "cpu" else torch.cuda.memory_allocated(dev) / 2**20

    cpu_times = []  # this process's CPU seconds per timed update: what other processes on the cores change least

    def update(step: int) -> tuple[float, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_sum, _ = train_update(trainer.forward_model, trainer.optimizer, [batch], options,
                                   get_lr(step, options.lr, options.warmup_updates), dev, trainer.scaler,
                                   trainer.autocast)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        cpu_times.append(time.process_time() - cpu_start)
        return time.perf_counter() - start, loss_sum

    warm_s, first_loss = update(1)
    gc.collect()
    reset = reset_peak_rss() if dev.type == "cpu" else False
    before_mb = status_mb("VmRSS")  # after the reset, so the peak of the steps cannot read below it
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before_mb = torch.cuda.memory_allocated(dev) / 2**20
    times = [update(step)[0] for step in range(2, updates + 2)]
    result = {"loss": loss, "device": device, "amp": amp or "fp32", "sentences": int(batch["labels"].shape[0]),
              "target_tokens": int(batch["n_tokens"]), "padded": list(batch["labels"].shape),
              "first_loss_per_token": first_loss / batch["n_tokens"], "warmup_s": warm_s, "step_s": times,
              "median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu_times[1:]),
              "load_average": os.getloadavg(), "before_mb": before_mb, "model_mb": model_mb, "trainable": sum(
                  p.numel() for p in model.trainable_parameters())}
    if dev.type == "cuda":
        result.update(peak_mb=torch.cuda.max_memory_allocated(dev) / 2**20, how="torch.cuda.max_memory_allocated")
    else:
        result.update(peak_mb=status_mb("VmHWM"), baseline_mb=baseline_mb,
                      how="VmHWM reset after the warm-up" if reset else "VmHWM since the process started")
    result["step_peak_mb"] = result["peak_mb"] - before_mb
    return result


# ---- 4. checkpoints and adapters --------------------------------------------------------------------------------
def tensor_bytes(obj) -> int:
    """Bytes of every distinct tensor storage in a nested structure (what torch.save writes as data)."""
    import torch

    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return total


def init_adam_state(optimizer, params: list, chunk_bytes: int = 2**30) -> None:
    """Adam's moments for every parameter, made by Adam itself: zero-gradient steps over chunks of the
    parameters (a zero gradient leaves the weights as they are), so at most chunk_bytes of gradients exist at once."""
    chunk, size = [], 0
    for p in params + [None]:
        if p is not None:
            chunk.append(p)
            size += p.numel() * p.element_size()
        if chunk and (p is None or size >= chunk_bytes):
            for q in chunk:
                q.grad = q.new_zeros(q.shape)
            optimizer.step()
            for q in chunk:
                q.grad = None
            chunk, size = [], 0


def save_ft_all(work: Path, save: bool) -> dict:
    """One Ft-all epoch checkpoint at the checkpoint's shape, as lslo.train.train saves it: save_checkpoint of
    trainable_state(model) (every entry of the state dict, each a copy) and the Adam optimizer's state_dict.

    Computed: the bytes of those tensors. Measured (save=True): the file's size. To stay within memory, the
    model's parameters are re-pointed at the copies trainable_state made (same values) before Adam's state is
    created, so the weights exist twice only for the tied embedding's extra entries."""
    import torch

    from lslo.checkpoint import KEEP_CHECKPOINTS, checkpoint_path, save_checkpoint
    from lslo.languages import read_language_table, select
    from lslo.train import load_base, make_trainer, trainable_state

    torch.set_num_threads(2)
    if not save:
        from transformers import M2M100Config

        return ft_all_from_config(M2M100Config.from_pretrained(work / MODEL_DIR))
    table = read_language_table(LANGUAGE_TABLE)
    codes = select(table, "lang12")
    options = ft_all_options()
    model, _ = load_base(work / MODEL_DIR, codes, LANGUAGE_TABLE)
    model.requires_grad_(True)
    state = trainable_state(model)
    weights = sum(v.numel() * v.element_size() for v in state.values())
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.data = state[name]
    gc.collect()
    trainer = make_trainer(model, options, device=torch.device("cpu"))
    init_adam_state(trainer.optimizer, list(params.values()))
    adam = tensor_bytes(trainer.optimizer.state_dict())
    shared = [k for k in state if state[k].shape == params["model.shared.weight"].shape]
    result = {"parameters": sum(p.numel() for p in params.values()), "state_entries": len(state),
              "state_bytes": weights, "adam_bytes": adam, "computed_bytes": weights + adam,
              "embedding_copies": len(shared), "keep": KEEP_CHECKPOINTS, "peak_rss_mb": status_mb("VmHWM")}
    if save:
        start = time.perf_counter()
        directory = work / "checkpoints" / "ft-all"
        path = save_checkpoint(directory, 1, 1, {"stage": "finetune", "method": "full"}, state,
                               trainer.optimizer, trainer.scaler, [])
        result.update(file_bytes=path.stat().st_size, save_s=time.perf_counter() - start,
                      saved_tensor_bytes=tensor_bytes(torch.load(path, map_location="cpu", weights_only=True,
                                                                 mmap=True)))
        result["peak_rss_mb"] = status_mb("VmHWM")
        assert path == checkpoint_path(directory, 1)
        shutil.rmtree(directory)
    return result


def ft_all_from_config(config) -> dict:
    """The Ft-all checkpoint's tensor bytes from the checkpoint's config alone (a model on the meta device, no
    memory): trainable_state holds every state-dict tensor once (the tied embedding under its first name), Adam a
    float32 exp_avg and exp_avg_sq per parameter and a float32 step per parameter tensor."""
    import torch
    from transformers import M2M100ForConditionalGeneration

    from lslo.checkpoint import KEEP_CHECKPOINTS

    with torch.device("meta"):
        model = M2M100ForConditionalGeneration(config)
    state = list({id(v): v for v in model.state_dict(keep_vars=True).values()}.values())  # each tensor once
    params = list(model.parameters())
    weights = sum(v.numel() * v.element_size() for v in state)
    adam = sum(2 * p.numel() * 4 + 4 for p in params)
    shared = model.model.shared.weight.shape
    return {"parameters": sum(p.numel() for p in params), "state_entries": len(state), "state_bytes": weights,
            "adam_bytes": adam, "computed_bytes": weights + adam, "keep": KEEP_CHECKPOINTS,
            "embedding_copies": sum(1 for v in state if v.shape == shared),
            "peak_rss_mb": status_mb("VmHWM")}


def ft_all_options():
    from lslo.config import load_yaml
    from lslo.train import TrainOptions

    config = load_yaml(REPO / "config" / "lang12.yaml")
    return TrainOptions.from_dict({**config["train"], **config["variants"]["ft-all"].get("train", {}),
                                   "amp": False}, "scale.ft-all")


def save_lslo_lang30(work: Path) -> dict:
    """LSLo lang30 at ranks H;M;L;V = 2;2;8;8 on the checkpoint (the paper's index plan, lang30's LoRA layout):
    the adapter file (lslo.adapters.save_adapters) and one epoch checkpoint (Adam state after a zero-gradient
    step), their sizes, and the trainable count against lslo.params.count_from_shape (what `lslo params` says)."""
    import torch

    from lslo.adapters import save_adapters
    from lslo.checkpoint import save_checkpoint
    from lslo.config import load_yaml
    from lslo.languages import groups as group_of
    from lslo.languages import read_language_table, select
    from lslo.model import LSLoSpec, inject_lslo
    from lslo.params import count_from_shape, count_params
    from lslo.train import TrainOptions, load_base, make_trainer, trainable_state

    torch.set_num_threads(2)
    table = read_language_table(LANGUAGE_TABLE)
    codes = select(table, "lang30")
    groups = group_of(table, codes)
    options = TrainOptions.from_dict({**load_yaml(REPO / "config" / "lang30.yaml")["train"], "amp": False})
    ranks = {c: GROUP_RANKS[groups[c]] for c in codes}
    hf_model, _ = load_base(work / MODEL_DIR, codes, LANGUAGE_TABLE)
    model = inject_lslo(hf_model, LSLoSpec(languages=codes, ranks=ranks, modules="all", index_plan="paper",
                                           **options.lora_layout()))
    trainer = make_trainer(model, options, device=torch.device("cpu"))
    init_adam_state(trainer.optimizer, model.trainable_parameters())
    adapters = save_adapters(model, work / "lslo-lang30" / "adapters.safetensors", base_model=str(work / MODEL_DIR))
    state = trainable_state(model)
    path = save_checkpoint(work / "lslo-lang30" / "checkpoints", 1, 1, {"stage": "finetune", "method": "lslo"},
                           state, trainer.optimizer, trainer.scaler, [])
    layout = options.lora_layout()
    by_group = {g: [c for c in codes if groups[c] == g] for g in sorted(set(groups.values()))}
    formula = count_from_shape(hf_model.config.to_dict(), codes, ranks, "all", groups=by_group,
                               fc_lora=layout["fc_lora"], fc_lora_offset=layout["fc_lora_offset"],
                               fc_lora_width=layout["fc_lora_width"])
    counted = count_params(model)
    result = {"languages": len(codes), "trainable": counted["trainable"], "formula": formula["trainable"],
              "by_group": {g: v["trainable"] for g, v in formula["by_group"].items()},
              "adapter_bytes": adapters.stat().st_size, "checkpoint_bytes": path.stat().st_size,
              "state_bytes": tensor_bytes(state), "adam_bytes": tensor_bytes(trainer.optimizer.state_dict()),
              "embedding_copies": sum(1 for v in state.values() if v.shape == hf_model.model.shared.weight.shape),
              "embedding_bytes": hf_model.model.shared.weight.numel() * 4}
    shutil.rmtree(work / "lslo-lang30")
    return result


def retention(ft_all_bytes: int, model_bytes: int, lslo_bytes: int) -> list[dict]:
    """Disk under the retention policy per paper config: every training run keeps its KEEP_CHECKPOINTS newest
    epoch files (one more while a new one is written, before the oldest is removed); Ft-all-style variants
    (method full) also write their fine-tuned model. LSLo training runs are the LSLo variants, weight learning
    (when a variant uses the learned index plan) and the two subspace runs (ise, lsp); each is counted at
    `lslo_bytes` (the measured lang30 2;2;8;8 epoch checkpoint: what does not depend on the ranks dominates it)."""
    from lslo.checkpoint import KEEP_CHECKPOINTS
    from lslo.config import load_yaml

    rows = []
    for name in ("lang12", "lang30"):
        variants = load_yaml(REPO / "config" / f"{name}.yaml")["variants"]
        full = [v for v, spec in variants.items() if spec.get("method") == "full"]
        lslo = [v for v, spec in variants.items() if spec.get("method") == "lslo"]
        learned = any(spec.get("index") == "learned" for spec in variants.values())
        lslo_runs = len(lslo) + int(learned) + 2
        full_rest = len(full) * (KEEP_CHECKPOINTS * ft_all_bytes + model_bytes)
        lslo_rest = lslo_runs * KEEP_CHECKPOINTS * lslo_bytes
        rows.append({"config": name, "full_variants": len(full), "lslo_runs": lslo_runs, "keep": KEEP_CHECKPOINTS,
                     "full_at_rest": full_rest, "lslo_at_rest": lslo_rest, "total": full_rest + lslo_rest,
                     "peak_extra": ft_all_bytes})
    return rows


# ---- 5. the rehearsal ---------------------------------------------------------------------------------------------
def rehearsal_available() -> bool:
    """Whether this checkout's workflow has the rehearsal mode (a `rehearse` key in config/schema.yaml)."""
    from lslo.config import load_yaml

    return "rehearse" in load_yaml(REPO / "config" / "schema.yaml").get("properties", {})


def run_rehearsal(config: Path, work: Path, timeout: float, settings: dict | None = None) -> dict:
    """The workflow's rehearsal of `config` (a `rehearse` setting: `settings`, or the workflow's defaults) in a copy
    of the workflow under work: snakemake with the config and a second config file that sets `rehearse`; returns
    the table of its results/rehearsal/report.md (per-stage wall time, peak memory, disk, seconds per update and
    sentence, projected full-run cost)."""
    import yaml

    run_dir = work / "workflow-run"
    if run_dir.exists():  # an earlier rehearsal's results would be reported as this one's
        raise RuntimeError(f"{run_dir} exists (an earlier rehearsal): remove it or give another --workdir")
    run_dir.mkdir(parents=True)
    for name in ("Snakefile", "rules", "workflow", "config", "profiles"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run_dir / name)
    rehearse = run_dir / "rehearse.yaml"
    rehearse.write_text(yaml.safe_dump({"rehearse": settings or True}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake) if snakemake.exists() else "snakemake", "--configfile", str(config), str(rehearse),
           "--cores", "2", "--show-failed-logs", "results/rehearsal/report.md"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout)
    report = run_dir / "results" / "rehearsal" / "report.md"
    if proc.returncode or not report.is_file():
        raise RuntimeError(f"rehearsal failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    lines = report.read_text(encoding="utf-8").splitlines()
    table = [line for line in lines if line.startswith("|")]
    shown = [Path(cmd[0]).name, cmd[1], config.name, rehearse.name, *cmd[4:]]  # as run in workflow-run/
    return {"s": time.perf_counter() - start, "table": table, "command": " ".join(shown)}


def memory_miss_note(plain: dict, chunked: dict, vocab: int) -> str:
    """Why the chunked loss's peak RSS misses its target against the plain loss's: what the update allocates above
    the RSS it starts from (the loss among it) against that starting RSS, which no loss changes."""
    logits_mb = plain["target_tokens"] * vocab * 4 / 2**20
    floor = plain["before_mb"] / plain["peak_mb"]
    return (f"Why the peak ratio misses: one float32 N x V array at {plain['target_tokens']:,} target tokens and "
            f"{vocab:,} rows is {logits_mb:,.0f} MiB, and the plain loss holds several (logits, log-softmax, their "
            f"gradients). The update's own peak above the RSS it starts from falls from {plain['step_peak_mb']:,.0f} "
            f"to {chunked['step_peak_mb']:,.0f} MiB ({chunked['step_peak_mb'] / plain['step_peak_mb']:.2f}x). The "
            f"starting RSS ({plain['before_mb']:,.0f} MiB: the weights, the LSLo state, and what the allocator kept "
            f"of the warm-up's freed memory) is {floor:.2f} of the plain peak and no loss changes it, so the whole "
            f"step's ratio stays above {floor:.2f} however lean the loss.")


def load_yaml_file(path: Path) -> dict:
    from lslo.config import load_yaml

    return load_yaml(path)


# ---- subprocesses ------------------------------------------------------------------------------------------------
def in_subprocess(args: list, timeout: float | None = None) -> dict:
    """Run this script with `args` in a fresh process; its last stdout line is a JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"scale.py {' '.join(map(str, args))} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ------------------------------------------------------------------------------------------------------
def gb(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 1e9:.3f} GB"


def mib(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def machine_info() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "lslo", "benchmarks", "config",
                            ":(exclude)benchmarks/RESULTS*.md"],
                           capture_output=True, text=True).stdout.strip()  # untracked files too (a new script)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "git": (git.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")}


def report(r: dict, args) -> str:
    shape = SHAPES[args.shape]
    out = ["# lslo at the paper's scale", "",
           f"Written by `python benchmarks/scale.py {' '.join(r['argv'])}` in {r['total_s']:.0f} s. Every number "
           "below was measured or computed by that run (random weights; the demo world's text).", "",
           "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r["machine"].items()] + [""]
    ck = r["checkpoint"]
    out += [f"## Checkpoint (shape `{shape.name}`)", "", "| quantity | value |", "|---|---|",
            f"| d_model / layers / ffn / heads | {shape.d_model} / {shape.layers}+{shape.layers} / {shape.ffn} / "
            f"{shape.heads} |",
            f"| embedding rows | {ck['rows']:,} |",
            f"| vocab.json entries (specials + pieces + filler) | {ck['vocab_json']:,} |",
            f"| SentencePiece pieces (trained on the world) | {ck['pieces']:,} |",
            f"| language tokens (M2M-124's) | {ck['languages']} |",
            f"| parameters | {ck['parameters']:,} |",
            f"| weights file (float32 safetensors) | {gb(ck['weights_bytes'])} |",
            f"| checkpoint directory | {gb(ck['dir_bytes'])} |",
            f"| build / save time | {ck['build_s']} s / {ck['save_s']} s"
            + (" (reused from --keep)" if ck["reused"] else "") + " |",
            f"| lslo.check_model (lang30) | {len(r['check'])} checks ok, 0 problems |", "",
            f"World: {r['world']['languages']} demo languages as FLORES-101 files ({r['world']['files']} files) in "
            f"`{FLORES_DIR}/`; configs lang12.yaml and lang30.yaml point at it.", ""]
    steps = r["steps"]
    if steps:
        out += [f"## One lang12 LSLo training update (ranks 2;2;8, {args.target_tokens} target tokens, CPU, "
                f"{args.threads} threads)", "",
                "| loss | sentences | target tokens | padded labels | loss/token (warm-up) | median step s | steps s | "
                "median CPU s | load average (1, 5, 15 min) | "
                "peak RSS MiB | RSS with the model built MiB | peak above it MiB | RSS before the timed steps MiB | "
                "peak above it MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in steps.items():
            out.append(f"| {name} | {s['sentences']} | {s['target_tokens']} | {s['padded'][0]}x{s['padded'][1]} | "
                       f"{s['first_loss_per_token']:.5f} | {s['median_s']:.2f} | "
                       f"{', '.join(f'{t:.2f}' for t in s['step_s'])} | "
                       f"{s['median_cpu_s']:.2f} | {', '.join(f'{x:.1f}' for x in s['load_average'])} | "
                       f"{s['peak_mb']:.0f} | {s['model_mb']:.0f} | "
                       f"{s['peak_mb'] - s['model_mb']:.0f} | {s['before_mb']:.0f} | {s['step_peak_mb']:.0f} |")
        out += ["", f"Peak RSS: {next(iter(steps.values()))['how']}; each loss in its own process. The RSS before "
                "the timed steps holds what glibc kept of the warm-up's freed memory; the RSS with the model built "
                "(weights, LSLo, before any update) is the cleaner base."]
        if set(steps) >= set(LOSSES):
            p, c = steps["plain"], steps["chunked"]
            ratios = [("peak RSS, chunked / plain", c["peak_mb"] / p["peak_mb"], TARGETS["memory"]),
                      ("peak RSS above the built model, chunked / plain",
                       (c["peak_mb"] - c["model_mb"]) / (p["peak_mb"] - p["model_mb"]), TARGETS["memory"]),
                      ("median step time, chunked / plain", c["median_s"] / p["median_s"], TARGETS["time"]),
                      ("median step CPU time, chunked / plain", c["median_cpu_s"] / p["median_cpu_s"],
                       TARGETS["time"])]
            out += ["", "| ratio | value | target | |", "|---|---|---|---|"]
            out += [f"| {label} | {v:.3f} | <= {t} | {'PASS' if v <= t else 'MISS'} |" for label, v, t in ratios]
            if ratios[0][1] > TARGETS["memory"]:
                out += ["", memory_miss_note(p, c, r["checkpoint"]["rows"])]
        else:
            out += ["", "Only " + ", ".join(steps) + " measured: "
                    + r.get("loss_note", "the chunked loss is not an option of lslo.train in this checkout.")]
        out.append("")
    ft = r.get("ft_all")
    if ft:
        out += ["## Ft-all epoch checkpoint (weights + Adam state, as lslo.train saves it)", "",
                "| quantity | value |", "|---|---|",
                f"| parameters (trainable) | {ft['parameters']:,} |",
                f"| trainable_state entries / bytes | {ft['state_entries']} / {gb(ft['state_bytes'])} |",
                f"| of which copies of the tied embedding | {ft['embedding_copies']} |",
                f"| Adam state_dict bytes (exp_avg, exp_avg_sq, step) | {gb(ft['adam_bytes'])} |",
                f"| computed checkpoint (sum of numel x element_size) | {gb(ft['computed_bytes'])} |",
                "| saved file (lslo.checkpoint.save_checkpoint) | "
                + (f"{gb(ft['file_bytes'])} in {ft['save_s']:.0f} s |" if "file_bytes" in ft else
                   f"not saved: {ft.get('why', '')} |"),
                f"| peak RSS of that process | {ft['peak_rss_mb']:.0f} MiB |", ""]
        if ft["embedding_copies"] > 1:
            out += [f"`trainable_state` copies every state-dict entry, so the tied embedding (model.shared, the "
                    f"encoder's and decoder's embed_tokens, lm_head) is saved {ft['embedding_copies']} times.", ""]
    ls = r.get("lslo30")
    if ls:
        out += ["## LSLo lang30, ranks H;M;L;V = 2;2;8;8 (paper index plan)", "", "| quantity | value |",
                "|---|---|",
                f"| trainable parameters (live model) | {ls['trainable']:,} |",
                f"| lslo.params.count_from_shape (`lslo params`) | {ls['formula']:,} |",
                "| by group | " + ", ".join(f"{g} {n:,}" for g, n in ls["by_group"].items()) + " |",
                f"| adapters.safetensors | {mib(ls['adapter_bytes'])} |",
                f"| epoch checkpoint | {mib(ls['checkpoint_bytes'])} (trainable_state {mib(ls['state_bytes'])}, "
                f"Adam {mib(ls['adam_bytes'])}) |",
                f"| of which copies of the frozen tied embedding | {ls['embedding_copies']} x "
                f"{mib(ls['embedding_bytes'])} |", ""]
        if ls["embedding_copies"]:
            out += ["`trainable_state` leaves out the frozen parameters by their names in `named_parameters()`, "
                    "which names the tied embedding once (`model.shared`); its other state-dict names (the "
                    "encoder's and decoder's embed_tokens, lm_head) are saved, each as a copy.", ""]
    if r.get("retention"):
        out += ["## Disk under the retention policy", "",
                "| config | Ft-all-style variants | LSLo training runs | epoch files kept per run | Ft-all at rest "
                "(kept checkpoints + fine-tuned model) | LSLo runs at rest | total | extra while an Ft-all "
                "checkpoint is written |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {row['config']} | {row['full_variants']} | {row['lslo_runs']} | {row['keep']} | "
                f"{gb(row['full_at_rest'])} | {gb(row['lslo_at_rest'])} | {gb(row['total'])} | "
                f"{gb(row['peak_extra'])} |" for row in r["retention"]]
        out += ["", "LSLo runs: the LSLo variants, weight learning (lang12: its variants use the learned index "
                "plan) and the two subspace runs, each at the lang30 2;2;8;8 checkpoint's size above.", ""]
    rh = r.get("rehearsal")
    out += ["## Rehearsal of the lang12 config", ""]
    if rh and rh.get("table"):
        if rh.get("variants"):
            out += [f"lang12.yaml cut so that it fits these cores (`lang12-rehearsal.yaml`): the variants "
                    f"{', '.join(rh['variants'])} (one of each method), Table 1 and Figure 3 of them, one decoding "
                    "shard" + (f", {rh['batch']:,} tokens per update (the paper's: 4,000 x 4)" if rh["batch"]
                               else "") + (", fp32 decoding (no CUDA here)" if rh.get("fp32") else "") + ".", ""]
        out += [f"`{rh['command']}` in {rh['s']:.0f} s:", ""] + rh["table"] + [""]
    else:
        out += [rh.get("note", "not run") if rh else "not run (--skip-rehearsal)", ""]
    if r.get("projection"):
        out += ["## The full lang12 and lang30 runs on this machine, projected from the rehearsal", "",
                "Each job of the full config from the rehearsed job of its kind (lslo.rehearsal.project_training /"
                " project_decoding): its updates and epochs from the trainer's own epoch plan on that config's "
                "languages" + (f" at {r['rehearsal']['batch']:,} tokens per update (the same tokens per epoch as "
                               "the paper's 16,000-token updates, in 8 times as many updates)"
                               if r["rehearsal"].get("batch") else "")
                + ", its dev scores at its own dev sentences and directions, its decoding at every test sentence of "
                "every direction. Every LSLo variant is projected from the rehearsed one (ranks, modules and GPS "
                "change an update's work little next to the frozen 615M model's).", "",
                "| config | job | jobs | work per job | hours per job | hours |", "|---|---|---:|---|---:|---:|"]
        for row in r["projection"]:
            out.append(f"| {row['config']} | {row['kind']} | {row['jobs']} | {row['work']} | "
                       f"{row['hours_each']:,.1f} | {row['hours']:,.1f} |")
        for name in ("lang12", "lang30"):
            total = sum(row["hours"] for row in r["projection"] if row["config"] == name)
            out.append(f"| {name} | **total** | | | | **{total:,.0f}** ({total / 24:,.1f} days) |")
        out.append("")
    return "\n".join(out) + "\n"


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="m2m124-615m")
    p.add_argument("--workdir", default=None, help="work directory (default: a fresh benchmarks/.scale-work-*)")
    p.add_argument("--keep", action="store_true", help="keep what was built in the work directory")
    p.add_argument("--updates", type=int, default=3, help="timed training updates per loss (after one warm-up)")
    p.add_argument("--target-tokens", type=int, default=2000, help="target tokens of the training batch")
    p.add_argument("--losses", default=",".join(LOSSES), help="training losses to measure (train.loss)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-rehearsal", action="store_true")
    p.add_argument("--skip-ft-all-save", action="store_true", help="compute the Ft-all checkpoint, do not save it")
    p.add_argument("--rehearsal-timeout", type=float, default=4 * 3600,
                   help="seconds the rehearsal may take (on 2 cores under load, the 615M one took over 30 min)")
    p.add_argument("--rehearsal-variants", default="pretrain,ft-all,lslo-2-2-8-wl-gps0.9",
                   help="lang12 variants rehearsed, one per method; the full lang12 and lang30 runs are projected "
                        "from them ('' rehearses every variant of lang12.yaml, hours on CPU)")
    p.add_argument("--rehearsal-batch", type=int, default=2000,
                   help="tokens per update in the rehearsal and the projection (0: the config's, 16,000)")
    p.add_argument("--rehearse", default="updates=1,sentences=1,max_new_tokens=4",
                   help="the workflow's `rehearse` settings (key=value,...; empty: its defaults)")
    p.add_argument("--out", default=None, help="markdown report (default benchmarks/RESULTS-scale.md)")
    p.add_argument("--step-of", default=None, choices=LOSSES,
                   help="measure one training update with this loss in this process and print it as JSON: the "
                        "checkpoint in --workdir with the world's text, or without --workdir a random model of "
                        "--shape on --device with a random batch (benchmarks/gpu_check.py runs this)")
    p.add_argument("--device", default="cpu", help="with --step-of: cpu or cuda")
    p.add_argument("--amp", default=None, choices=["fp16", "bf16"], help="with --step-of: autocast (CUDA only)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: ft-all | ft-all-computed | lslo30
    args = p.parse_args(argv)
    args.out = args.out or str(REPO / "benchmarks" / "RESULTS-scale.md")
    return args


def work_directory(args) -> tuple[Path, list[Path]]:
    """(work dir, paths this run creates there); a default directory ignores itself in git."""
    if args.workdir:
        work = Path(args.workdir).resolve()
        existed = work.exists()
        work.mkdir(parents=True, exist_ok=True)
        names = [MODEL_DIR, WORLD_DIR, FLORES_DIR, "spm.model", "lang12.yaml", "lang30.yaml", "checkpoints",
                 "lslo-lang30", "workflow-run", "lang12-rehearsal.yaml"]
        created = [] if existed and (work / MODEL_DIR / "scale.json").exists() else [work / n for n in names]
        return work, created if existed else [work]
    work = Path(tempfile.mkdtemp(prefix=".scale-work-", dir=REPO / "benchmarks"))
    (work / ".gitignore").write_text("*\n")
    return work, [work]


def main(argv=None) -> str:
    return run(argv)[1]


def run(argv=None) -> tuple[dict, str]:
    """The whole benchmark (or one internal part); returns (results, report text)."""
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    if args.step_of:
        work = Path(args.workdir) if args.workdir else None
        print(json.dumps(measure_step(args.step_of, args.updates, args.target_tokens, args.device, args.amp, work,
                                      shape, args.threads)))
        return {}, ""
    if args.part:
        work = Path(args.workdir)
        part = {"ft-all": lambda: save_ft_all(work, True), "ft-all-computed": lambda: save_ft_all(work, False),
                "lslo30": lambda: save_lslo_lang30(work)}[args.part]
        print(json.dumps(part()))
        return {}, ""
    start = time.perf_counter()
    work, created = work_directory(args)
    r = {"argv": list(argv if argv is not None else sys.argv[1:]), "machine": machine_info()}
    failed = None  # the rehearsal's error: the report is written, then the run fails
    common = ["--workdir", work, "--shape", args.shape, "--threads", args.threads]
    try:
        log(f"work directory {work}")
        if not (work / MODEL_DIR / "scale.json").exists():
            r["world"] = build_world(work, shape)
        else:
            r["world"] = {"languages": 30, "files": len(list((work / FLORES_DIR).rglob("*.dev*")))}
        log(f"world laid out: {r['world']}")
        r["checkpoint"] = build_checkpoint(work, shape)
        log(f"checkpoint: {r['checkpoint']}")
        r["check"] = check_checkpoint(work)
        configs = write_configs(work)
        r["steps"] = {}
        for loss in [name for name in args.losses.split(",") if name]:
            if loss != "plain" and not has_loss_option():
                r["loss_note"] = (f"`{loss}` not measured: lslo.options.TrainOptions has no `loss` option in this "
                                  "checkout.")
                log(r["loss_note"])
                continue
            r["steps"][loss] = in_subprocess(["--step-of", loss, "--updates", args.updates, "--target-tokens",
                                              args.target_tokens, *common])
            log(f"step {loss}: median {r['steps'][loss]['median_s']:.2f} s, "
                f"peak {r['steps'][loss]['peak_mb']:.0f} MiB")
        need = 13 if shape.name == "m2m124-615m" else 0  # GiB of memory for the measured Ft-all save
        free_disk = shutil.disk_usage(work).free
        ft_part = "ft-all"
        why = ""
        if args.skip_ft_all_save:
            ft_part, why = "ft-all-computed", "--skip-ft-all-save"
        elif available_gib() < need:
            ft_part, why = "ft-all-computed", f"{available_gib():.1f} GiB memory available, {need} GiB needed"
        elif free_disk < 3 * 4 * r["checkpoint"]["parameters"] * 1.5:
            ft_part, why = "ft-all-computed", f"{free_disk / 1e9:.1f} GB disk free"
        r["ft_all"] = in_subprocess(["--part", ft_part, *common])
        r["ft_all"]["why"] = why
        log(f"ft-all checkpoint: {r['ft_all']}")
        r["lslo30"] = in_subprocess(["--part", "lslo30", *common])
        log(f"lslo lang30: {r['lslo30']}")
        ft_bytes = r["ft_all"].get("file_bytes", r["ft_all"]["computed_bytes"])
        r["retention"] = retention(ft_bytes, r["checkpoint"]["dir_bytes"], r["lslo30"]["checkpoint_bytes"])
        if args.skip_rehearsal:
            r["rehearsal"] = None
        elif not rehearsal_available():
            r["rehearsal"] = {"note": "not run: this checkout's workflow has no rehearsal mode (no `rehearse` key "
                                      "in config/schema.yaml)."}
        else:
            settings = dict(item.split("=") for item in args.rehearse.split(",") if item)
            variants = [v for v in args.rehearsal_variants.split(",") if v]
            config = rehearsal_config(work, variants, args.rehearsal_batch) if variants else configs["lang12"]
            try:
                r["rehearsal"] = run_rehearsal(config, work, args.rehearsal_timeout,
                                               {k: int(v) for k, v in settings.items()})
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # what was measured before it is kept
                failed = f"{type(err).__name__}: {err}"
                r["rehearsal"] = {"note": f"**failed** ({failed.splitlines()[0]}); its jobs so far: "
                                          f"{work / 'workflow-run' / 'results' / 'rehearsal'}"}
            rehearsed = load_yaml_file(config)
            r["rehearsal"].update(variants=variants, batch=args.rehearsal_batch,
                                  fp32=bool(variants) and rehearsed["eval"]["dtype"] == "fp32")
            if variants and not failed:
                methods = {rehearsed["variants"][v]["method"]: v for v in variants}
                missing = sorted({"pretrain", "full", "lslo"} - set(methods))
                if missing:
                    raise SystemExit(f"--rehearsal-variants: no variant of method(s) {missing} to project from")
                r["projection"] = project_full_runs(work, work / "workflow-run" / "results" / "rehearsal" / "clocks",
                                                    methods, args.rehearsal_batch)
    finally:
        if not args.keep:
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
    r["total_s"] = time.perf_counter() - start
    text = report(r, args)
    from lslo.io import atomic_write

    with atomic_write(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(text)
    if failed:
        raise SystemExit(f"scale.py: the rehearsal failed ({failed.splitlines()[0]}); the report says what was "
                         f"measured: {args.out}")
    return r, text


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
