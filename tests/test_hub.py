"""Hub resolution: an actionable error without network, and the allow-list of files."""

from __future__ import annotations

import pytest
from huggingface_hub.utils import filter_repo_objects

from flax_ce import CrossEncoder
from flax_ce.hub import ALLOW_PATTERNS, IGNORE_PATTERNS


def test_unreachable_hub_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"cross-encoder/ms-marco-MiniLM-L6-v2.*local directory"):
        CrossEncoder("cross-encoder/ms-marco-MiniLM-L6-v2", cache_dir=str(tmp_path))


def test_allow_list_skips_onnx_and_openvino():
    repo = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "README.md",
        "onnx/model.onnx",
        "onnx/model_O4.onnx",
        "openvino/openvino_model.bin",
        "openvino/openvino_model.xml",
        "onnx/config.json",
        "tf_model.h5",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "spm.model",
    ]
    fetched = set(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    assert fetched == {
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
    }
