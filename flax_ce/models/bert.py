"""BERT, RoBERTa, XLM-RoBERTa and ELECTRA cross-encoders: one encoder, three embeddings/head variants."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ce.config import ConfigReader, LabelsMixin, read_labels
from flax_ce.conversion.rules import KeyTable, Kind, Rule
from flax_ce.models.attention import mask_bias, self_attention
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
from flax_ce.models.packing import Packing, first_tokens, same_pair

MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
# XLM-RoBERTa is RoBERTa's architecture with a sentencepiece vocabulary (and, in bge-reranker-v2-m3,
# a longer position table): every rule below that is RoBERTa's is also its.
ROBERTA_TYPES = ("roberta", "xlm-roberta")
# The variants' differences, as config fields: RoBERTa counts positions from pad_token_id + 1, ELECTRA's
# head uses GELU, and only BERT's pooler reads the CLS vector without dropout.
HEAD_ACTIVATION = {"bert": "tanh", "roberta": "tanh", "xlm-roberta": "tanh", "electra": "gelu"}


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
    position_offset: int = 0  # > 0: positions count real tokens from here (RoBERTa: pad_token_id + 1)
    head_activation: str = "tanh"
    head_dropout: float = 0.1
    head_input_dropout: float = 0.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    num_labels: int = 1
    labels: tuple[str, ...] = ("LABEL_0",)

    @property
    def position_limit(self) -> int:
        """The longest sequence the position table can index."""
        return self.max_position_embeddings - self.position_offset


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
    embedding_size = r.get("embedding_size", hidden, int) if model_type == "electra" else hidden
    pad_token_id = r.get("pad_token_id", 1 if model_type in ROBERTA_TYPES else 0, int)
    hidden_dropout = r.get("hidden_dropout_prob", 0.1, float)
    classifier_dropout = r.get("classifier_dropout", None, float)
    head_dropout = classifier_dropout if classifier_dropout is not None else hidden_dropout
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
        position_offset=(pad_token_id or 0) + 1 if model_type in ROBERTA_TYPES else 0,
        head_activation=HEAD_ACTIVATION.get(model_type, "tanh"),
        head_dropout=hidden_dropout if model_type == "bert" else head_dropout,
        head_input_dropout=0.0 if model_type == "bert" else head_dropout,
        hidden_act=r.activation("hidden_act", "gelu"),
        layer_norm_eps=r.get("layer_norm_eps", 1e-12, float),
        pad_token_id=pad_token_id,
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=r.get("attention_probs_dropout_prob", 0.1, float),
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
        self.position_offset = config.position_offset
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

    def position_ids(self, input_ids: jax.Array, pair_positions: jax.Array | None = None) -> jax.Array:
        """[batch, seq] positions: with an offset (RoBERTa) real tokens count from it and padding sits one
        below (RoBERTa's padding_idx), computed from input_ids as the reference does; otherwise arange.
        Packed rows give each token's position within its pair: both counts restart at every pair."""
        if self.position_offset:
            real = (input_ids != self.pad_token_id).astype(jnp.int32)
            count = jnp.cumsum(real, axis=1)
            if pair_positions is not None:  # less the real tokens before the pair's first token
                first = jnp.arange(input_ids.shape[1]) - pair_positions
                count = count - jnp.take_along_axis(count - real, first, axis=1)
            return count * real + self.position_offset - 1
        if pair_positions is not None:
            return pair_positions
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, pair_positions: jax.Array | None = None
    ) -> jax.Array:
        x = (
            self.word(input_ids)
            + self.token_type(token_type_ids)
            + self.position(self.position_ids(input_ids, pair_positions))
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

    def __call__(self, x: jax.Array, key_mask: jax.Array, keys_from: jax.Array | None = None) -> jax.Array:
        """x [batch, seq, hidden], key_mask [batch, seq] bool (or [batch, seq, seq] for packed rows) ->
        [batch, seq, hidden]. With `keys_from` [batch, seq, hidden], x holds only some of its tokens
        [batch, q, hidden] (a [batch, q, seq] mask for packed rows), which attend to all of them."""
        context_tokens = x if keys_from is None else keys_from
        q = split_heads(self.query(x), self.num_heads)
        k, v = (split_heads(proj(context_tokens), self.num_heads) for proj in (self.key, self.value))
        bias = mask_bias(key_mask)  # the same in every layer: XLA computes it once
        # 1 / sqrt(head_dim) in Python float, as the references compute it.
        context = self_attention(q, k, v, bias, 1.0 / math.sqrt(q.shape[-1]), self.attention_dropout)
        return self.output(context.reshape(x.shape[:-1] + (-1,)), x)


class EncoderLayer(nnx.Module):
    """One transformer layer: attention block then feed-forward block (post-LN)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attention = SelfAttention(config, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward.from_config(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        return self.ffn(self.attention(x, key_mask))

    def at_first_tokens(self, x: jax.Array, key_mask: jax.Array, starts: jax.Array | None) -> jax.Array:
        """The layer's output at each pair's first token only, [batch, 1 or slots, hidden]: the head reads
        nothing else, so the last layer computes keys and values for every token but queries, the output
        projection and the feed-forward block for these alone (about 5/6 of a layer's work saved).
        starts: packed rows' first-token indices [batch, slots] (key_mask is then [batch, seq, seq]), or
        None for one pair a row, starting at token 0."""
        if starts is None:
            return self.ffn(self.attention(x[:, :1], key_mask, keys_from=x))
        rows = jnp.take_along_axis(key_mask, starts[..., None], axis=1)  # [batch, slots, seq]
        return self.ffn(self.attention(first_tokens(x, starts), rows, keys_from=x))


class BertCrossEncoder(nnx.Module):
    """Embeddings, encoder layers and the family's classification head; returns fp32 logits."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [EncoderLayer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)]
        )
        self.head = ClassificationHead(
            config.hidden_size,
            config.hidden_size,
            config.num_labels,
            config.head_activation,
            config.head_dropout,
            rngs=rngs,
            dtype=dtype,
            input_dropout_rate=config.head_input_dropout,
        )

    def embed(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None,
        packing: Packing | None,
    ) -> tuple[jax.Array, jax.Array]:
        """The embeddings [batch, seq, hidden] and the layers' key mask (bool [batch, seq], or
        [batch, seq, seq] for packed rows)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if packing is None:
            key_mask, positions = attention_mask.astype(bool), None
        else:
            key_mask, positions = same_pair(packing.segment_ids), packing.positions
        return self.embeddings(input_ids, token_type_ids, positions), key_mask

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        packing: Packing | None = None,
    ) -> list[jax.Array]:
        """Hidden states after the embeddings and after each layer, each [batch, seq, hidden]."""
        x, key_mask = self.embed(input_ids, attention_mask, token_type_ids, packing)
        states = [x]
        for layer in self.layers:
            x = layer(x, key_mask)
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
        packed rows give logits [batch, slots, num_labels]. The same as the head over `encode`'s last
        state, with the last layer computed only where the head reads it."""
        x, key_mask = self.embed(input_ids, attention_mask, token_type_ids, packing)
        for layer in self.layers[:-1]:
            x = layer(x, key_mask)
        starts = None if packing is None else packing.starts
        logits = self.head.classify(self.layers[-1].at_first_tokens(x, key_mask, starts))
        return logits[:, 0] if starts is None else logits


ENCODER_RULES = (
    Rule("embeddings.word_embeddings", "embeddings.word", Kind.EMBED),
    Rule("embeddings.position_embeddings", "embeddings.position", Kind.EMBED),
    Rule("embeddings.token_type_embeddings", "embeddings.token_type", Kind.EMBED),
    Rule("embeddings.LayerNorm", "embeddings.norm", Kind.NORM),
    Rule(
        f"{LAYER}.attention.self.{{proj}}",
        "layers.{layer}.attention.{proj}",
        Kind.LINEAR,
        {"proj": ("query", "key", "value")},
    ),
    *BLOCK_RULES,
)
DENSE_OUT_PROJ_HEAD = (
    Rule("classifier.dense", "head.dense", Kind.LINEAR),
    Rule("classifier.out_proj", "head.out_proj", Kind.LINEAR),
)
BUFFERS = (r"embeddings\.position_ids", r"embeddings\.token_type_ids")

BERT = Family(
    "bert",
    config_from_dict,
    BertCrossEncoder,
    # BERT's pooler belongs to BertModel (under the prefix); the classifier sits beside it.
    KeyTable(
        prefix="bert.",
        encoder=ENCODER_RULES + (Rule("pooler.dense", "head.dense", Kind.LINEAR),),
        head=(Rule("classifier", "head.out_proj", Kind.LINEAR),),
        ignore=BUFFERS + (r"cls\..*",),
    ),
    "BertForSequenceClassification",
    vocabulary_files=("vocab.txt",),
)
ROBERTA_KEYS = KeyTable(
    prefix="roberta.",
    encoder=ENCODER_RULES,
    head=DENSE_OUT_PROJ_HEAD,
    ignore=BUFFERS + (r"pooler\..*", r"lm_head\..*"),
)
ROBERTA = Family(
    "roberta",
    config_from_dict,
    BertCrossEncoder,
    ROBERTA_KEYS,
    "RobertaForSequenceClassification",
    vocabulary_files=("vocab.json", "merges.txt"),
)
# transformers' XLMRobertaForSequenceClassification keeps RoBERTa's key names, `roberta.` prefix included.
XLM_ROBERTA = Family(
    "xlm-roberta",
    config_from_dict,
    BertCrossEncoder,
    ROBERTA_KEYS,
    "XLMRobertaForSequenceClassification",
    vocabulary_files=("sentencepiece.bpe.model",),
)
ELECTRA = Family(
    "electra",
    config_from_dict,
    BertCrossEncoder,
    KeyTable(
        prefix="electra.",
        encoder=ENCODER_RULES + (Rule("embeddings_project", "embeddings.projection", Kind.LINEAR),),
        head=DENSE_OUT_PROJ_HEAD,
        ignore=BUFFERS + (r"discriminator_predictions\..*", r"generator_.*"),
    ),
    "ElectraForSequenceClassification",
    vocabulary_files=("vocab.txt",),
)
