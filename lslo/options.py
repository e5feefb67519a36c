"""The options of the training stages and of a rehearsal, as the config states them: TrainOptions (a `train`
block) and RehearsalOptions (`rehearse`), with the names the modules that implement them accept, and the paper's
index plan (a variant's `index: paper`).

Standard library only, so that the workflow checks a config and builds its DAG, and the table and figure jobs read
index plans, without importing torch or transformers. lslo.train, lslo.layer, lslo.model, lslo.inference,
lslo.lean_loss and lslo.index_plans take their names from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from lslo.errors import LsloError

# train.lora_init: A's initialisation in lslo.layer (B is always zero, so the model is unchanged at step 0):
#   "authors": the authors' release stores A as [in, r] and calls kaiming_uniform_(a=√5), whose fan_in is then r:
#              A ~ U(-1/√r, 1/√r) (std 1/√(3r): 0.408 at r = 2, 0.204 at r = 8);
#   "peft":    PEFT's default, kaiming_uniform_(a=√5) on A as [r, in]: U(-1/√in, 1/√in);
#   "gaussian": the paper's text ("Gaussian"), as PEFT's init_lora_weights="gaussian": N(0, (1/r)²).
LORA_INITS = ("authors", "peft", "gaussian")
# train.fc_lora: the fc1/fc2 LoRA layout in lslo.model. "full": a LoRA on the whole d -> f (fc1) and f -> d (fc2)
# matrix, r (d + f) entries. "slice": the authors' release (--dim d_model --start-idx 0): a width × d LoRA adding to
# fc1's output units [offset:offset + width] and a d × width LoRA reading fc2's input units [offset:offset + width],
# r (d + width) entries; width defaults to d_model, so every LoRA of the model is d_model × d_model.
FC_LAYOUTS = ("slice", "full")
SEARCHES = ("fairseq", "hf")  # eval.search, train.dev_search: fairseq-generate's beam search (lslo.search), HF's
AMP_DTYPES = ("fp16", "bf16")  # train.amp_dtype (lslo.train maps them to torch dtypes)
LOSSES = ("chunked", "plain")  # train.loss
DEFAULT_CHUNK_ELEMENTS = 2**26  # logits elements of one block (train.loss_chunk_elements): 256 MiB in float32

SIDES = ("enc", "dec")  # the model's two stacks
INDEXES = ("src", "tgt")  # a language-specific LoRA is chosen by the source or by the target language


def paper_index_plan(encoder_layers: int, decoder_layers: int) -> dict:
    """The paper's index plan for a model of this depth: the top quarter of the encoder target-indexed, the rest
    source-indexed; every decoder layer target-indexed. At 12 + 12 layers (M2M100 418M, M2M-124 615M) it is the
    plan the paper learned on lang12 (§6.1, Figure 1) and the authors' lang30 command hard-codes: encoder layers
    1-9 source-indexed, 10-12 target-indexed."""
    target_indexed = encoder_layers // 4
    return {"enc": ["src"] * (encoder_layers - target_indexed) + ["tgt"] * target_indexed,
            "dec": ["tgt"] * decoder_layers}


PAPER_INDEX_PLAN = paper_index_plan(12, 12)

REHEARSAL_DIR = "results/rehearsal"  # every file of a rehearsal, its logs and report.md included
STOP_OPTION = "max_updates"  # the training option that ends a stage after N updates (fairseq's --max-update)


@dataclass
class TrainOptions:
    """Training hyper-parameters: the config's `train` blocks (top level, per stage, per variant; later wins).

    Each option's type, default and allowed values (LIMITS) are stated here once; config/schema.yaml repeats them
    for the workflow's config check and tests/test_options.py keeps the two equal.
    """

    lr: float = 3e-3  # paper §5: 3e-3 for LSLo, 1e-4 for full fine-tuning
    epochs: int = 15  # T
    max_tokens: int = 4096  # token budget per batch, padding included (fairseq --max-tokens)
    update_freq: int = 1  # gradient accumulation (micro-batches per update and process); see tokens_per_update
    tokens_per_update: int | None = None  # effective batch: max_tokens x update_freq x processes (fairseq); when
    # set, update_freq is derived from the process count so the batch does not depend on how many GPUs run it
    temperature: float = 5.0  # direction sampling temperature
    seed: int = 1
    label_smoothing: float = 0.2
    # chunked: the loss from the decoder's hidden states block by block, without the N x V logits (lslo.lean_loss);
    # plain: the full logits, then label_smoothed_nll_loss. Both compute the same loss (tests/test_lean_loss.py).
    loss: str = "chunked"
    loss_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS  # logits elements of one chunked block (tokens x V)
    dropout: float = 0.1  # the HF config's `dropout` (residual/FFN output dropout)
    # The authors' architecture (models/transformer_lora.py, m2m100_lora_base) sets attention_dropout 0.1 and
    # leaves activation_dropout at 0.0; their command sets --encoder-layerdrop 0 --decoder-layerdrop 0.
    attention_dropout: float = 0.1  # the HF config's `attention_dropout` (attention probabilities)
    activation_dropout: float = 0.0  # the HF config's `activation_dropout` (after fc1's activation)
    layerdrop: float = 0.0  # the HF config's encoder_layerdrop and decoder_layerdrop
    # LoRA structure of every LSLo stage (lslo.model.LSLoSpec): A's init and the fc1/fc2 layout; the defaults are
    # the authors' release (A ~ U(-1/√r, 1/√r); d_model x d_model fc LoRAs at ffn units [0:d_model]).
    lora_init: str = "authors"  # authors | peft | gaussian (LORA_INITS)
    fc_lora: str = "slice"  # slice | full (FC_LAYOUTS)
    fc_lora_offset: int = 0  # first ffn unit of the slice
    fc_lora_width: int | None = None  # ffn units of the slice (None: d_model)
    warmup_updates: int = 4000
    adam_betas: list = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # 0: no clipping
    amp: bool = True  # only used on CUDA
    amp_dtype: str = "fp16"  # fp16: fairseq's --amp (GradScaler, overflowed updates skipped) | bf16: no scaler
    mixed_directions: bool = True  # False: one direction per batch (the LSLo fast path)
    dev_sentences: int | None = 50  # per-epoch dev spBLEU on the first N devtest sentences (Figure 3); 0: none,
    # None: the whole devtest (the paper's Figure 3 levels are Table 1's, i.e. all 1012 sentences)
    dev_beam: int = 1
    dev_search: str = "fairseq"  # the dev decoding's beam search (SEARCHES); the workflow sets it
    # from config eval.search (rules/common.smk train_options), so dev scores decode as the evaluate stage does
    # fairseq's --max-update: stop after this many optimizer updates, write the run's outputs as at its end, and
    # mark the metrics row of the last epoch `stopped: max_updates` (smoke runs, the rehearsal, demo pretraining)
    max_updates: int | None = None
    max_epoch_examples: int | None = None  # None: one pass = n_sentences * n_directions examples

    # The allowed values of every option, in JSON Schema keywords (an option without an entry takes any value of its
    # type; lora_init, fc_lora, amp_dtype, dev_search and loss take the names in LORA_INITS, FC_LAYOUTS,
    # AMP_DTYPES, SEARCHES and LOSSES). validate() enforces exactly these, and
    # config/schema.yaml's `$defs.train` states the same types, bounds and defaults: tests/test_options.py compares
    # the two field by field, so a change here must be made there too.
    LIMITS = {
        "lr": {"exclusiveMinimum": 0},
        "epochs": {"minimum": 1},
        "max_tokens": {"minimum": 1},
        "update_freq": {"minimum": 1},
        "tokens_per_update": {"minimum": 1},
        "temperature": {"exclusiveMinimum": 0},
        # a probability of 1 would drop everything (dropout) or learn nothing from the reference (label smoothing)
        "label_smoothing": {"minimum": 0, "exclusiveMaximum": 1},
        "dropout": {"minimum": 0, "exclusiveMaximum": 1},
        "attention_dropout": {"minimum": 0, "exclusiveMaximum": 1},
        "activation_dropout": {"minimum": 0, "exclusiveMaximum": 1},
        "layerdrop": {"minimum": 0, "exclusiveMaximum": 1},
        "fc_lora_offset": {"minimum": 0},
        "fc_lora_width": {"minimum": 1},
        "warmup_updates": {"minimum": 0},
        "adam_betas": {"minItems": 2, "maxItems": 2, "items": {"minimum": 0, "exclusiveMaximum": 1}},
        "weight_decay": {"minimum": 0},
        "clip_norm": {"minimum": 0},
        "dev_sentences": {"minimum": 0},
        "dev_beam": {"minimum": 1},
        "max_updates": {"minimum": 1},
        "loss_chunk_elements": {"minimum": 1},
        "max_epoch_examples": {"minimum": 1},
    }

    @classmethod
    def from_dict(cls, d: dict | None, path: str = "options") -> "TrainOptions":
        """Build from a config dict; an unknown key or a wrong type raises LsloError naming `path.key`."""
        if isinstance(d, TrainOptions):
            return d
        d = dict(d or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise LsloError(f"{path}.{unknown[0]}: unknown training option; known options are {sorted(known)}")
        defaults = cls()
        for key, value in d.items():
            d[key] = _check_type(f"{path}.{key}", value, getattr(defaults, key), key)
        options = cls(**d)
        options.validate(path)
        return options

    @classmethod
    def json_schema(cls) -> dict:
        """The JSON Schema of each option (type, bounds, allowed names), as config/schema.yaml must state it."""
        types = {"float": {"type": "number"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                 "int | None": {"type": ["integer", "null"]}, "list": {"type": "array"}}
        enums = {"lora_init": list(LORA_INITS), "fc_lora": list(FC_LAYOUTS), "amp_dtype": list(AMP_DTYPES),
                 "dev_search": list(SEARCHES), "loss": list(LOSSES)}
        schema = {}
        for f in fields(cls):
            limits = dict(cls.LIMITS.get(f.name, {}))
            if f.name in enums:
                schema[f.name] = {"enum": enums[f.name]}
                continue
            if "items" in limits:  # adam_betas: a list of numbers
                limits["items"] = {"type": "number", **limits["items"]}
            schema[f.name] = {**types[str(f.type)], **limits}
        return schema

    @staticmethod
    def _expected(limits: dict, kind: str) -> str:
        """'a number in [0, 1)', 'a whole number >= 1', ... from JSON Schema bounds."""
        low = (f"[{limits['minimum']}" if "minimum" in limits
               else f"({limits['exclusiveMinimum']}" if "exclusiveMinimum" in limits else None)
        if "exclusiveMaximum" in limits and low is not None:
            return f"{kind} in {low}, {limits['exclusiveMaximum']})"
        if "minimum" in limits:
            return f"{kind} >= {limits['minimum']}"
        return f"{kind} > {limits['exclusiveMinimum']}"

    @staticmethod
    def _within(value, limits: dict) -> bool:
        return (value >= limits.get("minimum", value) and value > limits.get("exclusiveMinimum", value - 1)
                and value < limits.get("exclusiveMaximum", value + 1))

    def validate(self, path: str = "options") -> None:
        """Check every option against LIMITS; the first one out of range raises LsloError naming `path.key`."""
        schema = self.json_schema()
        for key, limits in self.LIMITS.items():
            value = getattr(self, key)
            if key == "adam_betas":
                if not (len(value) == 2 and all(self._within(b, limits["items"]) for b in value)):
                    raise LsloError(f"{path}.{key} is {value!r}, expected two "
                                    f"{self._expected(limits['items'], 'numbers')}")
                continue
            if value is None or self._within(value, limits):
                continue
            json_type = schema[key]["type"]
            kind = ("a number" if json_type == "number" else "a whole number" if json_type == "integer"
                    else "null or a whole number")
            raise LsloError(f"{path}.{key} is {value!r}, expected {self._expected(limits, kind)}")
        for key in ("lora_init", "fc_lora", "amp_dtype", "dev_search", "loss"):
            if getattr(self, key) not in schema[key]["enum"]:
                raise LsloError(f"{path}.{key} is {getattr(self, key)!r}, expected one of "
                                f"{', '.join(schema[key]['enum'])}")
        if self.tokens_per_update is not None and self.update_freq != 1:
            raise LsloError(f"{path}: set tokens_per_update or update_freq, not both (update_freq is derived from "
                            "tokens_per_update, max_tokens and the number of processes)")

    def lora_layout(self) -> dict:
        """The LSLoSpec fields these options set (A's init and the fc1/fc2 layout)."""
        return {"init": self.lora_init, "fc_lora": self.fc_lora, "fc_lora_offset": self.fc_lora_offset,
                "fc_lora_width": self.fc_lora_width}

    def update_freq_for(self, world_size: int) -> int:
        """Micro-batches per optimizer update in each of `world_size` processes.

        With tokens_per_update set: tokens_per_update / (max_tokens x world_size), which must be a whole number, so
        that 1, 2 or 4 GPUs train with the same effective batch (fairseq's max_tokens x update_freq x GPUs).
        """
        if self.tokens_per_update is None:
            return self.update_freq
        per_update = self.max_tokens * world_size
        if self.tokens_per_update % per_update:
            raise LsloError(f"options.tokens_per_update ({self.tokens_per_update}) is not a multiple of max_tokens "
                            f"({self.max_tokens}) x {world_size} process(es); choose a process count or max_tokens "
                            "that divides it")
        return self.tokens_per_update // per_update


_OPTIONAL_INT = {f.name for f in fields(TrainOptions) if str(f.type) == "int | None"}  # null or a whole number


def _check_type(path: str, value, default, key: str):
    if key in _OPTIONAL_INT:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise LsloError(f"{path} is {value!r}, expected null or a whole number")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
    else:
        ok = True
    if not ok:
        raise LsloError(f"{path} is {value!r} ({type(value).__name__}), expected {type(default).__name__}")
    return value


@dataclass(frozen=True)
class RehearsalOptions:
    """config `rehearse`: false (a real run), true (these defaults) or a mapping of some of the fields."""

    updates: int = 2  # updates per training stage; the first warms up, the rest give the seconds per update
    sentences: int = 2  # test sentences per direction decoded; dev sentences scored per epoch
    max_new_tokens: int = 16  # new tokens per decoded test sentence at most

    @classmethod
    def from_config(cls, value) -> "RehearsalOptions | None":
        """None for a real run (false, null, absent); the options otherwise. A wrong value raises LsloError."""
        if value is None or value is False or value == "false":
            return None
        if value is True or value == "true":  # "true": --config rehearse=true (snakemake reads only True as a bool)
            return cls()
        if not isinstance(value, dict):
            raise LsloError(f"config key 'rehearse' is {value!r}; expected true, false or a mapping of "
                            f"{[f.name for f in fields(cls)]}")
        known = {f.name for f in fields(cls)}
        for key, number in value.items():
            if key not in known:
                raise LsloError(f"config key 'rehearse.{key}' is not known; known: {sorted(known)}")
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise LsloError(f"config key 'rehearse.{key}' is {number!r}; expected a whole number >= 1")
        return cls(**value)

    def train_options(self, options: dict) -> dict:
        """A stage's training options, cut: at most `updates` updates and `sentences` dev sentences (0 stays 0)."""
        cut = dict(options)
        limit = cut.get(STOP_OPTION)
        cut[STOP_OPTION] = self.updates if limit is None else min(limit, self.updates)
        dev = cut.get("dev_sentences", TrainOptions.dev_sentences)
        cut["dev_sentences"] = self.sentences if dev is None else min(dev, self.sentences)
        return cut

    def eval_options(self, options: dict) -> dict:
        """The config's `eval` block, cut: the first `sentences` test sentences, `max_new_tokens` new tokens."""
        limit = options.get("max_sentences")
        return {**options, "max_sentences": self.sentences if limit is None else min(limit, self.sentences),
                "max_len_a": 0.0, "max_len_b": min(options.get("max_len_b", self.max_new_tokens),
                                                   self.max_new_tokens)}
