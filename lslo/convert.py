"""fairseq M2M-124 (or any fairseq M2M100-architecture checkpoint) -> HF M2M100ForConditionalGeneration directory.

The paper's base model is M2M-124 615M (§5), released as a fairseq checkpoint (model.pt), a fairseq dictionary
(dict.txt) and a SentencePiece model. fairseq's multilingual task appends the language tokens __xx__ to the
dictionary in language-list order (then pads with madeup words), exactly the id layout of HF's M2M100Tokenizer,
so the converted directory holds the model and an `lslo.tokenizer` tokenizer with the same ids.
transformers' convert_m2m100_original_checkpoint_to_pytorch.py is the reference; this version is strict:
every weight must be used and every model parameter filled.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

from lslo.errors import LsloError
from lslo.io import atomic_write, check_output_dir
from lslo.tokenizer import FAIRSEQ_SPECIALS, M2M124_LANGUAGE_CODES, build_tokenizer

log = logging.getLogger(__name__)

# fairseq bookkeeping entries that carry no weights
_IGNORED_SUFFIXES = ("version", "_float_tensor")
_UNREADABLE = "the file is truncated, corrupt or not written by torch.save"
_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")


def convert_fairseq_m2m(checkpoint: str | os.PathLike, dict_txt: str | os.PathLike, spm_model: str | os.PathLike,
                        out_dir: str | os.PathLike, languages: list[str] | None = None, force: bool = False) -> Path:
    """Convert and save; languages default to the checkpoint's own list (langs / lang_pairs), else M2M-124's.

    out_dir must not exist or be empty; `force` lets it replace an earlier output of lslo, never a directory
    holding anything else (lslo.io.check_output_dir)."""
    check_output_dir(out_dir, force)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise LsloError(f"{checkpoint}: fairseq checkpoint not found")
    saved = load_fairseq_checkpoint(checkpoint)
    args = _model_args(saved, checkpoint)
    languages = list(languages) if languages is not None else _checkpoint_languages(saved, checkpoint)
    vocab = read_fairseq_dict(dict_txt, languages)
    state = {k: v for k, v in saved["model"].items() if not k.endswith(_IGNORED_SUFFIXES)}
    embedding = _shared_embedding(state, checkpoint)
    madeup = embedding.shape[0] - len(vocab) - len(languages)
    if madeup < 0:
        raise LsloError(f"{checkpoint}: embedding has {embedding.shape[0]} rows, fewer than {len(vocab)} "
                        f"dictionary entries ({dict_txt}) + {len(languages)} language tokens")
    config = hf_config(args, vocab_size=embedding.shape[0], source=checkpoint)
    model = M2M100ForConditionalGeneration(config)
    _load_strict(model, state, embedding, checkpoint)
    with atomic_write(out_dir, is_dir=True) as tmp:
        build_tokenizer(spm_model, languages, tmp, vocab=vocab, num_madeup_words=madeup)
        model.save_pretrained(tmp)
    log.info("converted %s (%d languages, vocab %d) to %s", checkpoint, len(languages), config.vocab_size, out_dir)
    return Path(out_dir)


def _fairseq_safe_globals() -> list:
    """What fairseq checkpoints pickle besides tensors and containers: argparse.Namespace (args, and cfg.model /
    cfg.task of legacy architectures) and numpy scalars with their dtypes (meter values and losses in
    extra_state / optimizer_history). None of these runs code when unpickled."""
    try:
        from numpy._core.multiarray import scalar  # noqa: PLC0415 - its module moved in numpy 2
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # noqa: PLC0415
    dtype_classes = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]
    return [argparse.Namespace, np.dtype, *dtype_classes, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


def load_fairseq_checkpoint(path: Path) -> dict:
    """A fairseq checkpoint (model.pt) read with torch.load(weights_only=True): pickled code is refused, never run.

    Anything that is not a readable torch checkpoint, or whose structure is not {"model": state dict, "args" /
    "cfg": arguments}, is one LsloError naming the file."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        raise LsloError(f"{path}: a safetensors file, not a fairseq checkpoint; lslo convert reads the model.pt "
                        "that fairseq writes with torch.save")
    safe = _fairseq_safe_globals()
    try:
        with torch.serialization.safe_globals(safe):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path, safe, err)
        if unsafe:
            raise LsloError(f"{path}: refused to unpickle {unsafe}: a fairseq checkpoint holds only tensors, "
                            "numbers, strings and argparse.Namespace, and unpickling these could run code (a trusted "
                            "checkpoint can be re-saved with its 'model' state dict and 'args'/'cfg' as plain "
                            "dicts)") from None
        raise LsloError(f"{path}: not a readable torch checkpoint ({_unpickler_reason(err)}); {_UNREADABLE}") from None
    except Exception as err:  # the unpickler and zip reader raise many types for bytes that are not a checkpoint
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise LsloError(f"{path}: not a readable torch checkpoint ({reason}); {_UNREADABLE}") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise LsloError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    state = saved["model"]
    if not isinstance(state, dict):
        raise LsloError(f"{path}: field 'model' is a {type(state).__name__}, expected a state dict of tensors")
    bad = [name for name, value in state.items() if not isinstance(name, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise LsloError(f"{path}: field 'model' holds entries that are not named tensors: {bad[:5]}"
                        + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return saved


def _unsafe_globals(path: Path, safe: list, err: Exception) -> list[str]:
    """Names of the pickled globals outside the allowlist (read from the pickle, nothing imported or run)."""
    allowed = {name if isinstance(name, str) else f"{name.__module__}.{name.__qualname__}"
               for entry in safe for name in ([entry[1]] if isinstance(entry, tuple) else [entry])}
    try:
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:  # not a zip checkpoint: the unpickler's message names the first one
        return re.findall(r"GLOBAL (\S+) was not an allowed global", str(err))[:1]


def _unpickler_reason(err: Exception) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(err))
    return found.group(1) if found else str(err).splitlines()[0][:200]


def _model_args(saved: dict, source: Path) -> dict:
    """Model hyper-parameters from cfg.model (fairseq >= 0.10) or args (older checkpoints)."""
    cfg = _as_dict(saved.get("cfg"), "cfg", source)
    args = (_as_dict(cfg["model"], "cfg.model", source) if cfg.get("model") is not None
            else _as_dict(saved.get("args"), "args", source))
    if not args:
        raise LsloError(f"{source}: no model arguments (neither cfg.model nor args)")
    return args


def _as_dict(obj, field: str, source: Path) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    raise LsloError(f"{source}: field '{field}' is a {type(obj).__name__}, expected a dict or argparse.Namespace")


def _checkpoint_languages(saved: dict, source: Path) -> list[str]:
    """fairseq's MultilingualDatasetManager.load_langs: `langs` if given, else sorted languages of lang_pairs."""
    cfg = _as_dict(saved.get("cfg"), "cfg", source)
    task = (_as_dict(cfg.get("task"), "cfg.task", source) if cfg
            else _as_dict(saved.get("args"), "args", source))
    for field in ("langs", "lang_pairs"):
        value = task.get(field)
        if value and not (isinstance(value, str) or
                          (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
            raise LsloError(f"{source}: task field '{field}' is {value!r}, expected a comma-separated string or a "
                            "list of strings")
    langs, pairs = task.get("langs"), task.get("lang_pairs")
    if langs:
        return langs.split(",") if isinstance(langs, str) else list(langs)
    if pairs:
        pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs)
        return sorted({code for pair in pairs for code in pair.split("-")})
    return list(M2M124_LANGUAGE_CODES)


def read_fairseq_dict(path: str | os.PathLike, languages: list[str]) -> list[str]:
    """Token list in id order: fairseq's 4 specials, then dict.txt's tokens ("token count [flags]" per line).
    Language tokens already at the end of dict.txt, in language order, are dropped (they are re-appended)."""
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: fairseq dictionary not found")
    tokens = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").rsplit(" ", 2 if line.endswith("#fairseq:overwrite") else 1)
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            raise LsloError(f"{path}: line {number}: expected '<token> <count>', got {line!r}")
        tokens.append(parts[0])
    lang_tokens = [f"__{code}__" for code in languages]
    present = [t for t in tokens if t in set(lang_tokens)]
    if present:
        if tokens[-len(lang_tokens):] != lang_tokens:
            raise LsloError(f"{path}: language tokens {present[:5]}... are in the dictionary but not as its last "
                            f"{len(lang_tokens)} entries in language order {languages[:5]}...")
        tokens = tokens[: -len(lang_tokens)]
    return FAIRSEQ_SPECIALS + tokens


def _shared_embedding(state: dict, source: Path) -> torch.Tensor:
    """M2M100 ties encoder, decoder and output embeddings; fairseq must have shared them too."""
    if _EMBEDDINGS[0] not in state:
        raise LsloError(f"{source}: missing weight {_EMBEDDINGS[0]}")
    embedding = state.pop(_EMBEDDINGS[0])
    for name in _EMBEDDINGS[1:]:
        other = state.pop(name, None)
        if other is not None and not torch.equal(other, embedding):
            raise LsloError(f"{source}: {name} differs from {_EMBEDDINGS[0]}; M2M100 needs shared embeddings "
                            "(fairseq --share-all-embeddings)")
    return embedding


def hf_config(args: dict, vocab_size: int, source: Path | str = "checkpoint") -> M2M100Config:
    """M2M100Config from fairseq transformer arguments; refuses architectures M2M100 cannot express."""
    def need(name):
        if args.get(name) is None:
            raise LsloError(f"{source}: model argument '{name}' missing")
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LsloError(f"{source}: model argument '{name}' is {value!r}, expected a whole number >= 1")
        return value

    for name in ("encoder_normalize_before", "decoder_normalize_before"):
        if not args.get(name, False):
            raise LsloError(f"{source}: {name} is not set; M2M100 is a pre-norm transformer")
    for name in ("layernorm_embedding", "no_token_positional_embeddings", "learned_pos"):
        if args.get(name, False):
            raise LsloError(f"{source}: {name} is set; M2M100 has no such option")
    if need("decoder_embed_dim") != need("encoder_embed_dim"):
        raise LsloError(f"{source}: encoder_embed_dim and decoder_embed_dim differ; M2M100 needs one d_model")
    return M2M100Config(
        vocab_size=vocab_size, d_model=need("encoder_embed_dim"),
        encoder_layers=need("encoder_layers"), decoder_layers=need("decoder_layers"),
        encoder_attention_heads=need("encoder_attention_heads"),
        decoder_attention_heads=need("decoder_attention_heads"),
        encoder_ffn_dim=need("encoder_ffn_embed_dim"), decoder_ffn_dim=need("decoder_ffn_embed_dim"),
        max_position_embeddings=max(args.get("max_source_positions") or 1024, args.get("max_target_positions") or 1024),
        activation_function=args.get("activation_fn") or "relu", scale_embedding=not args.get("no_scale_embedding"),
        dropout=args.get("dropout", 0.1), attention_dropout=args.get("attention_dropout", 0.0),
        activation_dropout=args.get("activation_dropout", 0.0),
        encoder_layerdrop=args.get("encoder_layerdrop", 0.0), decoder_layerdrop=args.get("decoder_layerdrop", 0.0),
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,  # fairseq dictionary ids
    )


def _load_strict(model: M2M100ForConditionalGeneration, state: dict, embedding: torch.Tensor, source: Path) -> None:
    """fairseq names equal HF M2M100Model names (encoder.layers.N.self_attn.q_proj ...) under the `model.` prefix."""
    hf_state = {f"model.{k}": v for k, v in state.items()}
    for name in ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                 "lm_head.weight"):
        hf_state[name] = embedding
    expected = model.state_dict()
    missing = sorted(k.removeprefix("model.") for k in expected.keys() - hf_state.keys())
    unexpected = sorted(k.removeprefix("model.") for k in hf_state.keys() - expected.keys())
    if missing or unexpected:
        raise LsloError(f"{source}: weights do not match the M2M100 architecture; missing {missing}, "
                        f"unexpected {unexpected}")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in hf_state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise LsloError(f"{source}: weight shapes do not match the model arguments: {wrong}")
    model.load_state_dict({k: v.float() for k, v in hf_state.items()}, strict=True)
    model.tie_weights()
