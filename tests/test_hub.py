"""Hub resolution: an actionable error without network, and the allow-list of files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from checkpoints import sample_pairs
from huggingface_hub.utils import filter_repo_objects

from flax_ce import CrossEncoder
from flax_ce.hub import ALLOW_PATTERNS, IGNORE_PATTERNS


def test_unreachable_hub_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"cross-encoder/ms-marco-MiniLM-L6-v2.*local directory"):
        CrossEncoder("cross-encoder/ms-marco-MiniLM-L6-v2", cache_dir=str(tmp_path))


def test_allow_list_skips_onnx_and_openvino():
    wanted = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "spm.model",
        "modules.json",  # sentence-transformers' own settings (activation, max length) come too
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",  # a modular cross-encoder's modules
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
    ]
    unwanted = [
        "README.md",
        "onnx/model.onnx",
        "onnx/model_O4.onnx",
        "openvino/openvino_model.bin",
        "openvino/openvino_model.xml",
        "onnx/config.json",
        "tf_model.h5",
        "2_Dense/README.md",
    ]
    fetched = filter_repo_objects(
        wanted + unwanted, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
    )
    assert set(fetched) == set(wanted)


def hub_cache(tmp_path, model_dir: str, repo_id: str) -> str:
    """A huggingface_hub cache (models--org--name/snapshots/REV + refs/main) holding `model_dir`'s files."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return str(cache)


def test_hub_id_from_the_cache_with_local_files_only(bert_dir, tmp_path):
    cache = hub_cache(tmp_path, bert_dir, "someone/tiny-reranker")
    pairs = sample_pairs(5)
    expected = CrossEncoder(bert_dir).predict(pairs)
    ce = CrossEncoder("someone/tiny-reranker", cache_dir=cache, local_files_only=True)
    assert ce.model_dir.startswith(cache)
    assert np.abs(ce.predict(pairs) - expected).max() <= 1e-6
    with pytest.raises(OSError, match=r"local_files_only=True and it is not in the cache.*local directory"):
        CrossEncoder("someone/other-reranker", cache_dir=cache, local_files_only=True)
