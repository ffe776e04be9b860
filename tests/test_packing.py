"""Packed scoring (several pairs per row): the same scores as one pair per row, for every family."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from checkpoints import CASES, build_modernbert, build_xlm_roberta, sample_pairs, set_config
from flax import nnx
from reference_scores import long_range_pairs, transformers_logits
from support import TOLERANCE, count_compiles
from test_deberta import case_models

import flax_ce
from flax_ce import CrossEncoder
from flax_ce.engine import ScoringEngine
from flax_ce.packing import PackedBatch, packed_arrays, slots_for_length
from flax_ce.planning import Batch, padded_tokens, plan_batches, plan_packed, planned_shapes

# Short and long pairs, empty texts and a 3,000-character text that every max_length truncates.
PAIRS = sample_pairs(30, seed=4) + long_range_pairs(seed=1)


def assert_packing_changes_nothing(
    model_dir: str, max_length: int | None = None, batch_size: int | None = None
) -> None:
    """Packed logits equal unpacked ones (and with `batch_size`) and transformers', on rows of several pairs."""
    unpacked = CrossEncoder(model_dir, max_length=max_length, packing=False)
    packed = CrossEncoder(model_dir, max_length=max_length, packing=True)
    lengths = [len(ids) for ids in packed.tokenize(PAIRS)["input_ids"]]
    plan = plan_packed(lengths, packed.max_length)
    assert max((b.pairs >= 0).sum(axis=1).max() for b in plan) >= 2  # rows really hold several pairs
    assert max(lengths) == packed.max_length  # and some pairs are truncated
    ours, expected = packed.logits(PAIRS), unpacked.logits(PAIRS)
    assert np.abs(ours - expected).max() <= 1e-5
    if batch_size is not None:
        assert np.abs(packed.logits(PAIRS, batch_size=batch_size) - expected).max() <= 1e-5
    assert np.abs(ours - transformers_logits(model_dir, PAIRS, packed.max_length)).max() <= TOLERANCE


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_bert_family(family, family_dirs):
    assert_packing_changes_nothing(
        family_dirs[family], max_length=200, batch_size=3 if family == "bert" else None
    )


@pytest.fixture(scope="module")
def xlm_roberta_dir(tmp_path_factory):
    return build_xlm_roberta(str(tmp_path_factory.mktemp("xlm-roberta") / "model"), positions=258)


def test_xlm_roberta(xlm_roberta_dir):
    assert_packing_changes_nothing(xlm_roberta_dir)


@pytest.fixture(scope="module")
def modernbert_dirs(tmp_path_factory):
    """The same random ModernBERT weights with a CLS and a mean-pooling head."""
    root = tmp_path_factory.mktemp("modernbert")
    cls = build_modernbert(str(root / "cls"), pooling="cls", num_labels=3)
    mean = str(root / "mean")
    shutil.copytree(cls, mean)
    set_config(mean, classifier_pooling="mean")
    return {"cls": cls, "mean": mean}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert(pooling, modernbert_dirs):
    # The 16-token sliding window runs as a band in rows over 64 tokens, as a masked square in shorter ones.
    assert_packing_changes_nothing(modernbert_dirs[pooling], max_length=160)


def random_pairs(count: int, max_length: int, vocab: int, type_vocab: int, seed: int = 0):
    """Token ids and types of `count` pairs from 2 tokens to max_length (truncated ones among them)."""
    rng = np.random.RandomState(seed)
    lengths = [max_length, max_length, 2, 3] + list(rng.randint(2, max_length + 1, count - 4))
    ids = [list(rng.randint(5, vocab, n)) for n in lengths]
    types = [[0] * (n // 2) + [1 if type_vocab > 1 else 0] * (n - n // 2) for n in lengths]
    return ids, types


@pytest.mark.parametrize("case", list(CASES))
def test_deberta(case):
    reference, module = case_models(case)
    config = reference.config
    max_length = 64 if config.max_position_embeddings <= 64 else 160  # past 256 buckets' exact range (128)
    ids, types = random_pairs(21, max_length, config.vocab_size, config.type_vocab_size)

    def run(packing: bool) -> np.ndarray:
        engine = ScoringEngine(pad_id=0, max_length=max_length, packing=packing)
        return engine.run(module, ids, types, config.num_labels, token_budget=1024)

    expected = []
    for seq, seq_types in zip(ids, types, strict=True):  # each pair alone, unpadded, in transformers
        with torch.no_grad():
            out = reference(input_ids=torch.tensor([seq]), token_type_ids=torch.tensor([seq_types]))
        expected.append(out.logits.numpy()[0])
    packed = run(True)
    assert np.abs(packed - run(False)).max() <= 1e-5
    assert np.abs(packed - np.array(expected)).max() <= TOLERANCE


def test_plan_covers_every_input_once_in_planned_shapes():
    rng = np.random.RandomState(0)
    lengths = list(rng.randint(3, 300, size=500)) + [512] * 5
    for kwargs in ({}, {"batch_size": 7}, {"token_budget": 8192, "multiple": 4}):
        plan = plan_packed(lengths, 512, **kwargs)
        shapes = planned_shapes(512, **kwargs)
        seen = np.concatenate([b.pairs[b.pairs >= 0] for b in plan])
        assert sorted(seen) == list(range(len(lengths)))
        for batch in plan:
            assert (batch.rows, batch.length) in shapes
            assert batch.slots == slots_for_length(batch.length, kwargs.get("batch_size"))
            assert batch.rows % kwargs.get("multiple", 1) == 0
            for row in batch.pairs:
                assert sum(lengths[i] for i in row[row >= 0]) <= batch.length
            # A given batch_size keeps sentence-transformers' meaning: at most that many pairs per forward.
            assert (batch.pairs >= 0).sum() <= kwargs.get("batch_size", batch.pairs.size)
        if "batch_size" not in kwargs:  # few pairs a batch leave little to pack (packing=None then pads less)
            assert padded_tokens(plan) < padded_tokens(plan_batches(lengths, 512, **kwargs))


def test_packed_arrays_mark_each_pair():
    ids = [[2, 7, 3], [2, 8, 9, 3], [2, 5, 3, 6, 3]]
    batch = PackedBatch(np.array([[1, 0, -1], [2, -1, -1]]), 8)
    input_ids, mask, types, packing = packed_arrays(ids, [[0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1, 1]], batch, 0)
    np.testing.assert_array_equal(input_ids[0], [2, 8, 9, 3, 2, 7, 3, 0])
    np.testing.assert_array_equal(packing.segment_ids[0], [1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(packing.positions[0], [0, 1, 2, 3, 0, 1, 2, 0])
    np.testing.assert_array_equal(packing.starts, [[0, 4, 0], [0, 0, 0]])
    np.testing.assert_array_equal(types[0], [0, 0, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 1, 0, 0, 0])


def test_warmup_compiles_packed_and_unpacked_programs(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=64, token_budget=256, packing=None)
    assert ce.engine.packing is None  # BERT on CPU: each call packs if that pads less
    assert ce.warmup() == 2 * len(ce.planned_shapes()) == ce.engine.compile_count
    few_long = [("long " * 40, "passage " * 40)] * 3  # nothing to pack: the unpacked plan
    expected = CrossEncoder(bert_dir, max_length=64, packing=False)
    for pairs, kind in ((PAIRS, PackedBatch), (few_long, Batch)):
        lengths = [len(ids) for ids in ce.tokenize(pairs)["input_ids"]]
        assert all(isinstance(batch, kind) for batch in ce.engine.plan(lengths, None, ce.token_budget))
    with count_compiles() as compiles:
        scores, long_scores = ce.predict(PAIRS), ce.predict(few_long)
    assert compiles[0] == 0
    assert np.abs(scores - expected.predict(PAIRS)).max() <= 1e-5
    assert np.abs(long_scores - expected.predict(few_long)).max() <= 1e-5


def test_score_takes_packed_rows_inside_user_jit(bert_dir):
    model, tokenizer, _ = flax_ce.load(bert_dir)
    encoded = tokenizer([a for a, _ in PAIRS[:6]], [b for _, b in PAIRS[:6]], truncation=True, max_length=40)
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    expected = CrossEncoder(bert_dir, max_length=40, packing=False).logits(PAIRS[:6])
    scorer = nnx.jit(flax_ce.score)
    for batch in plan_packed([len(x) for x in ids], 128):
        input_ids, mask, token_types, packing = packed_arrays(ids, types, batch, tokenizer.pad_token_id)
        logits = scorer(model, input_ids, mask, token_types, packing)
        assert logits.shape == (batch.rows, batch.slots, 1)
        filled = batch.pairs >= 0
        assert np.abs(np.asarray(logits)[filled] - expected[batch.pairs[filled]]).max() <= 1e-5


SHARDED = """
import json, sys
import jax
from flax_ce import CrossEncoder
pairs = json.loads(sys.argv[2])
ce = CrossEncoder(sys.argv[1], devices=jax.devices()[:2], packing=True, max_length=128)
print(json.dumps({"scores": ce.predict(pairs).tolist(), "multiple": ce.engine.multiple}))
"""


def test_packed_rows_sharded_over_two_devices(bert_dir):
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", SHARDED, bert_dir, json.dumps(PAIRS)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected = CrossEncoder(bert_dir, max_length=128, packing=False).predict(PAIRS)
    assert out["multiple"] == 2
    assert np.abs(np.array(out["scores"]) - expected).max() <= 1e-5
