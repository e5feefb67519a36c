"""Speed and memory of LSLo against a frozen-model floor, PEFT LoRA and full fine-tuning (one run, one shape).

What it measures, all on the same random-weight M2M100 and the same token batch (fixed seed):

- training step (forward + backward + Adam step) of: floor, PEFT LoRA (one adapter), LSLo with one direction
  per batch, LSLo with the 12 languages mixed in every batch, full fine-tuning; and the step's phases;
- beam-5 decoding of the same sentences with a fixed output length (min_new_tokens = max_new_tokens, so a random
  model produces as many tokens under every system): base model, LSLo mixed directions, PEFT mixed adapters
  (``adapter_names``, one adapter per language), a merged one-direction model (``lslo.adapters.merge_direction``),
  each under lslo's beam loop (``lslo.beam``) and HF's default one;
- evaluation cost against the number of directions: the 132 directions of 12 languages and the 870 of 30
  languages decoded as the evaluate stage does (one target language per generate call) on a small model;
- peak memory of each system in its own subprocess (see ``measure_memory``).

Systems are interleaved inside every repetition (the order rotates), and the median of the repetitions is
reported. ``--quick`` runs a tiny shape for 2 steps in seconds (no memory subprocesses, no RESULTS.md unless
``--out`` is given).

    python benchmarks/bench.py                 # CPU shape (and the m2m124-615m shape too when CUDA is present)
    python benchmarks/bench.py --quick
    python benchmarks/bench.py --against REV   # this checkout and git revision REV in one run (revision_compare.py)
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

# lang12 (paper Table 5) and the resource-group ranks of the paper's main setting (H;M;V = 2;2;8).
LANG12 = {"en": "H", "fr": "H", "de": "H", "it": "H", "zh": "M", "nl": "M", "ja": "M", "ko": "M",
          "oc": "V", "or": "V", "sd": "V", "wo": "V"}
GROUP_RANKS = {"H": 2, "M": 2, "L": 8, "V": 8}
ONE_DIRECTION = ("en", "wo")  # H->V: rank-2 encoder (source-indexed), rank-8 decoder (target-indexed)
PEFT_RANK = 8
# The paper's "all" modules (enc q k v fc1 fc2; dec q k v c-q c-k c-v fc1 fc2); out_proj is left out.
PEFT_TARGET = r".*\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj)$|.*\.(fc1|fc2)$"
EOS, PAD, BOS = 2, 1, 0
SENTENCE_LEN = 32


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    layers: int
    ffn: int
    heads: int
    vocab: int  # subword vocabulary; language tokens are appended after it


SHAPES = {
    "cpu": Shape("cpu", 512, 6, 2048, 8, 8000),
    "cpu-m2m100-vocab": Shape("cpu-m2m100-vocab", 512, 6, 2048, 8, 128000),  # M2M100's 128k SentencePiece vocabulary
    "m2m124-615m": Shape("m2m124-615m", 1024, 12, 4096, 16, 256000),
    "demo": Shape("demo", 128, 3, 512, 4, 2000),
    "tiny": Shape("tiny", 64, 2, 128, 4, 500),
}

TRAIN_SYSTEMS = ("floor", "peft", "lslo_one", "lslo_mixed", "lslo_stacked", "lslo_segments", "lslo_grouped", "full")
FORCED_KERNELS = ("lslo_stacked", "lslo_segments", "lslo_grouped")  # mixed LSLo with one kernel, not "auto"
AMP = {"fp32": None, "bf16": torch.bfloat16}  # --amp: autocast dtype of training and decoding (None: float32)
SWEEP_SYSTEMS = ("floor", "peft", "lslo_one", "lslo_mixed", "full")
PHASE_SYSTEMS = ("floor", "peft", "lslo_mixed", "full")
SWEEP = (("cpu", 512), ("cpu-m2m100-vocab", 512))  # (shape, source tokens per batch) for the training-only sweep
DECODE_SYSTEMS = ("base", "lslo_mixed", "peft_mixed", "merged")
DECODE_LOOPS = ("lslo", "hf")  # beam loops, see generation_kwargs


# ---- models and batch --------------------------------------------------------------------------------------
def build_base(shape: Shape, languages: list, device, seed: int = 1, dropout: float = 0.1):
    """A random-weight M2M100 of ``shape`` whose vocabulary ends with one token per language."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    config = M2M100Config(
        vocab_size=shape.vocab + len(languages), d_model=shape.d_model,
        encoder_layers=shape.layers, decoder_layers=shape.layers,
        encoder_ffn_dim=shape.ffn, decoder_ffn_dim=shape.ffn,
        encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads,
        max_position_embeddings=256, dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0,  # the authors' (HF's 0.05 skips random layers in every step)
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs (a 615M model in seconds on a GPU)
        return M2M100ForConditionalGeneration(config)


def sentences_in(tokens: int) -> int:
    """Sentences of SENTENCE_LEN tokens in a batch of ``tokens`` source tokens (at least one)."""
    return max(tokens // SENTENCE_LEN, 1)


def make_batch(shape: Shape, languages: list, n_sentences: int, length: int, device, seed: int = 1) -> dict:
    """Random sentences [src_tok x... eos] -> [tgt_tok y... eos]; every language is a source, targets differ
    from sources. ``src_one``/``tgt_one`` route the same tokens as a single direction."""
    g = torch.Generator().manual_seed(seed)
    n_lang = len(languages)
    src = torch.arange(n_sentences) % n_lang
    tgt = (src + torch.randint(1, n_lang, (n_sentences,), generator=g)) % n_lang
    input_ids = torch.randint(3, shape.vocab, (n_sentences, length), generator=g)
    labels = torch.randint(3, shape.vocab, (n_sentences, length), generator=g)
    input_ids[:, 0], input_ids[:, -1] = shape.vocab + src, EOS
    labels[:, 0], labels[:, -1] = shape.vocab + tgt, EOS
    one_src, one_tgt = (languages.index(c) for c in ONE_DIRECTION)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "src_lang": src, "tgt_lang": tgt,
             "src_one": torch.full_like(src, one_src), "tgt_one": torch.full_like(tgt, one_tgt),
             "decoder_start": torch.stack([torch.full_like(tgt, EOS), shape.vocab + tgt], dim=1)}
    return {k: v.to(device) for k, v in batch.items()}


ADAPTED = []  # what lslo_spec left out for an older lslo (bench.py --against REV imports lslo from REV's tree)


def lslo_spec(languages: list, groups: dict, n_layers: int):
    from lslo import model as lslo_model

    # The paper's index plan (the top quarter of the encoder target-indexed); fc1/fc2 LoRAs in lslo's default
    # layout, the authors' d x d block of the ffn units ("slice"; an older lslo, such as 6c9756c, has only the
    # full-width one and says so in the report). The LoRA init is left at the library's default: it moves no time.
    if hasattr(lslo_model, "paper_index_plan"):
        plan = lslo_model.paper_index_plan(n_layers, n_layers)
    else:  # its rule, as bench.py wrote it before lslo.model had it
        ADAPTED.append("lslo.model has no paper_index_plan: the plan written out (top quarter of the encoder tgt)")
        n_tgt = n_layers // 4
        plan = {"enc": ["src"] * (n_layers - n_tgt) + ["tgt"] * n_tgt, "dec": ["tgt"] * n_layers}
    options = {"fc_lora": "slice"}
    fields = {f.name for f in dataclasses.fields(lslo_model.LSLoSpec)}
    for name in [name for name in options if name not in fields]:
        ADAPTED.append(f"LSLoSpec has no {name} field ({options.pop(name)!r} asked): the revision's built-in choice")
    return lslo_model.LSLoSpec(languages=languages, ranks={c: GROUP_RANKS[groups[c]] for c in languages},
                               modules="all", index_plan=plan, **options)


def build_lslo(shape, languages, groups, device):
    from lslo.model import inject_lslo

    return inject_lslo(build_base(shape, languages, device), lslo_spec(languages, groups, shape.layers))


def build_peft(shape, languages, groups, device, per_language: bool):
    """PEFT LoRA on the same sites: one rank-8 adapter, or one adapter per language with the LSLo ranks."""
    from peft import LoraConfig, get_peft_model

    def config(r):
        return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=PEFT_TARGET)

    base = build_base(shape, languages, device)
    if not per_language:
        return get_peft_model(base, config(PEFT_RANK))
    model = get_peft_model(base, config(GROUP_RANKS[groups[languages[0]]]), adapter_name=peft_adapter(languages[0]))
    for code in languages[1:]:
        model.add_adapter(peft_adapter(code), config(GROUP_RANKS[groups[code]]))
    return model


def peft_adapter(code: str) -> str:
    return f"lang-{code}"  # a bare code like "or" is a substring of PEFT's "lora_" prefix, which PEFT rejects


# ---- training systems ---------------------------------------------------------------------------------------
def adam(params, lr):
    # The training recipe's optimizer (Adam, betas 0.9/0.98, §5; fused kernel), the same for every system.
    from lslo.train import make_adam

    return make_adam(params, lr)


def floor_loss(model, batch):
    """Floor: forward of the frozen model with the input embeddings as the only leaf requiring a gradient.
    Backward then computes the activation gradients through every layer (what any adapter method must compute)
    and no weight gradient; there is no optimizer step."""
    embeds = model.model.encoder.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def with_amp(function, amp: str, device):
    """``function`` run under autocast in the dtype of ``amp`` (as lslo.train.amp_setup does on GPUs)."""
    if AMP[amp] is None:
        return function

    def run(*args):
        with torch.autocast(device.type, dtype=AMP[amp]):
            return function(*args)
    return run


def build_train_parts(name: str, shape: Shape, languages: list, groups: dict, device, amp: str = "fp32"):
    """-> (model, loss(batch), optimizer or None) for one training system; the forward under ``amp``."""
    model, loss_of, optimizer = _train_parts(name, shape, languages, groups, device)
    return model, with_amp(loss_of, amp, device), optimizer


def _train_parts(name: str, shape: Shape, languages: list, groups: dict, device):
    if name == "floor":
        model = build_base(shape, languages, device).requires_grad_(False).train()
        return model, lambda batch: floor_loss(model, batch), None
    forward = None
    if name == "full":
        model = build_base(shape, languages, device).train()
        optimizer = adam(model.parameters(), 1e-4)
    elif name == "peft":
        model = build_peft(shape, languages, groups, device, per_language=False).train()
        optimizer = adam([p for p in model.parameters() if p.requires_grad], 3e-3)
    elif name in ("lslo_one", "lslo_mixed", *FORCED_KERNELS):
        model = build_lslo(shape, languages, groups, device).train()
        if name in FORCED_KERNELS:  # the mixed-batch kernels that "auto" does not take here
            model.set_mixed_path(name.removeprefix("lslo_"))
        optimizer = adam(model.trainable_parameters(), 3e-3)
        one = name == "lslo_one"
        forward = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                                  src_lang=b["src_one"] if one else b["src_lang"],
                                  tgt_lang=b["tgt_one"] if one else b["tgt_lang"])
    else:
        raise ValueError(f"unknown training system {name!r}; expected one of {TRAIN_SYSTEMS}")
    if forward is None:
        forward = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    return model, lambda batch: forward(batch).loss, optimizer


def build_train_system(name: str, shape: Shape, languages: list, groups: dict, device, amp: str = "fp32"):
    """-> (model, step(batch)) for one training system; the step includes zero_grad, backward and Adam."""
    model, loss_of, optimizer = build_train_parts(name, shape, languages, groups, device, amp)
    return model, lambda batch: run_step(loss_of, optimizer, batch)


def run_step(loss_of, optimizer, batch, device=None) -> list:
    """One training step: zero_grad + forward, backward, Adam step. With ``device``: the perf_counter times
    before the step and after each phase (device synchronised), else []."""
    marks = []

    def mark():
        if device is not None:
            sync(device)
            marks.append(time.perf_counter())

    mark()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = loss_of(batch)
    mark()
    loss.backward()
    mark()
    if optimizer is not None:
        optimizer.step()
    mark()
    return marks


def train_phases(name: str, shape: Shape, languages: list, groups: dict, batch, args, device) -> dict:
    """Median seconds of each phase of one system's training step: zero_grad + forward, backward, Adam step."""
    _, loss_of, optimizer = build_train_parts(name, shape, languages, groups, device, args.amp)
    times = {"forward": [], "backward": [], "optimizer": []}
    for rep in range(args.warmup + args.sweep_steps):
        marks = run_step(loss_of, optimizer, batch, device)
        if rep >= args.warmup:
            for phase, start, end in zip(times, marks, marks[1:]):
                times[phase].append(end - start)
    return {phase: statistics.median(values) for phase, values in times.items()}


# ---- decoding systems ---------------------------------------------------------------------------------------
def generation_kwargs(batch, new_tokens: int, beams: int, model, loop: str = "lslo") -> dict:
    """Beam-search arguments shared by every system. ``loop``: "lslo" = the cache that lslo's evaluation uses
    (lslo.beam: cross-attention cache left in place), "hf" = HF's default cache (reordered in full every step)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from lslo.beam import BeamSearchCache

    config = getattr(model, "base", model).config.get_text_config(decoder=True)  # LSLoModel wraps the HF model
    cache = (BeamSearchCache if loop == "lslo" else EncoderDecoderCache)(DynamicCache(config=config),
                                                                         DynamicCache(config=config))
    # min_new_tokens = max_new_tokens: a random model would otherwise stop at different lengths per system.
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "decoder_input_ids": batch["decoder_start"], "num_beams": beams, "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens, "do_sample": False, "past_key_values": cache}


def build_decode_system(name: str, shape: Shape, languages: list, groups: dict, device, amp: str = "fp32"):
    """-> (model, decode(batch, new_tokens, beams, loop) -> output ids) for one decoding system, under ``amp``."""
    model, decode = _decode_system(name, shape, languages, groups, device)
    return model, with_amp(decode, amp, device)


def _decode_system(name: str, shape: Shape, languages: list, groups: dict, device):
    if name in ("base", "merged"):
        if name == "base":
            model = build_base(shape, languages, device).eval()
        else:
            from lslo.adapters import merge_direction

            model = merge_direction(build_lslo(shape, languages, groups, device), *ONE_DIRECTION).eval()
        return model, lambda b, n, k, loop: model.generate(**generation_kwargs(b, n, k, model, loop))
    if name == "lslo_mixed":
        model = build_lslo(shape, languages, groups, device).eval()
        return model, lambda b, n, k, loop: model.generate(src_lang=b["src_lang"], tgt_lang=b["tgt_lang"],
                                                           **generation_kwargs(b, n, k, model, loop))
    if name == "peft_mixed":
        # PEFT routes a sample to one adapter in every layer, so an adapter per target language is the closest
        # PEFT can express; beam search repeats adapter_names per beam in the decoder only (PEFT >= 0.15).
        model = build_peft(shape, languages, groups, device, per_language=True).eval()
        return model, lambda b, n, k, loop: model.generate(
            adapter_names=[peft_adapter(languages[i]) for i in b["tgt_lang"].tolist()],
            **generation_kwargs(b, n, k, model.get_base_model(), loop))
    raise ValueError(f"unknown decoding system {name!r}; expected one of {DECODE_SYSTEMS}")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (no mmap for large blocks, no trimming of the heap), as torch's CUDA
    caching allocator does on GPUs. Otherwise every CPU step faults its activations in afresh: on a 2-core machine
    that cost up to half of a step, and step times depended on which system had run before. False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# ---- timing -------------------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FAILED = {}  # system -> the error that stopped it (reported in its row; the other systems still run)


def time_interleaved(runners: dict, warmup: int, steps: int, device) -> dict:
    """name -> list of seconds. Each repetition runs every system once, in an order rotated per repetition
    (ABCD, BCDA, ...), so slow drift of the machine spreads over all systems alike. A system that raises is
    dropped (FAILED says why), so one broken kernel cannot cost the rest of a GPU run."""
    names = list(runners)
    times = {name: [] for name in names}
    for rep in range(warmup + steps):
        if not names:
            break
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            try:
                runners[name]()
            except (RuntimeError, NotImplementedError) as err:
                FAILED[name] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
                print(f"  {name} failed: {FAILED[name]}", file=sys.stderr, flush=True)
                names.remove(name)
                del times[name]
                continue
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
        print(f"  repetition {rep + 1}/{warmup + steps}: " + ", ".join(
            f"{n} {1000 * times[n][-1]:.0f} ms" for n in names if rep >= warmup), file=sys.stderr, flush=True)
    return times


def bench_training(shape, languages, groups, batch, args, device, systems=TRAIN_SYSTEMS, steps=None) -> dict:
    runners = {}
    for name in systems:
        _, step = build_train_system(name, shape, languages, groups, device, args.amp)
        runners[name] = (lambda s: lambda: s(batch))(step)
    return time_interleaved(runners, args.warmup, steps or args.steps, device)


def bench_decoding(shape, languages, groups, batch, args, device) -> dict:
    """(loop, system) -> seconds, every system under both beam loops (see generation_kwargs)."""
    decoders, outputs = {}, {}
    for name in DECODE_SYSTEMS:
        try:
            _, decode = build_decode_system(name, shape, languages, groups, device, args.amp)
        except ImportError as err:  # a checkout without lslo.adapters: report the row as missing
            print(f"decoding system {name} skipped: {err}", file=sys.stderr)
            continue
        for loop in DECODE_LOOPS:
            outputs[loop, name] = decode(batch, args.new_tokens, args.beams, loop)
            decoders[loop, name] = (lambda d, lp: lambda: d(batch, args.new_tokens, args.beams, lp))(decode, loop)
    if len({out.shape[1] for out in outputs.values()}) != 1:
        raise RuntimeError(f"decoded lengths differ across systems: { {k: v.shape for k, v in outputs.items()} }")
    for name in {name for _, name in outputs}:  # the loops must not change a system's translations
        if not torch.equal(*(outputs[loop, name] for loop in DECODE_LOOPS)):
            raise RuntimeError(f"{name}: the two beam loops decoded different tokens")
    return time_interleaved(decoders, min(args.warmup, 1), args.decode_steps, device)


# ---- evaluation cost against the number of directions -------------------------------------------------------
def bench_directions(args, device) -> list:
    """Decode ``args.sentences_per_direction`` sentences in every direction as the evaluate stage does: generate
    calls of at most ``args.direction_max_tokens`` source tokens, each with one target language and every source
    language into it (``lslo.inference.make_decoding_batches`` keyed by target), LSLo on a demo-sized random
    model; 12 vs 30 languages."""
    from lslo.inference import make_decoding_batches
    from lslo.languages import read_language_table, select

    table = read_language_table(REPO / "config" / "languages.tsv")
    shape = SHAPES["tiny" if args.quick else "demo"]
    rows = []
    for subset in ("lang12", "lang30"):
        languages = select(table, subset)
        if args.quick:
            languages = languages[:3] if subset == "lang12" else languages[:5]
        groups = {c: table.loc[c, "resource"] for c in languages}
        model = build_lslo(shape, languages, groups, device).eval()
        pairs = [(s, t) for s in range(len(languages)) for t in range(len(languages)) if s != t]
        samples = [(s, t, i) for s, t in pairs for i in range(args.sentences_per_direction)]
        batches = [directions_batch(shape, [samples[j] for j in indices], device) for indices in
                   make_decoding_batches([DIRECTION_LEN] * len(samples), args.direction_max_tokens,
                                         keys=[t for _, t, _ in samples])]
        decode = lambda b: model.generate(src_lang=b["src_lang"], tgt_lang=b["tgt_lang"],  # noqa: B023 - this subset's
                                          **generation_kwargs(b, args.direction_tokens, args.beams, model))  # noqa: B023
        decode(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for b in batches:
            decode(b)
        sync(device)
        seconds = time.perf_counter() - start
        rows.append({"languages": subset if not args.quick else f"{subset}[:{len(languages)}]",
                     "n_languages": len(languages), "directions": len(pairs), "generate_calls": len(batches),
                     "seconds": seconds, "ms_per_direction": 1000 * seconds / len(pairs)})
    return rows


DIRECTION_LEN = 16  # source tokens per sentence in the directions sweep


def directions_batch(shape: Shape, samples: list, device) -> dict:
    """[(src, tgt, sentence index)] -> one mixed-direction batch; sentence i is the same text in every direction."""
    sentences = torch.randint(3, shape.vocab, (max(i for _, _, i in samples) + 1, DIRECTION_LEN),
                              generator=torch.Generator().manual_seed(1))
    src_lang = torch.tensor([s for s, _, _ in samples])
    tgt_lang = torch.tensor([t for _, t, _ in samples])
    input_ids = sentences[[i for _, _, i in samples]]
    input_ids[:, 0], input_ids[:, -1] = shape.vocab + src_lang, EOS
    start = torch.stack([torch.full_like(tgt_lang, EOS), shape.vocab + tgt_lang], dim=1)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "src_lang": src_lang,
             "tgt_lang": tgt_lang, "decoder_start": start}
    return {k: v.to(device) for k, v in batch.items()}


# ---- memory (one subprocess per system) ---------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to /proc/self/clear_refs); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(kind: str, name: str, shape, languages, groups, batch, args, device) -> dict:
    """Peak memory of one system alone in this process, over 2 steps after 1 warm-up step (so the Adam state
    and the gradients exist). CPU: peak RSS (VmHWM) after resetting it post-warm-up, minus the RSS of the bare
    process (torch + transformers imported, nothing built). CUDA: torch.cuda.max_memory_allocated."""
    import gc

    import peft  # noqa: F401  (import everything before the baseline, so only the system is counted)
    import lslo.model  # noqa: F401
    from transformers import M2M100ForConditionalGeneration  # noqa: F401

    baseline = _status_mb("VmRSS") if device.type == "cpu" else 0.0
    if kind == "train":
        _, step = build_train_system(name, shape, languages, groups, device, args.amp)
        run = lambda: step(batch)
    else:
        _, decode = build_decode_system(name, shape, languages, groups, device, args.amp)
        run = lambda: decode(batch, args.new_tokens, args.beams, "lslo")
    run()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset = device.type == "cpu" and _reset_peak_rss()
    for _ in range(2):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "how": "cuda max_memory_allocated"}
    how = "VmHWM reset after warm-up" if reset else "VmHWM since start (reset not allowed)"
    return {"peak_mb": _status_mb("VmHWM") - baseline, "how": how}


def memory_in_subprocesses(shape_name: str, args) -> dict:
    """(kind, name) -> peak MB, each measured by ``bench.py --memory-of kind:name`` in a fresh process."""
    results = {}
    for kind, names in (("train", TRAIN_SYSTEMS), ("decode", DECODE_SYSTEMS)):
        if kind not in args.memory_kinds.split(","):
            continue
        for name in [n for n in names if not args.memory_systems or n in args.memory_systems.split(",")]:
            cmd = [sys.executable, __file__, "--memory-of", f"{kind}:{name}", "--shape", shape_name,
                   "--batch-tokens", str(args.batch_tokens), "--decode-sentences", str(args.decode_sentences),
                   "--new-tokens", str(args.new_tokens),
                   "--beams", str(args.beams), "--threads", str(args.threads), "--amp", args.amp]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                raise RuntimeError(f"memory subprocess {kind}:{name} failed:\n{out.stderr[-3000:]}")
            results[(kind, name)] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


# ---- report -------------------------------------------------------------------------------------------------
TARGETS = (  # (label, numerator, denominator, bound on CPU, bound on CUDA, "<=" | ">="); ratios of median times
    # CUDA bounds: the GPU targets (bf16 AMP) of the issue "One prepared GPU check"
    ("LSLo mixed-12 train step / PEFT step", ("train", "lslo_mixed"), ("train", "peft"), 1.10, 1.05, "<="),
    ("LSLo mixed-12 (stacked kernel) train step / PEFT step", ("train", "lslo_stacked"), ("train", "peft"),
     1.10, 1.05, "<="),
    ("LSLo mixed-12 (segments kernel) train step / PEFT step", ("train", "lslo_segments"), ("train", "peft"),
     1.10, 1.05, "<="),
    ("LSLo mixed-12 (grouped kernel) train step / PEFT step", ("train", "lslo_grouped"), ("train", "peft"),
     1.10, 1.05, "<="),
    ("LSLo one-direction train step / PEFT step", ("train", "lslo_one"), ("train", "peft"), 1.05, 1.05, "<="),
    ("LSLo mixed-12 train step / full FT step", ("train", "lslo_mixed"), ("train", "full"), 0.60, 0.60, "<="),
    ("LSLo mixed beam throughput / PEFT adapter_names throughput", ("lslo", "peft_mixed"),
     ("lslo", "lslo_mixed"), 1.50, 2.00, ">="),
    ("LSLo mixed beam throughput / PEFT adapter_names throughput (HF's beam loop)", ("hf", "peft_mixed"),
     ("hf", "lslo_mixed"), 1.50, 2.00, ">="),
    ("merged one-direction decode time / base decode time", ("lslo", "merged"), ("lslo", "base"), 1.05, 1.05,
     "<="),
)


def machine_info(device) -> dict:
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "git": _git_commit()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def medians(times: dict) -> dict:
    return {name: statistics.median(values) for name, values in times.items()}


def shape_report(shape: Shape, n_sentences: int, args, train: dict, decode: dict, memory: dict, device) -> list:
    med = {("train", k): v for k, v in medians(train).items()} | medians(decode)  # decode keys: (loop, system)
    mem = lambda key: f"{memory[key]['peak_mb']:.0f}" if key in memory else "-"
    train_tokens = 2 * n_sentences * SENTENCE_LEN  # source + target tokens of the batch
    lines = [f"### Shape `{shape.name}`: d_model {shape.d_model}, {shape.layers}+{shape.layers} layers, "
             f"ffn {shape.ffn}, {shape.heads} heads, vocab {shape.vocab} + 12 language tokens; batch "
             f"{n_sentences} sentences x {SENTENCE_LEN} tokens, 12 languages; "
             f"{'float32' if AMP[args.amp] is None else args.amp + ' autocast'}", "",
             f"Training step (median of {args.steps} after {args.warmup} warm-up, interleaved):", "",
             "| system | median ms | x PEFT | x floor | x full | tokens/s (src+tgt) | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in TRAIN_SYSTEMS:
        if ("train", name) not in med:
            lines.append(f"| {name} | failed: {FAILED.get(name, 'not run')} | | | | | |")
            continue
        t = med[("train", name)]
        lines.append(f"| {name} | {1000 * t:.1f} | {t / med[('train', 'peft')]:.3f} | "
                     f"{t / med[('train', 'floor')]:.3f} | {t / med[('train', 'full')]:.3f} | "
                     f"{train_tokens / t:.0f} | {mem(('train', name))} |")
    out_tokens = args.decode_sentences * args.new_tokens
    lines += ["", f"Beam-{args.beams} decoding of {args.decode_sentences} sentences (12 source languages, mixed "
              f"targets), {args.new_tokens} new tokens per sentence (min = max), median of {args.decode_steps}; "
              "every system under lslo's beam loop (the evaluate stage's) and under HF's default one:", "",
              "| system | median ms | x PEFT mixed | x base | output tokens/s | HF loop ms | HF loop x PEFT mixed "
              "| peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in DECODE_SYSTEMS:
        if ("lslo", name) not in med:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        t, t_hf = med[("lslo", name)], med[("hf", name)]
        lines.append(f"| {name} | {1000 * t:.1f} | {t / med[('lslo', 'peft_mixed')]:.3f} | "
                     f"{t / med[('lslo', 'base')]:.3f} | {out_tokens / t:.1f} | {1000 * t_hf:.1f} | "
                     f"{t_hf / med[('hf', 'peft_mixed')]:.3f} | {mem(('decode', name))} |")
    lines += ["", "Targets (ratios of medians from this run):", "", "| target | ratio | bound | result |",
              "|---|---:|---:|---|"]
    for label, num, den, cpu_bound, cuda_bound, op in TARGETS:
        bound = cuda_bound if device.type == "cuda" else cpu_bound
        if num not in med or den not in med:
            lines.append(f"| {label} | - | {op} {bound:.2f} | not run |")
            continue
        ratio = med[num] / med[den]
        ok = ratio <= bound if op == "<=" else ratio >= bound
        lines.append(f"| {label} | {ratio:.3f} | {op} {bound:.2f} | {'PASS' if ok else 'MISS'} |")
    return lines + [""]


def phases_report(phases: dict, args) -> list:
    full, floor = phases["full"], phases["floor"]
    total = {name: sum(p.values()) for name, p in phases.items()}
    lines = [f"Where a training step's time goes (each system alone, median of {args.sweep_steps} after "
             f"{args.warmup} warm-up; forward includes zero_grad):", "",
             "| system | forward ms | backward ms | optimizer ms | total ms | x full |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {1000 * p['forward']:.1f} | {1000 * p['backward']:.1f} | {1000 * p['optimizer']:.1f} | "
              f"{1000 * total[name]:.1f} | {total[name] / total['full']:.3f} |" for name, p in phases.items()]
    lines += ["", f"Full fine-tuning's step is the floor plus the weight gradients "
              f"({1000 * (full['backward'] - floor['backward']):.0f} ms more backward) and Adam "
              f"({1000 * full['optimizer']:.0f} ms); the floor, the least any adapter method's step can cost, is "
              f"{total['floor'] / total['full']:.3f} of it here.", ""]
    return lines


def run_sweep(args, device) -> list:
    """Training-step ratios of SWEEP_SYSTEMS at the other (shape, batch) points of SWEEP: where the fixed
    per-language costs of LSLo weigh most (small batches) and where the output layer does (M2M100's vocabulary)."""
    lines = [f"### Training step at other shapes and batch sizes (median of {args.sweep_steps} after "
             f"{args.warmup} warm-up, interleaved)", "",
             "| shape | vocab | batch (source tokens) | PEFT ms | one-direction / PEFT | mixed-12 / PEFT | "
             "mixed-12 / full | floor / full |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape_name, tokens in SWEEP:
        shape, languages = SHAPES[shape_name], list(LANG12)
        print(f"[sweep {shape_name}, {tokens} tokens] training ...", file=sys.stderr, flush=True)
        batch = make_batch(shape, languages, sentences_in(tokens), SENTENCE_LEN, device)
        med = medians(bench_training(shape, languages, LANG12, batch, args, device, SWEEP_SYSTEMS,
                                     args.sweep_steps))
        lines.append(f"| {shape_name} | {shape.vocab} | {tokens} | {1000 * med['peft']:.0f} | "
                     f"{med['lslo_one'] / med['peft']:.3f} | {med['lslo_mixed'] / med['peft']:.3f} | "
                     f"{med['lslo_mixed'] / med['full']:.3f} | {med['floor'] / med['full']:.3f} |")
    return lines + [""]


def directions_report(rows: list, args) -> list:
    lines = [f"### Evaluation cost against the number of directions (LSLo, generate calls of at most "
             f"{args.direction_max_tokens} source tokens, one target language and mixed sources each, as in the "
             "evaluate stage, "
             f"{args.sentences_per_direction} sentences x {DIRECTION_LEN} tokens per direction, beam {args.beams}, "
             f"{args.direction_tokens} new tokens, `{'tiny' if args.quick else 'demo'}` shape)", "",
             "| languages | directions | generate calls | seconds | ms / direction |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['languages']} | {r['directions']} | {r['generate_calls']} | {r['seconds']:.1f} | "
              f"{r['ms_per_direction']:.1f} |" for r in rows]
    if len(rows) == 2:
        a, b = rows
        lines += ["", f"time ratio {b['seconds'] / a['seconds']:.2f} for a direction ratio "
                      f"{b['directions'] / a['directions']:.2f} (linear cost: equal)."]
    return lines + [""]


DEFINITIONS = f"""Definitions
- floor: forward + backward of the frozen base model with the input embeddings as the only tensor requiring a
  gradient (activation gradients through every layer, no weight gradient, no optimizer step): the least work
  any adapter method's step can do.
- peft: PEFT LoRA, one adapter, r={PEFT_RANK}, alpha={PEFT_RANK}, on the paper's "all" sites (regex
  `{PEFT_TARGET}`: q k v fc1 fc2 in the encoder, q k v c-q c-k c-v fc1 fc2 in the decoder; out_proj excluded).
- lslo_one / lslo_mixed: LSLo on the same sites, lang12 with ranks H;M;V = 2;2;8, index plan: top quarter of
  the encoder target-indexed (paper §4.1), the rest of the encoder source-indexed, the decoder target-indexed.
  lslo_one routes the whole batch as one direction ({ONE_DIRECTION[0]}->{ONE_DIRECTION[1]}); lslo_mixed routes
  each sentence by its own direction (all 12 languages as sources in every batch) with the default kernel
  ("auto", which takes "gathered" for training: each sentence's A/B gathered and zero-padded to rank 8, two
  batched matmuls); lslo_stacked, lslo_segments and lslo_grouped force the other kernels (all present
  languages' A/B concatenated with a per-row routing scale: 48 rank columns for every row; rows sorted by
  language, one LoRA per language, rows unsorted; rows sorted by language, each LoRA matmul one grouped GEMM
  over the languages, `F.grouped_mm`).
- full: every parameter trainable. All trained systems: Adam (betas 0.9/0.98, torch's fused kernel, as
  `lslo.train.make_adam`), lr 3e-3 (adapters) or 1e-4 (full), zero_grad(set_to_none=True) each step, model
  dropout 0.1, adapter dropout 0.
- batches: 32-token sentences; training batches cycle the 12 languages as sources, with random other targets.
- CPU allocator: glibc malloc keeps freed memory (`keep_freed_memory`: no mmap, no trim), as torch's caching
  allocator does on CUDA; otherwise page faults on fresh activations cost up to half a step on this machine and
  made each system's time depend on the system timed before it.
- decoding: beam search, min_new_tokens = max_new_tokens so every system emits the same number of tokens;
  decoder prompt [eos, target-language token] per sentence. peft_mixed: one PEFT adapter per language (ranks
  as LSLo), `adapter_names` = each sentence's target language (PEFT routes a sample to one adapter in every
  layer; in beam search PEFT repeats the names per beam in the decoder only). merged:
  `lslo.adapters.merge_direction(model, {ONE_DIRECTION[0]!r}, {ONE_DIRECTION[1]!r})`, a plain HF model.
  Beam loops: "lslo" passes every system an `lslo.beam.BeamSearchCache`, which reorders only the self-attention
  cache between steps (what `LSLoModel.generate` and the evaluate stage use for every method); "HF" passes HF's
  `EncoderDecoderCache`, which also copies the beam-invariant cross-attention cache every step. Both loops must
  decode the same tokens (checked). The throughput target is read under the lslo loop, where the shared base cost
  is lower and the adapters' own cost weighs more; the HF-loop ratio is printed beside it.
- peak MB: each system alone in a fresh process, 1 warm-up step then 2 measured steps. CPU: peak resident set
  (VmHWM, reset after the warm-up) minus the resident set of the bare process (imports only): weights,
  gradients, Adam state, activations and allocator slack. CUDA: torch.cuda.max_memory_allocated.
- precision: `--amp fp32` runs every system in float32; `--amp bf16` runs every training forward and every
  generate call under bf16 autocast (weights, gradients and Adam stay float32), as `lslo.train` trains on GPUs.
  Target bounds: the CPU bounds on CPU; on CUDA the GPU targets (mixed-12 <= 1.05 x PEFT, <= 0.6 x full
  fine-tuning, mixed beam throughput >= 2 x PEFT adapter_names).
- tokens/s: training counts source + target tokens of the batch; decoding counts output tokens (sentences x
  new tokens, not beams).
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["auto", *SHAPES], default="auto",
                   help="auto: cpu (and m2m124-615m when CUDA is present)")
    p.add_argument("--steps", type=int, default=10, help="timed training repetitions per system")
    p.add_argument("--decode-steps", type=int, default=5, help="timed decoding repetitions per system")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help=f"source tokens per training batch ({SENTENCE_LEN} per sentence)")
    p.add_argument("--decode-sentences", type=int, default=16, help="sentences per decoding batch")
    p.add_argument("--sweep-steps", type=int, default=5, help="timed repetitions per point of the training sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the training sweep over shapes and batch sizes")
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--sentences-per-direction", type=int, default=4)
    p.add_argument("--direction-tokens", type=int, default=10)
    p.add_argument("--direction-max-tokens", type=int, default=4000,
                   help="source tokens per generate call in the directions sweep (config eval.max_tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the per-system memory subprocesses")
    p.add_argument("--memory-kinds", default="train,decode", help="systems whose memory is measured: train, decode")
    p.add_argument("--memory-systems", default="", help="comma-separated systems to measure (default: all)")
    p.add_argument("--amp", choices=list(AMP), default="fp32",
                   help="autocast dtype of every system's training forward and decoding (bf16: as lslo.train on GPUs)")
    p.add_argument("--no-directions", action="store_true", help="skip the 12 vs 30 languages decoding sweep")
    p.add_argument("--quick", action="store_true", help="tiny shape, 2 steps, no memory, no RESULTS.md")
    p.add_argument("--out", default=None, help="markdown report (default benchmarks/RESULTS.md; none with --quick)")
    p.add_argument("--against", default=None, metavar="REV",
                   help="time the training steps and decodings of this checkout and of git revision REV in one run, "
                        "interleaved, and report new/old ratios with 99.5%% intervals "
                        "(benchmarks/revision_compare.py), after the full report (with --quick, alone)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: kind:name
    p.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)  # internal: --against's worker, lslo's tree
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.decode_steps, args.warmup = "tiny", 2, 1, 1
        args.new_tokens, args.direction_tokens, args.sentences_per_direction, args.no_memory = 4, 3, 2, True
        args.direction_max_tokens = 64
        args.batch_tokens, args.decode_sentences, args.no_sweep = 512, 4, True
    if args.out is None and not args.quick and not args.against:
        args.out = str(REPO / "benchmarks" / "RESULTS.md")
    return args


def run_shape(shape: Shape, args, device) -> list:
    languages = list(LANG12)
    n_sentences = sentences_in(args.batch_tokens)
    batch = make_batch(shape, languages, n_sentences, SENTENCE_LEN, device)
    print(f"[{shape.name}] training ...", file=sys.stderr, flush=True)
    train = bench_training(shape, languages, LANG12, batch, args, device)
    print(f"[{shape.name}] training phases ...", file=sys.stderr, flush=True)
    phases = {name: train_phases(name, shape, languages, LANG12, batch, args, device) for name in PHASE_SYSTEMS}
    print(f"[{shape.name}] decoding ...", file=sys.stderr, flush=True)
    decode_batch = make_batch(shape, languages, args.decode_sentences, SENTENCE_LEN, device)
    decode = bench_decoding(shape, languages, LANG12, decode_batch, args, device)
    memory = {}
    if not args.no_memory:
        print(f"[{shape.name}] memory (one process per system) ...", file=sys.stderr, flush=True)
        memory = memory_in_subprocesses(shape.name, args)
    return (shape_report(shape, n_sentences, args, train, decode, memory, device) + phases_report(phases, args)
            + auto_choices_report())


def auto_choices_report() -> list:
    """What "auto" chose where it measured (lslo.kernels.KernelTimer; CUDA bf16 on compute capability 9.x/10.x)."""
    from lslo.kernels import KERNEL_TIMER

    if not KERNEL_TIMER.choices:
        return ["\"auto\" measured no kernel choice in this run (it measures only on CUDA with a native grouped GEMM).",
                ""]
    lines = ["\"auto\"'s measured kernel choices (lslo.kernels.KernelTimer), one per (layer shape, rows, autograd):",
             "",
             "| in | out | ranks present | rows (rounded up) | autograd | chosen |", "|---:|---:|---|---:|---|---|"]
    for (_, _, d_in, d_out, ranks, rows, grad, _), kernel in sorted(KERNEL_TIMER.choices.items(), key=str):
        lines.append(f"| {d_in} | {d_out} | {len(ranks)} (max {max(ranks)}) | {rows} | {grad} | {kernel} |")
    return lines + [""]


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_of:
        kind, name = args.memory_of.split(":")
        shape = SHAPES[args.shape]
        n = sentences_in(args.batch_tokens) if kind == "train" else args.decode_sentences
        batch = make_batch(shape, list(LANG12), n, SENTENCE_LEN, device)
        print(json.dumps(measure_memory(kind, name, shape, list(LANG12), LANG12, batch, args, device)))
        return ""
    if args.worker_of:
        revision_compare().serve(sys.modules[__name__], args.worker_of, args)
        return ""
    comparison = None
    if args.against:  # first, while nothing else holds memory; the full report follows unless --quick
        comparison = revision_compare().compare(sys.modules[__name__], args, argv if argv is not None else sys.argv[1:])
        if args.quick:
            return write_report(comparison, args.out)
    names = [args.shape] if args.shape != "auto" else (["cpu", "m2m124-615m"] if device.type == "cuda" else ["cpu"])
    info = machine_info(device)
    lines = ["# lslo benchmark results", "", "Written by `python benchmarks/bench.py "
             + " ".join(argv if argv is not None else sys.argv[1:]) + "`.", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), ""]
    for name in names:
        lines += run_shape(SHAPES[name], args, device)
    if not args.no_sweep and device.type == "cpu":
        lines += run_sweep(args, device)
    if not args.no_directions:
        print("directions sweep ...", file=sys.stderr, flush=True)
        lines += directions_report(bench_directions(args, device), args)
    return write_report("\n".join(lines + [DEFINITIONS] + ([comparison] if comparison else [])), args.out)


def write_report(report: str, out) -> str:
    print(report)
    if out:
        from lslo.io import atomic_write

        with atomic_write(out) as tmp:
            tmp.write_text(report, encoding="utf-8")
    return report


def revision_compare():
    """benchmarks/revision_compare.py (beside this file; bench.py also runs as a module loaded by path)."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.append(here)
    return importlib.import_module("revision_compare")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        keep_freed_memory()  # process-wide, so only when run as a script (and in its memory subprocesses)
    main()
