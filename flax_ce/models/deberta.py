"""DeBERTa (v1) and DeBERTa-v2/v3 cross-encoders: disentangled attention over relative positions."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_ce.activations import HIDDEN_ACTIVATIONS
from flax_ce.config import ConfigReader, LabelsMixin, read_labels
from flax_ce.conversion.rules import KeyTable, Kind, Rule
from flax_ce.models.attention import attend, mask_bias, relative_scores
from flax_ce.models.family import Family
from flax_ce.models.layers import (
    BLOCK_RULES,
    LAYER,
    ClassificationHead,
    FeedForward,
    ResidualOutput,
    dense,
    dropout,
    embedding,
    layer_norm,
    split_heads,
)
from flax_ce.models.packing import Packing, same_pair

MODEL_TYPES = ("deberta", "deberta-v2")
POS_ATT_TYPES = ("c2p", "p2c")
NORM_REL_EBD = ("none", "layer_norm")


@dataclasses.dataclass(frozen=True)
class DebertaConfig(LabelsMixin):
    """Everything the DeBERTa forward pass depends on; built by `config_from_dict`.

    `model_type` "deberta" is v1 (interleaved `in_proj`, sliced relative table); "deberta-v2" covers
    v2 and v3 (separate projections, optional log buckets, shared keys, conv layer).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    embedding_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    position_biased_input: bool = True
    relative_attention: bool = False
    max_relative_positions: int = -1
    pos_att_type: tuple[str, ...] = ()
    position_buckets: int = -1
    share_att_key: bool = False
    norm_rel_ebd: bool = False  # "layer_norm" in config.json's norm_rel_ebd
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    hidden_act: str = "gelu"
    pooler_hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None
    num_labels: int = 1
    labels: tuple[str, ...] = ("LABEL_0",)

    @property
    def is_v1(self) -> bool:
        return self.model_type == "deberta"

    @property
    def position_limit(self) -> int | None:
        """The longest sequence an absolute position table can index; None when there is none (v3)."""
        return self.max_position_embeddings if self.position_biased_input else None

    @property
    def relative_range(self) -> int:
        """The relative distance the table covers: `max_relative_positions`, or max_position_embeddings if < 1."""
        if self.max_relative_positions >= 1:
            return self.max_relative_positions
        return self.max_position_embeddings

    @property
    def relative_span(self) -> int:
        """Half the number of relative-embedding rows: buckets (v2 with buckets) or the relative range."""
        if not self.is_v1 and self.position_buckets > 0:
            return self.position_buckets
        return self.relative_range

    @property
    def score_scale_factor(self) -> int:
        """Scores are divided by sqrt(head_dim * this), even when relative attention is off."""
        return 1 + len(self.pos_att_type)


def _split_names(value: Any) -> list[str] | Any:
    # Old config.json files store "c2p|p2c"; transformers splits, strips and lower-cases them.
    if isinstance(value, str):
        return [part.strip() for part in value.lower().split("|")]
    return value


def config_from_dict(raw: Mapping[str, Any], source: str = "config.json") -> DebertaConfig:
    """Validate a DeBERTa / DeBERTa-v2 config.json dict; one ConfigError lists every unsupported setting."""
    r = ConfigReader(raw, source)
    model_type = r.model_type(MODEL_TYPES)
    is_v1 = model_type == "deberta"
    hidden, heads = r.width_and_heads()
    if hidden and heads and hidden % heads == 0:
        # v2 reads attention_head_size, but its output projection needs heads * head_size == hidden_size.
        head_size = raw.get("attention_head_size")
        r.require(
            is_v1 or head_size is None or head_size == hidden // heads,
            f"attention_head_size={head_size!r} is not supported (only hidden_size / num_attention_heads "
            f"= {hidden // heads})",
        )
    if is_v1:
        r.require(not raw.get("talking_head", False), "talking_head=true is not supported")

    relative = _relative_attention_fields(r, is_v1)
    conv = {} if is_v1 else _conv_fields(r, hidden)
    pooler_size = r.get("pooler_hidden_size", hidden, int)
    r.require(
        pooler_size == hidden,
        f"pooler_hidden_size={pooler_size} is not supported (the reference's classifier reads "
        f"hidden_size={hidden} features)",
    )
    r.check_problem_type()
    type_vocab = r.get("type_vocab_size", 0, int)
    r.require(type_vocab is None or type_vocab >= 0, f"type_vocab_size must be >= 0, got {type_vocab}")
    num_labels, labels = read_labels(r)
    config = DebertaConfig(
        model_type=model_type,
        vocab_size=r.get("vocab_size", kind=int),
        hidden_size=hidden,
        num_hidden_layers=r.get("num_hidden_layers", kind=int),
        num_attention_heads=heads,
        intermediate_size=r.get("intermediate_size", kind=int),
        max_position_embeddings=relative.pop("max_position_embeddings"),
        type_vocab_size=type_vocab,
        embedding_size=r.get("embedding_size", hidden, int),
        position_biased_input=r.get("position_biased_input", True, bool),
        share_att_key=False if is_v1 else r.get("share_att_key", False, bool),
        **relative,
        **conv,
        hidden_act=r.activation("hidden_act", "gelu"),
        pooler_hidden_act=r.activation("pooler_hidden_act", "gelu"),
        layer_norm_eps=r.get("layer_norm_eps", 1e-7, float),
        pad_token_id=r.get("pad_token_id", 0, int),
        hidden_dropout_prob=r.get("hidden_dropout_prob", 0.1, float),
        attention_probs_dropout_prob=r.get("attention_probs_dropout_prob", 0.1, float),
        pooler_dropout=r.get("pooler_dropout", 0.0, float),
        cls_dropout=r.get("cls_dropout", None, float),
        num_labels=num_labels,
        labels=labels,
    )
    r.finish()
    return config


def _relative_attention_fields(r: ConfigReader, is_v1: bool) -> dict[str, Any]:
    """pos_att_type, positions, relative range and buckets, norm_rel_ebd; v1 ignores the v2-only ones."""
    pos_att_type = _split_names(r.get("pos_att_type", None, (str, list)))
    pos_att_type = tuple(pos_att_type or ())
    unknown = [p for p in pos_att_type if p not in POS_ATT_TYPES]
    r.require(not unknown, f"pos_att_type entries {unknown!r} are not supported (only {POS_ATT_TYPES})")
    r.require(
        len(set(pos_att_type)) == len(pos_att_type), f"pos_att_type {list(pos_att_type)!r} repeats an entry"
    )
    max_positions = r.get("max_position_embeddings", 512, int)
    r.require(max_positions is None or max_positions >= 1, "max_position_embeddings must be >= 1")
    relative_attention = r.get("relative_attention", False, bool)
    max_relative = r.get("max_relative_positions", -1, int)
    buckets = -1 if is_v1 else r.get("position_buckets", -1, int)
    if relative_attention and buckets is not None and buckets > 0:
        relative_range = max_relative if max_relative and max_relative >= 1 else max_positions
        # The log buckets divide by log((range - 1) / (buckets // 2)); it must be positive.
        r.require(
            buckets >= 2 and relative_range is not None and relative_range - 1 > buckets // 2,
            f"position_buckets={buckets} needs buckets >= 2 and a relative range ({relative_range}) "
            f"larger than buckets // 2 + 1",
        )
    norm_rel_ebd = [] if is_v1 else _split_names(r.get("norm_rel_ebd", "none", str)) or []
    bad_norms = [n for n in norm_rel_ebd if n not in NORM_REL_EBD]
    r.require(not bad_norms, f"norm_rel_ebd entries {bad_norms!r} are not supported (only {NORM_REL_EBD})")
    return {
        "max_position_embeddings": max_positions,
        "relative_attention": relative_attention,
        "max_relative_positions": max_relative,
        "pos_att_type": pos_att_type,
        "position_buckets": buckets,
        "norm_rel_ebd": "layer_norm" in norm_rel_ebd,
    }


def _conv_fields(r: ConfigReader, hidden: int | None) -> dict[str, Any]:
    """v2's optional convolution after the first layer (conv_kernel_size > 0)."""
    conv_kernel = r.get("conv_kernel_size", 0, int)
    if not conv_kernel or conv_kernel <= 0:
        return {}
    # The reference pads (k - 1) // 2 on each side: an even kernel shortens the sequence and fails.
    r.require(conv_kernel % 2 == 1, f"conv_kernel_size={conv_kernel} is not supported (only odd sizes)")
    conv_groups = r.get("conv_groups", 1, int)
    r.require(
        bool(conv_groups) and conv_groups >= 1 and bool(hidden) and hidden % conv_groups == 0,
        f"conv_groups={conv_groups} must be >= 1 and divide hidden_size {hidden}",
    )
    return {
        "conv_kernel_size": conv_kernel,
        "conv_groups": conv_groups,
        "conv_act": r.activation("conv_act", "tanh"),
    }


def log_bucket_positions(relative: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
    """v2's log buckets: exact within buckets // 2, logarithmic beyond; float32 like the reference."""
    mid = buckets // 2
    magnitude = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative))
    # Same float32 operations as torch so that ceil() lands on the same side of every integer.
    log_ratio = np.log(magnitude.astype(np.float32) / np.float32(mid)) / np.log(
        np.float32((max_position - 1) / mid)
    )
    log_pos = np.ceil(log_ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(magnitude <= mid, relative, (log_pos * np.sign(relative)).astype(np.int64))


@functools.lru_cache(maxsize=64)
def relative_position_index(length: int, span: int, buckets: int, max_position: int) -> np.ndarray:
    """[length, length] int32 row of the relative table for query i and key j (i - j, bucketed, clipped).

    Depends only on the static sequence length, so it is a trace-time constant. The reference's p2c
    index is this one transposed (the bucket function is odd).
    """
    positions = np.arange(length, dtype=np.int64)
    relative = positions[:, None] - positions[None, :]
    if buckets > 0:
        relative = log_bucket_positions(relative, buckets, max_position)
    # jnp.take_along_axis fills out-of-range indices with NaN (torch.gather raises): clip as the reference.
    index = np.clip(relative + span, 0, 2 * span - 1).astype(np.int32)
    index.setflags(write=False)
    return index


class Embeddings(nnx.Module):
    """Word (+ position) (+ token type) embeddings, projection when E != H, LayerNorm, zeroed padding."""

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        width = config.embedding_size
        self.word = embedding(config.vocab_size, width, rngs=rngs, dtype=dtype)
        self.position = (
            embedding(config.max_position_embeddings, width, rngs=rngs, dtype=dtype)
            if config.position_biased_input
            else None
        )
        self.token_type = (
            embedding(config.type_vocab_size, width, rngs=rngs, dtype=dtype)
            if config.type_vocab_size > 0
            else None
        )
        self.projection = (
            dense(width, config.hidden_size, rngs=rngs, dtype=dtype, use_bias=False)
            if width != config.hidden_size
            else None
        )
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs=rngs)
        self.dropout = dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        mask: jax.Array,
        pair_positions: jax.Array | None = None,
    ) -> jax.Array:
        """[batch, seq] ids and bool mask -> [batch, seq, hidden]; padded positions are exactly zero.
        Packed rows give each token's position within its pair."""
        x = self.word(input_ids)
        if self.position is not None:
            positions = jnp.arange(input_ids.shape[1])[None] if pair_positions is None else pair_positions
            x = x + self.position(positions)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        if self.projection is not None:
            x = self.projection(x)
        x = self.norm(x.astype(jnp.float32)).astype(x.dtype) * mask[..., None].astype(x.dtype)
        return self.dropout(x)


class DisentangledSelfAttention(nnx.Module):
    """Content-to-content plus content-to-position (c2p) and position-to-content (p2c) attention.

    v1 projects q, k, v with one `in_proj` whose rows interleave per head ([heads, 3, head_dim]),
    adds `q_bias`/`v_bias`, and projects positions with `pos_key_proj` (no bias) / `pos_query_proj`.
    v2 has biased query/key/value projections and either reuses them for positions
    (`share_att_key`) or has its own biased `pos_key_proj` / `pos_query_proj`.
    """

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.is_v1 = config.is_v1
        self.scale_factor = config.score_scale_factor
        self.c2p = config.relative_attention and "c2p" in config.pos_att_type
        self.p2c = config.relative_attention and "p2c" in config.pos_att_type
        if self.is_v1:
            self.in_proj = dense(hidden, 3 * hidden, rngs=rngs, dtype=dtype, use_bias=False)
            self.q_bias = nnx.Param(jnp.zeros((hidden,), jnp.float32))
            self.v_bias = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        else:
            self.query = dense(hidden, hidden, rngs=rngs, dtype=dtype)
            self.key = dense(hidden, hidden, rngs=rngs, dtype=dtype)
            self.value = dense(hidden, hidden, rngs=rngs, dtype=dtype)
        own_pos_proj = self.is_v1 or not config.share_att_key
        self.pos_key_proj = (
            dense(hidden, hidden, rngs=rngs, dtype=dtype, use_bias=not self.is_v1)
            if self.c2p and own_pos_proj
            else None
        )
        self.pos_query_proj = (
            dense(hidden, hidden, rngs=rngs, dtype=dtype) if self.p2c and own_pos_proj else None
        )
        self.attention_dropout = dropout(config.attention_probs_dropout_prob, rngs=rngs)
        self.position_dropout = dropout(config.hidden_dropout_prob, rngs=rngs)
        self.output = ResidualOutput(
            hidden, hidden, config.layer_norm_eps, config.hidden_dropout_prob, rngs=rngs, dtype=dtype
        )

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v, each [batch, seq, heads, head_dim]."""
        if self.is_v1:
            qkv = self.in_proj(x).reshape(*x.shape[:-1], self.num_heads, 3, -1)
            q_bias = split_heads(self.q_bias[...].astype(qkv.dtype), self.num_heads)
            v_bias = split_heads(self.v_bias[...].astype(qkv.dtype), self.num_heads)
            return qkv[..., 0, :] + q_bias, qkv[..., 1, :], qkv[..., 2, :] + v_bias
        return tuple(split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))

    def position_projections(self, rel_embeddings: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
        """Relative-position keys (for c2p) and queries (for p2c), each [rows, heads, head_dim] or None."""
        rel_embeddings = self.position_dropout(rel_embeddings)
        pos_key = pos_query = None
        if self.c2p:
            proj = self.pos_key_proj if self.pos_key_proj is not None else self.key
            pos_key = split_heads(proj(rel_embeddings), self.num_heads)
        if self.p2c:
            proj = self.pos_query_proj if self.pos_query_proj is not None else self.query
            pos_query = split_heads(proj(rel_embeddings), self.num_heads)
        return pos_key, pos_query

    def __call__(
        self,
        x: jax.Array,
        pair_mask: jax.Array,
        rel_embeddings: jax.Array | None,
        rel_index: np.ndarray | None,
        first_only: bool = False,
    ) -> jax.Array:
        """x [batch, seq, hidden], pair_mask [batch, seq, seq] bool -> [batch, seq, hidden].

        rel_embeddings [rows, hidden] and rel_index [seq, seq] (static rows of it, a function of i - j)
        are None without relative attention. first_only: only token 0 queries (-> [batch, 1, hidden]).
        """
        q, k, v = self.project(x)
        # Both references divide by sqrt(head_dim * factor) computed in fp32; dividing q and the
        # position queries before the matmuls keeps reduced-precision products in range.
        scale = np.sqrt(np.float32(q.shape[-1] * self.scale_factor)).astype(np.float32)
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q / scale.astype(q.dtype), k, v))  # heads-major
        if first_only:
            q, pair_mask, x = q[:, :, :1], pair_mask[:, :1], x[:, :1]
        extra_scores = None
        if rel_embeddings is not None and (self.c2p or self.p2c):
            pos_key, pos_query = self.position_projections(rel_embeddings.astype(x.dtype))
            pos_query = None if pos_query is None else pos_query / scale.astype(q.dtype)
            if first_only:
                extra_scores = first_row_relative_scores(q, k, pos_key, pos_query, rel_index)
            else:
                extra_scores = relative_scores(q, k, pos_key, pos_query, rel_index)
        # Masked scores become the most negative value, as in the reference (which replaces rather than
        # adds), so a fully padded query row is uniform.
        bias = mask_bias(pair_mask)
        context = attend(q, k, v, bias, extra_scores=extra_scores, dropout=self.attention_dropout)
        return self.output(jnp.swapaxes(context, 1, 2).reshape(x.shape), x)


def first_row_relative_scores(
    q: jax.Array, k: jax.Array, pos_key: jax.Array | None, pos_query: jax.Array | None, index: np.ndarray
):
    """`relative_scores` for query 0 alone (q [batch, heads, 1, dim]): its relative rows index[0] are
    static, so c2p and p2c are one product each against the rows gathered in key order."""
    rows = index[0]

    def add(scores: jax.Array, start: int, size: int) -> jax.Array:
        if pos_key is not None:  # q_0 . pos_key[index[0, j]]
            scores = scores + jnp.einsum("bhqd,jhd->bhqj", q, pos_key[rows])
        if pos_query is not None:  # k_j . pos_query[index[0, j]]
            scores = scores + jnp.einsum("bhjd,jhd->bhj", k, pos_query[rows])[:, :, None]
        return scores

    return add


class EncoderLayer(nnx.Module):
    """Disentangled attention block then feed-forward block (post-LN)."""

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attention = DisentangledSelfAttention(config, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward.from_config(config, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        pair_mask: jax.Array,
        rel_embeddings: jax.Array | None,
        rel_index: np.ndarray | None,
        first_only: bool = False,
    ) -> jax.Array:
        """[batch, seq, hidden] -> the same, or with first_only the output at token 0 alone
        [batch, 1, hidden] (keys and values still from every token)."""
        return self.ffn(self.attention(x, pair_mask, rel_embeddings, rel_index, first_only))


class ConvLayer(nnx.Module):
    """v2's `LN(layer0_out + act(conv1d(embeddings) * mask)) * mask`, applied after the first layer."""

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        kernel = config.conv_kernel_size
        self.conv = nnx.Conv(
            config.hidden_size,
            config.hidden_size,
            kernel_size=(kernel,),
            padding=[((kernel - 1) // 2, (kernel - 1) // 2)],
            feature_group_count=config.conv_groups,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.act = HIDDEN_ACTIVATIONS[config.conv_act]
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, rngs=rngs)
        self.dropout = dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(
        self,
        embeddings: jax.Array,
        layer_output: jax.Array,
        mask: jax.Array,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """All [batch, seq, hidden] except mask [batch, seq] bool (and packed rows' segment_ids)."""
        mask = mask[..., None]
        conv = (
            self.conv(embeddings) if segment_ids is None else self._conv_within_pairs(embeddings, segment_ids)
        )
        out = self.act(self.dropout(jnp.where(mask, conv, 0)))
        y = self.norm(layer_output.astype(jnp.float32) + out.astype(jnp.float32)).astype(layer_output.dtype)
        return y * mask.astype(y.dtype)

    def _conv_within_pairs(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """The convolution of packed rows, each token's window cut at its pair's ends: the neighbouring
        pairs' tokens read as zeros, as the padding of a pair alone does. Each token's window is gathered
        ([batch * seq, kernel, hidden]) and convolved without padding."""
        batch, length, hidden = x.shape
        kernel = self.conv.kernel_size[0]
        half = (kernel - 1) // 2
        padded = jnp.pad(x, ((0, 0), (half, half), (0, 0)))
        padded_segments = jnp.pad(segment_ids, ((0, 0), (half, half)))
        taps = [
            jnp.where(
                (padded_segments[:, t : t + length] == segment_ids)[..., None], padded[:, t : t + length], 0
            )
            for t in range(kernel)
        ]
        windows = jnp.stack(taps, axis=2).reshape(batch * length, kernel, hidden)
        dtype = self.conv.dtype or x.dtype
        y = jax.lax.conv_general_dilated(
            windows.astype(dtype),
            self.conv.kernel[...].astype(dtype),
            window_strides=(1,),
            padding="VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.conv.feature_group_count,
        )
        return y.reshape(batch, length, -1) + self.conv.bias[...].astype(dtype)


class DebertaCrossEncoder(nnx.Module):
    """DeBERTa v1 / v2 / v3 with the ContextPooler + classifier head; returns fp32 logits."""

    def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        hidden = config.hidden_size
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [EncoderLayer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)]
        )
        self.rel_embeddings = (
            embedding(2 * config.relative_span, hidden, rngs=rngs) if config.relative_attention else None
        )
        # v2 builds this norm whenever norm_rel_ebd asks for it, even without relative attention.
        self.rel_norm = (
            layer_norm(hidden, config.layer_norm_eps, rngs=rngs)
            if config.norm_rel_ebd and not config.is_v1
            else None
        )
        self.conv = ConvLayer(config, rngs=rngs, dtype=dtype) if config.conv_kernel_size > 0 else None
        # The reference drops the CLS vector at pooler_dropout and the pooled vector at cls_dropout.
        head_dropout = config.cls_dropout if config.cls_dropout is not None else config.hidden_dropout_prob
        self.head = ClassificationHead(
            hidden,
            hidden,
            config.num_labels,
            config.pooler_hidden_act,
            head_dropout,
            rngs=rngs,
            dtype=dtype,
            input_dropout_rate=config.pooler_dropout,
        )

    def relative_inputs(self, length: int) -> tuple[jax.Array | None, np.ndarray | None]:
        """The relative-embedding rows [rows, hidden] the layers attend to, and their index [length, length]."""
        if self.rel_embeddings is None:
            return None, None
        config = self.config
        table = self.rel_embeddings.embedding[...]
        if config.is_v1:
            # v1 uses only the middle 2 * span rows, span shrinking with short sequences.
            span = min(length, config.relative_range)
            table = table[config.relative_range - span : config.relative_range + span]
            return table, relative_position_index(length, span, 0, 0)
        if self.rel_norm is not None:
            table = self.rel_norm(table)
        span = config.relative_span
        return table, relative_position_index(length, span, config.position_buckets, config.relative_range)

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        packing: Packing | None = None,
    ) -> list[jax.Array]:
        """Hidden states after the embeddings and after each layer, each [batch, seq, hidden]."""
        return self._hidden_states(input_ids, attention_mask, token_type_ids, packing)

    def _hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None,
        packing: Packing | None,
        last_at_first_token: bool = False,
    ) -> list[jax.Array]:
        """`encode`'s states; with last_at_first_token, the last layer's is computed at token 0 alone
        ([batch, 1, hidden]), unless that layer is also the first (the conv layer reads all its tokens)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)
        pair_mask = mask[:, :, None] & mask[:, None, :] if packing is None else same_pair(packing.segment_ids)
        positions, segment_ids = (None, None) if packing is None else (packing.positions, packing.segment_ids)
        # Relative positions are i - j in packed rows too: within one pair (the only keys a query sees),
        # the difference of positions within the pair is the difference of row indices.
        rel_embeddings, rel_index = self.relative_inputs(input_ids.shape[1])
        x = self.embeddings(input_ids, token_type_ids, mask, positions)
        states = [x]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            first_only = last_at_first_token and i == last and i > 0
            x = layer(x, pair_mask, rel_embeddings, rel_index, first_only)
            if i == 0 and self.conv is not None:
                x = self.conv(states[0], x, mask, segment_ids)
            states.append(x)
        return states

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        packing: Packing | None = None,
    ) -> jax.Array:
        """input_ids, attention_mask, token_type_ids [batch, seq] int -> logits [batch, num_labels];
        packed rows give logits [batch, slots, num_labels]."""
        # One pair a row: the head reads token 0 alone, so the last layer computes only its output there
        # (about 3/4 of that layer's work saved), as BertCrossEncoder does. Packed rows keep the full layer.
        hidden = self._hidden_states(
            input_ids, attention_mask, token_type_ids, packing, last_at_first_token=packing is None
        )[-1]
        return self.head(hidden, None if packing is None else packing.starts)


# v1 and v2/v3 share embeddings, output blocks and feed-forward; the ContextPooler head sits beside the
# base model.
SHARED_RULES = (
    Rule("embeddings.word_embeddings", "embeddings.word", Kind.EMBED),
    Rule("embeddings.position_embeddings", "embeddings.position", Kind.EMBED),
    Rule("embeddings.token_type_embeddings", "embeddings.token_type", Kind.EMBED),
    Rule("embeddings.embed_proj", "embeddings.projection", Kind.LINEAR),
    Rule("embeddings.LayerNorm", "embeddings.norm", Kind.NORM),
    Rule("encoder.rel_embeddings", "rel_embeddings", Kind.EMBED),
    *BLOCK_RULES,
)
HEAD_RULES = (
    Rule("pooler.dense", "head.dense", Kind.LINEAR),
    Rule("classifier", "head.out_proj", Kind.LINEAR),
)
# The published checkpoints keep `embeddings.position_embeddings` even when position_biased_input is
# false; transformers drops it then (`_keys_to_ignore_on_load_unexpected`), as it drops MLM heads.
IGNORE = (
    r"embeddings\.position_ids",
    r"embeddings\.position_embeddings\.weight",
    r"lm_predictions\..*",
    r"mask_predictions\..*",
    r"cls\..*",
)

DEBERTA = Family(
    "deberta",
    config_from_dict,
    DebertaCrossEncoder,
    KeyTable(
        prefix="deberta.",
        encoder=SHARED_RULES
        + (
            Rule(f"{LAYER}.attention.self.in_proj", "layers.{layer}.attention.in_proj", Kind.LINEAR),
            Rule(
                f"{LAYER}.attention.self.{{bias}}",
                "layers.{layer}.attention.{bias}",
                Kind.PARAM,
                {"bias": ("q_bias", "v_bias")},
            ),
            Rule(f"{LAYER}.attention.self.pos_proj", "layers.{layer}.attention.pos_key_proj", Kind.LINEAR),
            Rule(
                f"{LAYER}.attention.self.pos_q_proj", "layers.{layer}.attention.pos_query_proj", Kind.LINEAR
            ),
        ),
        head=HEAD_RULES,
        ignore=IGNORE,
    ),
    "DebertaForSequenceClassification",
    vocabulary_files=("vocab.json", "merges.txt"),
)
DEBERTA_V2 = Family(
    "deberta-v2",
    config_from_dict,
    DebertaCrossEncoder,
    KeyTable(
        prefix="deberta.",
        encoder=SHARED_RULES
        + (
            Rule(
                f"{LAYER}.attention.self.{{proj}}_proj",
                "layers.{layer}.attention.{proj}",
                Kind.LINEAR,
                {"proj": ("query", "key", "value")},
            ),
            Rule(
                f"{LAYER}.attention.self.pos_{{proj}}_proj",
                "layers.{layer}.attention.pos_{proj}_proj",
                Kind.LINEAR,
                {"proj": ("key", "query")},
            ),
            Rule("encoder.LayerNorm", "rel_norm", Kind.NORM),
            Rule("encoder.conv.conv", "conv.conv", Kind.CONV1D),
            Rule("encoder.conv.LayerNorm", "conv.norm", Kind.NORM),
        ),
        head=HEAD_RULES,
        ignore=IGNORE,
    ),
    "DebertaV2ForSequenceClassification",
    vocabulary_files=("spm.model",),
)
