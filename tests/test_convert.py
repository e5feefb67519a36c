"""fairseq M2M100-architecture checkpoint -> HF directory: logits equal an independent forward of the same weights."""

import argparse
import collections
import contextlib
import dataclasses
import enum
import io
import json
import math
import operator
import os
import random
import sys
from unittest import mock
import types
import typing
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer, M2M100ForConditionalGeneration  # noqa: E402

from lslo.convert import convert_fairseq_m2m, load_fairseq_checkpoint  # noqa: E402
from lslo.errors import LsloError  # noqa: E402
from lslo.tokenizer import (M2M124_LANGUAGE_CODES, LsloM2M100Tokenizer, load_tokenizer,  # noqa: E402
                            model_vocab_size, spm_vocab)

D, HEADS, FFN, LAYERS = 16, 2, 24, 2
LANGS = ["de", "en", "kam"]
PAD = 1


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["ka", "mo", "ti", "ru", "sel", "bon", "ve"]
    (directory / "c.txt").write_text("\n".join(" ".join(rng.choice(words) + rng.choice(words) for _ in range(6))
                                               for _ in range(300)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(directory / "c.txt"), model_prefix=str(directory / "sp"),
                                   vocab_size=40, model_type="bpe", minloglevel=2)
    return directory / "sp.model"


def fairseq_state(rows, generator):
    """Random weights under fairseq's names (layer norms random too, so a swapped name would show)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    state = {"encoder.embed_tokens.weight": rand(rows, D), "encoder.version": torch.tensor([3.0]),
             "decoder.version": torch.tensor([3.0]), "encoder.embed_positions._float_tensor": torch.zeros(1)}
    state["decoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"]
    state["decoder.output_projection.weight"] = state["encoder.embed_tokens.weight"]
    for side in ("encoder", "decoder"):
        attentions = ["self_attn", "encoder_attn"] if side == "decoder" else ["self_attn"]
        for i in range(LAYERS):
            prefix = f"{side}.layers.{i}"
            for attn in attentions:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    state[f"{prefix}.{attn}.{proj}.weight"] = rand(D, D)
                    state[f"{prefix}.{attn}.{proj}.bias"] = rand(D)
                state[f"{prefix}.{attn}_layer_norm.weight"] = 1 + rand(D)
                state[f"{prefix}.{attn}_layer_norm.bias"] = rand(D)
            state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"] = rand(FFN, D), rand(FFN)
            state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"] = rand(D, FFN), rand(D)
            state[f"{prefix}.final_layer_norm.weight"], state[f"{prefix}.final_layer_norm.bias"] = 1 + rand(D), rand(D)
        state[f"{side}.layer_norm.weight"], state[f"{side}.layer_norm.bias"] = 1 + rand(D), rand(D)
    return state


def fairseq_args(**changes):
    args = dict(encoder_embed_dim=D, decoder_embed_dim=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN,
                decoder_ffn_embed_dim=FFN, encoder_normalize_before=True, decoder_normalize_before=True,
                activation_fn="relu", max_source_positions=64, max_target_positions=64, dropout=0.1,
                share_all_embeddings=True)
    args.update(changes)
    return args


@pytest.fixture()
def fake(tmp_path, spm_model):
    """A fairseq-style release: model.pt (args Namespace + state), dict.txt (pieces; no language tokens)."""
    pieces = spm_vocab(spm_model)[4:]
    (tmp_path / "dict.txt").write_text("".join(f"{p} {100 - i}\n" for i, p in enumerate(pieces)), encoding="utf-8")
    rows = 4 + len(pieces) + len(LANGS) + 5  # + madeup words
    state = fairseq_state(rows, torch.Generator().manual_seed(0))
    checkpoint = {"args": argparse.Namespace(**fairseq_args(), lang_pairs="en-de,de-kam,kam-en"), "model": state}
    torch.save(checkpoint, tmp_path / "model.pt")
    return tmp_path, checkpoint


# ---------------------------------------------------------------- independent forward (plain torch)

def sinusoid_positions(tokens):
    """fairseq SinusoidalPositionalEmbedding: positions padding_idx+1.. for real tokens, row padding_idx zero."""
    positions = (torch.cumsum(tokens.ne(PAD).long(), dim=1) * tokens.ne(PAD)) + PAD
    half = D // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freq
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return table * tokens.ne(PAD).unsqueeze(-1)


def attention(state, prefix, x, memory, key_pad, causal):
    b, t, _ = x.shape
    def heads(y):
        return y.view(b, -1, HEADS, D // HEADS).transpose(1, 2)
    q = heads(F.linear(x, state[f"{prefix}.q_proj.weight"], state[f"{prefix}.q_proj.bias"]) * (D // HEADS) ** -0.5)
    k = heads(F.linear(memory, state[f"{prefix}.k_proj.weight"], state[f"{prefix}.k_proj.bias"]))
    v = heads(F.linear(memory, state[f"{prefix}.v_proj.weight"], state[f"{prefix}.v_proj.bias"]))
    scores = q @ k.transpose(-1, -2)
    scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
    return F.linear(out, state[f"{prefix}.out_proj.weight"], state[f"{prefix}.out_proj.bias"])


def layer_norm(state, name, x):
    return F.layer_norm(x, (D,), state[f"{name}.weight"], state[f"{name}.bias"])


def feed_forward(state, prefix, x):
    hidden = F.relu(F.linear(layer_norm(state, f"{prefix}.final_layer_norm", x), state[f"{prefix}.fc1.weight"],
                             state[f"{prefix}.fc1.bias"]))
    return x + F.linear(hidden, state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"])


def reference_logits(state, src, tgt):
    """Pre-norm transformer as fairseq's M2M100 architecture computes it (embeddings scaled by sqrt(d))."""
    embed = state["encoder.embed_tokens.weight"]
    src_pad, tgt_pad = src.eq(PAD), tgt.eq(PAD)
    x = embed[src] * math.sqrt(D) + sinusoid_positions(src)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}"
        h = layer_norm(state, f"{p}.self_attn_layer_norm", x)
        x = feed_forward(state, p, x + attention(state, f"{p}.self_attn", h, h, src_pad, False))
    memory = layer_norm(state, "encoder.layer_norm", x)
    y = embed[tgt] * math.sqrt(D) + sinusoid_positions(tgt)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}"
        h = layer_norm(state, f"{p}.self_attn_layer_norm", y)
        y = y + attention(state, f"{p}.self_attn", h, h, tgt_pad, True)
        h = layer_norm(state, f"{p}.encoder_attn_layer_norm", y)
        y = feed_forward(state, p, y + attention(state, f"{p}.encoder_attn", h, memory, src_pad, False))
    return layer_norm(state, "decoder.layer_norm", y) @ state["decoder.output_projection.weight"].T


# ---------------------------------------------------------------- tests

def test_converted_logits_equal_independent_forward(fake, spm_model):
    directory, checkpoint = fake
    out = convert_fairseq_m2m(directory / "model.pt", directory / "dict.txt", spm_model, directory / "hf")
    model = M2M100ForConditionalGeneration.from_pretrained(str(out)).eval()
    tokenizer = load_tokenizer(out)
    assert isinstance(AutoTokenizer.from_pretrained(str(out)), LsloM2M100Tokenizer)
    # languages come from the checkpoint's lang_pairs, sorted as fairseq does; ids follow the dictionary
    assert tokenizer.languages == LANGS
    n_dict = len(spm_vocab(spm_model))  # 4 specials + the dict.txt lines
    assert tokenizer.lang_code_to_id == {c: n_dict + i for i, c in enumerate(LANGS)}
    rows = checkpoint["model"]["encoder.embed_tokens.weight"].shape[0]
    assert model.config.vocab_size == model_vocab_size(tokenizer) == rows

    tokenizer.src_lang, tokenizer.tgt_lang = "kam", "de"
    batch = tokenizer(["kamo tiru selve", "bon"], text_target=["veka mobon", "ruti kasel"], padding=True,
                      return_tensors="pt")
    decoder_inputs = torch.cat([torch.full((2, 1), 2), batch["labels"][:, :-1]], dim=1)  # eos = decoder start
    assert (batch["input_ids"][1] == PAD).any()  # the encoder batch really has padding
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_inputs).logits
        expected = reference_logits(checkpoint["model"], batch["input_ids"], decoder_inputs)
    real = decoder_inputs.ne(PAD)
    assert torch.allclose(logits[real], expected[real], atol=1e-5), (logits[real] - expected[real]).abs().max()


def test_explicit_languages_and_cfg_checkpoint(fake, spm_model, tmp_path):
    directory, checkpoint = fake
    state = dict(checkpoint["model"])
    torch.save({"cfg": {"model": argparse.Namespace(**fairseq_args()), "task": {"langs": ["en", "kam", "de"]}},
                "model": state}, tmp_path / "cfg.pt")
    tokenizer = load_tokenizer(convert_fairseq_m2m(tmp_path / "cfg.pt", directory / "dict.txt", spm_model,
                                                   tmp_path / "a"))
    assert tokenizer.languages == ["en", "kam", "de"]
    tokenizer = load_tokenizer(convert_fairseq_m2m(tmp_path / "cfg.pt", directory / "dict.txt", spm_model,
                                                   tmp_path / "b", languages=["kam", "de", "en"]))
    assert tokenizer.languages == ["kam", "de", "en"]


@pytest.mark.parametrize("change,message", [
    ("extra", "unexpected ['encoder.layernorm_embedding.weight']"),
    ("missing", "missing ['decoder.layers.1.fc2.bias']"),
    ("shape", "encoder.layers.0.fc1.weight"),
    ("unshared", "decoder.output_projection.weight differs"),
    ("postnorm", "encoder_normalize_before is not set"),
    ("small", "fewer than"),
])
def test_bad_checkpoints_name_the_problem_and_write_nothing(fake, spm_model, tmp_path, change, message):
    directory, checkpoint = fake
    state, args = dict(checkpoint["model"]), fairseq_args()
    if change == "extra":
        state["encoder.layernorm_embedding.weight"] = torch.ones(D)
    elif change == "missing":
        del state["decoder.layers.1.fc2.bias"]
    elif change == "shape":
        state["encoder.layers.0.fc1.weight"] = torch.zeros(FFN + 1, D)
    elif change == "unshared":
        state["decoder.output_projection.weight"] = state["encoder.embed_tokens.weight"] + 1
    elif change == "postnorm":
        args["encoder_normalize_before"] = False
    elif change == "small":
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            state[name] = state[name][:10]
    torch.save({"args": argparse.Namespace(**args), "model": state}, tmp_path / "bad.pt")
    with pytest.raises(LsloError) as err:
        convert_fairseq_m2m(tmp_path / "bad.pt", directory / "dict.txt", spm_model, tmp_path / "out", LANGS)
    assert message in str(err.value) and "bad.pt" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_convert_command_writes_the_same_checkpoint(fake, spm_model, tmp_path):
    from lslo.cli import main

    directory, checkpoint = fake
    assert main(["convert", "--checkpoint", str(directory / "model.pt"), "--dict", str(directory / "dict.txt"),
                 "--spm", str(spm_model), "--languages", "kam,de,en", "--out", str(tmp_path / "hf")]) == 0
    model = M2M100ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(model.model.shared.weight, checkpoint["model"]["encoder.embed_tokens.weight"])
    assert load_tokenizer(tmp_path / "hf").languages == ["kam", "de", "en"]
    assert main(["convert", "--checkpoint", str(tmp_path / "nothing.pt"), "--dict", str(directory / "dict.txt"),
                 "--spm", str(spm_model), "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_convert_out_never_replaces_a_directory_lslo_did_not_write(fake, spm_model, tmp_path, capsys):
    from lslo.cli import main

    directory, _ = fake
    command = ["convert", "--checkpoint", str(directory / "model.pt"), "--dict", str(directory / "dict.txt"),
               "--spm", str(spm_model), "--languages", "kam,de,en", "--out"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "m2m100_418M").mkdir()
    (models / "m2m100_418M" / "model.safetensors").write_bytes(b"weights")
    (models / "README").write_text("my checkpoints")
    for force in ([], ["--force"]):
        assert main([*command, str(models), *force]) == 2
        assert ("only a directory lslo wrote" if force else "not empty") in capsys.readouterr().err
        assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == [
            "README", "m2m100_418M", "m2m100_418M/model.safetensors"]
        assert (models / "m2m100_418M" / "model.safetensors").read_bytes() == b"weights"
    out = tmp_path / "hf"
    assert main([*command, str(out)]) == 0
    assert main([*command, str(out)]) == 2 and "give --force" in capsys.readouterr().err
    (out / "config.json").write_text("{}")  # so the replacement is visible
    assert main([*command, str(out), "--force"]) == 0
    assert load_tokenizer(out).languages == ["kam", "de", "en"]
    from lslo.check_model import check_model

    report = check_model(out, ["kam", "de", "en"])  # the tokenizer's ids are the converted embedding's rows
    assert report.ok and any(fact.startswith("token ids: ") for fact in report.facts), report.problems


# ---------------------------------------------------------------- safe loading (weights_only) and bad files

class _OpensAFile:
    """A pickle payload: unpickling it calls open(path, "w"), which creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_fairseq_training_state_with_numpy_scalars_loads(fake, spm_model, tmp_path):
    import numpy as np

    directory, checkpoint = fake
    full = {**checkpoint, "extra_state": {"val_loss": np.float64(3.25), "train_iterator": {"epoch": np.int64(4)}},
            "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                                   "lr_scheduler_state": {"best": np.float32(2.5)}, "num_updates": 1000}],
            "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}}}
    torch.save(full, tmp_path / "full.pt")
    out = convert_fairseq_m2m(tmp_path / "full.pt", directory / "dict.txt", spm_model, tmp_path / "hf")
    model = M2M100ForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(model.model.shared.weight, checkpoint["model"]["encoder.embed_tokens.weight"])


def test_a_crafted_pickle_payload_is_refused_and_never_runs(fake, spm_model, tmp_path):
    from lslo.cli import main

    directory, checkpoint = fake
    marker = tmp_path / "payload-ran"
    torch.save({**checkpoint, "extra_state": {"hook": _OpensAFile(marker)}}, tmp_path / "crafted.pt")
    torch.load(tmp_path / "crafted.pt", weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(LsloError, match=r"crafted\.pt: refused to unpickle \['io\.open'\]"):
        convert_fairseq_m2m(tmp_path / "crafted.pt", directory / "dict.txt", spm_model, tmp_path / "out")
    assert main(["convert", "--checkpoint", str(tmp_path / "crafted.pt"), "--dict", str(directory / "dict.txt"),
                 "--spm", str(spm_model), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def _bad_checkpoint(kind, path, checkpoint):
    state, args = dict(checkpoint["model"]), checkpoint["args"]
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in state.items()}, str(path))
    elif kind == "list":
        torch.save([state], path)
    elif kind == "model-not-dict":
        torch.save({"args": args, "model": "weights"}, path)
    elif kind == "model-not-tensors":
        torch.save({"args": args, "model": {**state, "encoder.layers.0.fc1.weight": [1.0, 2.0]}}, path)
    elif kind == "args-not-namespace":
        torch.save({"args": "--arch transformer", "model": state}, path)
    elif kind == "layers-not-int":
        torch.save({"args": argparse.Namespace(**{**vars(args), "encoder_layers": "2"}), "model": state}, path)
    elif kind == "langs-not-strings":
        torch.save({"args": argparse.Namespace(**{**vars(args), "langs": 3}), "model": state}, path)


@pytest.mark.parametrize("kind,message", [
    ("garbage", "not a readable torch checkpoint"),
    ("text", "not a readable torch checkpoint"),
    ("empty", "not a readable torch checkpoint"),
    ("truncated", "not a readable torch checkpoint"),
    ("safetensors", "a safetensors file, not a fairseq checkpoint"),
    ("list", "not a fairseq checkpoint (no 'model' state dict)"),
    ("model-not-dict", "field 'model' is a str, expected a state dict of tensors"),
    ("model-not-tensors", "not named tensors: ['encoder.layers.0.fc1.weight']"),
    ("args-not-namespace", "field 'args' is a str, expected a dict or argparse.Namespace"),
    ("layers-not-int", "model argument 'encoder_layers' is '2', expected a whole number >= 1"),
    ("langs-not-strings", "task field 'langs' is 3"),
])
def test_files_that_are_not_fairseq_checkpoints_give_one_error(fake, spm_model, tmp_path, kind, message):
    from lslo.cli import main

    directory, checkpoint = fake
    _bad_checkpoint(kind, tmp_path / "model.pt", checkpoint)
    with pytest.raises(LsloError) as err:
        convert_fairseq_m2m(tmp_path / "model.pt", directory / "dict.txt", spm_model, tmp_path / "out")
    assert str(err.value).startswith(f"{tmp_path / 'model.pt'}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert main(["convert", "--checkpoint", str(tmp_path / "model.pt"), "--dict", str(directory / "dict.txt"),
                 "--spm", str(spm_model), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the three layouts fairseq wrote

_OMEGACONF_MODULES = ("omegaconf", "omegaconf.base", "omegaconf.dictconfig", "omegaconf.listconfig",
                      "omegaconf.nodes")


@contextlib.contextmanager
def omegaconf_stubs():
    """Classes named and laid out as omegaconf 2.0.6 pickles them, in sys.modules only while a test saves: a node
    pickles as its __dict__ (_metadata, _parent, and _content for DictConfig / ListConfig, _val for AnyNode),
    its metadata a dataclass (ContainerMetadata / Metadata: ref_type typing.Any, object_type, flags,
    resolver_cache a defaultdict(dict), key_type, element_type)."""
    modules = {name: types.ModuleType(name) for name in _OMEGACONF_MODULES}

    def place(cls, module):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
        return cls

    @dataclasses.dataclass
    class Metadata:
        ref_type: typing.Any
        object_type: typing.Any
        optional: bool
        key: typing.Any
        flags: dict = dataclasses.field(default_factory=dict)
        resolver_cache: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))

    @dataclasses.dataclass
    class ContainerMetadata(Metadata):
        key_type: typing.Any = None
        element_type: typing.Any = None

    class Node:
        def __init__(self, parent, metadata):
            self.__dict__["_metadata"] = metadata
            self.__dict__["_parent"] = parent

        def __getstate__(self):
            return self.__dict__

        def __setstate__(self, state):
            self.__dict__.update(state)

    class DictConfig(Node):
        pass

    class ListConfig(Node):
        pass

    class AnyNode(Node):
        pass

    place(Metadata, "omegaconf.base"), place(ContainerMetadata, "omegaconf.base"), place(Node, "omegaconf.base")
    place(DictConfig, "omegaconf.dictconfig"), place(ListConfig, "omegaconf.listconfig")
    place(AnyNode, "omegaconf.nodes")

    def create(value, parent=None, key=None):
        """What fairseq's OmegaConf.create(dict) held: containers for dicts and lists, AnyNode for the rest."""
        if isinstance(value, (dict, list)):
            cls = DictConfig if isinstance(value, dict) else ListConfig
            node = cls(parent, ContainerMetadata(ref_type=typing.Any, object_type=type(value), optional=True,
                                                 key=key, key_type=typing.Any, element_type=typing.Any))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            content = {k: create(v, node, k) for k, v in items}
            node.__dict__["_content"] = content if isinstance(value, dict) else list(content.values())
            return node
        node = AnyNode(parent, Metadata(ref_type=typing.Any, object_type=None, optional=True, key=key))
        node.__dict__["_val"] = value
        return node

    with mock.patch.dict(sys.modules, modules):  # the stubs exist only while saving
        yield SimpleNamespace(create=create, DictConfig=DictConfig, ListConfig=ListConfig, Node=Node,
                              Metadata=Metadata, ContainerMetadata=ContainerMetadata)


def save_layout(layout, path, state, task, model=None):
    """A checkpoint as fairseq of that time wrote it: `args` a Namespace (to 2020-10-20), `cfg` an omegaconf
    DictConfig (3b27ed79 .. f6d60e2f, to 2021-03-03), `cfg` a plain dict with args None (later releases)."""
    model = fairseq_args() if model is None else model
    training = {"extra_state": {"val_loss": np.float64(3.25), "train_iterator": {"epoch": np.int64(4)}},
                "optimizer_history": [{"num_updates": 1000, "lr_scheduler_state": {"best": np.float32(2.5)}}]}
    if layout == "args":
        torch.save({"args": argparse.Namespace(**model, **task), "model": state, **training}, path)
        return
    cfg = {"common": {"fp16": True, "seed": 2}, "optimization": {"lr": [0.0001], "max_update": 1000},
           "model": model, "task": {"_name": "translation_multi_simple_epoch", **task}}
    if layout == "dict":
        torch.save({"args": None, "cfg": cfg, "model": state, **training}, path)
        return
    with omegaconf_stubs() as omegaconf:
        root = omegaconf.create(cfg)
        root.__dict__["_metadata"].flags["struct"] = True  # fairseq set_struct(cfg, True)
        torch.save({"args": None, "cfg": root, "model": state, **training}, path)
    assert "omegaconf" not in sys.modules


@pytest.mark.parametrize("layout", ["args", "dict", "dictconfig"])
def test_every_layout_fairseq_wrote_converts(fake, spm_model, tmp_path, layout):
    directory, checkpoint = fake
    save_layout(layout, tmp_path / "model.pt", checkpoint["model"], {"lang_pairs": "en-de,de-kam,kam-en"})
    if layout == "dictconfig":  # the stand-ins are what reads it: the pickle names omegaconf's classes
        names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "model.pt")
        assert {"omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode", "omegaconf.base.ContainerMetadata",
                "omegaconf.listconfig.ListConfig", "typing.Any", "collections.defaultdict"} <= set(names)
        saved = load_fairseq_checkpoint(tmp_path / "model.pt")
        assert saved["cfg"]["optimization"] == {"lr": [0.0001], "max_update": 1000}
        assert saved["cfg"]["model"] == fairseq_args() and saved["cfg"]["task"]["lang_pairs"] == "en-de,de-kam,kam-en"
    out = convert_fairseq_m2m(tmp_path / "model.pt", directory / "dict.txt", spm_model, tmp_path / "hf")
    assert load_tokenizer(out).languages == LANGS
    model = M2M100ForConditionalGeneration.from_pretrained(str(out))
    for name, weight in checkpoint["model"].items():
        if name.startswith(("encoder.layers", "decoder.layers")):
            assert torch.equal(model.state_dict()[f"model.{name}"], weight), name


class _RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("payload", ["os.system", "stand-in name, eval", "stand-in called"])
def test_crafted_payloads_next_to_a_dictconfig_are_refused_and_never_run(fake, spm_model, tmp_path, payload):
    """A pickle that names what it runs is refused with only the offending names (not the DictConfig stand-ins,
    numpy scalars or typing.Any it also holds) and the re-save recipe; one that calls a stand-in gets no code
    run either."""
    directory, checkpoint = fake
    marker = tmp_path / "payload-ran"
    with omegaconf_stubs() as omegaconf:
        cfg = omegaconf.create({"model": fairseq_args(), "task": {"langs": "de,en,kam"}})
        if payload == "os.system":
            hook, expected = _RunsAShellCommand(f"touch {marker}"), "refused to unpickle ['posix.system']"
        elif payload == "stand-in name, eval":
            omegaconf.DictConfig.__reduce__ = lambda self: (eval, (f"open({str(marker)!r}, 'w')",))
            hook, expected = omegaconf.create({}), "refused to unpickle ['builtins.eval']"
        else:
            omegaconf.DictConfig.__reduce__ = lambda self: (type(self), (f"open({str(marker)!r}, 'w')",))
            hook, expected = omegaconf.create({}), "not a readable torch checkpoint"
        torch.save({"args": None, "cfg": cfg, "model": checkpoint["model"],
                    "extra_state": {"loss": np.float64(1.5), "hook": hook}}, tmp_path / "crafted.pt")
    with pytest.raises(LsloError) as err:
        convert_fairseq_m2m(tmp_path / "crafted.pt", directory / "dict.txt", spm_model, tmp_path / "out")
    message = str(err.value)
    assert expected in message, message
    if payload != "stand-in called":
        assert "OmegaConf.to_container" in message and "holds only" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a structured config (fairseq's dataclasses)

_FAIRSEQ_MODULES = ("fairseq", "fairseq.dataclass", "fairseq.dataclass.configs", "fairseq.dataclass.constants",
                    "fairseq.utils")


@contextlib.contextmanager
def fairseq_stubs():
    """fairseq's config classes where a structured config's pickle names them, in sys.modules only while a test
    saves: a ChoiceEnum (fairseq's StrEnum, values = names) in fairseq.dataclass.constants, the config dataclasses
    in fairseq.dataclass.configs, and `structured(FairseqConfig(...))`: the DictConfig that hydra built from
    them, laid out as omegaconf 2.0.0 pickles it (seen with the real wheel): a container's metadata names its
    dataclass (ref_type = object_type), a value node's its type (int, str, the enum class), Optional[X] is the
    `optional` flag with ref_type X, a List[str] field is a ListConfig (ref_type None, object_type list,
    key_type int, element_type str) of StringNodes, and an EnumNode keeps `fields`, `enum_type` and the member.
    typing_refs: ref_type as the typing form instead (Optional[int], List[str]), as later omegaconf reports it."""
    modules = {name: types.ModuleType(name) for name in _FAIRSEQ_MODULES}

    class StrEnum(enum.Enum):
        def __str__(self):
            return self.value

    choices = StrEnum("Choices", {k: k for k in ("json", "none", "simple", "tqdm")},
                      module="fairseq.dataclass.constants")
    modules["fairseq.dataclass.constants"].Choices = choices

    @dataclasses.dataclass
    class CommonConfig:
        log_format: typing.Optional[choices] = choices.json
        seed: int = 1
        fp16: bool = False
        tensorboard_logdir: typing.Optional[str] = None

    @dataclasses.dataclass
    class MultilingualConfig:
        encoder_langtok: typing.Optional[str] = None
        lang_list: typing.List[str] = dataclasses.field(default_factory=lambda: ["en", "de"])
        max_tokens: typing.Optional[int] = 4096

    @dataclasses.dataclass
    class FairseqConfig:
        common: CommonConfig = dataclasses.field(default_factory=CommonConfig)
        multilingual: MultilingualConfig = dataclasses.field(default_factory=MultilingualConfig)
        model: typing.Any = None
        task: typing.Any = None

    for cls in (CommonConfig, MultilingualConfig, FairseqConfig):
        cls.__module__, cls.__qualname__ = "fairseq.dataclass.configs", cls.__name__
        setattr(modules["fairseq.dataclass.configs"], cls.__name__, cls)
    with omegaconf_stubs() as omegaconf:
        nodes = {name: type(name, (omegaconf.Node,), {"__module__": "omegaconf.nodes", "__qualname__": name})
                 for name in ("StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode")}
        for name, cls in nodes.items():
            setattr(sys.modules["omegaconf.nodes"], name, cls)
        node_of = {str: "StringNode", int: "IntegerNode", float: "FloatNode", bool: "BooleanNode"}

        def structured(obj, parent=None, key=None, typing_refs=False):
            if dataclasses.is_dataclass(obj):
                node = omegaconf.DictConfig(parent, omegaconf.ContainerMetadata(
                    ref_type=type(obj), object_type=type(obj), optional=False, key=key))
                hints = typing.get_type_hints(type(obj))
                node.__dict__["_content"] = {
                    f.name: value_node(getattr(obj, f.name), hints[f.name], node, f.name, typing_refs)
                    for f in dataclasses.fields(obj)}
                return node
            return omegaconf.create(obj, parent, key)

        def value_node(value, hint, parent, key, typing_refs):
            optional = typing.get_origin(hint) is typing.Union
            inner = typing.get_args(hint)[0] if optional else hint
            if dataclasses.is_dataclass(value) or inner is typing.Any:
                return structured(value, parent, key, typing_refs)
            if typing.get_origin(inner) is list:
                element = typing.get_args(inner)[0]
                node = omegaconf.ListConfig(parent, omegaconf.ContainerMetadata(
                    ref_type=inner if typing_refs else None, object_type=list, optional=optional, key=key,
                    key_type=int, element_type=element))
                node.__dict__["_content"] = [value_node(v, element, node, i, typing_refs)
                                             for i, v in enumerate(value)]
                return node
            ref_type = hint if typing_refs and optional else inner
            if isinstance(inner, type) and issubclass(inner, enum.Enum):
                node = nodes["EnumNode"](parent, omegaconf.Metadata(ref_type=ref_type, object_type=inner,
                                                                    optional=optional, key=key))
                node.__dict__.update(fields={m.name: m.value for m in inner}, enum_type=inner)
            else:
                node = nodes[node_of[inner]](parent, omegaconf.Metadata(ref_type=ref_type, object_type=None,
                                                                        optional=optional, key=key))
            node.__dict__["_val"] = value
            return node

        with mock.patch.dict(sys.modules, modules):  # the stubs exist only while saving
            yield SimpleNamespace(structured=structured, Choices=choices, FairseqConfig=FairseqConfig,
                                  CommonConfig=CommonConfig, MultilingualConfig=MultilingualConfig,
                                  utils=modules["fairseq.utils"], omegaconf=omegaconf)


@pytest.mark.parametrize("typing_refs", [False, True], ids=["omegaconf-2.0.0-metadata", "typing-ref-types"])
def test_a_structured_fairseq_config_loads_and_converts(fake, spm_model, tmp_path, typing_refs):
    """fairseq (3b27ed79 .. f6d60e2f) built cfg with hydra from its dataclasses: the pickle names fairseq's
    config classes and ChoiceEnum, and an enum field holds a member. They load as inert stand-ins and flatten to
    what OmegaConf.to_container(cfg, enum_to_str=True) gives: the fields' values, the enum member's value."""
    directory, checkpoint = fake
    with fairseq_stubs() as fairseq:
        cfg = fairseq.FairseqConfig(
            common=fairseq.CommonConfig(log_format=fairseq.Choices.tqdm, seed=7),
            multilingual=fairseq.MultilingualConfig(encoder_langtok="tgt"),
            model={**fairseq_args(), "lang_list": ["de", "en"]},
            task={"_name": "translation_multi_simple_epoch", "lang_pairs": "en-de,de-kam,kam-en"})
        expected = dataclasses.asdict(cfg)  # an independent flattening: the dataclass's own values
        expected["common"]["log_format"] = "tqdm"
        root = fairseq.structured(cfg, typing_refs=typing_refs)
        root.__dict__["_metadata"].flags["struct"] = True
        torch.save({"args": None, "cfg": root, "model": checkpoint["model"],
                    "extra_state": {"val_loss": np.float64(3.25)}}, tmp_path / "model.pt")
    assert "fairseq" not in sys.modules and "omegaconf" not in sys.modules
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "model.pt"))
    assert {"fairseq.dataclass.configs.FairseqConfig", "fairseq.dataclass.configs.CommonConfig",
            "fairseq.dataclass.configs.MultilingualConfig", "fairseq.dataclass.constants.Choices",
            "omegaconf.nodes.EnumNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.StringNode"} <= names
    assert ({"_operator.getitem", "typing.Union", "builtins.type"} <= names) == typing_refs
    saved = load_fairseq_checkpoint(tmp_path / "model.pt")
    assert saved["cfg"] == expected
    assert saved["cfg"]["common"] == {"log_format": "tqdm", "seed": 7, "fp16": False, "tensorboard_logdir": None}
    assert saved["cfg"]["multilingual"] == {"encoder_langtok": "tgt", "lang_list": ["en", "de"], "max_tokens": 4096}
    assert type(saved["cfg"]["common"]["log_format"]) is str
    out = convert_fairseq_m2m(tmp_path / "model.pt", directory / "dict.txt", spm_model, tmp_path / "hf")
    assert load_tokenizer(out).languages == LANGS


def _run_command(command):
    os.system(command)


@pytest.mark.parametrize("payload", ["fairseq-named function", "fairseq-named function as enum value",
                                     "fairseq-named class reducing to os.system", "getitem on a dict",
                                     "type() making a class"])
def test_payloads_behind_fairseq_and_typing_names_never_run(fake, spm_model, tmp_path, payload):
    """A `fairseq.` name is read as an inert stand-in whatever it names in fairseq: calling it records the
    arguments and runs nothing; the names typing forms pickle through (operator.getitem, builtins.type) are read
    by functions that accept only typing forms / None."""
    directory, checkpoint = fake
    marker = tmp_path / "payload-ran"
    command = f"touch {marker}"
    with fairseq_stubs() as fairseq:
        _run_command.__module__, _run_command.__qualname__ = "fairseq.utils", "run_command"
        fairseq.utils.run_command = _run_command
        try:
            cfg = fairseq.structured(fairseq.FairseqConfig(model=fairseq_args(), task={"langs": "de,en,kam"}))
            extra = {}
            if payload == "fairseq-named function":
                extra["hook"] = _Reduces(_run_command, (command,))
            elif payload == "fairseq-named function as enum value":
                cfg.__dict__["_content"]["common"].__dict__["_content"]["log_format"].__dict__["_val"] = (
                    _Reduces(_run_command, (command,)))
            elif payload == "fairseq-named class reducing to os.system":
                extra["hook"] = type("Hook", (), {"__module__": "fairseq.models", "__qualname__": "Hook",
                                                  "__reduce__": lambda self: (os.system, (command,))})()
            elif payload == "getitem on a dict":
                extra["hook"] = _Reduces(operator.getitem, ({"a": 1}, "a"))
            else:
                extra["hook"] = _Reduces(type, ("Made", (), {}))
            torch.save({"args": None, "cfg": cfg, "model": checkpoint["model"], "extra_state": extra},
                       tmp_path / "crafted.pt")
            torch.load(tmp_path / "crafted.pt", weights_only=False) if "function" in payload else None
        finally:
            _run_command.__module__, _run_command.__qualname__ = __name__, "_run_command"
    if "function" in payload:  # the payload is live: plain unpickling (with the module present) runs it
        assert marker.exists()
        marker.unlink()
    if payload == "fairseq-named function as enum value":  # loads: the call was recorded, never made
        saved = load_fairseq_checkpoint(tmp_path / "crafted.pt")
        assert saved["cfg"]["common"]["log_format"] == command
        assert not marker.exists()
        return
    expected = {"fairseq-named function": "holds a pickled fairseq.utils.run_command object",
                "fairseq-named class reducing to os.system": "refused to unpickle ['posix.system']",
                "getitem on a dict": "refused to unpickle a call (operator.getitem called on dict, str, not a "
                                     "typing form)",
                "type() making a class": "refused to unpickle a call (builtins.type called on str, tuple, dict, "
                                         "not None)"}[payload]
    with pytest.raises(LsloError) as err:
        convert_fairseq_m2m(tmp_path / "crafted.pt", directory / "dict.txt", spm_model, tmp_path / "out")
    assert expected in str(err.value), str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


class _Reduces:
    """Pickles as a call of `function` with `arguments`."""

    def __init__(self, function, arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


# ---------------------------------------------------------------- language order: dict.txt's __xx__ tokens

def test_language_tokens_in_dict_txt_fix_the_order(fake, spm_model, tmp_path):
    directory, checkpoint = fake
    dict_txt = tmp_path / "dict.txt"
    dict_txt.write_text((directory / "dict.txt").read_text() + "".join(f"__{c}__ 1\n" for c in ["kam", "de", "en"]))
    rows = checkpoint["model"]["encoder.embed_tokens.weight"].shape[0]
    save_layout("dict", tmp_path / "model.pt", checkpoint["model"], {"langs": ["kam", "de", "en"]})
    tokenizer = load_tokenizer(convert_fairseq_m2m(tmp_path / "model.pt", dict_txt, spm_model, tmp_path / "a"))
    n_dict = len(spm_vocab(spm_model))
    assert tokenizer.lang_code_to_id == {"kam": n_dict, "de": n_dict + 1, "en": n_dict + 2}
    assert model_vocab_size(tokenizer) == rows
    # lang_pairs covers languages in the dictionary's order (fairseq sorts them): the dictionary's list is used
    save_layout("dictconfig", tmp_path / "pairs.pt", checkpoint["model"], {"lang_pairs": "kam-en"})
    assert load_tokenizer(convert_fairseq_m2m(tmp_path / "pairs.pt", dict_txt, spm_model, tmp_path / "b")
                          ).languages == ["kam", "de", "en"]
    # the checkpoint's langs, its lang_pairs (a language the dictionary lacks) or --languages against it
    save_layout("args", tmp_path / "langs.pt", checkpoint["model"], {"langs": "de,en,kam"})
    save_layout("dict", tmp_path / "fr.pt", checkpoint["model"], {"lang_pairs": "kam-fr,en-kam"})
    for source, languages, shown, order in [(tmp_path / "langs.pt", None, "args.langs", "['de', 'en', 'kam']"),
                                            (tmp_path / "fr.pt", None, "cfg.task.lang_pairs", "['en', 'fr', 'kam']"),
                                            (tmp_path / "model.pt", ["de", "en", "kam"], "--languages",
                                             "['de', 'en', 'kam']")]:
        with pytest.raises(LsloError) as err:
            convert_fairseq_m2m(source, dict_txt, spm_model, tmp_path / "c", languages=languages)
        assert ("fix the language order ['kam', 'de', 'en']" in str(err.value) and shown in str(err.value)
                and order in str(err.value)), str(err.value)
    assert not (tmp_path / "c").exists()
    middle = tmp_path / "middle.txt"
    lines = (directory / "dict.txt").read_text().splitlines(keepends=True)
    middle.write_text("".join(lines[:3] + ["__de__ 5\n"] + lines[3:]))
    with pytest.raises(LsloError, match=r"\['__de__'\] at line\(s\) \[4\]"):
        convert_fairseq_m2m(directory / "model.pt", middle, spm_model, tmp_path / "d")


# ---------------------------------------------------------------- the release's sizes: 256,125 rows, 124 languages

M2M124_ROWS, M2M124_PIECES = 256_125, 255_997  # flores101_mm100_615M: embedding rows, dict.txt lines before __af__


@pytest.fixture(scope="module")
def m2m124_release(tmp_path_factory, spm_model):
    """A checkpoint with M2M-124's vocabulary: dict.txt = the SentencePiece pieces, filler up to 255,997 lines,
    then the 124 __xx__ lines; the embedding 256,125 x 16; cfg a plain dict (args None), as in the release."""
    root = tmp_path_factory.mktemp("m2m124")
    pieces = spm_vocab(spm_model)[4:]
    lines = pieces + [f"filler{i}" for i in range(M2M124_PIECES - len(pieces))]
    (root / "dict.txt").write_text("".join(f"{t} 1\n" for t in lines)
                                   + "".join(f"__{c}__ 1\n" for c in M2M124_LANGUAGE_CODES), encoding="utf-8")
    state = fairseq_state(M2M124_ROWS, torch.Generator().manual_seed(3))
    save_layout("dict", root / "model.pt", state, {"langs": ",".join(M2M124_LANGUAGE_CODES)})
    out = convert_fairseq_m2m(root / "model.pt", root / "dict.txt", spm_model, root / "hf")
    return SimpleNamespace(root=root, out=out, state=state, dict_ids={t: 4 + i for i, t in enumerate(lines)})


def test_m2m124_in_the_dictconfig_layout_converts_as_the_release(m2m124_release, spm_model, tmp_path):
    """The release's sizes with `cfg` pickled as an omegaconf DictConfig (fairseq 2020-10-20 .. 2021-03-03): the
    124 language tokens at fairseq's ids and the same weights as the plain-dict release, whose tokens and logits
    test_m2m124_sizes_convert_to_fairseqs_ids_and_logits checks against the fairseq rule."""
    release = m2m124_release
    save_layout("dictconfig", tmp_path / "model.pt", release.state, {"langs": ",".join(M2M124_LANGUAGE_CODES)})
    out = convert_fairseq_m2m(tmp_path / "model.pt", release.root / "dict.txt", spm_model, tmp_path / "hf")
    tokenizer = load_tokenizer(out)
    assert tokenizer.languages == M2M124_LANGUAGE_CODES
    assert [tokenizer.convert_tokens_to_ids(f"__{c}__") for c in ("oc", "wo", "zu")] == [256083, 256119, 256124]
    tokenizer.src_lang = "oc"
    assert tokenizer("kamo tiru selve")["input_ids"] == fairseq_ids(spm_model, release.dict_ids, "kamo tiru selve",
                                                                      "oc")
    converted = M2M100ForConditionalGeneration.from_pretrained(str(out)).state_dict()
    expected = M2M100ForConditionalGeneration.from_pretrained(str(release.out)).state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def fairseq_ids(spm_model, dict_ids, text, src):
    """fairseq's rule: SentencePiece pieces looked up in dict.txt (id = 4 + line), __src__ first, </s> last."""
    processor = spm.SentencePieceProcessor(model_file=str(spm_model))
    return [4 + M2M124_PIECES + M2M124_LANGUAGE_CODES.index(src)] + [
        dict_ids.get(p, 3) for p in processor.encode(text, out_type=str)] + [2]


def test_m2m124_sizes_convert_to_fairseqs_ids_and_logits(m2m124_release, spm_model):
    release = m2m124_release
    tokenizer = load_tokenizer(release.out)
    assert tokenizer.languages == M2M124_LANGUAGE_CODES and model_vocab_size(tokenizer) == M2M124_ROWS
    assert [tokenizer.convert_tokens_to_ids(f"__{c}__") for c in ("oc", "wo", "zu")] == [256083, 256119, 256124]
    texts = ["kamo tiru selve", "bon veka"]
    for text, src in zip(texts, ["oc", "zu"]):
        tokenizer.src_lang = src
        ids = tokenizer(text)["input_ids"]
        assert ids == fairseq_ids(spm_model, release.dict_ids, text, src)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    model = M2M100ForConditionalGeneration.from_pretrained(str(release.out)).eval()
    assert model.config.vocab_size == M2M124_ROWS
    tokenizer.src_lang, tokenizer.tgt_lang = "wo", "oc"
    batch = tokenizer(texts, text_target=["veka mobon", "ruti"], padding=True, return_tensors="pt")
    decoder_inputs = torch.cat([torch.full((2, 1), 2), batch["labels"][:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_inputs).logits
        expected = reference_logits(release.state, batch["input_ids"], decoder_inputs)
    real = decoder_inputs.ne(PAD)
    assert torch.allclose(logits[real], expected[real], atol=1e-5), (logits[real] - expected[real]).abs().max()


def test_a_converted_directory_decodes_with_transformers_alone(m2m124_release, tmp_path, monkeypatch):
    """With transformers alone (a subprocess that never imports lslo), the converted directory knows all 124
    language tokens at lslo's ids, encodes "__src__ text" to lslo's ids and decodes from the evaluate stage's
    prefix [</s>, __tgt__] to the evaluate stage's tokens."""
    from model_dirs import stock_transformers_decode

    from lslo import evaluate, inference

    release = m2m124_release
    variant = tmp_path / "variant.json"
    variant.write_text(json.dumps({"method": "pretrain", "base_model": str(release.out),
                                   "languages": ["oc", "wo", "zu"]}))
    translator = inference.load_variant(variant, device="cpu")
    sentences = ["kamo tiru selve", "bon veka mo", "ti ru"]
    directions = [("oc", "zu"), ("wo", "oc")]
    pd.DataFrame({"id": range(3), "oc": sentences, "wo": sentences, "zu": sentences}).to_csv(
        tmp_path / "test.tsv", sep="\t", index=False)
    options = inference.DecodingOptions(beam=4, max_len_b=6, search="hf")  # transformers' generate: eval.search hf
    produced, batch_decode = [], translator.tokenizer.batch_decode

    def spy(ids, **kwargs):  # the evaluate stage decodes each batch's tokens after the prefix [</s>, __tgt__]
        produced.extend(ids.tolist())
        return batch_decode(ids, **kwargs)

    monkeypatch.setattr(translator.tokenizer, "batch_decode", spy)
    evaluate.decode_shard(variant, tmp_path / "test.tsv", directions, tmp_path / "hyps.tsv", options,
                          translator=translator)
    requests = [[src, tgt, s, options.beam, options.max_len_b, options.lenpen, "prefix"]
                for src, tgt in directions for s in sentences]
    stock = stock_transformers_decode(release.out, requests)
    assert not stock["lslo_imported"]
    assert stock["languages"] == {f"__{c}__": translator.tokenizer.get_lang_id(c) for c in M2M124_LANGUAGE_CODES}
    expected = []
    for (src, tgt, text, *_), result in zip(requests, stock["results"]):
        assert result["source"] == translator.encode(text, src)
        assert result["output"][:2] == [2, translator.tokenizer.get_lang_id(tgt)]
        expected.append(result["output"][2:])
    width = max(len(row) for row in produced)
    assert sorted(produced) == sorted(row + [PAD] * (width - len(row)) for row in expected)


def test_a_dictionary_without_some_pieces_converts_without_tokenizer_json(fake, spm_model, tmp_path, caplog):
    """fairseq maps a SentencePiece piece missing from dict.txt to <unk>: lslo's tokenizer does the same, a
    tokenizer.json cannot, so none is written and a warning says so."""
    directory, checkpoint = fake
    lines = (directory / "dict.txt").read_text().splitlines(keepends=True)
    (tmp_path / "dict.txt").write_text("".join(lines[1:]))
    missing = lines[0].split(" ")[0]
    out = convert_fairseq_m2m(directory / "model.pt", tmp_path / "dict.txt", spm_model, tmp_path / "hf", LANGS)
    assert not (out / "tokenizer.json").exists() and (out / "vocab.json").is_file()
    assert f"no tokenizer.json written ({spm_model}: 1 SentencePiece piece(s) not in the vocabulary, e.g. " \
           f"['{missing}']" in caplog.text
    tokenizer = load_tokenizer(out)
    assert missing not in tokenizer.get_vocab() and len(tokenizer.get_vocab()) == len(lines) + 3 + len(LANGS)


def test_the_checkpoint_is_memory_mapped_and_the_old_format_still_reads(fake, spm_model, tmp_path, monkeypatch):
    """A training checkpoint carries the optimizer state (4.9 GB for 615M): torch.load maps the file instead of
    reading it; a checkpoint in torch's format before 1.6, which cannot be mapped, is read without mapping."""
    directory, checkpoint = fake
    calls, load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    convert_fairseq_m2m(directory / "model.pt", directory / "dict.txt", spm_model, tmp_path / "a")
    assert calls == [True]
    torch.save(checkpoint, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    out = convert_fairseq_m2m(tmp_path / "old.pt", directory / "dict.txt", spm_model, tmp_path / "b")
    assert calls == [True, True, None]
    model = M2M100ForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(model.model.shared.weight, checkpoint["model"]["encoder.embed_tokens.weight"])
