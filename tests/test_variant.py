"""lslo.variant: the one table of methods, variant.json written and read back, and the schema's method enum."""

import json
from pathlib import Path

import pytest
import yaml

from lslo.errors import LsloError
from lslo.variant import METHODS, decoded_model_dir, read_variant, write_variant

ROOT = Path(__file__).resolve().parents[1]


def test_schema_methods_are_the_methods_table():
    schema = yaml.safe_load((ROOT / "config/schema.yaml").read_text())
    assert schema["$defs"]["variant"]["properties"]["method"]["enum"] == list(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_variant_round_trip_resolves_paths_against_its_own_directory(tmp_path, method):
    out = tmp_path / "results/finetune/v"
    out.mkdir(parents=True)
    written = write_variant(out, method, tmp_path / "model", ["en", "fr"], None)
    moved = tmp_path / "copy"
    (tmp_path / "results").rename(moved)  # a copied results directory reads its own files
    variant = read_variant(moved / "finetune/v/variant.json")
    assert written["base_model"] == str(tmp_path / "model")  # absolute stays absolute
    artifact = METHODS[method].artifact
    if artifact:
        assert variant[artifact] == str(moved / "finetune/v" / METHODS[method].artifact_path)
    expected_model = variant["model"] if method == "full" else str(tmp_path / "model")
    assert decoded_model_dir(variant) == expected_model
    assert variant["languages"] == ["en", "fr"]


@pytest.mark.parametrize("method, field", [("full", "model"), ("lslo", "adapters")])
def test_variant_without_its_artifact_is_refused(tmp_path, method, field):
    path = tmp_path / "variant.json"
    path.write_text(json.dumps({"method": method, "base_model": "m", field: None}))
    with pytest.raises(LsloError, match=f"method '{method}' needs field '{field}'"):
        read_variant(path)


def test_unknown_method_is_refused(tmp_path):
    path = tmp_path / "variant.json"
    path.write_text(json.dumps({"method": "prefix", "base_model": "m"}))
    with pytest.raises(LsloError, match="method 'prefix' not understood"):
        read_variant(path)
