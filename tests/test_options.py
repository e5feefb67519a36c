"""Each training option has one truth: lslo.options.TrainOptions (type, LIMITS, default).

config/schema.yaml's `$defs.train` block repeats it for the workflow's config check, and lslo.model.LSLoSpec checks
the LoRA-layout options again when the stages build their models. These tests compare the copies field by field,
structurally and by probing the boundaries, so that a bound or a default changed on one side only fails here.
"""

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import lslo.options
from lslo.config import load_yaml
from lslo.demo import pretrain_demo_model
from lslo.errors import LsloError
from lslo.model import LSLoSpec
from lslo.train import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_yaml(ROOT / "config" / "schema.yaml")
TRAIN_SCHEMA = SCHEMA["$defs"]["train"]
OPTIONS = {f.name: f for f in dataclasses.fields(TrainOptions)}


def schema_default(name: str):
    """The default the schema states for option `name`: its description starts with "unset: <YAML value>"."""
    description = " ".join(TRAIN_SCHEMA["properties"][name].get("description", "").split())
    match = re.match(r"unset: (.+?)(?: \(|;|$)", description)
    assert match, f"schema.yaml $defs.train.{name}: description does not start with 'unset: <default>'"
    import yaml
    return yaml.safe_load(match.group(1))


def library_default(name: str):
    f = OPTIONS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_schema_names_every_option_and_no_other():
    assert set(TRAIN_SCHEMA["properties"]) == set(OPTIONS)
    assert TRAIN_SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_schema_states_the_options_type_and_bounds(name):
    stated = {k: v for k, v in TRAIN_SCHEMA["properties"][name].items() if k != "description"}
    assert stated == TrainOptions.json_schema()[name]


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_schema_states_the_options_default(name):
    stated, default = schema_default(name), library_default(name)
    assert stated == default and type(stated) is type(default), f"{name}: schema says {stated!r}, library {default!r}"
    # the default itself is allowed on both sides
    assert_same_verdict(name, default)


def probes(name: str) -> list:
    """Values at and just beyond every bound of option `name`, plus a wrong type."""
    props = TRAIN_SCHEMA["properties"][name]
    if "enum" in props:
        return [*props["enum"], "none-of-these", 1]
    if name == "adam_betas":
        return [[0.0, 0.5], [0.9, 1.0], [-1e-9, 0.5], [0.9, 0.999999], [0.9], [0.9, 0.98, 0.99], ["a", "b"]]
    step = 1 if "integer" in props["type"] else 1e-9
    values = ["1", True]
    if "null" in props["type"]:
        values.append(None)
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        if key in props:
            values += [props[key] - step, props[key], props[key] + step]
    return values


def schema_accepts(name: str, value) -> bool:
    validator = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/train"})
    return validator.is_valid({name: value})


def options_accept(name: str, value) -> bool:
    try:
        TrainOptions.from_dict({name: value}, "train")
    except LsloError:
        return False
    return True


def assert_same_verdict(name: str, value):
    schema, options = schema_accepts(name, value), options_accept(name, value)
    assert schema == options, (f"train.{name} = {value!r}: schema.yaml {'accepts' if schema else 'rejects'} it, "
                               f"TrainOptions {'accepts' if options else 'rejects'} it")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_schema_and_options_accept_the_same_values(name):
    for value in probes(name):
        assert_same_verdict(name, value)


def test_probes_reach_both_sides_of_the_bounds():
    """The probes are not vacuous: each bounded option has a probe accepted and one rejected."""
    for name in ("lr", "dropout", "label_smoothing", "epochs", "fc_lora_width", "adam_betas", "lora_init"):
        verdicts = {options_accept(name, value) for value in probes(name)}
        assert verdicts == {True, False}, name
    assert not options_accept("dropout", 1.0) and options_accept("dropout", 0.999)


LAYOUT_PROBES = [("lora_init", v) for v in ("authors", "peft", "gaussian", "xavier")] + \
    [("fc_lora", v) for v in ("slice", "full", "half")] + \
    [("fc_lora_offset", v) for v in (-1, 0, 1)] + [("fc_lora_width", v) for v in (None, 0, 1, 2)]


@pytest.mark.parametrize("name, value", LAYOUT_PROBES)
def test_lslospec_accepts_the_layouts_that_train_options_accept(name, value):
    """The stages build LSLoSpec(**options.lora_layout()); it must not refuse what the config check let through."""
    options = TrainOptions()
    setattr(options, name, value)
    try:
        options.validate("train")
        options_ok = True
    except LsloError:
        options_ok = False
    try:
        LSLoSpec(languages=["en", "fr"], ranks={"en": 2, "fr": 2}, **options.lora_layout())
        spec_ok = True
    except LsloError:
        spec_ok = False
    assert spec_ok == options_ok


def test_demo_defaults_are_the_demo_configs_values():
    """config/config.yaml is the demo; the schema's demo defaults are its values, so a config that leaves a demo
    key out gets what the README describes."""
    demo_config = load_yaml(ROOT / "config" / "config.yaml")["demo"]
    defaults = {k: v["default"] for k, v in SCHEMA["properties"]["demo"]["properties"].items()}
    assert demo_config == defaults
    assert defaults["pretrain_temperature"] == 2.0


# config key of the demo -> the parameter of lslo.demo.pretrain_demo_model it sets (rules/data.smk, demo_pretrain)
PRETRAIN_PARAMETERS = {"seed": "seed", "pretrain_steps": "max_steps",
                       "pretrain_tokens": "max_tokens", "pretrain_lr": "lr", "pretrain_warmup": "warmup",
                       "pretrain_temperature": "temperature", "d_model": "d_model", "layers": "layers",
                       "ffn_dim": "ffn_dim"}


def test_demo_pretraining_library_defaults_are_the_schemas():
    """A library user calling pretrain_demo_model without arguments pretrains the model the workflow's demo does."""
    defaults = {k: v["default"] for k, v in SCHEMA["properties"]["demo"]["properties"].items()}
    signature = inspect.signature(pretrain_demo_model).parameters
    assert {key: signature[name].default for key, name in PRETRAIN_PARAMETERS.items()} == {
        key: defaults[key] for key in PRETRAIN_PARAMETERS}


def test_the_workflow_builds_its_dag_without_torchs_model_stack():
    # Every snakemake call (a dry run included) imports what the Snakefile and rules/ import at their top level;
    # transformers alone costs seconds of CPU there, so the option checks live in lslo.options. The modules are read
    # from the rule files themselves, so a new import of lslo.train (or anything that loads transformers) fails here.
    imports = set()
    for path in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        imports |= set(re.findall(r"^from (lslo[.\w]*) import", path.read_text(encoding="utf-8"), re.MULTILINE))
    assert "lslo.options" in imports and "lslo.variant" in imports
    code = "import sys\n" + "".join(f"import {name}\n" for name in sorted(imports)) + \
        "print(sorted(m for m in ('transformers', 'lslo.train', 'lslo.model') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_implementations_build_every_option_name():
    # lslo.options names what the modules implement; a name one cannot build would pass the config check and fail
    # hours later, in the job
    from lslo.layer import LoRABank
    from lslo.train import AMP_TORCH_DTYPES

    assert list(AMP_TORCH_DTYPES) == list(lslo.options.AMP_DTYPES)
    for init in lslo.options.LORA_INITS:
        bank = LoRABank(["en"], {"en": 4}, in_features=8, out_features=8, init=init)
        assert bank.A["en"].abs().sum() > 0, init  # A initialised; B zero, so the model starts unchanged
