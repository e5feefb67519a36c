"""Beam search without reordering the cross-attention cache.

HF's beam search reorders every cached key and value after each step, the cross-attention ones included. Beam
search only ever continues a sentence from that sentence's own beams, and all beams of a sentence hold the same
encoder states, so that reorder copies the whole cross-attention cache (batch · beams · source length · d_model ·
2 · layers values) to no effect at every step: about a tenth of a beam-5 decoding's time on a CPU (base model
1069 -> 967 ms in benchmarks/RESULTS.md, "HF loop ms" against "median ms").
``with_beam_cache`` hands ``generate`` a cache that reorders the self-attention cache only; outputs are unchanged.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicCache, EncoderDecoderCache


class BeamSearchCache(EncoderDecoderCache):
    """EncoderDecoderCache whose beam reorder leaves the (beam-invariant) cross-attention cache alone."""

    def reorder_cache(self, beam_idx) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def with_beam_cache(hf_model, gen_kwargs: dict) -> dict:
    """``gen_kwargs`` plus a fresh BeamSearchCache when ``hf_model.generate(**gen_kwargs)`` would run an
    encoder-decoder beam search with HF's default cache; otherwise ``gen_kwargs`` unchanged."""
    config = gen_kwargs.get("generation_config") or hf_model.generation_config
    beams = gen_kwargs.get("num_beams", config.num_beams) or 1
    use_cache = gen_kwargs.get("use_cache", config.use_cache)
    if (beams <= 1 or not use_cache or not hf_model.config.is_encoder_decoder
            or gen_kwargs.get("past_key_values") is not None or gen_kwargs.get("cache") is not None
            or config.cache_implementation is not None):
        return gen_kwargs
    decoder_config = hf_model.config.get_text_config(decoder=True)
    cache = BeamSearchCache(DynamicCache(config=decoder_config), DynamicCache(config=decoder_config))
    return {**gen_kwargs, cache_keyword(hf_model): cache}


def cache_keyword(hf_model) -> str:
    """The keyword ``generate`` takes a cache under. transformers 5 renamed ``past_key_values`` to ``cache``
    (``@deprecate_kwarg("past_key_values", new_name="cache")`` on ``generate``): the old name still works there
    but warns (a FutureWarning in every decoding); earlier versions know only ``past_key_values``. The rename
    hides in **kwargs, not in the signature, so it is read from the decorator's closure."""
    func = getattr(type(hf_model), "generate", None)
    while func is not None:
        cells = dict(zip(getattr(getattr(func, "__code__", None), "co_freevars", ()), func.__closure__ or ()))
        try:
            renamed = (cells["old_name"].cell_contents, cells["new_name"].cell_contents) == ("past_key_values",
                                                                                              "cache")
        except (KeyError, ValueError):  # not the decorator, or an empty cell
            renamed = False
        if renamed:
            return "cache"
        func = getattr(func, "__wrapped__", None)
    return "past_key_values"
