"""Injecting LSLo into an HF M2M100 model, and the wrapper that routes languages per batch (paper §3-4).

    spec = LSLoSpec(languages=["en", "fr", "oc"], ranks={"en": 2, "fr": 2, "oc": 8})  # the paper's model
    model = inject_lslo(hf_model, spec)          # base parameters frozen, LSLoLinear in place of chosen Linear
    out = model(input_ids=..., attention_mask=..., labels=..., src_lang=ids, tgt_lang=ids)

State-dict keys (of LSLoModel): ``base.model.{encoder|decoder}.layers.{i}.{path}.banks.{src|tgt}.{A|B}.{lang}``,
masks ``....banks.{src|tgt}.{A_mask|B_mask}.{lang}``, and in weight-learning mode
``index_weights.{enc|dec}_{i}.logits``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from transformers import M2M100ForConditionalGeneration

from lslo.beam import with_beam_cache
from lslo.errors import LsloError
from lslo.kernels import MIXED_PATHS, Routing
from lslo.layer import IndexWeights, LSLoLinear, LoRABank
from lslo.options import FC_LAYOUTS, INDEXES, LORA_INITS, SIDES, paper_index_plan

# Paper module names -> attribute path inside an M2M100 encoder/decoder layer.
MODULE_PATHS = {
    "enc": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "fc1": "fc1", "fc2": "fc2"},
    "dec": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "c-q": "encoder_attn.q_proj", "c-k": "encoder_attn.k_proj", "c-v": "encoder_attn.v_proj",
            "fc1": "fc1", "fc2": "fc2"},
}
MODULE_NAMES = ("q", "k", "v", "c-q", "c-k", "c-v", "fc1", "fc2")
MODULE_SETS = {"all": list(MODULE_NAMES), "attn": ["q", "k", "v", "c-q", "c-k", "c-v"], "fc": ["fc1", "fc2"]}
SUPPORTED = "M2M100ForConditionalGeneration (M2M100, NLLB-200, converted M2M-124)"


def fc_block(fc_lora: str, offset: int, width: int | None, d_model: int, ffn_dim: int) -> tuple | None:
    """(start, end) of the ffn units a fc1/fc2 LoRA of layout ``fc_lora`` covers; None for "full"."""
    if fc_lora not in FC_LAYOUTS:
        raise LsloError(f"fc_lora must be one of {', '.join(FC_LAYOUTS)}; got {fc_lora!r}")
    if fc_lora == "full":
        return None
    width = d_model if width is None else int(width)
    start = int(offset)
    if start < 0 or width < 1 or start + width > ffn_dim:
        raise LsloError(f"fc_lora slice [{start}:{start + width}] does not fit the ffn dimension {ffn_dim} "
                        f"(fc_lora_offset {start}, fc_lora_width {width})")
    return start, start + width


def site_key(side: str, layer: int, module: str) -> str:
    return f"{side}.{layer}.{module}"


@dataclass
class LSLoSpec:
    """What to inject: languages, per-language ranks, modules, layers and the index plan.

    modules: "all" | "attn" | "fc" | list of paper names (q k v c-q c-k c-v fc1 fc2; c-* exist in the decoder only).
    layers: None (every layer) or {"enc": [0-based layers], "dec": [...]}.
    index_plan: "paper" (paper_index_plan at the model's depth), {"enc": ["src"|"tgt", one per encoder layer],
    "dec": [...]}, "src", "tgt" (every layer), or "learn" (weight-learning mode, eq. 5: both banks per site,
    one softmax pair per layer).
    alpha: LoRA alpha, scaling = alpha / r_l (None: alpha = r_l, scaling 1.0).
    fc_lora: "slice" | "full" (FC_LAYOUTS); fc_lora_offset, fc_lora_width: the block of the ffn units that a
    "slice" LoRA covers (width None = d_model).
    init: A's initialisation, one of lslo.options.LORA_INITS ("authors" the authors' release; "peft" is PEFT's).

    The defaults build the paper's model as the authors' release does: every module, the paper's index plan,
    the slice fc layout and the authors' init. A plain per-language PEFT LoRA is fc_lora="full", init="peft".
    """

    languages: list
    ranks: dict
    modules: object = "all"
    layers: dict | None = None
    index_plan: object = "paper"
    alpha: float | None = None
    dropout: float = 0.0
    fc_lora: str = "slice"
    fc_lora_offset: int = 0
    fc_lora_width: int | None = None
    init: str = "authors"

    def __post_init__(self):
        self.languages = list(self.languages)
        if len(set(self.languages)) != len(self.languages) or not self.languages:
            raise LsloError(f"languages must be a non-empty list without duplicates, got {self.languages}")
        unknown = sorted(set(self.ranks) - set(self.languages))
        if unknown:
            raise LsloError(f"ranks name unknown language(s) {unknown}; languages are {self.languages}")
        missing = [lang for lang in self.languages if lang not in self.ranks]
        if missing:
            raise LsloError(f"no rank given for language(s) {missing}")
        for lang, r in self.ranks.items():
            if int(r) != r or r < 1:
                raise LsloError(f"rank of language {lang!r} must be an integer >= 1, got {r!r}")
        self.ranks = {lang: int(self.ranks[lang]) for lang in self.languages}
        self.modules = self.module_list()
        if self.dropout < 0 or self.dropout >= 1:
            raise LsloError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.fc_lora not in FC_LAYOUTS:
            raise LsloError(f"fc_lora must be one of {', '.join(FC_LAYOUTS)}; got {self.fc_lora!r}")
        if self.init not in LORA_INITS:
            raise LsloError(f"init must be one of {', '.join(LORA_INITS)}; got {self.init!r}")
        for name in ("fc_lora_offset", "fc_lora_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 0
                                      or (name == "fc_lora_width" and value < 1)):
                raise LsloError(f"{name} must be a whole number >= {0 if name == 'fc_lora_offset' else 1}, "
                                f"got {value!r}")

    def fc_block(self, d_model: int, ffn_dim: int) -> tuple | None:
        """(start, end) of the ffn units a fc1/fc2 LoRA covers, or None for the full layout."""
        return fc_block(self.fc_lora, self.fc_lora_offset, self.fc_lora_width, d_model, ffn_dim)

    def module_list(self) -> list:
        modules = MODULE_SETS.get(self.modules) if isinstance(self.modules, str) else list(self.modules)
        if modules is None or not modules or any(m not in MODULE_NAMES for m in modules):
            bad = self.modules if modules is None else [m for m in modules if m not in MODULE_NAMES]
            raise LsloError(f"unknown LSLo module name(s) {bad!r}; valid names: {list(MODULE_NAMES)} "
                            f"or one of {list(MODULE_SETS)}")
        return [m for m in MODULE_NAMES if m in modules]

    def resolve(self, n_layers: dict) -> tuple[dict, dict]:
        """Per side: the list of layers carrying LSLo and the per-layer index ("src"|"tgt"|"learn")."""
        layers, plan = {}, {}
        index_plan = self.index_plan
        if index_plan == "paper":
            index_plan = paper_index_plan(n_layers["enc"], n_layers["dec"])
        for side in SIDES:
            n = n_layers[side]
            chosen = list(range(n)) if self.layers is None else list(self.layers.get(side, []))
            bad = [i for i in chosen if not 0 <= int(i) < n]
            if bad:
                raise LsloError(f"layers[{side!r}] has {bad}; the model has {n} {side} layers (0-based)")
            layers[side] = sorted(int(i) for i in chosen)
            plan[side] = self._side_plan(index_plan, side, n)
        return layers, plan

    @staticmethod
    def _side_plan(index_plan, side: str, n: int) -> list:
        entry = index_plan if isinstance(index_plan, str) else index_plan.get(side)
        if entry is None:
            raise LsloError(f"index_plan has no {side!r} entry; expected {{'enc': [...], 'dec': [...]}}")
        side_plan = [entry] * n if isinstance(entry, str) else list(entry)
        if len(side_plan) != n:
            raise LsloError(f"index_plan[{side!r}] has {len(side_plan)} entries; the model has {n} {side} layers")
        bad = [x for x in side_plan if x not in (*INDEXES, "learn")]
        if bad:
            raise LsloError(f"index_plan[{side!r}] has {bad}; expected 'src', 'tgt' or 'learn' per layer")
        return side_plan

    def to_dict(self) -> dict:
        return {"languages": self.languages, "ranks": self.ranks, "modules": self.modules, "layers": self.layers,
                "index_plan": self.index_plan, "alpha": self.alpha, "dropout": self.dropout, "fc_lora": self.fc_lora,
                "fc_lora_offset": self.fc_lora_offset, "fc_lora_width": self.fc_lora_width, "init": self.init}


def _check_model(hf_model) -> None:
    if not isinstance(hf_model, M2M100ForConditionalGeneration):
        raise LsloError(f"unsupported model class {type(hf_model).__name__}; supported: {SUPPORTED}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(model_dir) -> None:
    """A local HF M2M100 checkpoint directory: config.json of model_type m2m_100 and a weight file.

    Checked before transformers loads it, whose errors for these cases are long tracebacks (or, for another
    model class, a warning and random weights).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise LsloError(f"{model_dir}: not an HF model directory (no config.json)")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise LsloError(f"{config_path}: not a JSON model config ({err})") from None
    if model_type != "m2m_100":
        raise LsloError(f"{config_path}: model_type is {model_type!r}, expected 'm2m_100' ({SUPPORTED})")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise LsloError(f"{model_dir}: no model weights; expected one of {list(WEIGHT_FILES)}")


def inject_lslo(hf_model, spec: LSLoSpec) -> "LSLoModel":
    """Freeze ``hf_model`` and replace the chosen ``nn.Linear`` modules by ``LSLoLinear`` (in place)."""
    return LSLoModel(hf_model, spec)


class LSLoModel(nn.Module):
    """An HF M2M100 model with LSLo modules; forward/generate take per-sample ``src_lang`` / ``tgt_lang``."""

    def __init__(self, hf_model, spec: LSLoSpec):
        super().__init__()
        _check_model(hf_model)
        if any(isinstance(m, LSLoLinear) for m in hf_model.modules()):
            raise LsloError("the model already carries LSLo modules; inject into a fresh base model")
        self.spec = spec
        self.languages = list(spec.languages)
        self.routing = Routing(self.languages)
        hf_model.requires_grad_(False)
        self.base = hf_model
        self.index_weights = nn.ModuleDict()
        self._inject()

    def _stacks(self) -> dict:
        return {"enc": self.base.model.encoder.layers, "dec": self.base.model.decoder.layers}

    def _inject(self) -> None:
        stacks = self._stacks()
        layers, plan = self.spec.resolve({side: len(stack) for side, stack in stacks.items()})
        self.index_plan = plan
        for side in SIDES:
            for i in layers[side]:
                modules = [m for m in self.spec.modules if m in MODULE_PATHS[side]]
                if not modules:
                    continue
                index = plan[side][i]
                weights = None
                if index == "learn":
                    weights = self.index_weights[f"{side}_{i}"] = IndexWeights().to(self.base.device)
                for module in modules:
                    self._wrap(stacks[side][i], side, i, module, index, weights)

    def _wrap(self, layer: nn.Module, side: str, i: int, module: str, index: str, weights) -> None:
        parent_path, _, attr = MODULE_PATHS[side][module].rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        linear = getattr(parent, attr)
        in_slice = out_slice = None
        if module == "fc1":  # the slice covers fc1's output units (ffn side) ...
            out_slice = self.spec.fc_block(linear.in_features, linear.out_features)
        elif module == "fc2":  # ... and fc2's input units
            in_slice = self.spec.fc_block(linear.out_features, linear.in_features)
        lora_in = linear.in_features if in_slice is None else in_slice[1] - in_slice[0]
        lora_out = linear.out_features if out_slice is None else out_slice[1] - out_slice[0]
        indexes = INDEXES if index == "learn" else (index,)
        banks = {ix: LoRABank(self.languages, self.spec.ranks, lora_in, lora_out, alpha=self.spec.alpha,
                              dropout=self.spec.dropout, device=linear.weight.device, init=self.spec.init)
                 for ix in indexes}
        setattr(parent, attr, LSLoLinear(linear, site_key(side, i, module), index, banks, self.routing, weights,
                                         in_slice=in_slice, out_slice=out_slice))

    # ---- routing -------------------------------------------------------------------------------------------
    def lang_ids(self, codes) -> torch.Tensor:
        """Language codes -> LongTensor of ids into ``self.languages``."""
        if isinstance(codes, str):
            codes = [codes]
        unknown = sorted({c for c in codes if c not in self.languages})
        if unknown:
            raise LsloError(f"unknown language(s) {unknown}; this model has LSLo for {self.languages}")
        return torch.tensor([self.languages.index(c) for c in codes], dtype=torch.long)

    def _as_ids(self, langs, batch_size: int, name: str) -> torch.Tensor:
        if langs is None:
            raise LsloError(f"{name} is required: one language id (or code) per sample")
        if isinstance(langs, str):
            return self.lang_ids([langs] * batch_size)
        if isinstance(langs, (list, tuple)) and langs and isinstance(langs[0], str):
            ids = self.lang_ids(langs)
        else:
            ids = torch.as_tensor(langs, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() != batch_size:
            raise LsloError(f"{name} must hold one language per sample ({batch_size}); got shape {tuple(ids.shape)}")
        return ids

    def _set_routing(self, input_ids, kwargs, src_lang, tgt_lang) -> None:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None and kwargs.get("encoder_outputs") is not None:
            ref = kwargs["encoder_outputs"][0]
        if ref is None:
            raise LsloError("input_ids (or inputs_embeds / encoder_outputs) is required")
        batch_size = ref.shape[0]
        self.routing.set(self._as_ids(src_lang, batch_size, "src_lang"), self._as_ids(tgt_lang, batch_size, "tgt_lang"))

    def forward(self, input_ids=None, attention_mask=None, labels=None, decoder_input_ids=None,
                src_lang=None, tgt_lang=None, **kwargs):
        self._set_routing(input_ids, kwargs, src_lang, tgt_lang)
        try:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             decoder_input_ids=decoder_input_ids, **kwargs)
        finally:
            self.routing.clear()

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, src_lang=None, tgt_lang=None, **gen_kwargs):
        """HF generate with per-sample routing. Beam search repeats each sample num_beams times consecutively;
        decoder layers then see B·num_beams rows and the routing repeat_interleaves the ids. Force each sample's
        target language token with decoder_input_ids=[[decoder_start, tgt_lang_token], ...]. Beam search keeps the
        cross-attention cache in place (lslo.beam)."""
        self._set_routing(input_ids, gen_kwargs, src_lang, tgt_lang)
        try:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **with_beam_cache(self.base, gen_kwargs))
        finally:
            self.routing.clear()

    # ---- introspection -------------------------------------------------------------------------------------
    def lslo_modules(self) -> dict:
        """Site key ("enc.3.fc1") -> LSLoLinear, in model order."""
        return {m.site: m for m in self.base.modules() if isinstance(m, LSLoLinear)}

    def set_mixed_path(self, path: str) -> None:
        """Mixed-batch kernel of every bank: one of kernels.MIXED_PATHS ("auto" chooses per call, see
        kernels.GATHER_COST)."""
        if path not in MIXED_PATHS:
            raise LsloError(f"mixed path must be one of {', '.join(MIXED_PATHS)}; got {path!r}")
        for module in self.lslo_modules().values():
            for bank in module.banks.values():
                bank.mixed_path = path

    def named_trainable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list:
        return [p for _, p in self.named_trainable_parameters()]

    def learned_index_weights(self) -> pd.DataFrame:
        """Weight-learning result (eq. 5): one row per layer with (w_src, w_tgt); layer is 1-based."""
        rows = []
        for key, module in self.index_weights.items():
            side, layer = key.split("_")
            w = module.weights().detach().float().cpu().tolist()
            rows.append({"side": side, "layer": int(layer) + 1, "w_src": w[0], "w_tgt": w[1]})
        return pd.DataFrame(rows, columns=["side", "layer", "w_src", "w_tgt"])

    def argmax_index_plan(self) -> dict:
        """Per layer the index with the larger learned weight (§4.1). Layers without weight learning keep the
        spec's index, or the natural default (encoder: src, decoder: tgt)."""
        plan = {}
        for side in SIDES:
            plan[side] = [x if x in INDEXES else ("src" if side == "enc" else "tgt") for x in self.index_plan[side]]
        for key, module in self.index_weights.items():
            side, layer = key.split("_")
            w = module.weights()
            plan[side][int(layer)] = "src" if bool(w[0] >= w[1]) else "tgt"
        return plan
