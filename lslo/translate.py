"""Translating text with a fine-tuned variant (`lslo translate`), exactly as the evaluate stage decodes it.

    lslo translate --variant results/finetune/<v>/variant.json --src en --tgt oc [--beam 5] < in.txt > out.txt

The model comes from `lslo.inference.load_variant` (GPU when there is one) and the sentences go through the
evaluate stage's translate-many loop (`lslo.inference.translate_many`) with the decoding options the run recorded
next to the variant (decoding.json, written by the workflow from config `eval`). A command-line option overrides
one of them and says so on stderr. With the run's options, the output equals the hypotheses the evaluate stage
wrote for these sentences whenever max_len_a is 0 (the default and the paper's setting): a hypothesis then does
not depend on the batch it is decoded in; with max_len_a > 0 the length limit follows the longest source of the
batch, as in fairseq-generate. One output line per input line, in input order; an empty input line gives an
empty output line.
"""

from __future__ import annotations

from lslo.errors import LsloError
from lslo.inference import (DecodingOptions, Translator, decoding_options_path, one_line, read_decoding_options,
                            translate_many)

# decoding options a command-line flag may override, and the flag
OPTION_FLAGS = {"beam": "--beam", "max_len_a": "--max-len-a", "max_len_b": "--max-len-b", "lenpen": "--lenpen",
                "max_tokens": "--max-tokens", "search": "--search", "dtype": "--dtype"}


def run_decoding_options(variant_json, overrides: dict) -> tuple[DecodingOptions, str]:
    """The decoding options recorded next to `variant_json` with `overrides` ({option: value}, flags given on the
    command line) applied, and one line that says where the options come from."""
    path = decoding_options_path(variant_json)
    if path.is_file():
        recorded, source = read_decoding_options(path), f"the run's decoding options ({path})"
    else:
        recorded = DecodingOptions()
        source = f"lslo's default decoding options ({path} not found)"
    options = recorded.replace(**overrides)
    changed = [f"{OPTION_FLAGS[key]} {value} (recorded: {getattr(recorded, key)})" if path.is_file()
               else f"{OPTION_FLAGS[key]} {value}" for key, value in overrides.items()]
    line = f"decoding with {source}" + (", overridden by " + ", ".join(changed) if changed else "")
    if not path.is_file():
        line += f"; {', '.join(f'{k} {getattr(options, k)}' for k in OPTION_FLAGS)}"
    return options, line


def read_input_lines(data: bytes, name: str) -> list[str]:
    """UTF-8 text as lines (a final newline ends the last line, "\\r\\n" counts as "\\n"); anything else is refused
    with the byte offset and line of the first byte that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise LsloError(f"{name}: byte offset {err.start} (line {line}) is not UTF-8 "
                        f"(byte 0x{data[err.start]:02x}); lslo translate reads UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def translate_lines(translator: Translator, lines: list[str], src: str, tgt: str,
                    options: DecodingOptions = DecodingOptions(), progress: bool = True) -> list[str]:
    """Hypotheses for `lines` (src -> tgt), one line each (whitespace runs joined, as in the hyps TSV). A line
    without text is not decoded (given only "__src__ </s>" a model still writes a sentence): its output is empty."""
    for lang in (src, tgt):
        if lang not in translator.tokenizer.lang_code_to_id:
            raise LsloError(f"language '{lang}' is not known to the variant's tokenizer; it knows "
                            f"{list(translator.tokenizer.lang_code_to_id)}")
        if translator.is_lslo and lang not in translator.languages:
            raise LsloError(f"language '{lang}' has no adapters in this variant; it has {translator.languages}")
    texts = [i for i, line in enumerate(lines) if line.strip()]
    decoded = translate_many(translator, [lines[i] for i in texts], [src] * len(texts), [tgt] * len(texts),
                             options, progress=f"translating {src}-{tgt}", show_progress=progress)
    hyps = [""] * len(lines)
    for i, hyp in zip(texts, decoded):
        hyps[i] = one_line(hyp)
    return hyps
