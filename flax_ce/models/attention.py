"""Softmax attention written for XLA CPU: heads-major matmuls, normalisation after PV, query blocks.

On CPU, `jax.nn.dot_product_attention` (and a plain einsum + softmax) cost 4-6x torch's fused attention
at MiniLM shapes (../shared/notes/performance.md). What closes the gap:
- both matmuls on [batch, heads, seq, dim] operands, so each is a plain batched GEMM;
- masking as an additive bias (0 or the most negative float) built once from the mask;
- the row maximum subtracted and exp taken, the unnormalised weights multiplied by V, and only the
  [.., seq, dim] result divided by the row sums (seq / dim times fewer divisions);
- queries in blocks, so that a block's scores stay in cache instead of round-tripping through memory.
DeBERTa's relative terms depend on i - j only, so a block of rows needs one matmul against the
block + seq - 1 relative rows it can see and a skew (slice + reshape), not a gather over [b, h, q, k].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Elements of one block's scores [batch, heads, block, keys]; 2**22 (16 MiB of fp32) gives blocks of
# 64 queries at the engine's 4096-token batches, the fastest of 32-512 at [32, 128] and [8, 512].
SCORES_BUDGET = 2**22


def mask_bias(mask: jax.Array) -> jax.Array:
    """Additive fp32 bias from a bool mask: 0 where attended, the most negative float elsewhere.

    A key mask [batch, seq] becomes [batch, 1, 1, seq]; a pair mask [batch, seq, seq] becomes
    [batch, 1, seq, seq]. A finite score plus the most negative float rounds to it, so a fully masked
    query row is uniform, as in the references that replace masked scores by it.
    """
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return bias[:, None, None, :] if mask.ndim == 2 else bias[:, None]


def query_block(batch: int, heads: int, queries: int, keys: int) -> int:
    """Queries per block: all if their scores fit SCORES_BUDGET, else the largest power of two that fits.

    Only on CPU: accelerators keep one block (their compilers tile attention themselves).
    """
    block = queries
    if jax.default_backend() != "cpu":
        return block
    while block > 16 and batch * heads * block * keys > SCORES_BUDGET:
        block = 1 << (block - 1).bit_length() - 1
    return block


def _weighted_values(scores: jax.Array, v: jax.Array, dropout: nnx.Dropout | None) -> jax.Array:
    """softmax(scores) @ v, dividing by the row sums after the matmul; scores fp32 [b, h, q, k]."""
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    row_sums = jnp.sum(weights, axis=-1, keepdims=True)
    if dropout is not None:
        # Dropout scales single weights, so dropping before the division equals dropping probabilities.
        weights = dropout(weights)
    context = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (context / row_sums).astype(v.dtype)


ScoresFn = Callable[[jax.Array, int, int], jax.Array]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    *,
    extra_scores: ScoresFn | None = None,
    dropout: nnx.Dropout | None = None,
    block: int | None = None,
) -> jax.Array:
    """Softmax attention on heads-major q, k, v [batch, heads, seq, dim] (q already scaled) -> [b, h, q, dim].

    bias: additive fp32 [batch, 1, 1 or q, k]. `extra_scores(scores, start, size)` returns a block of
    scores [b, h, size, k] (queries start..start+size) with extra terms added (DeBERTa's positions).
    With active dropout the queries stay in one block, so the dropout mask has the probabilities' shape.
    """
    if dropout is not None and (dropout.deterministic or dropout.rate == 0):
        dropout = None
    length = q.shape[2]
    if block is None:
        block = length if dropout is not None else query_block(q.shape[0], q.shape[1], length, k.shape[2])
    outputs = []
    for start in range(0, length, block):
        size = min(block, length - start)
        scores = jnp.matmul(
            q[:, :, start : start + size], jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32
        )
        if extra_scores is not None:
            scores = extra_scores(scores, start, size)
        row_bias = bias if bias.shape[2] == 1 else bias[:, :, start : start + size]
        outputs.append(_weighted_values(scores + row_bias, v, dropout))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    scale: float,
    dropout: nnx.Dropout | None = None,
) -> jax.Array:
    """Scaled softmax attention in the model layout: q, k, v [batch, seq, heads, dim] -> same layout.

    Off CPU, inference keeps `jax.nn.dot_product_attention`, which can pick a fused accelerator kernel.
    """
    if jax.default_backend() != "cpu" and (dropout is None or dropout.deterministic or dropout.rate == 0):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    return jnp.swapaxes(attend(q, k, v, bias, dropout=dropout), 1, 2)


def relative_offsets(index: np.ndarray) -> np.ndarray:
    """[2 * seq - 1] table rows by offset t = i - j + seq - 1, from a Toeplitz index [seq, seq] (i - j only)."""
    return np.concatenate([index[0, ::-1], index[1:, 0]])


def _skew(x: jax.Array, rows: int, cols: int, first: int) -> jax.Array:
    """out[..., r, c] = x[..., r, first - r + c] for x [..., rows, width]: one slice of the flat array.

    Row r of x starts at r * width in the flat array, so the element sits at first + r * (width - 1) + c.
    """
    width = x.shape[-1]
    flat = x.reshape(*x.shape[:-2], rows * width)[..., first : first + rows * (width - 1)]
    return flat.reshape(*x.shape[:-2], rows, width - 1)[..., :cols]


def _toeplitz_block(x: jax.Array, table: jax.Array, start: int, size: int) -> jax.Array:
    """out[..., u, j] = x[..., start + u, :] . table_t with t = start + u - j, for every j < seq.

    x [batch, heads, seq, dim]; table [heads, 2 * seq, dim] holds the rows by decreasing t
    (seq - 1 down to -seq; the last is never read, it keeps a one-row block wider than seq).
    Column m of the block's product is t = start + size - 1 - m, so (u, j) is column size - 1 - u + j.
    """
    length = x.shape[2]
    rows = table[:, length - start - size : 2 * length - start]
    product = jnp.matmul(x[:, :, start : start + size], jnp.swapaxes(rows, -1, -2)[None])
    return _skew(product, size, length, size - 1)


def relative_scores(
    q: jax.Array,
    k: jax.Array,
    pos_key: jax.Array | None,
    pos_query: jax.Array | None,
    index: np.ndarray,
) -> ScoresFn:
    """`extra_scores` adding DeBERTa's c2p (q_i . pos_key[index[i, j]]) and p2c (k_j . pos_query[index[i, j]]).

    q, k [batch, heads, seq, dim] (heads-major, q scaled); pos_key / pos_query [rows, heads, dim] (the
    latter scaled) or None; index [seq, seq] static, a function of i - j only. c2p is computed per
    query block; p2c (keys against offsets) per key block, once, then read by the query blocks.
    """
    offsets = relative_offsets(index)  # offsets[t + seq - 1] = index[i, j] with i - j = t
    length = index.shape[0]

    def by_decreasing_offset(table: jax.Array, order: np.ndarray) -> jax.Array:
        return jnp.swapaxes(table[np.append(order, 0)], 0, 1)

    keys_table = None if pos_key is None else by_decreasing_offset(pos_key, offsets[::-1])
    p2c = None
    if pos_query is not None:
        # p2c transposed is c2p's form with k for q and the offsets mirrored (t -> -t).
        queries_table = by_decreasing_offset(pos_query, offsets)
        block = query_block(k.shape[0], k.shape[1], length, length)
        starts = range(0, length, block)
        blocks = [_toeplitz_block(k, queries_table, s, min(block, length - s)) for s in starts]
        p2c = jnp.swapaxes(jnp.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0], -1, -2)

    def add(scores: jax.Array, start: int, size: int) -> jax.Array:
        if keys_table is not None:
            scores = scores + _toeplitz_block(q, keys_table, start, size)
        if p2c is not None:
            scores = scores + p2c[:, :, start : start + size]
        return scores

    return add
