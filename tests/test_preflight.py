"""Checkpoints that cannot be right fail fast, before anything large is built, with the problem named."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time

import numpy as np
import pytest
from checkpoints import resave_as, sample_pairs, set_config
from flax_ce.conversion.files import read_inventory, read_weights

from flax_ce import CheckpointError, ConfigError, CrossEncoder

PARITY = 2e-5


def linked_copy(source: str, target: str, *, skip: tuple[str, ...] = ()) -> str:
    """`target` with config.json copied (to edit) and every other file of `source` symlinked."""
    os.makedirs(target)
    for name in os.listdir(source):
        if name in skip:
            continue
        if name == "config.json":
            shutil.copy(os.path.join(source, name), target)
        else:
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    return target


def test_million_layer_config_over_six_layer_weights_fails_fast(minilm_dir, tmp_path):
    model_dir = linked_copy(minilm_dir, str(tmp_path / "model"))
    set_config(model_dir, num_hidden_layers=1_000_000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        CrossEncoder(model_dir)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert os.path.join(model_dir, "model.safetensors") in message
    assert "num_hidden_layers=1000000" in message and "room for 6 layers" in message
    assert elapsed < 3.0, f"took {elapsed:.1f} s"


def test_a_few_missing_layers_still_get_the_per_key_report(bert_dir, tmp_path):
    model_dir = linked_copy(bert_dir, str(tmp_path / "model"))
    set_config(model_dir, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing weights for \d+ model parameters") as info:
        CrossEncoder(model_dir)
    assert "layers.2.attention.key.kernel" in str(info.value)


def test_config_far_larger_than_its_weights(bert_dir, tmp_path):
    model_dir = linked_copy(bert_dir, str(tmp_path / "model"))
    set_config(model_dir, vocab_size=10**9)
    with pytest.raises(
        CheckpointError, match=r"describes a model of 32,\d{3},\d{3},\d{3} parameters, more than 4 times"
    ):
        CrossEncoder(model_dir)


def test_impossible_config_values_listed_at_once(bert_dir, tmp_path):
    model_dir = linked_copy(bert_dir, str(tmp_path / "model"))
    set_config(
        model_dir, num_attention_heads=-4, intermediate_size=0, pad_token_id=10**6, layer_norm_eps=-1.0,
        hidden_dropout_prob=2.0,
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        CrossEncoder(model_dir)
    message = str(info.value)
    assert os.path.join(model_dir, "config.json") in message
    for fragment in (
        "num_attention_heads must be between 1 and 2147483647, got -4",
        "intermediate_size must be between 1 and 2147483647, got 0",
        "pad_token_id must be an id of the vocabulary",
        "layer_norm_eps must be a positive finite number, got -1.0",
        "hidden_dropout_prob must be a probability between 0 and 1, got 2.0",
    ):
        assert fragment in message


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")


@pytest.mark.parametrize(
    "family, looked_for", [("bert", "vocab.txt"), ("roberta", "vocab.json + merges.txt")]
)
def test_missing_tokenizer_is_an_os_error(family_dirs, tmp_path, family, looked_for):
    model_dir = linked_copy(family_dirs[family], str(tmp_path / "model"), skip=TOKENIZER_FILES)
    expected = f"{model_dir}: no tokenizer found (looked for tokenizer.json or {looked_for})"
    with pytest.raises(OSError, match=re.escape(expected)):
        CrossEncoder(model_dir)


def write_vocab_txt(model_dir: str, tokens: list[str]) -> None:
    with open(os.path.join(model_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")


def test_family_vocabulary_file_is_enough(bert_dir, tmp_path):
    original = CrossEncoder(bert_dir, max_length=32)
    model_dir = linked_copy(bert_dir, str(tmp_path / "model"), skip=TOKENIZER_FILES)
    vocab = original.tokenizer.get_vocab()
    write_vocab_txt(model_dir, sorted(vocab, key=vocab.get))
    ce = CrossEncoder(model_dir, max_length=32)
    pairs = sample_pairs(8)
    assert np.abs(ce.predict(pairs) - original.predict(pairs)).max() <= PARITY


def test_special_tokens_only_tokenizer_is_refused(bert_dir, tmp_path):
    model_dir = linked_copy(bert_dir, str(tmp_path / "model"), skip=TOKENIZER_FILES)
    write_vocab_txt(model_dir, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    with pytest.raises(CheckpointError, match=r"vocab\.txt: the tokenizer has 5 entries, 5 of them special"):
        CrossEncoder(model_dir)


def test_tokenizer_past_the_embedding_table_is_refused(bert_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = linked_copy(bert_dir, str(tmp_path / "model"), skip=("model.safetensors",))
    tensors = load_file(os.path.join(bert_dir, "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    rows = tensors[key].shape[0] - 10
    tensors[key] = tensors[key][:rows]
    save_file(tensors, os.path.join(model_dir, "model.safetensors"))
    set_config(model_dir, vocab_size=rows)
    with pytest.raises(CheckpointError) as info:
        CrossEncoder(model_dir)
    assert str(info.value) == (
        f"{os.path.join(model_dir, 'tokenizer.json')}: the tokenizer's ids go up to {rows + 9}, past the "
        f"model's embedding table (vocab_size {rows} in config.json)"
    )


@pytest.mark.parametrize("family, minimum, max_length", [("bert", 5, 1), ("bert", 5, 4), ("roberta", 6, 5)])
def test_max_length_below_one_pair(family_dirs, family, minimum, max_length):
    with pytest.raises(ValueError) as info:
        CrossEncoder(family_dirs[family], max_length=max_length)
    assert str(info.value) == (
        f"max_length={max_length} is too short for a pair: the tokenizer adds {minimum - 2} special "
        f"tokens, so the minimum is {minimum} (one token of each text)"
    )


def test_minimum_max_length_scores_like_the_reference(bert_dir):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    pairs = sample_pairs(6)
    ours = CrossEncoder(bert_dir, max_length=5).predict(pairs)
    reference = STCrossEncoder(bert_dir, device="cpu", max_length=5).predict(pairs, show_progress_bar=False)
    assert np.abs(ours - reference).max() <= PARITY


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-legacy", "sharded-bin", "sharded-safetensors"])
def test_inventory_matches_the_tensors(bert_dir, tmp_path, fmt):
    model_dir = bert_dir if fmt == "safetensors" else resave_as(bert_dir, str(tmp_path / fmt), fmt)
    path = next(
        os.path.join(model_dir, name)
        for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")
        if os.path.isfile(os.path.join(model_dir, name))
    )  # fmt: skip
    inventory, tensors = read_inventory(path), read_weights(path)
    assert {name: (info.shape, info.dtype) for name, info in inventory.items()} == {
        name: (array.shape, array.dtype) for name, array in tensors.items()
    }


def test_truncated_legacy_pickle_is_caught_by_the_inventory(bert_dir, tmp_path):
    path = os.path.join(resave_as(bert_dir, str(tmp_path / "legacy"), "bin-legacy"), "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=r"file is truncated: its storages need \d+ bytes"):
        read_inventory(path)


def test_tensor_named_twice_in_a_safetensors_header(bert_dir, tmp_path):
    model_dir = linked_copy(bert_dir, str(tmp_path / "model"), skip=("model.safetensors",))
    with open(os.path.join(bert_dir, "model.safetensors"), "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = "classifier.bias"
    text = json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    text += " " * (-len(text) % 8)
    path = os.path.join(model_dir, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text.encode() + data[8 + length :])
    with pytest.raises(CheckpointError, match=rf"{path}: the header lists '{name}' more than once"):
        CrossEncoder(model_dir)
