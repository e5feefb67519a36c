"""Translating text with a fine-tuned variant (`lslo translate`), exactly as the evaluate stage decodes it.

    lslo translate --variant results/finetune/<v>/variant.json --src en --tgt oc [--beam 5] < in.txt > out.txt

The model comes from `lslo.evaluate.load_variant` (GPU when there is one), sentences are batched by length under
a token budget (`make_decoding_batches`, fairseq's --max-tokens) and decoded by `Translator.translate` with the
evaluate stage's defaults (beam 5, max_len_a 0, max_len_b 200), so a sentence gets the hypothesis the evaluate
stage writes for it. One output line per input line, in input order.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from lslo.errors import LsloError


def translate_lines(translator, lines: list[str], src: str, tgt: str, beam: int = 5, max_tokens: int = 4000,
                    max_len_a: float = 0.0, max_len_b: int = 200, progress: bool = True) -> list[str]:
    """Hypotheses for `lines` (src -> tgt), one line each (whitespace runs joined, as in the hyps TSV)."""
    from lslo.evaluate import make_decoding_batches

    for lang in (src, tgt):
        if lang not in translator.tokenizer.lang_code_to_id:
            raise LsloError(f"language '{lang}' is not known to the variant's tokenizer; it knows "
                            f"{list(translator.tokenizer.lang_code_to_id)}")
        if translator.is_lslo and lang not in translator.languages:
            raise LsloError(f"language '{lang}' has no adapters in this variant; it has {translator.languages}")
    encoded = [translator.encode(line, src) for line in lines]
    hyps = [""] * len(lines)
    batches = make_decoding_batches([len(ids) for ids in encoded], max_tokens)
    with tqdm(total=len(lines), desc=f"translating {src}-{tgt}", unit="sent", file=sys.stderr,
              disable=not progress) as bar:
        for batch in batches:
            longest = max(len(encoded[i]) for i in batch)
            outputs = translator.translate([encoded[i] for i in batch], [src] * len(batch), [tgt] * len(batch),
                                           beam, int(max_len_a * longest + max_len_b))
            for i, hyp in zip(batch, outputs):
                hyps[i] = " ".join(hyp.split())
            bar.update(len(batch))
    return hyps
