"""fairseq-generate's beam search, as the authors decode (fairseq `SequenceGenerator._generate` with
`search.BeamSearch`, M2M-100's `translation_multi_simple_epoch` task), over a step function, and the step
function of an HF M2M100 model (or an LSLo model's base with its routing).

Where it differs from HF `generate` (the `eval.search: hf` decoding):

- stop rule: a sentence is done as soon as `beam` hypotheses are finalized (fairseq `is_finished`); HF
  (early_stopping=False) keeps searching while a running beam could still beat the worst finished one;
- score: the forced target-language token keeps the model's log-probability in the cumulative score
  (`_prefix_tokens` sets every other token to -inf and keeps `lprobs` of the prefix token), and the sum is divided
  by (step + 1) ** lenpen, the hypothesis length counting the language token and EOS (`finalize_hypos`:
  `tokens[:, 1:step + 2]` with EOS at `step`); HF leaves the forced token out of both;
- candidates: the top 2·beam of (beam × vocab) (`BeamSearch.step`); one ending in EOS is finalized only if it
  is among the first `beam` candidates (`cand_bbsz_idx[:, :beam_size]`); the next beams are the first `beam`
  candidates that do not end in EOS;
- at the length limit (max_len = min(max_len_a · source width + max_len_b, max positions - 1)) EOS is forced;
- pad is never chosen (lprobs[pad] = -inf); fairseq's unk penalty defaults to 0, a no-op, and is left out.

The best finalized hypothesis (highest normalized score) is the output, as fairseq-generate's first (nbest 1).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from lslo.errors import LsloError

NEG_INF = -math.inf


@dataclass(frozen=True)
class Hypothesis:
    tokens: list  # the tokens after the decoder start: forced prefix, generated tokens, EOS (fairseq's `tokens`)
    score: float  # cumulative log-probability / len(tokens) ** lenpen


# step(tokens, reorder, kept) -> log-probabilities [rows, vocab] (float32) of the token after tokens[:, -1].
# rows = sentences still decoding × beam, sentence-major; tokens [rows, step + 1] start with the decoder start.
# reorder (None at the first step): for each row, the row of the previous call it continues (the model's state
# follows it). kept (None unless a sentence finished at the previous step): positions, in the previous call's
# sentence order, of the sentences still decoding.
StepFunction = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def fairseq_beam_search(step_fn: StepFunction, batch_size: int, beam: int, max_len: int, prefix: torch.Tensor,
                        *, bos: int, eos: int, pad: int, lenpen: float = 1.0, min_len: int = 1
                        ) -> list[list[Hypothesis]]:
    """fairseq's `_generate` for ``batch_size`` sentences: per sentence its finalized hypotheses (at most
    ``beam``), best first. ``prefix`` [batch_size, P]: tokens forced after ``bos`` (M2M-100: the target-language
    token, `translation_multi_simple_epoch.inference_step` with lang_tok_replacing_bos_eos false)."""
    if max_len < min_len:  # fairseq: assert self.min_len <= max_len
        raise LsloError(f"the length limit is {max_len} tokens, under fairseq's minimum length {min_len} "
                        f"(eval.max_len_a * source length + eval.max_len_b)")
    device = prefix.device
    rows = batch_size * beam
    tokens = torch.full((rows, max_len + 2), pad, dtype=torch.long, device=device)
    tokens[:, 0] = bos
    scores = torch.zeros(rows, dtype=torch.float32, device=device)  # cumulative log-prob of each beam
    prefix = prefix.to(device)
    sentences = list(range(batch_size))  # the original index of each sentence still decoding
    finalized: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    cand_size = 2 * beam  # "2 x beam size in case half are EOS"
    ignore = torch.zeros(batch_size, beam, dtype=torch.bool, device=device)  # fairseq's cands_to_ignore
    reorder = kept = None
    for step in range(max_len + 1):  # one extra step for EOS
        lprobs = step_fn(tokens[:, :step + 1], reorder, kept).float()
        lprobs = _constrain(lprobs, step, max_len, prefix, beam, eos, pad, min_len)
        bsz = len(sentences)
        vocab = lprobs.shape[1]
        # BeamSearch.step: at step 0 every beam holds the same prefix, so only the first one is expanded
        expanded = (lprobs.view(bsz, beam, vocab)[:, :1] if step == 0
                    else lprobs.view(bsz, beam, vocab) + scores.view(bsz, beam, 1))
        flat = expanded.reshape(bsz, -1)
        cand_scores, cand_flat = flat.topk(min(cand_size, flat.shape[1] - 1))  # "-1 so we never select pad"
        cand_beams, cand_tokens = cand_flat // vocab, cand_flat % vocab
        # finalize hypotheses that end in EOS, only among the first `beam` candidates
        eos_mask = cand_tokens.eq(eos) & cand_scores.ne(NEG_INF)
        first = min(beam, eos_mask.shape[1])  # fewer candidates than `beam` only with a vocabulary under 2·beam
        eos_mask[:, :first] &= ~ignore[:, :first]  # by candidate position, as fairseq applies cands_to_ignore
        done = set()
        if bool(eos_mask[:, :beam].any()):
            done = _finalize(finalized, sentences, tokens, step, beam, eos, lenpen, cand_beams[:, :beam],
                             cand_scores[:, :beam], eos_mask[:, :beam], max_len)
        if len(done) == bsz:
            break
        kept = None
        if done:  # drop the finished sentences from the batch
            keep = [i for i in range(bsz) if i not in done]
            kept = torch.tensor(keep, device=device)
            sentences = [sentences[i] for i in keep]
            eos_mask, cand_beams, cand_scores, cand_tokens = (eos_mask[kept], cand_beams[kept], cand_scores[kept],
                                                              cand_tokens[kept])
            ignore, prefix = ignore[kept], prefix[kept]
            row_kept = (kept[:, None] * beam + torch.arange(beam, device=device)).view(-1)
            tokens, scores = tokens[row_kept], scores[row_kept]
            previous = kept  # sentence positions in the previous step's rows
        else:
            previous = torch.arange(bsz, device=device)
        bsz = len(sentences)
        # the next beams: the first `beam` candidates not ending in EOS (nor ignored)
        eos_mask[:, :first] |= ignore[:, :first]
        offsets = torch.arange(eos_mask.shape[1], device=device)
        active_mask = eos_mask.long() * cand_size + offsets
        new_ignore, active = active_mask.topk(beam, dim=1, largest=False)
        ignore = new_ignore.ge(cand_size)
        active_beams = cand_beams.gather(1, active)
        here = (active_beams + torch.arange(bsz, device=device)[:, None] * beam).view(-1)
        reorder = (active_beams + previous[:, None] * beam).view(-1)
        tokens = tokens[here]
        tokens[:, step + 1] = cand_tokens.gather(1, active).view(-1)
        scores = cand_scores.gather(1, active).view(-1)
    for hyps in finalized:  # sort by score, best first (fairseq sorts each sentence's finalized list)
        hyps.sort(key=lambda h: h.score, reverse=True)
    return finalized


def _constrain(lprobs, step: int, max_len: int, prefix, beam: int, eos: int, pad: int, min_len: int):
    """fairseq `_generate`'s edits of the step's log-probabilities, in its order."""
    lprobs = lprobs.masked_fill(lprobs.isnan(), NEG_INF)
    lprobs[:, pad] = NEG_INF  # never select pad
    if step >= max_len:  # the length limit: only EOS
        eos_lprobs = lprobs[:, eos].clone()
        lprobs.fill_(NEG_INF)
        lprobs[:, eos] = eos_lprobs
    if step < prefix.shape[1] and step < max_len:
        # `_prefix_tokens`: the prefix token keeps its own log-probability, every other token -inf
        forced = prefix[:, step].repeat_interleave(beam)
        forced_lprobs = lprobs.gather(1, forced[:, None])
        mask = forced.ne(pad)
        lprobs[mask] = lprobs[mask].fill_(NEG_INF).scatter_(1, forced[mask][:, None], forced_lprobs[mask])
    elif step < min_len:  # the minimum length (not with a prefix step)
        lprobs[:, eos] = NEG_INF
    return lprobs


def _finalize(finalized, sentences, tokens, step: int, beam: int, eos: int, lenpen: float, cand_beams,
              cand_scores, eos_mask, max_len: int) -> set:
    """fairseq `finalize_hypos`: each EOS candidate (in candidate order) becomes a hypothesis of its sentence
    while the sentence has fewer than `beam`; the sentence is finished at `beam` hypotheses or at the length
    limit. Returns the positions (in this step's batch) of the sentences finished now."""
    bsz = len(sentences)
    rows = (cand_beams + torch.arange(bsz, device=cand_beams.device)[:, None] * beam)[eos_mask]
    prefixes = tokens[rows, 1:step + 1].tolist()
    eos_scores = cand_scores[eos_mask].tolist()
    positions = eos_mask.nonzero()[:, 0].tolist()  # row-major: sentence by sentence, best candidate first
    seen, done = set(), set()
    for position, prefix, score in zip(positions, prefixes, eos_scores):
        hyps = finalized[sentences[position]]
        seen.add(position)
        if len(hyps) < beam:
            # tokens[1:step + 2] with EOS at `step`: the length counts the prefix token and EOS
            hyps.append(Hypothesis(prefix + [eos], score / (step + 1) ** lenpen))
    for position in seen:
        if len(finalized[sentences[position]]) == beam or step == max_len:
            done.add(position)
    return done


# ---------------------------------------------------------------------------------------------- M2M100

def _cache_keyword(module) -> str:
    """The keyword a transformers module's forward takes its cache under (``cache`` since transformers 5,
    ``past_key_values`` before; lslo.beam.cache_keyword reads generate's)."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


class M2M100Steps:
    """The step function of `fairseq_beam_search` over an HF M2M100 model: the encoder once at B rows, its states
    repeated to B·beam rows (sentence-major, beam-minor, as fairseq's `reorder_encoder_out` and HF order them, so
    an LSLo routing set with B ids repeat_interleaves them), the decoder one token a step with a cache whose
    self-attention part follows the beams (the cross-attention part is the same for every beam of a sentence:
    lslo.beam) and whose rows of finished sentences are dropped; log-softmax in float32 (fairseq's
    `get_normalized_probs` computes it in float32 under --fp16 too)."""

    def __init__(self, hf_model, input_ids, attention_mask, beam: int, routing=None, src_lang=None, tgt_lang=None):
        self.hf, self.beam, self.routing = hf_model, beam, routing
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        if routing is not None:
            routing.set(src_lang, tgt_lang)
        encoded = hf_model.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        repeat = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(beam)
        self.encoded, self.mask = encoded[repeat], attention_mask[repeat]
        decoder = hf_model.model.decoder
        config = hf_model.config.get_text_config(decoder=True)
        self.cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        self.keyword = _cache_keyword(decoder)

    def __call__(self, tokens, reorder, kept):
        if kept is not None:  # sentences finished: drop their rows everywhere
            rows = (kept[:, None] * self.beam + torch.arange(self.beam, device=kept.device)).view(-1)
            self.cache.cross_attention_cache.reorder_cache(rows)
            self.encoded, self.mask = self.encoded[rows], self.mask[rows]
            if self.routing is not None:
                index = kept.to(self.src_lang.device)
                self.src_lang, self.tgt_lang = self.src_lang[index], self.tgt_lang[index]
                self.routing.set(self.src_lang, self.tgt_lang)
        if reorder is not None:
            self.cache.self_attention_cache.reorder_cache(reorder)
        out = self.hf.model.decoder(input_ids=tokens[:, -1:], encoder_hidden_states=self.encoded,
                                    encoder_attention_mask=self.mask, use_cache=True, **{self.keyword: self.cache})
        logits = self.hf.lm_head(out.last_hidden_state[:, -1])
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


@torch.no_grad()
def m2m100_beam_search(hf_model, input_ids, attention_mask, prefix, beam: int, max_new_tokens: int,
                       lenpen: float, routing=None, src_lang=None, tgt_lang=None) -> list[Hypothesis]:
    """The best fairseq-rule hypothesis per sentence. ``prefix`` [B, P]: the forced tokens after the decoder
    start (the target-language token); ``routing`` with ``src_lang``/``tgt_lang`` (LongTensors [B]): an LSLo
    model's routing (LSLoModel.routing, with hf_model its base), cleared afterwards."""
    config = hf_model.config
    # fairseq: max_len = min(max_len_a * src_len + max_len_b, max_decoder_positions - 1)
    max_len = min(max_new_tokens, config.max_position_embeddings - 1)
    try:
        steps = M2M100Steps(hf_model, input_ids, attention_mask, beam, routing, src_lang, tgt_lang)
        finalized = fairseq_beam_search(steps, input_ids.shape[0], beam, max_len, prefix,
                                        bos=config.decoder_start_token_id, eos=config.eos_token_id,
                                        pad=config.pad_token_id, lenpen=lenpen)
    finally:
        if routing is not None:
            routing.clear()
    empty = [i for i, hyps in enumerate(finalized) if not hyps]
    if empty:  # fairseq stops on `assert step < max_len` here
        raise LsloError(f"fairseq beam search ended sentence(s) {empty} of the batch without a hypothesis: every "
                        f"continuation had log-probability -inf or NaN (with eval.dtype fp16: an overflow)")
    return [hyps[0] for hyps in finalized]
