"""Translating text with a fine-tuned variant (`lslo translate`), exactly as the evaluate stage decodes it.

    lslo translate --variant results/finetune/<v>/variant.json --src en --tgt oc [--beam 5] < in.txt > out.txt

The model comes from `lslo.inference.load_variant` (GPU when there is one) and the sentences go through the
evaluate stage's translate-many loop (`lslo.inference.translate_many`) with the evaluate stage's defaults
(`lslo.inference.DecodingOptions`: beam 5, max_len_a 0, max_len_b 200). One output line per input line, in input
order.
"""

from __future__ import annotations

from lslo.errors import LsloError
from lslo.inference import DecodingOptions, Translator, one_line, translate_many


def translate_lines(translator: Translator, lines: list[str], src: str, tgt: str,
                    options: DecodingOptions = DecodingOptions(), progress: bool = True) -> list[str]:
    """Hypotheses for `lines` (src -> tgt), one line each (whitespace runs joined, as in the hyps TSV)."""
    for lang in (src, tgt):
        if lang not in translator.tokenizer.lang_code_to_id:
            raise LsloError(f"language '{lang}' is not known to the variant's tokenizer; it knows "
                            f"{list(translator.tokenizer.lang_code_to_id)}")
        if translator.is_lslo and lang not in translator.languages:
            raise LsloError(f"language '{lang}' has no adapters in this variant; it has {translator.languages}")
    decoded = translate_many(translator, lines, [src] * len(lines), [tgt] * len(lines), options,
                             progress=f"translating {src}-{tgt}", show_progress=progress)
    return [one_line(hyp) for hyp in decoded]
