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
import collections
import io
import logging
import os
import pickle
import pickletools
import re
import typing
import zipfile
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
    """Convert and save. The language order (which fixes the language token ids) is dict.txt's when it lists the
    __xx__ tokens; otherwise `languages`, else the checkpoint's own list (langs / lang_pairs), else M2M-124's.
    `languages` or the checkpoint's list that contradicts dict.txt's order is refused with both orders.

    out_dir must not exist or be empty; `force` lets it replace an earlier output of lslo, never a directory
    holding anything else (lslo.io.check_output_dir)."""
    check_output_dir(out_dir, force)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise LsloError(f"{checkpoint}: fairseq checkpoint not found")
    saved = load_fairseq_checkpoint(checkpoint)
    args = _model_args(saved, checkpoint)
    given, origin = ((list(languages), "--languages") if languages is not None
                     else _checkpoint_languages(saved, checkpoint))
    vocab, languages = read_fairseq_dict(dict_txt, given, origin)
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


class _OmegaConfStandIn:
    """An inert object in place of an omegaconf node: the unpickler fills its __dict__ (omegaconf 2.0 pickles a
    node as its __dict__: _metadata, _parent, and _content for a DictConfig / ListConfig, _val for a value node);
    it has no methods that run, and `_plain` turns it into dicts, lists and scalars."""


class _OmegaConfMetadata(_OmegaConfStandIn):
    """omegaconf.base.Metadata / ContainerMetadata (dataclasses: ref_type, object_type, optional, key, flags,
    resolver_cache, key_type, element_type): read and dropped."""


def _stand_in(qualified: str, base: type) -> tuple[type, str]:
    module, _, name = qualified.rpartition(".")
    return type(name, (base,), {"__module__": module, "__qualname__": name}), qualified


# What fairseq 3b27ed79 (2020-10-20) .. f6d60e2f (2021-03-03) pickled as `cfg` (omegaconf 2.0.x): DictConfig
# nodes whose values are ListConfig or value nodes (AnyNode for fairseq's untyped config, the typed ones for
# structured configs), each with its Metadata / ContainerMetadata dataclass.
_OMEGACONF_NODES = ["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
                    *(f"omegaconf.nodes.{name}" for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                             "BooleanNode", "EnumNode", "ValueNode"))]
_OMEGACONF_METADATA = ["omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata"]
_OMEGACONF_STAND_INS = ([_stand_in(name, _OmegaConfStandIn) for name in _OMEGACONF_NODES]
                        + [_stand_in(name, _OmegaConfMetadata) for name in _OMEGACONF_METADATA])


class _FairseqStandIn:
    """An inert object in place of whatever a `fairseq.*` module defines. A structured config's metadata names
    fairseq's config dataclasses (ref_type / object_type: fairseq.dataclass.configs.CommonConfig, model
    configs) and ChoiceEnum classes (an EnumNode's enum_type), and an EnumNode's value is a member of one, which
    pickle rebuilds by calling its class with the member's value: calling a stand-in class only records the
    arguments, so nothing fairseq defines is imported or run. `_plain` reads a recorded enum value only where
    omegaconf keeps one (an EnumNode's value) and a class as its qualified name."""

    def __init__(self, *args):
        self.__dict__["_called_with"] = args


# typing.List[str], Optional[int], Dict[str, Any] pickle as operator.getitem(typing.List, str) and
# Optional's NoneType as type(None); they are read by these two functions under those names (the real
# getitem and type never are), which accept only typing forms and types, and only None.
_TYPING_FORMS = ("Any", "Dict", "List", "Optional", "Tuple", "Union")
_REFUSED_CALL = "refused call: "


def _typing_subscript(*arguments) -> str:
    """The name of a subscripted typing form, e.g. "typing.List[str]": metadata only, dropped by `_plain`."""
    forms = [getattr(typing, name) for name in _TYPING_FORMS]
    origin, parameters = arguments if len(arguments) == 2 else (None, ())
    parameters = parameters if isinstance(parameters, tuple) else (parameters,)
    if not (any(origin is form for form in forms) and all(
            p is Ellipsis or isinstance(p, (type, str)) or any(p is form for form in forms) for p in parameters)):
        raise pickle.UnpicklingError(f"{_REFUSED_CALL}operator.getitem called on "
                                     f"{', '.join(type(a).__name__ for a in arguments)}, not a typing form")

    def name(p):
        if isinstance(p, str) or p is Ellipsis or any(p is form for form in forms):
            return "..." if p is Ellipsis else str(p)
        return p.__qualname__
    return f"{origin}[{', '.join(name(p) for p in parameters)}]"


def _type_of_none(*arguments) -> type:
    """type(None), as pickle rebuilds NoneType (Optional[X] is Union[X, NoneType]); nothing else."""
    if len(arguments) != 1 or arguments[0] is not None:
        raise pickle.UnpicklingError(f"{_REFUSED_CALL}builtins.type called on "
                                     f"{', '.join(type(a).__name__ for a in arguments)}, not None")
    return type(None)


def _pickled_global_names(path: Path) -> set[str]:
    """The GLOBAL names of a torch.save pickle (zip format: data.pkl; the pre-1.6 format: its leading pickles),
    read with pickletools: nothing is imported or run. Empty when the file cannot be read this way (the
    unpickler then says why)."""
    names = set()
    try:
        with open(path, "rb") as stream:
            if zipfile.is_zipfile(stream):
                with zipfile.ZipFile(stream) as archive:
                    record = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                    pickles = [io.BytesIO(archive.read(record))]
            else:
                stream.seek(0)  # read in place: tensor data follows the pickles
                pickles = [stream] * 4  # magic number, protocol, sys info, the object
            for data in pickles:
                for opcode, argument, _ in pickletools.genops(data):
                    if opcode.name == "GLOBAL":
                        names.add(".".join(argument.split(" ", 1)))
    except Exception:  # not a pickle this reads: the unpickler reports it
        pass
    return names


def _fairseq_stand_ins(names: set[str]) -> list[tuple[type, str]]:
    return [_stand_in(name, _FairseqStandIn) for name in sorted(names)
            if name.startswith("fairseq.")]


def _fairseq_safe_globals(names: set[str] = frozenset()) -> list:
    """What fairseq checkpoints pickle besides tensors and containers, none of which runs code when unpickled:
    argparse.Namespace (args, and cfg.model / cfg.task of legacy architectures); numpy scalars with their dtypes
    (meter values and losses in extra_state / optimizer_history); omegaconf 2.0 nodes (a DictConfig `cfg`) as
    inert stand-ins, with what their metadata names: typing forms and builtin types (ref_type, object_type,
    key_type, element_type), collections.defaultdict(dict) (resolver_cache), and of `names` (the pickle's own)
    those of fairseq's modules (a structured config's dataclasses and ChoiceEnum classes) as inert stand-ins."""
    try:
        from numpy._core.multiarray import scalar  # noqa: PLC0415 - its module moved in numpy 2
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # noqa: PLC0415
    dtype_classes = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]
    typing_names = [(getattr(typing, name), f"typing.{name}") for name in _TYPING_FORMS]
    return [argparse.Namespace, np.dtype, *dtype_classes, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar"), *_OMEGACONF_STAND_INS, *typing_names,
            (_typing_subscript, "_operator.getitem"), (_type_of_none, "builtins.type"), (Ellipsis, "builtins.Ellipsis"),
            *_fairseq_stand_ins(names),
            collections.defaultdict, dict, list, tuple, str, int, float, bool, type(None)]


def load_fairseq_checkpoint(path: Path) -> dict:
    """A fairseq checkpoint (model.pt) read with torch.load(weights_only=True): pickled code is refused, never run.

    Memory-mapped, so a training checkpoint's optimizer state (4.9 GB for M2M-124 615M) is not read into memory.
    Every layout fairseq wrote loads: `args` an argparse.Namespace (before 2020-10-20), `cfg` an omegaconf
    DictConfig (fairseq 3b27ed79 .. f6d60e2f, 2020-10-20 .. 2021-03-03, untyped or built by hydra from fairseq's
    config dataclasses; read through inert stand-ins, neither omegaconf nor fairseq is needed) or a plain dict
    (later, e.g. flores101_mm100_615M); the result holds plain dicts, lists and scalars (an enum field its value).
    Anything that is not a readable torch checkpoint, or whose structure is not {"model": state dict,
    "args" / "cfg": arguments}, is one LsloError naming the file."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        raise LsloError(f"{path}: a safetensors file, not a fairseq checkpoint; lslo convert reads the model.pt "
                        "that fairseq writes with torch.save")
    safe = _fairseq_safe_globals(_pickled_global_names(path))
    try:
        with torch.serialization.safe_globals(safe):
            saved = _torch_load(path)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path, safe, err)
        if unsafe:
            raise LsloError(f"{path}: refused to unpickle {unsafe}: lslo reads a checkpoint without running pickled "
                            "code (torch.load weights_only), and these names could run code. If the file is one "
                            f"you trust, re-save it: {RESAVE_RECIPE}") from None
        reason = _unpickler_reason(err)
        if reason.startswith(_REFUSED_CALL):
            raise LsloError(f"{path}: refused to unpickle a call ({reason.removeprefix(_REFUSED_CALL)}): lslo reads "
                            "a checkpoint without running pickled code (torch.load weights_only)") from None
        raise LsloError(f"{path}: not a readable torch checkpoint ({reason}); {_UNREADABLE}") from None
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
    return {key: value if key == "model" else _plain(value, key, path) for key, value in saved.items()}


# How to turn a checkpoint lslo refuses into one it reads, in an environment that has fairseq (and so omegaconf)
RESAVE_RECIPE = ("python -c \"import torch; from omegaconf import OmegaConf; s = torch.load('model.pt', "
                 "weights_only=False); c = s.get('cfg'); torch.save({'model': s['model'], 'args': s.get('args'), "
                 "'cfg': OmegaConf.to_container(c, resolve=True, enum_to_str=True) if OmegaConf.is_config(c) else c}, "
                 "'model-plain.pt')\" in an environment with fairseq, then convert model-plain.pt")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap can only be used with files saved with" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format cannot be mapped


def _plain(value, field: str, source: Path):
    """`value` with omegaconf stand-ins replaced by their content: DictConfig -> dict, ListConfig -> list,
    value node -> its value (an interpolation or "???" stays the string omegaconf stored; an EnumNode's member
    of a fairseq ChoiceEnum -> its value), metadata dropped; a fairseq class -> its qualified name."""
    if isinstance(value, type) and issubclass(value, _FairseqStandIn):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, _FairseqStandIn):
        raise LsloError(f"{source}: field '{field}' holds a pickled {type(value).__module__}."
                        f"{type(value).__qualname__} object, which lslo reads only as an omegaconf enum value; "
                        f"if the file is one you trust, re-save it: {RESAVE_RECIPE}")
    if isinstance(value, _OmegaConfMetadata):
        raise LsloError(f"{source}: field '{field}' holds omegaconf metadata outside a node")
    if isinstance(value, _OmegaConfStandIn):
        name = type(value).__name__
        content = value.__dict__.get("_val" if name.endswith("Node") else "_content")
        if name == "EnumNode" and isinstance(content, _FairseqStandIn):
            called_with = content.__dict__.get("_called_with")
            if not (isinstance(called_with, tuple) and len(called_with) == 1):
                raise LsloError(f"{source}: field '{field}' is an omegaconf EnumNode whose value is not an enum "
                                f"member ({type(content).__module__}.{type(content).__qualname__})")
            return _plain(called_with[0], field, source)
        if name == "DictConfig" and isinstance(content, dict):
            return {key: _plain(item, f"{field}.{key}", source) for key, item in content.items()}
        if name == "ListConfig" and isinstance(content, (list, tuple)):
            return [_plain(item, f"{field}[{i}]", source) for i, item in enumerate(content)]
        if name.endswith("Node") or content is None or isinstance(content, str):
            return _plain(content, field, source)
        raise LsloError(f"{source}: field '{field}' is an omegaconf {name} holding a {type(content).__name__}")
    if isinstance(value, dict):
        return {key: _plain(item, f"{field}.{key}", source) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, f"{field}[{i}]", source) for i, item in enumerate(value))
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**_plain(vars(value), field, source))
    return value


def _unsafe_globals(path: Path, safe: list, err: Exception) -> list[str]:
    """Names of the pickled globals outside the allowlist (read from the pickle, nothing imported or run); the
    names torch allows by default and lslo's own allowlist are left out, so the list holds only the offenders."""
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


def _checkpoint_languages(saved: dict, source: Path) -> tuple[list[str], str | None]:
    """fairseq's MultilingualDatasetManager.load_langs: `langs` if given, else sorted languages of lang_pairs;
    M2M-124's list when the checkpoint has neither. Returns the list and the field it came from (None: M2M-124)."""
    cfg = _as_dict(saved.get("cfg"), "cfg", source)
    where = "cfg.task" if cfg else "args"
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
        return (langs.split(",") if isinstance(langs, str) else list(langs)), f"{source} {where}.langs"
    if pairs:
        pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs)
        return sorted({code for pair in pairs for code in pair.split("-")}), f"{source} {where}.lang_pairs"
    return list(M2M124_LANGUAGE_CODES), None


_LANGUAGE_TOKEN = re.compile(r"__([^_\s]+(?:_[^_\s]+)*)__")


def read_fairseq_dict(path: str | os.PathLike, languages: list[str],
                      origin: str | None = "the language list") -> tuple[list[str], list[str]]:
    """(token list in id order, language list): fairseq's 4 specials, then dict.txt's tokens ("token count
    [flags]" per line) without the language tokens, and the languages in id order.

    fairseq's multilingual task adds a __xx__ token per language unless the dictionary already holds it, so a
    dict.txt that lists them (flores101_mm100_615M's does) fixes their ids: its order is the language order, they
    must be its last lines, and `languages` (from `origin`; None: a default list, not checked) must name some of
    them in the same order (lang_pairs, which fairseq sorts: name some of them). A dict.txt without them gets
    `languages` appended in the given order."""
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
    tail = len(tokens)
    while tail > 0 and _LANGUAGE_TOKEN.fullmatch(tokens[tail - 1]):
        tail -= 1
    in_dict = [_LANGUAGE_TOKEN.fullmatch(t).group(1) for t in tokens[tail:]]
    known = {f"__{code}__" for code in [*in_dict, *languages]}
    stray = [(i + 1, t) for i, t in enumerate(tokens[:tail]) if t in known]
    if stray:
        raise LsloError(f"{path}: language token(s) {[t for _, t in stray[:5]]} at line(s) "
                        f"{[n for n, _ in stray[:5]]}, before other entries; the M2M100 layout needs the language "
                        "tokens as the dictionary's last entries")
    if not in_dict:
        return FAIRSEQ_SPECIALS + tokens, list(languages)
    # lang_pairs' languages are sorted by fairseq, so only their presence says anything about the dictionary
    ordered = origin is None or not origin.endswith("lang_pairs")
    if origin is not None and not (_in_order(languages, in_dict) if ordered else set(languages) <= set(in_dict)):
        raise LsloError(f"{path}: its language tokens fix the language order {in_dict}, which {origin} "
                        f"contradicts: {languages}; if this dictionary belongs to the checkpoint, give --languages "
                        "in its order")
    return FAIRSEQ_SPECIALS + tokens[:tail], in_dict


def _in_order(subset: list[str], full: list[str]) -> bool:
    """`subset` names languages of `full` in `full`'s order (lang_pairs may cover fewer languages)."""
    positions = {code: i for i, code in enumerate(full)}
    return all(code in positions for code in subset) and [positions[c] for c in subset] == sorted(
        positions[c] for c in subset) and len(set(subset)) == len(subset)


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
