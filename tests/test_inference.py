"""lslo.inference: the decoding options, one generate call site, no import cycles, and a quiet loader."""

import ast
import json
import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_dirs import make_m2m100_model_dir, syllable_sentences  # noqa: E402

from lslo.errors import LsloError  # noqa: E402
from lslo.inference import (DecodingOptions, decoding_options_path, load_variant, read_decoding_options,  # noqa: E402
                            translate_many, write_decoding_options)

LSLO = Path(__file__).resolve().parents[1] / "lslo"
LANGS = ["en", "fr", "oc"]


def lslo_imports() -> dict:
    """lslo module -> the lslo modules it imports (at the top or inside a function)."""
    graph = {}
    for path in sorted(LSLO.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lslo":
                deps |= {a.name for a in node.names} if node.module == "lslo" else {node.module.split(".")[1]}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lslo.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_lslo_modules_import_each_other_in_a_circle():
    graph = lslo_imports()
    assert {"inference", "metrics"} <= set(graph["evaluate"]) and "metrics" in graph["bootstrap"]
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_generate_is_called_from_the_inference_module_only():
    """Besides LSLoModel.generate's wrapper around the HF model (lslo/model.py), one module decodes."""
    calls = {}
    for path in LSLO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                calls.setdefault(path.name, []).append(ast.unparse(node.func))
    assert calls == {"inference.py": ["self.model.generate"], "model.py": ["self.base.generate"]}


def test_decoding_options_round_trip_and_refuse_bad_values(tmp_path):
    options = DecodingOptions(beam=3, max_len_a=1.5, max_len_b=7, lenpen=0.6, max_tokens=90, max_sentences=4)
    path = decoding_options_path(tmp_path / "v" / "variant.json")
    assert path == tmp_path / "v" / "decoding.json"
    write_decoding_options(options, path)
    assert read_decoding_options(path) == options
    assert options.max_new_tokens(10) == int(1.5 * 10 + 7)
    assert DecodingOptions() == DecodingOptions(beam=5, max_len_a=0.0, max_len_b=200, lenpen=1.0, max_tokens=4000)
    path.write_text(json.dumps({"beam": 5, "length_penalty": 1.0}))
    with pytest.raises(LsloError, match=r"decoding.json: unknown decoding option\(s\) \['length_penalty'\]"):
        read_decoding_options(path)
    path.write_text(json.dumps({"beam": "5"}))
    with pytest.raises(LsloError, match=r"decoding.json: beam is '5', expected a whole number >= 1"):
        read_decoding_options(path)
    with pytest.raises(LsloError, match="decoding options not found"):
        read_decoding_options(tmp_path / "absent.json")
    for bad in (dict(max_tokens=0), dict(max_len_b=-1), dict(max_len_a=-0.5), dict(max_sentences=2.5)):
        with pytest.raises(LsloError, match=f"{next(iter(bad))} is"):
            DecodingOptions(**bad)


@pytest.fixture(scope="module")
def pretrain_variant(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    base = make_m2m100_model_dir(root / "base", LANGS, init_std=0.5)
    variant = root / "variant.json"
    variant.write_text(json.dumps({"method": "pretrain", "base_model": str(base), "languages": LANGS}))
    return variant


def test_loading_and_beam_decoding_print_no_bar_and_no_warning(pretrain_variant, capfd):
    """transformers' weight-loading bar and its FutureWarning about generate(past_key_values=...) appeared in
    every decode log; the loader hides the bar and the beam cache is handed over under generate's own name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        translator = load_variant(pretrain_variant, device="cpu")
        hyps = translate_many(translator, syllable_sentences(3, seed=1, words=4), ["en"] * 3, ["oc"] * 3,
                              DecodingOptions(beam=3, max_len_b=5))
    assert len(hyps) == 3
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "deprecated" not in err, err
