"""Checks shared by the family tests: flax_ce against transformers and sentence-transformers on a checkpoint."""

from __future__ import annotations

import random

import numpy as np
from checkpoints import corpus
from support import TOLERANCE

from flax_ce import CrossEncoder


def long_range_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """Pairs from a few tokens to far over 600 (cut at the model's limit), empty texts included; few length
    buckets, so that batch size 1 compiles only a handful of programs."""
    rng = random.Random(seed)
    sentences = corpus()

    def text(k: int) -> str:
        return " ".join(rng.choice(sentences) for _ in range(k))

    short = [("a", "b"), ("", "short passage"), ("query", ""), (text(1), text(1))]
    return short + [(text(1), text(3)) for _ in range(2)] + [(text(1), text(150)) for _ in range(4)]


def transformers_logits(model_dir: str, pairs, max_length: int, batch_size: int = 8) -> np.ndarray:
    """Logits [N, C] of transformers' AutoModelForSequenceClassification, padded batches of `batch_size`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = tokenizer(
            [a for a, _ in chunk],
            [b for _, b in chunk],
            padding=True,
            truncation="longest_first",
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            out.append(model(**encoded).logits.numpy())
    return np.concatenate(out)


def assert_matches_references(model_dir: str, pairs, batch_sizes=(1, 7, 32), modular=False) -> CrossEncoder:
    """predict, logits and rank equal sentence-transformers' and transformers' within TOLERANCE (a
    `modular` model's logits: sentence-transformers' scores before the activation)."""
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ours = CrossEncoder(model_dir)
    theirs = STCrossEncoder(model_dir, device="cpu")
    assert ours.max_length == theirs.max_length
    lengths = [len(ids) for ids in ours.tokenize(pairs)["input_ids"]]
    assert min(lengths) <= 8 and max(lengths) > 600, lengths  # the range the tests promise
    if modular:
        logits = theirs.predict(pairs, batch_size=8, activation_fn=torch.nn.Identity()).reshape(
            len(pairs), -1
        )
    else:
        logits = transformers_logits(model_dir, pairs, ours.max_length)
    for batch_size in batch_sizes:
        st_scores = theirs.predict(pairs, batch_size=batch_size)
        assert np.abs(ours.predict(pairs, batch_size=batch_size) - st_scores).max() <= TOLERANCE
        assert np.abs(ours.logits(pairs, batch_size=batch_size) - logits).max() <= TOLERANCE
    if ours.num_labels == 1:
        query, documents = pairs[3][0], [b for _, b in pairs]
        ranked = ours.rank(query, documents, batch_size=batch_sizes[-1])
        expected = theirs.rank(query, documents, batch_size=batch_sizes[-1])
        # Compared by document, since saturated sigmoid scores may tie and tied documents may come in either order.
        expected_by_id = {r["corpus_id"]: r["score"] for r in expected}
        assert sorted(r["corpus_id"] for r in ranked) == sorted(expected_by_id)
        assert all(abs(r["score"] - expected_by_id[r["corpus_id"]]) <= TOLERANCE for r in ranked)
        assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:], strict=False))
    return ours
