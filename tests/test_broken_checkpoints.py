"""Broken checkpoints: one clear error each, naming the file and the keys."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
from checkpoints import resave_as, set_config

from flax_ce import CheckpointError, ConfigError, CrossEncoder


@pytest.fixture()
def model_dir(bert_dir, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(bert_dir, path)
    return path


def _rewrite_safetensors(model_dir: str, edit) -> str:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_directory_and_files(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        CrossEncoder(str(tmp_path / "nope" / "deeper" / "model"))
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no weights found.*model\.safetensors"):
        CrossEncoder(model_dir)
    os.remove(os.path.join(model_dir, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        CrossEncoder(model_dir)


def test_model_dir_is_a_file(model_dir):
    with pytest.raises(NotADirectoryError, match="is a file"):
        CrossEncoder(os.path.join(model_dir, "config.json"))


def test_unknown_model_type(model_dir):
    set_config(model_dir, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config\.json.*model_type 'gpt2' is not supported"):
        CrossEncoder(model_dir)


def test_every_unsupported_setting_listed_at_once(model_dir):
    set_config(model_dir, position_embedding_type="relative_key", hidden_act="swiglu", is_decoder=True)
    with pytest.raises(ConfigError) as info:
        CrossEncoder(model_dir)
    message = str(info.value)
    for fragment in (
        "config.json",
        "position_embedding_type='relative_key'",
        "hidden_act='swiglu'",
        "is_decoder",
    ):
        assert fragment in message


def test_missing_key(model_dir):
    key = "bert.encoder.layer.1.attention.self.key.weight"
    path = _rewrite_safetensors(model_dir, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as info:
        CrossEncoder(model_dir)
    assert path in str(info.value) and "layers.1.attention.key.kernel" in str(info.value)


def test_unknown_extra_key(model_dir):
    path = _rewrite_safetensors(
        model_dir, lambda t: t.update({"bert.encoder.layer.0.adapter.weight": np.zeros((2, 2), np.float32)})
    )
    with pytest.raises(CheckpointError) as info:
        CrossEncoder(model_dir)
    assert path in str(info.value) and "bert.encoder.layer.0.adapter.weight" in str(info.value)


def test_wrong_shape(model_dir):
    key = "classifier.weight"
    path = _rewrite_safetensors(model_dir, lambda t: t.update({key: np.zeros((2, 32), np.float32)}))
    with pytest.raises(CheckpointError) as info:
        CrossEncoder(model_dir)
    assert path in str(info.value) and key in str(info.value) and "(2, 32)" in str(info.value)


def test_all_problems_in_one_error(model_dir):
    def edit(t):
        t.pop("bert.pooler.dense.bias")
        t["bert.extra.weight"] = np.zeros(3, np.float32)
        t["classifier.bias"] = np.zeros(5, np.float32)

    _rewrite_safetensors(model_dir, edit)
    with pytest.raises(CheckpointError, match=r"3 problems") as info:
        CrossEncoder(model_dir)
    for fragment in ("head.dense.bias", "bert.extra.weight", "classifier.bias"):
        assert fragment in str(info.value)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(model_dir, tmp_path, fmt):
    if fmt == "bin":
        model_dir = resave_as(model_dir, str(tmp_path / "bin"), "bin")
    path = os.path.join(model_dir, "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt") as info:
        CrossEncoder(model_dir)
    assert path in str(info.value)


def test_malicious_pickle_is_refused(model_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    os.remove(os.path.join(model_dir, "model.safetensors"))
    path = os.path.join(model_dir, "pytorch_model.bin")
    # torch's zip layout, so the payload reaches the unpickler rather than the format check.
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl",
            pickle.dumps({"bert.embeddings.word_embeddings.weight": Exploit()}, protocol=2),
        )
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="system") as info:
        CrossEncoder(model_dir)
    assert path in str(info.value)
    assert not marker.exists()


def test_shard_outside_directory_is_refused(model_dir, tmp_path):
    model_dir = resave_as(model_dir, str(tmp_path / "sharded"), "sharded-safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../etc/passwd"
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(CheckpointError, match=r"not a plain file name") as info:
        CrossEncoder(model_dir)
    assert index in str(info.value)


def test_missing_shard(model_dir, tmp_path):
    model_dir = resave_as(model_dir, str(tmp_path / "sharded"), "sharded-bin")
    os.remove(os.path.join(model_dir, "pytorch_model-00002-of-00002.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin.*missing"):
        CrossEncoder(model_dir)


def test_bfloat16_weights_load(model_dir, bert_dir):
    import ml_dtypes

    def to_bf16(tensors):
        for key, value in tensors.items():
            tensors[key] = value.astype(ml_dtypes.bfloat16) if value.dtype == np.float32 else value

    _rewrite_safetensors(model_dir, to_bf16)
    pairs = [("a question", "an answer"), ("one", "two three")]
    # bf16-rounded weights score close to the fp32 originals (about 1e-2 apart), not refused as non-float.
    assert np.abs(CrossEncoder(model_dir).predict(pairs) - CrossEncoder(bert_dir).predict(pairs)).max() < 0.1
