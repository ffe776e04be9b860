"""ModernBERT cross-encoders (gte-reranker-modernbert, Ettin): rotary pre-norm encoder with local attention."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ce.activations import HIDDEN_ACTIVATIONS
from flax_ce.config import ConfigReader, LabelsMixin, read_labels
from flax_ce.conversion.rules import KeyTable, Kind, Rule
from flax_ce.models.attention import mask_bias, self_attention
from flax_ce.models.family import Family
from flax_ce.models.layers import dense, dropout, embedding, split_heads
from flax_ce.models.packing import Packing, first_tokens, pair_means, same_pair

LAYER_TYPES = ("full_attention", "sliding_attention")
POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(LabelsMixin):
    """Everything the ModernBERT forward pass depends on; built by `config_from_dict`."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    global_layers: tuple[bool, ...]  # per layer: full attention (True) or the sliding window (False)
    local_attention: int = 128  # the whole window: a token sees local_attention // 2 tokens either side
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    max_position_embeddings: int = 8192
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    classifier_pooling: str = "cls"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    classifier_dropout: float = 0.0
    pad_token_id: int = 50283
    num_labels: int = 1
    labels: tuple[str, ...] = ("LABEL_0",)
    model_type: str = "modernbert"
    type_vocab_size: int = 0  # no token types: the tokenizer's type ids are ignored

    @property
    def position_limit(self) -> None:
        """None: rotary positions have no table to run off (max_position_embeddings is what it was trained on)."""
        return None


def _layer_types(r: ConfigReader, num_layers: int | None) -> tuple[bool, ...]:
    """Per layer, whether it attends globally: `layer_types` (transformers 5), else every
    `global_attn_every_n_layers`-th layer from layer 0 (the form the published checkpoints carry)."""
    if not isinstance(num_layers, int):
        return ()  # num_hidden_layers is missing or bad: already a recorded problem
    layer_types = r.get("layer_types", None, list)
    if layer_types is not None:
        r.require(
            len(layer_types) == num_layers and set(layer_types) <= set(LAYER_TYPES),
            f"layer_types must list {num_layers} entries from {LAYER_TYPES}, got {layer_types!r}",
        )
        return tuple(t == "full_attention" for t in layer_types)
    every = r.get("global_attn_every_n_layers", 3, int)
    r.require(every is not None and every >= 1, f"global_attn_every_n_layers must be >= 1, got {every!r}")
    return tuple(i % max(every or 1, 1) == 0 for i in range(num_layers))


def _rope_thetas(r: ConfigReader) -> tuple[float, float]:
    """(global, local) rotary theta: `rope_parameters` (transformers 5) wins over the older
    `global_rope_theta` / `local_rope_theta`, as in transformers; only the default rope type is implemented."""
    r.require(
        r.raw.get("rope_scaling") is None, f"rope_scaling={r.raw.get('rope_scaling')!r} is not supported"
    )
    thetas = [r.get("global_rope_theta", 160_000.0, float), r.get("local_rope_theta", 10_000.0, float)]
    parameters = r.get("rope_parameters", None, dict) or {}
    for i, layer_type in enumerate(LAYER_TYPES):
        entry = parameters.get(layer_type) or {}
        if not isinstance(entry, Mapping):
            r.require(False, f"rope_parameters[{layer_type!r}] must be an object, got {entry!r}")
            continue
        rope_type = entry.get("rope_type", "default")
        r.require(
            rope_type == "default",
            f"rope_parameters[{layer_type!r}] rope_type={rope_type!r} is not supported",
        )
        theta = entry.get("rope_theta", thetas[i])
        r.require(isinstance(theta, (int, float)) and theta > 0, f"rope_theta must be > 0, got {theta!r}")
        thetas[i] = float(theta)
    return thetas[0], thetas[1]


def config_from_dict(raw: Mapping[str, Any], source: str = "config.json") -> ModernBertConfig:
    """Validate a ModernBERT config.json dict; one ConfigError lists every unsupported setting."""
    r = ConfigReader(raw, source)
    r.model_type(("modernbert",))
    hidden, heads = r.width_and_heads()
    head_dim = r.get("head_dim", None, int)
    r.require(
        head_dim in (None, (hidden or 0) // (heads or 1)), f"head_dim={head_dim} != hidden_size / heads"
    )
    r.check_problem_type()
    num_labels, labels = read_labels(r)
    num_layers = r.get("num_hidden_layers", kind=int)
    global_theta, local_theta = _rope_thetas(r)
    pooling = r.get("classifier_pooling", "cls", str)
    r.require(pooling in POOLINGS, f"classifier_pooling={pooling!r} is not supported (only {POOLINGS})")
    window = r.get("local_attention", 128, int)
    r.require(window is not None and window >= 0, f"local_attention must be >= 0, got {window!r}")
    config = ModernBertConfig(
        vocab_size=r.get("vocab_size", kind=int),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=r.get("intermediate_size", kind=int),
        global_layers=_layer_types(r, num_layers),
        local_attention=window,
        global_rope_theta=global_theta,
        local_rope_theta=local_theta,
        max_position_embeddings=r.get("max_position_embeddings", 8192, int),
        hidden_activation=r.activation("hidden_activation", "gelu"),
        classifier_activation=r.activation("classifier_activation", "gelu"),
        classifier_pooling=pooling,
        norm_eps=r.get("norm_eps", 1e-5, float),
        norm_bias=r.get("norm_bias", False, bool),
        attention_bias=r.get("attention_bias", False, bool),
        mlp_bias=r.get("mlp_bias", False, bool),
        classifier_bias=r.get("classifier_bias", False, bool),
        embedding_dropout=r.get("embedding_dropout", 0.0, float),
        attention_dropout=r.get("attention_dropout", 0.0, float),
        mlp_dropout=r.get("mlp_dropout", 0.0, float),
        classifier_dropout=r.get("classifier_dropout", 0.0, float),
        pad_token_id=r.get("pad_token_id", 50283, int),
        num_labels=num_labels,
        labels=labels,
    )
    r.finish()
    return config


def norm(features: int, config: ModernBertConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with the config's eps, a bias only if `norm_bias`, exact variance, computed in fp32."""
    return nnx.LayerNorm(
        features,
        epsilon=config.norm_eps,
        use_bias=config.norm_bias,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [length, head_dim] for positions 0..length-1, in fp32 step by step as transformers
    computes them (its angles are fp32 products, so a float64 table would differ from it at long inputs)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponents, dtype=np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of x [batch, seq, heads, d] in fp32: x * cos + rotate_half(x) * sin, with cos and
    sin [seq, d] (or [batch, seq, d], each token's own position in packed rows)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def attention_bias(
    key_mask: jax.Array, window: int | None, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Additive fp32 bias [batch, 1, 1 or seq, seq]: real keys (of the query's own pair in packed rows),
    within `window // 2` positions of the query when windowed. Within a pair, positions differ as row
    indices do."""
    if window is None and segment_ids is None:
        return mask_bias(key_mask)
    mask = key_mask[:, None, :] if segment_ids is None else same_pair(segment_ids)
    if window is None:
        return mask_bias(mask)
    positions = jnp.arange(key_mask.shape[1])
    band = jnp.abs(positions[:, None] - positions[None, :]) <= window // 2
    return mask_bias(mask & band[None])


def banded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    half: int,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Attention within `half` positions either side, at the window's cost: q, k, v [batch, seq, heads, d];
    in packed rows (`segment_ids` [batch, seq]) only to keys of the query's own pair.

    Queries go in blocks of `half`; block i sees key blocks i-1, i, i+1 (3 * half keys), which hold every
    key within reach, and the band mask removes the rest. Softmax over the same keys as the full masked
    square, so real tokens get the same result; only fully masked (padding) rows spread differently.
    """
    batch, length, heads, dim = q.shape
    blocks = -(-length // half)
    padded = blocks * half

    def pad(x, before, after):
        return jnp.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))

    def neighbours(x):
        # [batch, padded + 2 * half, ...] -> [batch, blocks, 3 * half, ...]: blocks i-1, i, i+1 side by side.
        x = x.reshape(batch, blocks + 2, half, *x.shape[2:])
        return jnp.concatenate([x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=2)

    tail = padded - length
    keys, values = (neighbours(pad(t, half, tail + half)) for t in (k, v))
    real = neighbours(pad(key_mask, half, tail + half))  # [batch, blocks, 3 * half]
    query_pos = np.arange(padded).reshape(blocks, half)
    key_pos = np.stack([np.arange(i * half - half, i * half + 2 * half) for i in range(blocks)])
    band = np.abs(query_pos[:, :, None] - key_pos[:, None, :]) <= half  # [blocks, half, 3 * half]
    mask = real[:, :, None, :] & band[None]
    if segment_ids is not None:
        key_segments = neighbours(pad(segment_ids, half, tail + half))
        query_segments = pad(segment_ids, 0, tail).reshape(batch, blocks, half)
        mask = mask & (query_segments[..., None] == key_segments[:, :, None, :])
    fold = batch * blocks
    context = self_attention(
        pad(q, 0, tail).reshape(fold, half, heads, dim),
        keys.reshape(fold, 3 * half, heads, dim),
        values.reshape(fold, 3 * half, heads, dim),
        mask_bias(mask.reshape(fold, half, 3 * half)),
        scale,
    )
    return context.reshape(batch, padded, heads, dim)[:, :length]


class Attention(nnx.Module):
    """Packed-QKV attention with rotary q/k; full, or within the sliding window on local layers."""

    def __init__(self, config: ModernBertConfig, is_global: bool, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.window = None if is_global else config.local_attention
        self.theta = config.global_rope_theta if is_global else config.local_rope_theta
        self.Wqkv = dense(hidden, 3 * hidden, rngs=rngs, dtype=dtype, use_bias=config.attention_bias)
        self.Wo = dense(hidden, hidden, rngs=rngs, dtype=dtype, use_bias=config.attention_bias)
        self.attention_dropout = dropout(config.attention_dropout, rngs=rngs)
        self.out_dropout = dropout(config.attention_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array, packing: Packing | None = None) -> jax.Array:
        """x [batch, seq, hidden], key_mask [batch, seq] bool -> [batch, seq, hidden]."""
        batch, length, hidden = x.shape
        # Wqkv's output is [3, heads, head_dim] on the last axis (q, k, v outermost).
        q, k, v = jnp.moveaxis(self.Wqkv(x).reshape(batch, length, 3, hidden), 2, 0)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        cos, sin = (jnp.asarray(t) for t in rotary_tables(length, q.shape[-1], self.theta))
        segment_ids = None
        if packing is not None:
            # Rotary positions restart at every pair. Scores depend on i - j only, so this changes them by
            # rounding alone, but it gives each pair the very tables (and rounding) it gets unpacked.
            cos, sin, segment_ids = cos[packing.positions], sin[packing.positions], packing.segment_ids
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scale = 1.0 / float(np.sqrt(q.shape[-1]))
        training = self.attention_dropout.rate > 0 and not self.attention_dropout.deterministic
        if not training and self.window is not None and self.window // 2 >= 1 and length > 4 * self.window:
            # Several windows long: the band costs what the window costs; shorter, the full square is cheaper.
            context = banded_attention(q, k, v, key_mask, self.window // 2, scale, segment_ids)
        else:
            bias = attention_bias(key_mask, self.window, segment_ids)
            context = self_attention(q, k, v, bias, scale, dropout=self.attention_dropout)
        return self.out_dropout(self.Wo(context.reshape(batch, length, hidden)))


class GatedFeedForward(nnx.Module):
    """GeGLU: `Wo(act(input) * gate)` with `Wi(x)` split into input and gate, in that order."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.Wi = dense(hidden, 2 * inner, rngs=rngs, dtype=dtype, use_bias=config.mlp_bias)
        self.Wo = dense(inner, hidden, rngs=rngs, dtype=dtype, use_bias=config.mlp_bias)
        self.act = HIDDEN_ACTIVATIONS[config.hidden_activation]
        self.dropout = dropout(config.mlp_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.Wi(x), 2, axis=-1)
        return self.Wo(self.dropout(self.act(value) * gate))


class EncoderLayer(nnx.Module):
    """Pre-norm layer: `x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`; layer 0 has no attn_norm."""

    def __init__(self, config: ModernBertConfig, index: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = config.hidden_size
        # Layer 0 reads the embeddings, which are already normalised.
        self.attn_norm = norm(hidden, config, rngs=rngs) if index > 0 else None
        self.attn = Attention(config, config.global_layers[index], rngs=rngs, dtype=dtype)
        self.mlp_norm = norm(hidden, config, rngs=rngs)
        self.mlp = GatedFeedForward(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array, packing: Packing | None = None) -> jax.Array:
        normed = self.attn_norm(x).astype(x.dtype) if self.attn_norm is not None else x
        x = x + self.attn(normed, key_mask, packing)
        return x + self.mlp(self.mlp_norm(x).astype(x.dtype))


class Embeddings(nnx.Module):
    """Token embeddings, norm, dropout: no position or token-type tables (positions are rotary)."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.tok_embeddings = embedding(config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype)
        self.norm = norm(config.hidden_size, config, rngs=rngs)
        self.dropout = dropout(config.embedding_dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = self.tok_embeddings(input_ids)
        return self.dropout(self.norm(x.astype(jnp.float32)).astype(x.dtype))


class Head(nnx.Module):
    """Pooling (CLS or masked mean), `norm(act(dense(.)))`, dropout, classifier -> fp32 logits."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = config.hidden_size
        self.pooling = config.classifier_pooling
        self.dense = dense(hidden, hidden, rngs=rngs, dtype=dtype, use_bias=config.classifier_bias)
        self.act = HIDDEN_ACTIVATIONS[config.classifier_activation]
        self.norm = norm(hidden, config, rngs=rngs)
        self.dropout = dropout(config.classifier_dropout, rngs=rngs)
        self.classifier = dense(hidden, config.num_labels, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        hidden_states: jax.Array,
        attention_mask: jax.Array | None = None,
        packing: Packing | None = None,
    ) -> jax.Array:
        """[batch, seq, hidden] (after the final norm), mask [batch, seq] -> logits [batch, num_labels];
        packed rows pool each pair's own tokens: logits [batch, slots, num_labels]."""
        if self.pooling == "cls":
            pooled = hidden_states[:, 0] if packing is None else first_tokens(hidden_states, packing.starts)
        elif packing is not None:
            slots = packing.starts.shape[1]
            pooled = pair_means(hidden_states, packing.segment_ids, slots).astype(hidden_states.dtype)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones(hidden_states.shape[:2], jnp.int32)
            real = attention_mask.astype(bool)[..., None]
            # where, not a product: padded rows may hold anything, and they must not reach the sum.
            total = jnp.where(real, hidden_states.astype(jnp.float32), 0.0).sum(axis=1)
            pooled = (total / real.sum(axis=1)).astype(hidden_states.dtype)
        x = self.norm(self.act(self.dense(pooled))).astype(pooled.dtype)
        return self.classifier(self.dropout(x)).astype(jnp.float32)


class ModernBertCrossEncoder(nnx.Module):
    """Embeddings, pre-norm layers, final norm, pooled prediction head; returns fp32 logits."""

    def __init__(self, config: ModernBertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [EncoderLayer(config, i, rngs=rngs, dtype=dtype) for i in range(config.num_hidden_layers)]
        )
        self.final_norm = norm(config.hidden_size, config, rngs=rngs)
        self.head = Head(config, rngs=rngs, dtype=dtype)

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        packing: Packing | None = None,
    ) -> list[jax.Array]:
        """Hidden states after the embeddings and after each layer, the last one after the final norm (as
        transformers reports them), each [batch, seq, hidden]. Token types are ignored."""
        key_mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.layers:
            x = layer(x, key_mask, packing)
            states.append(x)
        states[-1] = self.final_norm(x).astype(x.dtype)
        return states

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        packing: Packing | None = None,
    ) -> jax.Array:
        """input_ids, attention_mask [batch, seq] int -> logits [batch, num_labels]; packed rows give
        logits [batch, slots, num_labels]."""
        return self.head(self.encode(input_ids, attention_mask, packing=packing)[-1], attention_mask, packing)


LAYER = "layers.{layer}"
MODERNBERT = Family(
    "modernbert",
    config_from_dict,
    ModernBertCrossEncoder,
    KeyTable(
        prefix="model.",
        encoder=(
            Rule("embeddings.tok_embeddings", "embeddings.tok_embeddings", Kind.EMBED),
            Rule("embeddings.norm", "embeddings.norm", Kind.NORM),
            Rule(
                f"{LAYER}.{{norm}}", "layers.{layer}.{norm}", Kind.NORM, {"norm": ("attn_norm", "mlp_norm")}
            ),
            Rule(
                f"{LAYER}.attn.{{proj}}", "layers.{layer}.attn.{proj}", Kind.LINEAR, {"proj": ("Wqkv", "Wo")}
            ),
            Rule(f"{LAYER}.mlp.{{proj}}", "layers.{layer}.mlp.{proj}", Kind.LINEAR, {"proj": ("Wi", "Wo")}),
            Rule("final_norm", "final_norm", Kind.NORM),
        ),
        head=(
            Rule("head.dense", "head.dense", Kind.LINEAR),
            Rule("head.norm", "head.norm", Kind.NORM),
            Rule("classifier", "head.classifier", Kind.LINEAR),
        ),
        # ModernBertForMaskedLM's decoder (tied to the embeddings) when an MLM checkpoint gets a fresh head.
        ignore=(r"decoder\..*",),
    ),
    "ModernBertForSequenceClassification",
)
