"""The CPU attention kernel: query blocks, masks and dropout agree with plain softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from support import TOLERANCE
from test_deberta import case_models, padded_batch

from flax_ce.models import attention


def reference_attention(q, k, v, key_mask, probs_scale=None):
    """softmax(q k^T / sqrt(d)) v in numpy (float64), masked scores replaced by -inf-like; [b, s, h, d]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(key_mask[:, None, None, :], scores, np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if probs_scale is not None:
        probs = probs * probs_scale
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def random_qkv(batch=4, length=37, heads=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) for _ in range(3))
    lengths = np.array([length, 20, 1, 0])[:batch]  # the last row is all padding: uniform weights
    return q, k, v, np.arange(length)[None] < lengths[:, None]


@pytest.mark.parametrize("budget", [attention.SCORES_BUDGET, 1])
def test_blocks_match_softmax_attention(budget, monkeypatch):
    monkeypatch.setattr(attention, "SCORES_BUDGET", budget)  # 1: blocks of 16 queries, the last partial
    q, k, v, mask = random_qkv()
    bias = attention.mask_bias(jnp.asarray(mask))
    out = jax.jit(lambda *a: attention.self_attention(*a, q.shape[-1] ** -0.5))(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, mask), atol=2e-6)
    np.testing.assert_allclose(np.asarray(out)[3], np.broadcast_to(v[3].mean(0), v[3].shape), atol=2e-6)


def test_dropout_drops_probabilities():
    q, k, v, mask = random_qkv()
    bias = attention.mask_bias(jnp.asarray(mask))
    drop = nnx.Dropout(0.5, deterministic=False, rngs=nnx.Rngs(dropout=3))
    out = attention.self_attention(q, k, v, bias, q.shape[-1] ** -0.5, drop)
    # The same stream drawn again on ones gives the kept mask / keep probability, in [b, h, q, k].
    kept = nnx.Dropout(0.5, deterministic=False, rngs=nnx.Rngs(dropout=3))(jnp.ones((4, 3, 37, 37)))
    expected = reference_attention(q, k, v, mask, np.asarray(kept))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    drop.deterministic = True
    plain = attention.self_attention(q, k, v, bias, q.shape[-1] ** -0.5, drop)
    np.testing.assert_allclose(np.asarray(plain), reference_attention(q, k, v, mask), atol=2e-6)


def test_relative_offsets_read_a_toeplitz_index():
    index = np.add.outer(np.arange(5), -np.arange(5)) * 3 + 7  # any function of i - j
    offsets = attention.relative_offsets(index)
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(offsets[i - j + 4], index)


@pytest.mark.parametrize(
    "case, length",
    [("v3", 100), ("v1", 30), ("v2-c2p-only", 33), ("v2-p2c-only", 33), ("v2-separate-keys-conv-proj", 20)],
)
def test_deberta_query_blocks_match_transformers(case, length, monkeypatch):
    monkeypatch.setattr(attention, "SCORES_BUDGET", 1)  # blocks of 16 queries, the last partial
    model, module = case_models(case)
    ids, mask, types = padded_batch(length, model.config.vocab_size, model.config.type_vocab_size)
    graphdef, state = nnx.split(module)
    last = jax.jit(lambda s, *a: nnx.merge(graphdef, s).encode(*a)[-1])(state, ids, mask, types)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
            output_hidden_states=True,
        )
    assert np.abs(np.asarray(last) - out.hidden_states[-1].numpy()).max() <= TOLERANCE
