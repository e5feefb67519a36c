"""Shared test fixtures: a tiny random M2M100 (CPU, float32, deterministic).

Use the fixtures (``tiny_config``, ``tiny_model``, ``languages``) or import the plain helpers:
    from conftest import LANGUAGES, make_tiny_config, make_tiny_model, lang_token_id
Vocabulary: ids 0..63 are ordinary tokens (bos 0, pad 1, eos 2, unk 3), ids 64.. are the language tokens of
LANGUAGES in order (lang_token_id(code)). Dropout is 0 so train and eval forwards agree.
"""

import shutil

import pytest
import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

LANGUAGES = ["en", "fr", "de", "oc", "wo"]
BASE_VOCAB = 64
BOS, PAD, EOS, DECODER_START = 0, 1, 2, 2


def lang_token_id(code: str) -> int:
    return BASE_VOCAB + LANGUAGES.index(code)


def make_tiny_config(**overrides) -> M2M100Config:
    kwargs = dict(
        vocab_size=BASE_VOCAB + len(LANGUAGES), d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        decoder_start_token_id=DECODER_START, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=True,
    )
    kwargs.update(overrides)
    return M2M100Config(**kwargs)


def make_tiny_model(seed: int = 0, **overrides) -> M2M100ForConditionalGeneration:
    torch.manual_seed(seed)
    return M2M100ForConditionalGeneration(make_tiny_config(**overrides)).eval()


def make_batch(directions, length: int = 7, seed: int = 0):
    """A random source batch for a list of (src, tgt) directions: input_ids [B, length] = [src_tok, words.., eos]
    with some right padding, attention_mask, and the src/tgt codes per sample."""
    g = torch.Generator().manual_seed(seed)
    batch_size = len(directions)
    ids = torch.randint(4, BASE_VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for b, (src, _) in enumerate(directions):
        n = length - (b % 3)  # a few padded rows
        ids[b, 0] = lang_token_id(src)
        ids[b, n - 1] = EOS
        ids[b, n:] = PAD
        mask[b, n:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "src": [s for s, _ in directions], "tgt": [t for _, t in directions]}


@pytest.fixture
def languages():
    return list(LANGUAGES)


@pytest.fixture
def tiny_config():
    return make_tiny_config()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


def randomize_lora(model, std: float = 0.5, seed: int = 0) -> None:
    """Give every LoRA bank non-zero random B (and fresh A) so adapters change outputs (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.lslo_modules().values():
            for bank in module.banks.values():
                for lang in bank.languages:
                    bank.A[lang].copy_(torch.randn(bank.A[lang].shape, generator=g) * std)
                    bank.B[lang].copy_(torch.randn(bank.B[lang].shape, generator=g) * std)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several threads on a busy 2-core machine mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The test files that run the workflow for real, slowest first (minutes each on 2 cores; the rest of the suite takes
# seconds a file). `make test` gives each worker whole files: started first, they run while the other worker works
# through the short files, instead of one of them running alone at the end. test_workflow.py builds the shared
# runs (below) that test_workflow_runs.py and test_reruns.py start from, so those two come after another long file.
SLOWEST_FIRST = ["test_workflow.py", "test_seeds.py", "test_rehearsal.py", "test_workflow_runs.py",
                 "test_stale_inputs.py", "test_reruns.py", "test_gpu_check.py", "test_nllb_workflow.py"]


def pytest_configure(config):
    # pytest-xdist orders the files by their number of tests (--loadscope-reorder, its default); the files that
    # run the workflow have few tests each and would come last
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The slow workflow files first (SLOWEST_FIRST, the rest in collection order); tests marked ``cuda`` skip
    without a GPU (benchmarks/gpu_check.sh runs them on one)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (benchmarks/gpu_check.sh runs it on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------- shared runs
# Built once per test run (shared_runs.build_once); a test copies one (shared_runs.copy_run) before changing it.

# The smoke config's demo world and data: every job that the smoke run and the runs derived from the smoke config
# (same demo and data settings, other variants or training options) have in common.
SMOKE_WORLD = ["results/demo/model", "results/demo/spm.model", "results/demo/languages.tsv", "results/data/train.tsv",
               "results/data/test.tsv", "results/data/dev/2.tsv"]


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory):
    """A workflow copy with config/smoke.yaml (tests/data/smoke.yaml) and its SMOKE_WORLD built: the demo
    benchmark, the tiny pretrained base (one thread, as every real run of the tests), the train and test tables and
    the 2-sentence dev set."""
    from shared_runs import build_once
    from test_workflow import ROOT, copy_workflow, snakemake

    def build(workdir):
        copy_workflow(workdir)
        shutil.copy(ROOT / "tests/data/smoke.yaml", workdir / "config/smoke.yaml")
        snakemake(workdir, *SMOKE_WORLD, "--configfile", "config/smoke.yaml", "--cores", "2", "--set-threads",
                  "demo_pretrain=1", "--show-failed-logs")

    return build_once(tmp_path_factory, "smoke-world", build)


@pytest.fixture(scope="session")
def demo_materialised(tmp_path_factory):
    """The demo workflow (config/config.yaml) with every output an empty file and every job's metadata recorded
    (test_workflow.materialise): up to date with and without the local profile."""
    from shared_runs import build_once
    from test_workflow import copy_workflow, materialise, snakemake

    def build(workdir):
        materialise(copy_workflow(workdir))
        assert "Nothing to be done" in snakemake(workdir, "-n", "--profile", "profiles/local").stdout

    return build_once(tmp_path_factory, "demo-materialised", build)
