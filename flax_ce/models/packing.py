"""Packed rows (several pairs in one row, no padding between them): what the model reads about them.

A packed row holds pairs side by side; each token carries its pair's segment id and its position within
the pair. Attention is block-diagonal (a token sees only its own pair's tokens), positions restart at
every pair, and the head reads each pair's own first token (or its own mean). Every family computes a
pair's logits from these exactly as from that pair alone in an unpadded row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Packing(NamedTuple):
    """Where the pairs of packed rows lie (int32 arrays; the engine builds them in flax_ce.packing).

    segment_ids [rows, seq]: slot + 1 of the pair each token belongs to, 0 for padding.
    positions [rows, seq]: each token's position within its pair (0 at the pair's first token).
    starts [rows, slots]: index of each slot's first token (0 for an empty slot, whose logits are dropped).
    """

    segment_ids: jax.Array
    positions: jax.Array
    starts: jax.Array


def same_pair(segment_ids: jax.Array) -> jax.Array:
    """[rows, seq, seq] bool: query i and key j are real tokens of the same pair (the attention mask)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)


def first_tokens(hidden_states: jax.Array, starts: jax.Array) -> jax.Array:
    """Each pair's first-token vector: [rows, seq, hidden], starts [rows, slots] -> [rows, slots, hidden]."""
    return jnp.take_along_axis(hidden_states, starts[..., None], axis=1)


def pair_means(hidden_states: jax.Array, segment_ids: jax.Array, slots: int) -> jax.Array:
    """Each pair's mean over its own tokens, fp32: [rows, seq, hidden] -> [rows, slots, hidden]."""
    members = segment_ids[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]  # [rows, slots, seq]
    # where, not a product: other pairs' and padded rows may hold anything, and must not reach the sum.
    totals = jnp.einsum(
        "rsl,rlh->rsh",
        members.astype(jnp.float32),
        jnp.where(segment_ids[..., None] > 0, hidden_states.astype(jnp.float32), 0.0),
        precision=jax.lax.Precision.HIGHEST,
    )
    counts = members.sum(axis=-1, keepdims=True)
    return totals / jnp.maximum(counts, 1)  # an empty slot's mean is 0, not NaN (its logits are dropped)
