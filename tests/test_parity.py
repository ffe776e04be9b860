"""Scores equal transformers' logits and sentence-transformers' predict/rank, for every weight format."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from checkpoints import resave_as, sample_pairs
from support import TOLERANCE

from flax_ce import CrossEncoder

PAIRS = sample_pairs(23)


@functools.cache
def reference(model_dir: str, max_length: int | None = None):
    """(transformers logits [N, C], sentence-transformers predict) for PAIRS, computed once per model."""
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    st = STCrossEncoder(model_dir, device="cpu", max_length=max_length)
    st_scores = st.predict(PAIRS, batch_size=8)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = tokenizer(
        [a for a, _ in PAIRS],
        [b for _, b in PAIRS],
        padding=True,
        truncation="longest_first",
        max_length=max_length or st.max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**encoded).logits.numpy()
    return logits, st_scores


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
@pytest.mark.parametrize(
    "fmt", ["safetensors", "bin", "bin-legacy", "sharded-bin", "sharded-safetensors", "gamma-beta"]
)
def test_parity_every_format(family, fmt, family_dirs, tmp_path):
    source = family_dirs[family]
    model_dir = source if fmt == "safetensors" else resave_as(source, str(tmp_path / fmt), fmt)
    logits, st_scores = reference(source)
    ce = CrossEncoder(model_dir)
    ours_logits = ce.logits(PAIRS, batch_size=5)
    assert np.abs(ours_logits - logits).max() <= TOLERANCE
    ours = ce.predict(PAIRS, batch_size=5)
    assert ours.shape == st_scores.shape
    assert np.abs(ours - st_scores).max() <= TOLERANCE


def test_real_minilm_weights(minilm_dir):
    logits, st_scores = reference(minilm_dir)
    ce = CrossEncoder(minilm_dir)
    scores = ce.predict(PAIRS, batch_size=6)
    assert np.abs(ce.logits(PAIRS)[:, 0] - logits[:, 0]).max() <= TOLERANCE
    assert np.abs(scores - st_scores).max() <= TOLERANCE
    assert scores.std() > 1e-3  # the real encoder separates the pairs


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_truncation_matches(family, family_dirs):
    logits, st_scores = reference(family_dirs[family], max_length=24)
    ce = CrossEncoder(family_dirs[family], max_length=24)
    assert ce.max_length == 24
    assert np.abs(ce.predict(PAIRS, batch_size=4) - st_scores).max() <= TOLERANCE
    assert np.abs(ce.logits(PAIRS, batch_size=32) - logits).max() <= TOLERANCE


def test_rank_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    query = "How do I sort a list in Python?"
    documents = [b for _, b in sample_pairs(15, seed=3)]
    ours = CrossEncoder(minilm_dir).rank(query, documents, return_documents=True, batch_size=4)
    theirs = STCrossEncoder(minilm_dir, device="cpu").rank(
        query, documents, return_documents=True, batch_size=4
    )
    assert [r["corpus_id"] for r in ours] == [r["corpus_id"] for r in theirs]
    assert np.allclose([r["score"] for r in ours], [r["score"] for r in theirs], atol=TOLERANCE)
    assert [r["text"] for r in ours] == [documents[r["corpus_id"]] for r in ours]
    top = CrossEncoder(minilm_dir).rank(query, documents, top_k=3)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ours[:3]]


def test_nli_softmax_and_labels(roberta_dir):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ce = CrossEncoder(roberta_dir)
    assert ce.num_labels == 3
    assert ce.config.id2label == {0: "contradiction", 1: "entailment", 2: "neutral"}
    ours = ce.predict(PAIRS, apply_softmax=True)
    theirs = STCrossEncoder(roberta_dir, device="cpu").predict(PAIRS, apply_softmax=True)
    assert ours.shape == (len(PAIRS), 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    assert np.allclose(ours.sum(axis=1), 1.0, atol=1e-5)


def test_single_pair_and_empty(bert_dir):
    ce = CrossEncoder(bert_dir)
    batch = ce.predict(PAIRS[:4])
    single = ce.predict(PAIRS[2])
    assert np.ndim(single) == 0 and abs(float(single) - batch[2]) <= 1e-5
    assert ce.predict(list(PAIRS[2])).shape == ()
    assert ce.predict([]).shape == (0,)
    assert ce.predict(np.array([list(p) for p in PAIRS[:4]])).shape == (4,)
    assert isinstance(ce.predict(PAIRS[:2], convert_to_numpy=False), list)


def test_batch_size_and_order_do_not_change_scores(bert_dir):
    ce = CrossEncoder(bert_dir)
    base = ce.predict(PAIRS, batch_size=32)
    for batch_size in (1, 3, 7, 100):
        assert np.abs(ce.predict(PAIRS, batch_size=batch_size) - base).max() <= 1e-5
    permutation = np.random.RandomState(0).permutation(len(PAIRS))
    shuffled = ce.predict([PAIRS[i] for i in permutation])
    assert np.abs(shuffled - base[permutation]).max() <= 1e-5
