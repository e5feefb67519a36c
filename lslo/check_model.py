"""What the workflow needs from a model directory, checked in one go (`lslo check-model`, the Snakefile's pre-check).

    report = check_model("checkpoints/nllb-200-600M", ["en", "fr", "oc"], table)
    report.facts      # one line each: config class, weights, parameters and size, tokenizer, language tokens,
    decoder start report.problems   # one line each; empty when every stage will find what it needs

Nothing is loaded into memory: the parameter count comes from the model built on the meta device, the weight
names and shapes from the safetensors headers (or a memory-mapped pytorch_model.bin). transformers would load a
checkpoint whose weights miss a matrix with a warning and random values there; here that is a problem line.
docs/your-model.md describes each check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lslo.errors import LsloError

TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")  # = model.shared


@dataclass
class ModelReport:
    model_dir: Path
    facts: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [f"ok       {fact}" for fact in self.facts] + [f"problem  {p}" for p in self.problems]


def check_model(model_dir, languages: list[str] | None = None, table=None) -> ModelReport:
    """Every check at once; `languages` (model codes) need a language token each, `table` (the language
    table) gives their NLLB codes for an NLLB tokenizer."""
    from lslo.languages import nllb_codes

    report = ModelReport(Path(model_dir))
    config = _check_config(report)
    if config is None:
        return report
    model = _meta_model(config)
    _check_weights(report, model)
    n_params = sum(p.numel() for p in model.parameters())
    report.facts.append(f"parameters: {n_params:,} ({_size(n_params * 4)} in float32, as lslo loads the base "
                        "model; training adds the adapters, optimizer state and activations)")
    codes = nllb_codes(table, languages) if table is not None else None
    tokenizer = _check_tokenizer(report, codes)
    if tokenizer is not None:
        _check_tokenizer_against_model(report, tokenizer, config)
        _check_languages(report, tokenizer, list(languages or []), config.vocab_size)
    _check_decoder_start(report, config)
    return report


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def _check_config(report: ModelReport):
    from transformers import M2M100Config

    from lslo.model import SUPPORTED

    path = report.model_dir / "config.json"
    if not report.model_dir.is_dir():
        report.problems.append(f"{report.model_dir}: not a directory")
        return None
    if not path.is_file():
        report.problems.append(f"{report.model_dir}: no config.json (not an HF model directory)")
        return None
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        report.problems.append(f"{path}: not a JSON model config ({err})")
        return None
    if model_type != "m2m_100":
        report.problems.append(f"{path}: model_type is {model_type!r}, expected 'm2m_100' ({SUPPORTED})")
        return None
    config = M2M100Config.from_pretrained(str(report.model_dir), local_files_only=True)
    report.facts.append(f"config: {type(config).__name__} (model_type m2m_100), {config.encoder_layers}+"
                        f"{config.decoder_layers} layers, d_model {config.d_model}, vocab_size {config.vocab_size}")
    return config


def _meta_model(config):
    import torch
    from transformers import M2M100ForConditionalGeneration

    with torch.device("meta"):
        return M2M100ForConditionalGeneration(config)


def _weight_shapes(model_dir: Path) -> tuple[str, dict, str] | None:
    """(file name, {tensor name: (shape, dtype)}, note) of the checkpoint's weights, or None without any."""
    from safetensors import safe_open

    from lslo.model import WEIGHT_FILES

    name = next((n for n in WEIGHT_FILES if (model_dir / n).is_file()), None)
    if name is None:
        return None
    if name.endswith(".index.json"):  # sharded: the index names the shard of each tensor
        shards = sorted(set(json.loads((model_dir / name).read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        shards = [name]
    shapes = {}
    for shard in shards:
        if shard.endswith(".safetensors"):
            with safe_open(str(model_dir / shard), framework="pt") as f:
                for key in f.keys():
                    sliced = f.get_slice(key)
                    shapes[key] = (tuple(sliced.get_shape()), sliced.get_dtype())
        else:
            import torch

            state = torch.load(model_dir / shard, map_location="cpu", mmap=True, weights_only=True)
            shapes.update({k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()})
    return name, shapes, f"{len(shards)} file(s)"


def _check_weights(report: ModelReport, model) -> None:
    from lslo.model import WEIGHT_FILES

    try:
        found = _weight_shapes(report.model_dir)
    except Exception as err:  # safetensors / torch raise their own types for unreadable files
        report.problems.append(f"{report.model_dir}: the weight file does not read ({type(err).__name__}: {err})")
        return
    if found is None:
        report.problems.append(f"{report.model_dir}: no model weights; expected one of {list(WEIGHT_FILES)}")
        return
    name, shapes, note = found
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes and not (k in TIED and "model.shared.weight" in shapes)]
    wrong = [f"{k} {shapes[k][0]} (config: {expected[k]})" for k in expected if k in shapes
             and shapes[k][0] != expected[k]]
    if missing:
        report.problems.append(f"{report.model_dir / name}: {len(missing)} weight(s) missing, e.g. {missing[:3]} "
                               "(transformers would fill them with random values)")
    if wrong:
        report.problems.append(f"{report.model_dir / name}: {len(wrong)} weight(s) shaped unlike config.json, "
                               f"e.g. {wrong[:2]}")
    if not missing and not wrong:
        dtypes = sorted({str(dtype) for _, dtype in shapes.values()})
        report.facts.append(f"weights: {name} ({note}, {len(shapes)} tensors stored as {', '.join(dtypes)}), "
                            "every weight of the config present with its shape")


def _check_tokenizer(report: ModelReport, nllb_codes):
    from lslo.tokenizer import NllbCodes, load_tokenizer

    try:
        tokenizer = load_tokenizer(report.model_dir, nllb_codes)
    except LsloError as err:
        report.problems.append(str(err))
        return None
    except Exception as err:  # a broken tokenizer file: transformers' own error, on one line
        report.problems.append(f"{report.model_dir}: the tokenizer does not load ({type(err).__name__}: {err})")
        return None
    if isinstance(tokenizer, NllbCodes):
        kind = (f"NLLB ({type(tokenizer.tokenizer).__name__}, {len(tokenizer.nllb_languages)} language tokens "
                "such as eng_Latn, source = [language] tokens </s>)")
    else:
        kind = f"M2M100 ({type(tokenizer).__name__}, {len(tokenizer.lang_code_to_id)} language tokens __xx__)"
    report.facts.append(f"tokenizer: {kind}, {len(tokenizer)} tokens")
    return tokenizer


SPECIALS = ("bos", "pad", "eos")  # ids config.json and the tokenizer must agree on


def _check_tokenizer_against_model(report: ModelReport, tokenizer, config) -> None:
    """The tokenizer's ids are the embedding's rows: a tokenizer that loads and knows every language can still
    be off by one (one entry short in vocab.json shifts every language token id onto its neighbour's row), and
    nothing downstream would notice. Checked: the special-token ids against config.json and, for the M2M100
    format, vocab.json's ids 0..n-1 in fairseq order, the language tokens right after them and the rows they
    add up to against vocab_size."""
    from lslo.tokenizer import FAIRSEQ_SPECIALS, LsloM2M100Tokenizer, model_vocab_size

    before = len(report.problems)
    for name in SPECIALS:
        token_id, config_id = getattr(tokenizer, f"{name}_token_id", None), getattr(config, f"{name}_token_id")
        if config_id is not None and token_id != config_id:
            report.problems.append(f"{report.model_dir}: the tokenizer's {name} token "
                                   f"{getattr(tokenizer, f'{name}_token', None)!r} has id {token_id}, config.json's "
                                   f"{name}_token_id is {config_id}")
    if isinstance(tokenizer, LsloM2M100Tokenizer):
        vocab = report.model_dir / "vocab.json"
        ids = sorted(tokenizer.encoder.values())
        if ids != list(range(len(ids))):
            gap = next((i for i, token_id in enumerate(ids) if token_id != i), len(ids))
            report.problems.append(f"{vocab}: ids are not 0..{len(ids) - 1} (first gap or repeat at id {gap}); the "
                                   f"language tokens take the ids after the {len(ids)} entries, so they would "
                                   "collide with the entries' ids")
        heads = [tokenizer.decoder.get(i) for i in range(len(FAIRSEQ_SPECIALS))]
        if heads != FAIRSEQ_SPECIALS:
            report.problems.append(f"{vocab}: ids 0-3 are {heads}, expected {FAIRSEQ_SPECIALS} (fairseq order)")
        clashes = [token for token in tokenizer.lang_code_to_token.values() if token in tokenizer.encoder]
        if clashes:
            report.problems.append(f"{vocab}: holds language token(s) {clashes[:5]} among the pieces; M2M100 "
                                   "places them after the vocabulary")
        rows = model_vocab_size(tokenizer)
        if rows != config.vocab_size:
            report.problems.append(
                f"{report.model_dir}: the tokenizer accounts for {rows} embedding rows ({len(ids)} vocab.json entries "
                f"+ {len(tokenizer.lang_code_to_id)} language tokens + {tokenizer.num_madeup_words} madeup words), "
                f"the model has vocab_size {config.vocab_size}: every language token id would be off by "
                f"{config.vocab_size - rows} (a vocab.json or num_madeup_words not of these weights)")
        elif len(report.problems) == before:
            report.facts.append(f"token ids: {len(ids)} vocab.json entries, language tokens at ids {len(ids)}.."
                                f"{len(ids) + len(tokenizer.lang_code_to_id) - 1}, {tokenizer.num_madeup_words} "
                                f"madeup words = vocab_size {config.vocab_size}; bos/pad/eos as config.json")
    else:
        ids = list(tokenizer.lang_code_to_id.values())
        if len(set(ids)) != len(ids):
            report.problems.append(f"{report.model_dir}: two language codes share a token id "
                                   f"({tokenizer.lang_code_to_token})")
        elif len(report.problems) == before:
            report.facts.append("token ids: bos/pad/eos as config.json")


def _check_languages(report: ModelReport, tokenizer, languages: list[str], vocab_size: int) -> None:
    from lslo.tokenizer import language_token

    if len(tokenizer) > vocab_size:
        report.problems.append(f"{report.model_dir}: the tokenizer has {len(tokenizer)} tokens, more than the "
                               f"model's vocab_size {vocab_size} (config.json)")
    found = []
    for code in languages:
        token = language_token(tokenizer, code)
        if code not in tokenizer.lang_code_to_id:
            hint = "" if token != code or "_" in code else " (no nllb code for it in the language table)"
            report.problems.append(f"language '{code}': the tokenizer has no language token '{token}'{hint}")
        elif tokenizer.lang_code_to_id[code] >= vocab_size:
            report.problems.append(f"language '{code}': token '{token}' has id {tokenizer.lang_code_to_id[code]}, "
                                   f"outside the model's vocab_size {vocab_size}")
        else:
            found.append(f"{code}={token}")
    if found:
        report.facts.append(f"language tokens: {', '.join(found)}")


def _check_decoder_start(report: ModelReport, config) -> None:
    """Decoding starts [decoder_start, target language token]; HF generate prepends generation_config's
    decoder_start_token_id to that prefix when it differs from its first token, so both must agree."""
    from transformers import GenerationConfig

    start = config.decoder_start_token_id
    generation = None
    if (report.model_dir / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(report.model_dir), local_files_only=True)
    generation_start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        report.problems.append(f"{report.model_dir / 'config.json'}: decoder_start_token_id is not set "
                               "(M2M100 and NLLB start decoding with </s>, id 2)")
    elif generation_start is not None and generation_start != start:
        report.problems.append(f"{report.model_dir / 'generation_config.json'}: decoder_start_token_id is "
                               f"{generation_start}, config.json says {start}; set both to the same id (</s>)")
    else:
        where = "config.json and generation_config.json" if generation_start is not None else "config.json"
        report.facts.append(f"decoder start: id {start} ({where}), then the target language token")


def workflow_problems(languages, table_path, model_dir, config_files: str) -> list[str]:
    """The Snakefile's pre-check (flores mode): the configured language codes against the language table, then
    the model directory against those languages. One line per problem, naming the config key or file."""
    from lslo.languages import read_language_table, select

    try:
        table = read_language_table(table_path)
    except LsloError as err:
        return [f"data.language_table ({config_files}): {err}"]
    try:
        codes = select(table, languages)
    except LsloError as err:
        return [f"config key 'data.languages' ({config_files}): {err}"]
    report = check_model(model_dir, codes, table)
    return [f"config key 'model' ({config_files}): {problem}" for problem in report.problems]
