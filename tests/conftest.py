"""Session fixtures: tiny local checkpoints (built once) and reference scores from torch."""

from __future__ import annotations

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import checkpoints  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Processes the tests start must not fill the user's default compilation cache (~/.cache/flax_ce/jax).
os.environ["FLAX_CE_COMPILATION_CACHE"] = "0"


def pytest_configure(config):
    # Many tests build a CrossEncoder for the same tiny model; a session-local persistent cache lets
    # identical programs compile once. It starts empty, so it cannot hide a change in the code.
    import tempfile

    cache_dir = tempfile.mkdtemp(prefix="flax_ce_jax_cache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def bert_dir(ckpt_root):
    return checkpoints.build_random("bert", str(ckpt_root / "bert"))


@pytest.fixture(scope="session")
def roberta_dir(ckpt_root):
    return checkpoints.build_random("roberta", str(ckpt_root / "roberta"), num_labels=3)


@pytest.fixture(scope="session")
def electra_dir(ckpt_root):
    return checkpoints.build_random("electra", str(ckpt_root / "electra"))


@pytest.fixture(scope="session")
def minilm_dir(ckpt_root):
    return checkpoints.build_minilm(str(ckpt_root / "minilm"))


@pytest.fixture(scope="session")
def deberta_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny DeBERTa v1 and v3 checkpoints with trained tokenizers."""
    import transformers
    from checkpoints import V3, save_checkpoint, train_byte_bpe, train_sentencepiece

    root = tmp_path_factory.mktemp("deberta_checkpoints")
    train_sentencepiece(str(root / "spm"))
    train_byte_bpe(str(root / "bpe"))
    v3_tokenizer = transformers.DebertaV2Tokenizer.from_pretrained(str(root / "spm"), model_max_length=128)
    v1_tokenizer = transformers.DebertaTokenizer.from_pretrained(str(root / "bpe"), model_max_length=128)
    v1_overrides = dict(relative_attention=True, pos_att_type="c2p|p2c", position_biased_input=False)
    return {
        "deberta-v3": save_checkpoint(
            str(root / "v3"), "deberta-v2", v3_tokenizer, {**V3, "position_buckets": 32}
        ),
        "deberta-v1": save_checkpoint(str(root / "v1"), "deberta", v1_tokenizer, v1_overrides),
    }


@pytest.fixture(scope="session")
def family_dirs(bert_dir, roberta_dir, electra_dir):
    return {"bert": bert_dir, "roberta": roberta_dir, "electra": electra_dir}


@pytest.fixture(autouse=True)
def fp32_matmuls():
    """Parity is measured in full fp32 (XLA's default may use lower-precision passes on accelerators)."""
    with jax.default_matmul_precision("float32"):
        yield
