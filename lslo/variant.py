"""What a fine-tuned variant is: its method, the files its finetune job writes, and its record, variant.json.

The one table of methods (`METHODS`) is read by the rules (rules/common.smk: which finetune rule runs a variant,
which files it declares), by the finetune stage and by the variant loader (lslo.inference):

  pretrain  the base model, untrained: variant.json and the epoch-0 dev scores; decodes the base model
  full      every parameter trained (Ft-all): writes the whole HF model directory ``model/``
  lslo      the base frozen, language-specific LoRA: writes ``adapters.safetensors`` (lslo.adapters)

variant.json: {"method", "base_model", "adapters", "model", "languages", "nllb_codes"}. Its paths are relative
to variant.json itself (lslo.io.portable_path; a base model given as an absolute path stays absolute), so a
copied results directory reads its own files; `read_variant` resolves them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lslo.errors import LsloError
from lslo.io import portable_path, read_json, stage_path, write_json

# The roles of the summary's findings (config `summary`: the variant that plays each; lslo.summary): named here so
# that the rules read them without importing the summary's statistics.
SUMMARY_ROLES = ("pretrain", "ft_all", "full_rank", "low_rank", "pruned")


@dataclass(frozen=True)
class Method:
    trains: bool
    artifact: str | None  # the variant.json field naming what the finetune job writes besides variant.json
    artifact_path: str | None  # that file or directory, relative to the variant's directory
    artifact_is_dir: bool = False

    @property
    def model_field(self) -> str:
        """The variant.json field naming the HF model directory this method decodes with."""
        return "model" if self.artifact == "model" else "base_model"


METHODS = {
    "pretrain": Method(trains=False, artifact=None, artifact_path=None),
    "full": Method(trains=True, artifact="model", artifact_path="model", artifact_is_dir=True),
    "lslo": Method(trains=True, artifact="adapters", artifact_path="adapters.safetensors"),
}
VARIANT_FIELDS = ("method", "base_model", "adapters", "model", "languages", "nllb_codes")


def method_of(name: str, where: str = "variant") -> Method:
    if name not in METHODS:
        raise LsloError(f"{where}: method '{name}' not understood; expected one of {list(METHODS)}")
    return METHODS[name]


def write_variant(out_dir, method: str, base_model, languages: list[str], nllb_codes: dict | None) -> dict:
    """Write out_dir/variant.json for a finished finetune job and return it (paths relative to out_dir)."""
    spec = method_of(method)
    variant = {"method": method, "base_model": portable_path(base_model, out_dir), "adapters": None, "model": None,
               "languages": list(languages), "nllb_codes": nllb_codes}
    if spec.artifact:
        variant[spec.artifact] = spec.artifact_path
    write_json(variant, os.path.join(out_dir, "variant.json"))
    return variant


def read_variant(variant_json) -> dict:
    """A finetune stage's variant.json with its paths (base_model, adapters, model) resolved against the file's
    own directory: a results directory copied elsewhere reads its own adapters, never the original's. A field the
    method needs and does not have is refused, naming the file and the field."""
    variant = read_json(variant_json)
    for key in ("method", "base_model"):
        if not variant.get(key):
            raise LsloError(f"{variant_json}: field '{key}' is missing")
    spec = method_of(variant["method"], str(variant_json))
    if spec.artifact and not variant.get(spec.artifact):
        raise LsloError(f"{variant_json}: method '{variant['method']}' needs field '{spec.artifact}'")
    for key in ("base_model", "adapters", "model"):
        if variant.get(key):
            variant[key] = str(stage_path(variant[key], variant_json))
    return variant


def decoded_model_dir(variant: dict) -> str:
    """The HF model directory a variant (as `read_variant` returns it) decodes with."""
    return variant[METHODS[variant["method"]].model_field]
