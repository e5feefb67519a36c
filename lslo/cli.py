"""The ``lslo`` command line. Subcommands:

  lslo params   exact trainable / effective parameter counts of an LSLo configuration from model shapes
                (no weights needed), e.g.
                lslo params --preset m2m124-615m --languages lang12 --ranks H=2,M=2,V=8 --prune H=0.9,M=0.9
                (--fc-lora slice, the default, is the authors' d_model x d_model fc1/fc2 LoRA; full: d x ffn)
  lslo convert  a fairseq M2M-124 checkpoint (model.pt + dict + SentencePiece model) to an HF checkpoint directory
  lslo check-model  what the workflow needs from a model directory, for a language list (docs/your-model.md)
  lslo translate    translate stdin to stdout with a fine-tuned variant (results/finetune/<v>/variant.json)
  lslo export       one direction of an LSLo variant as a plain HF model or a PEFT LoRA adapter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lslo.errors import LsloError
from lslo.options import FC_LAYOUTS
from lslo.params import INDEX_MODES, count_from_shape, load_config

_M2M100 = {"d_model": 1024, "encoder_attention_heads": 16, "decoder_attention_heads": 16, "tie_word_embeddings": True}

# Shape numbers of the public HF configs (config.json of each checkpoint).
PRESETS = {
    # M2M-124 615M = fairseq "flores101_mm100_615M" (paper §5). Its converted HF config
    # (huggingface.co/VityaVitalich/flores101_mm100_615M, config.json) has vocab_size 256125: the FLORES-101
    # models use a 256k SentencePiece dictionary, not M2M-100's 128k one. With it the model has 614,990,848
    # parameters, the "615M" of the name and of the paper's Ft-all row.
    "m2m124-615m": {**_M2M100, "vocab_size": 256125, "encoder_layers": 12, "decoder_layers": 12,
                    "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096},
    "m2m100-418m": {**_M2M100, "vocab_size": 128112, "encoder_layers": 12, "decoder_layers": 12,
                    "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096},
    "m2m100-1.2b": {**_M2M100, "vocab_size": 128112, "encoder_layers": 24, "decoder_layers": 24,
                    "encoder_ffn_dim": 8192, "decoder_ffn_dim": 8192},
    "nllb-600m": {**_M2M100, "vocab_size": 256206, "encoder_layers": 12, "decoder_layers": 12,
                  "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096},
}
DEFAULT_LANGUAGE_TABLE = "config/languages.tsv"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LsloError as err:
        print(f"lslo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lslo params ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lslo", description="Language-Specific LoRA for multilingual NMT")
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="exact trainable/effective parameter counts from model shapes")
    source = params.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="path to an HF config.json (M2M100 / NLLB)")
    source.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
    params.add_argument("--languages", help="comma list of codes, or a subset of the language table (lang12, lang30)")
    params.add_argument("--groups", help='explicit groups "H=en,fr,de,it;M=zh,nl,ja,ko;V=oc,or,sd,wo"')
    params.add_argument("--language-table", default=DEFAULT_LANGUAGE_TABLE, help="language table TSV (groups)")
    params.add_argument("--ranks", required=True, help='"H=2,M=2,V=8" (groups or languages) or one rank "8"')
    params.add_argument("--modules", default="all", help="all | attn | fc | comma list of q,k,v,c-q,c-k,c-v,fc1,fc2")
    params.add_argument("--prune", default="", help='pruning ratios "H=0.9,M=0.9" (groups or languages)')
    params.add_argument("--index", default="single", choices=INDEX_MODES,
                        help="single: one bank per site (learned/src/tgt plan); learn: src and tgt banks (eq. 5)")
    params.add_argument("--fc-lora", default="slice", choices=FC_LAYOUTS,
                        help="fc1/fc2 LoRA layout: slice (the authors': d_model x d_model blocks) or full (d x ffn)")
    params.add_argument("--json", action="store_true", help="print the counts as JSON")
    params.set_defaults(func=run_params)

    convert = commands.add_parser("convert", help="fairseq M2M-124 checkpoint -> HF M2M100 checkpoint directory")
    convert.add_argument("--checkpoint", required=True, help="fairseq model.pt (e.g. flores101_mm100_615M/model.pt)")
    convert.add_argument("--dict", required=True, help="the fairseq dictionary (dict.txt)")
    convert.add_argument("--spm", required=True, help="the SentencePiece model of that dictionary")
    convert.add_argument("--languages", help="comma list of language codes in the checkpoint's order; when "
                                             "dict.txt ends with the __xx__ tokens their order is used and this "
                                             "must agree with it (default: the checkpoint's own list, else the "
                                             "124 M2M-124 codes)")
    convert.add_argument("--out", required=True, help="output HF checkpoint directory (new or empty)")
    convert.add_argument("--force", action="store_true",
                         help="replace --out if it is an earlier lslo output (never a directory lslo did not write)")
    convert.set_defaults(func=run_convert)
    _add_model_commands(commands)

    readme = commands.add_parser("readme-summary", help="put a finished run's results/summary.md into docs/demo.md")
    readme.add_argument("--summary", default="results/summary.md", help="the summary of a run (rule summary)")
    readme.add_argument("--readme", default="docs/demo.md", help="the page with the demo-summary markers")
    readme.add_argument("--assets", default="docs/demo", help="where the summary's figures are copied")
    readme.set_defaults(func=run_readme_summary)
    return parser


def _add_model_commands(commands) -> None:
    check = commands.add_parser("check-model", help="check a model directory for the workflow (one line each)")
    check.add_argument("model_dir", nargs="?", help="HF checkpoint directory (default: the --config's model)")
    check.add_argument("--languages", help="comma list of codes or a subset of the language table (lang12)")
    check.add_argument("--language-table", help=f"language table TSV (default: the config's, else "
                                                f"{DEFAULT_LANGUAGE_TABLE})")
    check.add_argument("--config", help="a workflow config (config/lang12.yaml): model, data.languages, "
                                        "data.language_table")
    check.set_defaults(func=run_check_model)

    translate = commands.add_parser("translate", help="translate stdin (one sentence a line) to stdout")
    translate.add_argument("--variant", required=True, help="results/finetune/<variant>/variant.json")
    translate.add_argument("--src", required=True, help="source language code")
    translate.add_argument("--tgt", required=True, help="target language code")
    # decoding options: by default the run's own (decoding.json next to variant.json, from config eval)
    translate.add_argument("--beam", type=int, help="beam size (default: the run's eval.beam)")
    translate.add_argument("--max-tokens", type=int, help="source tokens per batch (default: the run's)")
    translate.add_argument("--max-len-a", type=float,
                           help="max new tokens = a * source length + b (default: the run's)")
    translate.add_argument("--max-len-b", type=int, help="(default: the run's)")
    translate.add_argument("--lenpen", type=float, help="length penalty (default: the run's, 1.0)")
    translate.add_argument("--search", help="fairseq | hf: whose beam search (default: the run's eval.search)")
    translate.add_argument("--dtype", help="fp32 | fp16 (CUDA only): the weights' precision while decoding "
                                           "(default: the run's eval.dtype)")
    translate.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    translate.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    translate.set_defaults(func=run_translate)

    export = commands.add_parser("export", help="an LSLo direction as a plain HF model or a PEFT LoRA adapter")
    export.add_argument("--variant", required=True, help="results/finetune/<variant>/variant.json (method lslo)")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--direction", help="SRC-TGT, e.g. en-oc")
    which.add_argument("--all-directions", action="store_true",
                       help="every direction of the variant's languages, one directory each (OUT/<src>-<tgt>)")
    export.add_argument("--out", required=True, help="output directory (new or empty)")
    export.add_argument("--force", action="store_true",
                        help="replace --out if it is an earlier lslo output (never a directory lslo did not write)")
    export.add_argument("--peft", action="store_true", help="write a PEFT LoRA adapter instead of a merged model")
    export.set_defaults(func=run_export)


def run_check_model(args) -> int:
    from lslo.check_model import check_model
    from lslo.languages import read_language_table, select

    config = _workflow_config(args.config) if args.config else {}
    model_dir = args.model_dir or config.get("model")
    if not model_dir:
        raise LsloError("give the model directory (or --config with a 'model' path)")
    data = config.get("data") or {}
    languages = args.languages or data.get("languages")
    table_path = args.language_table or data.get("language_table") or DEFAULT_LANGUAGE_TABLE
    table, codes = None, None
    if languages is not None:
        table = read_language_table(table_path)
        if isinstance(languages, str):
            parts = _split(languages, ",")
            languages = parts[0] if len(parts) == 1 and parts[0] not in table.index else parts
        codes = select(table, languages)
    report = check_model(model_dir, codes, table)
    print("\n".join(report.lines()))
    if report.ok:
        return 0
    print(f"{len(report.problems)} problem(s) in {model_dir}", file=sys.stderr)
    return 1


def _workflow_config(path) -> dict:
    from lslo.config import load_yaml

    config = load_yaml(path)
    if not isinstance(config, dict):
        raise LsloError(f"{path}: not a workflow config (a YAML mapping)")
    return config


def run_translate(args) -> int:
    from lslo.inference import decoding_options_path, load_variant
    from lslo.translate import OPTION_FLAGS, read_input_lines, run_decoding_options, translate_lines

    if (args.beam is not None and args.beam < 1) or (args.max_tokens is not None and args.max_tokens < 1):
        raise LsloError("--beam and --max-tokens must be >= 1")
    overrides = {key: getattr(args, key) for key in OPTION_FLAGS if getattr(args, key) is not None}
    options, source = run_decoding_options(args.variant, overrides)
    # bytes, so that text that is not UTF-8 is refused with its offset (a test's stdin may be a text stream)
    stdin = getattr(sys.stdin, "buffer", None)
    data = stdin.read() if stdin else sys.stdin.read().encode("utf-8", "surrogateescape")
    lines = read_input_lines(data, "<stdin>")
    translator = load_variant(args.variant, args.device)
    if overrides or not args.quiet or not decoding_options_path(args.variant).is_file():
        print(f"lslo translate: {source}", file=sys.stderr)
    hyps = translate_lines(translator, lines, args.src, args.tgt, options, progress=not args.quiet)
    sys.stdout.write("".join(f"{hyp}\n" for hyp in hyps))
    return 0


def run_export(args) -> int:
    from lslo.data import directions
    from lslo.export import export_variant
    from lslo.io import read_json

    if args.all_directions:
        pairs = directions(list(read_json(args.variant).get("languages") or []))
    else:
        src, sep, tgt = args.direction.partition("-")
        if not sep or not src or not tgt:
            raise LsloError(f"--direction '{args.direction}' not understood; expected SRC-TGT such as en-oc")
        pairs = [(src, tgt)]
    for path in export_variant(args.variant, args.out, pairs, peft=args.peft, force=args.force):
        print(f"wrote {path}")
    return 0


def run_readme_summary(args) -> int:
    from lslo.summary import update_readme

    copied = update_readme(args.summary, args.readme, args.assets)
    print(f"updated {args.readme} from {args.summary}; figures: {', '.join(map(str, copied)) or 'none'}")
    return 0


def run_convert(args) -> int:
    from lslo.convert import convert_fairseq_m2m

    languages = _split(args.languages, ",") if args.languages else None
    out = convert_fairseq_m2m(args.checkpoint, args.dict, args.spm, args.out, languages=languages,
                              force=args.force)
    print(f"wrote {out}")
    return 0


def run_params(args) -> int:
    model_config = _model_config(args)
    languages, groups = _languages_and_groups(args)
    ranks = {lang: int(r) for lang, r in _per_language(args.ranks, languages, groups, "--ranks", _rank).items()}
    prune = _per_language(args.prune, languages, groups, "--prune", _ratio)
    counts = count_from_shape(model_config, languages, ranks, modules=args.modules, index_mode=args.index,
                              prune=prune, groups=groups or None, fc_lora=args.fc_lora)
    print(json.dumps(counts, indent=2) if args.json else format_counts(counts))
    return 0


def _model_config(args) -> dict:
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise LsloError(f"unknown preset '{args.preset}'; expected one of {list(PRESETS)}")
        return dict(PRESETS[args.preset])
    return load_config(Path(args.config))


def _languages_and_groups(args) -> tuple[list[str], dict[str, list[str]]]:
    """Languages and resource groups from --groups, or from --languages through the language table."""
    if args.groups:
        groups = parse_groups(args.groups)
        languages = [lang for langs in groups.values() for lang in langs]
        if args.languages and set(_split(args.languages, ",")) != set(languages):
            raise LsloError(f"--languages {args.languages} and --groups {args.groups} name different languages")
        return languages, groups
    if not args.languages:
        raise LsloError("give --languages (codes or a subset such as lang12) or --groups")
    table_path = Path(args.language_table)
    if not table_path.is_file():  # no table: explicit codes, no resource groups (ranks per language)
        return _split(args.languages, ","), {}
    from lslo.languages import read_language_table, select

    table = read_language_table(table_path)
    codes = _split(args.languages, ",")
    languages = select(table, codes[0] if len(codes) == 1 and codes[0] not in table.index else codes)
    groups: dict[str, list[str]] = {}
    for lang in languages:
        groups.setdefault(table.loc[lang, "resource"], []).append(lang)
    return languages, groups


def parse_groups(text: str) -> dict[str, list[str]]:
    """ "H=en,fr;M=zh,nl" -> {"H": ["en", "fr"], "M": ["zh", "nl"]}."""
    groups: dict[str, list[str]] = {}
    for part in _split(text, ";"):
        name, sep, members = part.partition("=")
        if not sep or not name.strip() or not _split(members, ","):
            raise LsloError(f"--groups: '{part}' not understood; expected GROUP=lang,lang,... parts joined by ';'")
        if name.strip() in groups:
            raise LsloError(f"--groups: group '{name.strip()}' given twice; list each group's languages once")
        groups[name.strip()] = _split(members, ",")
    listed = [lang for langs in groups.values() for lang in langs]
    twice = sorted({lang for lang in listed if listed.count(lang) > 1})
    if twice:
        raise LsloError(f"--groups: language(s) {twice} listed more than once")
    return groups


def _per_language(text: str, languages: list[str], groups: dict, option: str, convert) -> dict:
    """ "H=2,M=2,V=8" (group or language keys) or one bare value for every language -> {lang: value}."""
    text = text.strip()
    if not text:
        return {}
    if "=" not in text:
        return {lang: convert(text, option, "all languages") for lang in languages}
    values = {}
    for part in _split(text, ","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise LsloError(f"{option}: '{part}' not understood; expected KEY=VALUE with a group or language key")
        if key in groups:
            members = groups[key]
        elif key in languages:
            members = [key]
        else:
            raise LsloError(f"{option}: unknown group or language '{key}'; groups {list(groups)}, "
                            f"languages {languages}")
        for lang in members:
            values[lang] = convert(value, option, key)
    return values


def _rank(value: str, option: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LsloError(f"{option}: rank of '{key}' is '{value}', expected a whole number >= 1") from None


def _ratio(value: str, option: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LsloError(f"{option}: ratio of '{key}' is '{value}', expected a number in [0, 1)") from None


def _split(text: str, sep: str) -> list[str]:
    return [item.strip() for item in text.split(sep) if item.strip()]


def format_counts(counts: dict) -> str:
    """A readable table of the counts (exact integers, M = 1e6 for reading)."""
    lines = [f"{'':<14}{'trainable':>14}{'effective':>14}",
             f"{'total':<14}{counts['trainable']:>14,}{counts['effective']:>14,}"]
    if counts["index_weights"]:
        lines.append(f"{'index weights':<14}{counts['index_weights']:>14,}{counts['index_weights']:>14,}")
    lines.append(f"base model {counts['base']:,} parameters; trainable = {counts['percent']:.3f}% of it "
                 f"({counts['trainable'] / 1e6:.2f}M trainable, {counts['effective'] / 1e6:.2f}M effective)")
    for title in ("by_group", "by_language", "by_module"):
        if counts[title]:
            lines.append(f"\n{title.replace('_', ' ')}:")
            lines += [f"  {key:<12}{v['trainable']:>14,}{v['effective']:>14,}" for key, v in counts[title].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
