"""Static shapes: one compilation per (batch, 32-token bucket) shape, none on reuse."""

from __future__ import annotations

from checkpoints import sample_pairs
from conftest import count_compiles

from flax_ce import CrossEncoder
from flax_ce.cross_encoder import bucket_length


def test_compiles_once_per_shape(bert_dir):
    pairs = sample_pairs(60, seed=5)
    ce = CrossEncoder(bert_dir, max_length=200)
    with count_compiles() as compiles:
        first = ce.predict(pairs, batch_size=8)
    shapes = set(ce.compiled_shapes)
    assert all(b == 8 and (length % 32 == 0 or length == 200) for b, length in shapes)
    assert 1 <= compiles[0] <= len(shapes)
    with count_compiles() as again:
        second = ce.predict(list(reversed(pairs)), batch_size=8)
    assert again[0] == 0
    assert (second[::-1] == first).all()


def test_bucket_length():
    assert bucket_length(1, 512) == 32
    assert bucket_length(32, 512) == 32
    assert bucket_length(33, 512) == 64
    assert bucket_length(500, 512) == 512
    assert bucket_length(100, 100) == 100
