"""Shared test fixtures: a tiny random M2M100 (CPU, float32, deterministic).

Use the fixtures (``tiny_config``, ``tiny_model``, ``languages``) or import the plain helpers:
    from conftest import LANGUAGES, make_tiny_config, make_tiny_model, lang_token_id
Vocabulary: ids 0..63 are ordinary tokens (bos 0, pad 1, eos 2, unk 3), ids 64.. are the language tokens of
LANGUAGES in order (lang_token_id(code)). Dropout is 0 so train and eval forwards agree.
"""

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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip without a GPU (benchmarks/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (benchmarks/gpu_check.sh runs it on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
