"""fairseq M2M100-architecture checkpoint -> HF directory: logits equal an independent forward of the same weights."""

import argparse
import io
import math
import os
import random

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer, M2M100ForConditionalGeneration  # noqa: E402

from lslo.convert import convert_fairseq_m2m  # noqa: E402
from lslo.errors import LsloError  # noqa: E402
from lslo.tokenizer import LsloM2M100Tokenizer, load_tokenizer, model_vocab_size, spm_vocab  # noqa: E402

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
