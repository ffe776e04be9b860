"""`flax-ce demo`: its docstring data set, held-out split, and a short offline run with a cached result."""

from __future__ import annotations

import json
import os

import pytest

from flax_ce import demo
from flax_ce.cli import main


def test_data_set_is_split_by_object():
    items = demo.docstring_items()
    assert len(items) > 300
    assert len({item.name for item in items}) == len({item.passage for item in items}) == len(items)
    train, held_out = demo.split_items(items, held_out=40)
    assert len(held_out) == 40 and len(train) == len(items) - 40
    pairs = demo.training_pairs(train, negatives=1)
    assert len(pairs) == 2 * len(train) and sum(label for *_, label in pairs) == len(train)
    unseen = {item.query for item in held_out} | {item.passage for item in held_out}
    assert not unseen & {text for a, b, _ in pairs for text in (a, b)}
    samples = demo.reranking_samples(held_out, candidates=10)
    held_out_passages = {item.passage for item in held_out}
    for sample, item in zip(samples, held_out, strict=True):
        assert sample["query"] == item.query and sample["positive"] == [item.passage]
        assert len(sample["negative"]) == 9 and item.passage not in sample["negative"]
        assert set(sample["negative"]) <= held_out_passages
    assert demo.split_items(items, 40) == (train, held_out)  # deterministic


def test_short_offline_run_trains_caches_and_reuses(bert_dir, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    # HF_HUB_OFFLINE=1 (conftest): the hub lookup fails at once and the embedded default is built.
    args = ["demo", "--steps", "3", "--held-out", "10", "--cache-dir", cache, "--encoder", bert_dir]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "not available" in out and "trained in" in out
    assert "untrained fresh head" in out and "fine-tuned:" in out
    assert {"config.json", "model.safetensors", "demo.json"} <= set(os.listdir(cache))
    record = json.load(open(os.path.join(cache, "demo.json")))
    assert record["settings"]["steps"] == 3 and 0 <= record["before"] <= 1 and 0 <= record["after"] <= 1

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "loaded from the cache" in out and f"{record['after']:.3f}" in out
    assert main([*args, "--retrain"]) == 0
    assert "trained in" in capsys.readouterr().out


@pytest.mark.slow
def test_embedded_default_encoder_runs(tmp_path, capsys):
    assert main(["demo", "--offline", "--steps", "2", "--held-out", "10", "--cache-dir", str(tmp_path)]) == 0
    assert "all-MiniLM-L6-v2" in capsys.readouterr().out
