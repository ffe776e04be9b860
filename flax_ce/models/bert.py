"""BERT, RoBERTa and ELECTRA cross-encoders: one encoder, three embeddings/head variants."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ce.config import ConfigReader, LabelsMixin, read_labels
from flax_ce.models.attention import mask_bias, self_attention
from flax_ce.models.layers import (
    ClassificationHead,
    FeedForward,
    ResidualOutput,
    dense,
    dropout,
    embedding,
    head_scale,
    layer_norm,
    split_heads,
)

MODEL_TYPES = ("bert", "roberta", "electra")


@dataclasses.dataclass(frozen=True)
class BertConfig(LabelsMixin):
    """Everything the BERT-family forward pass depends on; built by `config_from_dict`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    embedding_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    num_labels: int = 1
    labels: tuple[str, ...] = ("LABEL_0",)

    @property
    def uses_token_types(self) -> bool:
        return self.model_type != "roberta"


def config_from_dict(raw: Mapping[str, Any], source: str = "config.json") -> BertConfig:
    """Validate a BERT/RoBERTa/ELECTRA config.json dict; one ConfigError lists every unsupported setting."""
    r = ConfigReader(raw, source)
    model_type = r.model_type(MODEL_TYPES)
    hidden, heads = r.width_and_heads()
    position_type = r.get("position_embedding_type", "absolute", str)
    r.require(
        position_type == "absolute",
        f"position_embedding_type={position_type!r} is not supported (only 'absolute')",
    )
    for flag in ("is_decoder", "add_cross_attention"):
        r.require(not raw.get(flag, False), f"{flag}=true is not supported (encoder-only cross-encoders)")
    r.check_problem_type()
    num_labels, labels = read_labels(r)
    default_eps = 1e-12
    embedding_size = r.get("embedding_size", hidden, int) if model_type == "electra" else hidden
    config = BertConfig(
        model_type=model_type,
        vocab_size=r.get("vocab_size", kind=int),
        hidden_size=hidden,
        num_hidden_layers=r.get("num_hidden_layers", kind=int),
        num_attention_heads=heads,
        intermediate_size=r.get("intermediate_size", kind=int),
        max_position_embeddings=r.get("max_position_embeddings", 512, int),
        type_vocab_size=r.get("type_vocab_size", 2, int),
        embedding_size=embedding_size,
        hidden_act=r.activation("hidden_act", "gelu"),
        layer_norm_eps=r.get("layer_norm_eps", default_eps, float),
        pad_token_id=r.get("pad_token_id", 1 if model_type == "roberta" else 0, int),
        hidden_dropout_prob=r.get("hidden_dropout_prob", 0.1, float),
        attention_probs_dropout_prob=r.get("attention_probs_dropout_prob", 0.1, float),
        classifier_dropout=r.get("classifier_dropout", None, float),
        num_labels=num_labels,
        labels=labels,
    )
    r.require(
        config.type_vocab_size >= 1 if config.type_vocab_size is not None else True,
        "type_vocab_size must be >= 1 for BERT-family models",
    )
    r.finish()
    return config


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, LayerNorm, and ELECTRA's projection when E != H."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.model_type = config.model_type
        self.pad_token_id = config.pad_token_id
        width = config.embedding_size
        self.word = embedding(config.vocab_size, width, rngs=rngs, dtype=dtype)
        self.position = embedding(config.max_position_embeddings, width, rngs=rngs, dtype=dtype)
        self.token_type = embedding(config.type_vocab_size, width, rngs=rngs, dtype=dtype)
        self.norm = layer_norm(width, config.layer_norm_eps, rngs=rngs)
        self.dropout = dropout(config.hidden_dropout_prob, rngs=rngs)
        self.projection = (
            dense(width, config.hidden_size, rngs=rngs, dtype=dtype) if width != config.hidden_size else None
        )

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        """[batch, seq] positions: RoBERTa counts real tokens from pad_id + 1; the others use arange."""
        if self.model_type == "roberta":
            real = (input_ids != self.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(real, axis=1) * real + self.pad_token_id
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        x = (
            self.word(input_ids)
            + self.token_type(token_type_ids)
            + self.position(self.position_ids(input_ids))
        )
        x = self.dropout(self.norm(x.astype(jnp.float32)).astype(x.dtype))
        return self.projection(x) if self.projection is not None else x


class SelfAttention(nnx.Module):
    """Multi-head attention with a key padding mask (see `flax_ce.models.attention`)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = dense(hidden, hidden, rngs=rngs, dtype=dtype)
        self.key = dense(hidden, hidden, rngs=rngs, dtype=dtype)
        self.value = dense(hidden, hidden, rngs=rngs, dtype=dtype)
        self.attention_dropout = dropout(config.attention_probs_dropout_prob, rngs=rngs)
        self.output = ResidualOutput(
            hidden, hidden, config.layer_norm_eps, config.hidden_dropout_prob, rngs=rngs, dtype=dtype
        )

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [batch, seq, hidden], key_mask [batch, seq] bool -> [batch, seq, hidden]."""
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.query, self.key, self.value))
        bias = mask_bias(key_mask)  # the same in every layer: XLA computes it once
        context = self_attention(q, k, v, bias, head_scale(q.shape[-1]), self.attention_dropout)
        return self.output(context.reshape(x.shape[:-1] + (-1,)), x)


class EncoderLayer(nnx.Module):
    """One transformer layer: attention block then feed-forward block (post-LN)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attention = SelfAttention(config, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward.from_config(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        return self.ffn(self.attention(x, key_mask))


class BertCrossEncoder(nnx.Module):
    """Embeddings, encoder layers and the family's classification head; returns fp32 logits."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [EncoderLayer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)]
        )
        head_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.head = ClassificationHead(
            config.hidden_size,
            config.hidden_size,
            config.num_labels,
            "gelu" if config.model_type == "electra" else "tanh",
            config.hidden_dropout_prob if config.model_type == "bert" else head_dropout,
            rngs=rngs,
            dtype=dtype,
            input_dropout_rate=0.0 if config.model_type == "bert" else head_dropout,
        )

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> list[jax.Array]:
        """Hidden states after the embeddings and after each layer, each [batch, seq, hidden]."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        key_mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids, token_type_ids)
        states = [x]
        for layer in self.layers:
            x = layer(x, key_mask)
            states.append(x)
        return states

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """input_ids, attention_mask, token_type_ids [batch, seq] int -> logits [batch, num_labels]."""
        return self.head(self.encode(input_ids, attention_mask, token_type_ids)[-1])
