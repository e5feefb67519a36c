"""The shipped configs follow the authors' release (docs/authors.md): batch, lr schedule, dropouts, LoRA
structure, index plan and decoding limits."""

import math
from pathlib import Path

import pytest
import yaml

from lslo.finetune import resolve_index_plan
from lslo.errors import LsloError
from lslo.io import write_json
from lslo.options import PAPER_INDEX_PLAN
from lslo.train import TrainOptions, get_lr

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text(encoding="utf-8"))


def fairseq_inverse_sqrt(num_updates: int, lr: float, warmup_updates: int, warmup_init_lr: float = -1) -> float:
    """fairseq's InverseSquareRootSchedule.step_update(num_updates), written from its definition:
    warmup_init_lr defaults to 0 when warmup_updates > 0; linear warm-up by lr_step, then
    decay_factor * num_updates ** -0.5 with decay_factor = lr * warmup_updates ** 0.5."""
    if warmup_init_lr < 0:
        warmup_init_lr = 0 if warmup_updates > 0 else lr
    lr_step = (lr - warmup_init_lr) / warmup_updates
    decay_factor = lr * warmup_updates ** 0.5
    if num_updates < warmup_updates:
        return warmup_init_lr + num_updates * lr_step
    return decay_factor * num_updates ** -0.5


@pytest.mark.parametrize("name", ["lang12", "lang30"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_effective_batch_is_16000_tokens_per_update(name, world_size):
    options = TrainOptions.from_dict(load(name)["train"])
    assert options.max_tokens == 4000
    assert options.max_tokens * options.update_freq_for(world_size) * world_size == 16000


@pytest.mark.parametrize("name", ["lang12", "lang30"])
def test_lr_schedule_is_fairseq_inverse_sqrt_with_warmup_1(name):
    options = TrainOptions.from_dict(load(name)["train"])
    assert options.warmup_updates == 1 and options.lr == 3e-3
    for update in (1, 100, 1000):
        assert get_lr(update, options.lr, options.warmup_updates) == pytest.approx(
            fairseq_inverse_sqrt(update, 3e-3, 1), rel=1e-12)
    assert get_lr(100, options.lr, options.warmup_updates) == pytest.approx(3e-4)  # 3e-3 / sqrt(100)
    # the old warm-up of 4000 updates still rose at update 1000; the authors' lr is decaying there
    assert get_lr(1000, 3e-3, 4000) > get_lr(100, 3e-3, 4000)


@pytest.mark.parametrize("name", ["config", "lang12", "lang30"])
def test_shipped_configs_use_the_authors_lora_structure(name):
    train = load(name)["train"]
    options = TrainOptions.from_dict(train)
    assert options.lora_layout() == {"init": "authors", "fc_lora": "slice", "fc_lora_offset": 0,
                                     "fc_lora_width": None}
    assert (options.attention_dropout, options.activation_dropout) == (0.1, 0.0)
    if name != "config":
        assert (options.dropout, options.layerdrop, options.seed, options.amp) == (0.1, 0.0, 2, True)
    assert TrainOptions().lora_layout() == options.lora_layout()  # the library default is the same


@pytest.mark.parametrize("name", ["lang12", "lang30"])
def test_paper_configs_decode_with_fairseq_generate_defaults(name):
    evaluation = load(name)["eval"]
    assert (evaluation["beam"], evaluation["max_len_a"], evaluation["max_len_b"]) == (5, 0.0, 200)
    assert (evaluation["search"], evaluation["dtype"]) == ("fairseq", "fp16")  # fairseq-generate --fp16


def test_lang30_uses_the_papers_index_plan(tmp_path):
    variants = load("lang30")["variants"]
    assert {v["index"] for v in variants.values() if v["method"] == "lslo"} == {"paper"}
    assert resolve_index_plan("paper", None) == {"enc": ["src"] * 9 + ["tgt"] * 3, "dec": ["tgt"] * 12}
    assert PAPER_INDEX_PLAN["enc"].count("src") == 9
    plan = {"enc": ["tgt"] * 12, "dec": ["src"] * 12}
    write_json(plan, tmp_path / "other" / "plan.json")
    assert resolve_index_plan(str(tmp_path / "other" / "plan.json"), tmp_path / "other" / "plan.json") == plan
    write_json({"enc": ["src"]}, tmp_path / "bad.json")
    with pytest.raises(LsloError, match="bad.json: not an index plan"):
        resolve_index_plan(str(tmp_path / "bad.json"), tmp_path / "bad.json")
    with pytest.raises(LsloError, match="expected learned, src, tgt, paper or the path of a plan.json"):
        resolve_index_plan("lang12", None)


@pytest.mark.parametrize("key, value, message", [
    ("lora_init", "xavier", "train.lora_init is 'xavier', expected one of authors, peft, gaussian"),
    ("fc_lora", "half", "train.fc_lora is 'half', expected one of slice, full"),
    ("attention_dropout", 1.5, "train.attention_dropout is 1.5"),
    ("fc_lora_width", 0, "train.fc_lora_width is 0"),
])
def test_bad_structure_options(key, value, message):
    with pytest.raises(LsloError, match=message.replace(".", r"\.").replace("(", r"\(")):
        TrainOptions.from_dict({key: value}, "train")


def test_fairseq_formula_itself():
    """The reference formula: with warmup 4 the lr rises linearly from 0, then decays as 1/sqrt."""
    assert [fairseq_inverse_sqrt(n, 1.0, 4) for n in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fairseq_inverse_sqrt(16, 1.0, 4) == pytest.approx(math.sqrt(4 / 16))


def test_set_dropout_reaches_attention_activation_and_layerdrop():
    import torch
    from conftest import make_batch, make_tiny_model
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Attention

    from lslo.train import set_dropout

    model = make_tiny_model()
    set_dropout(model, 0.0, attention=0.3, activation=0.2, layerdrop=0.05)
    attention = [m for m in model.modules() if isinstance(m, M2M100Attention)]
    assert len(attention) == 2 + 2 * 2 and all(m.dropout == 0.3 for m in attention)
    layers = [*model.model.encoder.layers, *model.model.decoder.layers]
    assert all(layer.activation_dropout == 0.2 and layer.dropout == 0.0 for layer in layers)
    assert model.model.encoder.layerdrop == model.model.decoder.layerdrop == 0.05
    assert (model.config.attention_dropout, model.config.activation_dropout) == (0.3, 0.2)
    # what the probabilities do: with only attention dropout on, train-mode outputs change, eval-mode do not
    set_dropout(model, 0.0, attention=0.5, activation=0.0, layerdrop=0.0)
    batch = make_batch([("en", "fr"), ("oc", "wo")])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  decoder_input_ids=batch["input_ids"][:, :3])
    with torch.no_grad():
        reference = model.eval()(**inputs).logits
        assert not torch.allclose(model.train()(**inputs).logits, reference)
        set_dropout(model, 0.0, attention=0.0)
        torch.testing.assert_close(model.train()(**inputs).logits, reference)


def variant_options(config: dict, variant: str) -> TrainOptions:
    """A variant's options as rules/common.smk merges them: the `train` block, then the variant's own."""
    return TrainOptions.from_dict({**config["train"], **(config["variants"][variant].get("train") or {})})


@pytest.mark.parametrize("name", ["lang12", "lang30"])
def test_figure3_variants_score_the_whole_devtest_with_beam_5(name):
    config = load(name)
    assert config["figure3"]
    for variant in config["variants"]:
        options = variant_options(config, variant)
        expected = (None, 5) if variant in config["figure3"] else (50, 1)  # the rest: cheap monitoring only
        assert (options.dev_sentences, options.dev_beam) == expected, variant
    for stage in ("weight_learning", "subspace"):  # not in Figure 3
        options = TrainOptions.from_dict({**config["train"], **config[stage]["train"]})
        assert (options.dev_sentences, options.dev_beam) == (50, 1)


def test_the_demo_keeps_its_dev_protocol():
    config = load("config")
    assert {(variant_options(config, v).dev_sentences, variant_options(config, v).dev_beam)
            for v in config["figure3"]} == {(20, 1)}


def test_dev_sentences_null_is_the_whole_devtest():
    import pandas as pd

    from lslo.train import dev_rows

    table = pd.DataFrame({"id": range(5), "en": list("abcde")})
    assert dev_rows(table, TrainOptions.from_dict({"dev_sentences": None})).equals(table)
    assert dev_rows(table, TrainOptions.from_dict({"dev_sentences": 2}))["en"].tolist() == ["a", "b"]
    assert dev_rows(table, TrainOptions()).equals(table.head(50))  # unset: the first 50
    with pytest.raises(LsloError, match="train.dev_sentences is 'all', expected null or a whole number"):
        TrainOptions.from_dict({"dev_sentences": "all"}, "train")


def test_docs_authors_table_gives_every_choice_a_value_and_a_source():
    """docs/authors.md's one table: no choice without its value in the paper configs and its source, and the
    choices that change the paper's numbers are all in it."""
    lines = (ROOT / "docs" / "authors.md").read_text(encoding="utf-8").splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    header, rows = rows[0], [row for row in rows[1:] if not row[0].startswith("**")]  # bold rows: sections
    assert header[:3] == ["choice", "the paper configs", "source"]
    assert all(len(row) == len(header) for row in rows), [row[0] for row in rows if len(row) != len(header)]
    unsourced = [row[0] for row in rows if not row[1] or not row[2]]
    assert not unsourced
    choices = {row[0] for row in rows}
    for needed in ("precision", "an overflowed update", "search", "decoding precision", "GPS matrices and pool",
                   "Ft-all schedule", "Figure 3", "index plan, lang12", "weight-learning training",
                   "label smoothing", "gradient clipping", "optimizer", "checkpoint tested", "language tokens",
                   "detokenisation"):
        assert needed in choices, needed
    lslo_choices = [row for row in rows if "lslo's choice" in row[2]]
    assert all(":" in row[2].split("lslo's choice", 1)[1] for row in lslo_choices)  # each says why
