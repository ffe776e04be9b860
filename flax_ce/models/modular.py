"""Modular cross-encoders as sentence-transformers saves them (Ettin layout): a family's plain encoder, then
Pooling, Dense and LayerNorm modules, the last Dense writing the scores. Reading the files: flax_ce/st_modules.py."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ce.activations import activation_from_name
from flax_ce.config import LabelsMixin
from flax_ce.conversion.rules import Kind, Rule
from flax_ce.models.family import Family
from flax_ce.models.layers import dense, layer_norm

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# torch.nn.LayerNorm's default, which sentence-transformers' LayerNorm module does not change.
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class PoolingSpec:
    """sentence-transformers' Pooling: token embeddings -> one vector per mode, concatenated."""

    dimension: int
    modes: tuple[str, ...]
    include_prompt: bool = True

    @property
    def output_dimension(self) -> int:
        return self.dimension * len(self.modes)


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """sentence-transformers' Dense: `features[output_name] = activation(linear(features[input_name]))`."""

    in_features: int
    out_features: int
    bias: bool
    activation: str  # a torch.nn class path, e.g. torch.nn.modules.activation.GELU
    input_name: str = "sentence_embedding"
    output_name: str = "sentence_embedding"

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The torch keys of its weights file and their shapes."""
        shapes = {"linear.weight": (self.out_features, self.in_features)}
        return {**shapes, "linear.bias": (self.out_features,)} if self.bias else shapes


@dataclasses.dataclass(frozen=True)
class LayerNormSpec:
    """sentence-transformers' LayerNorm over the sentence embedding (torch's eps, with a bias)."""

    dimension: int

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"norm.weight": (self.dimension,), "norm.bias": (self.dimension,)}


@dataclasses.dataclass(frozen=True)
class ModularConfig(LabelsMixin):
    """A family's encoder config and the modules after it (modules.json entries 1.., in order)."""

    encoder: Any
    modules: tuple[PoolingSpec | DenseSpec | LayerNormSpec, ...]
    # Where each module's files are, for messages; not part of the model (equal models compare equal).
    folders: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def num_labels(self) -> int:
        """Scores per pair: the width of the last Dense that writes "scores", as sentence-transformers reads it."""
        return next(
            m.out_features for m in reversed(self.modules) if getattr(m, "output_name", "") == "scores"
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"LABEL_{i}" for i in range(self.num_labels))

    @property
    def pools_prompt(self) -> bool:
        """False if a Pooling module leaves prompt tokens out (include_prompt=false)."""
        return all(m.include_prompt for m in self.modules if isinstance(m, PoolingSpec))

    # The encoder's settings that tokenisation, batching and tools read.
    model_type = property(lambda self: self.encoder.model_type)
    vocab_size = property(lambda self: self.encoder.vocab_size)
    type_vocab_size = property(lambda self: self.encoder.type_vocab_size)
    hidden_size = property(lambda self: self.encoder.hidden_size)
    num_hidden_layers = property(lambda self: self.encoder.num_hidden_layers)
    max_position_embeddings = property(lambda self: self.encoder.max_position_embeddings)
    position_limit = property(lambda self: self.encoder.position_limit)
    pad_token_id = property(lambda self: self.encoder.pad_token_id)


def pool(mode: str, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch, seq, dim], mask [batch, seq] bool -> [batch, dim], as sentence-transformers' Pooling on a
    padded batch (sums in fp32)."""
    real = mask[..., None]
    length = hidden.shape[1]
    if mode in ("cls", "lasttoken"):
        # The first real token; the last real one (index 0 for a row without any, as the reference).
        first = jnp.argmax(mask, axis=1)
        last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        index = first if mode == "cls" else jnp.where(mask.any(axis=1), last, 0)
        source = hidden if mode == "cls" else jnp.where(real, hidden, 0)
        return jnp.take_along_axis(source, index[:, None, None], axis=1)[:, 0]
    if mode == "max":
        return jnp.where(real, hidden, -jnp.inf).max(axis=1)
    x = hidden.astype(jnp.float32)
    if mode == "weightedmean":
        # Weights count positions from the first real token, from 1.
        positions = jnp.arange(1, length + 1, dtype=jnp.float32)[None, :] - jnp.argmax(mask, axis=1)[:, None]
        weights = jnp.where(mask, positions, 0.0)[..., None]
        total = jnp.where(real, x * weights, 0.0).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
        return total.astype(hidden.dtype)
    # where, not a product: padded rows may hold anything, and they must not reach the sum.
    total = jnp.where(real, x, 0.0).sum(axis=1)
    count = jnp.maximum(real.sum(axis=1).astype(jnp.float32), 1e-9)
    return (total / (count if mode == "mean" else jnp.sqrt(count))).astype(hidden.dtype)


class Pooling(nnx.Module):
    """features["sentence_embedding"] from features["token_embeddings"] and the attention mask."""

    def __init__(self, spec: PoolingSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.modes = spec.modes

    def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
        hidden, mask = features["token_embeddings"], features["attention_mask"]
        pooled = [pool(mode, hidden, mask) for mode in self.modes]
        return {**features, "sentence_embedding": jnp.concatenate(pooled, axis=-1)}


class Dense(nnx.Module):
    """features[output_name] = activation(linear(features[input_name]))."""

    def __init__(self, spec: DenseSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear = dense(spec.in_features, spec.out_features, rngs=rngs, dtype=dtype, use_bias=spec.bias)
        self.activation = activation_from_name(spec.activation)
        self.input_name, self.output_name = spec.input_name, spec.output_name

    def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {**features, self.output_name: self.activation(self.linear(features[self.input_name]))}


class LayerNorm(nnx.Module):
    """features["sentence_embedding"] layer-normalised (fp32)."""

    def __init__(self, spec: LayerNormSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = layer_norm(spec.dimension, LAYER_NORM_EPS, rngs=rngs)

    def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
        x = features["sentence_embedding"]
        return {**features, "sentence_embedding": self.norm(x.astype(jnp.float32)).astype(x.dtype)}


MODULES = {PoolingSpec: Pooling, DenseSpec: Dense, LayerNormSpec: LayerNorm}


class ModularCrossEncoder(nnx.Module):
    """The family's encoder without its head, then the modules after it; returns fp32 scores."""

    def __init__(self, config: ModularConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, encoder_module):
        self.config = config
        self.encoder = encoder_module(config.encoder, rngs=rngs, dtype=dtype)
        self.encoder.head = None  # the modules replace the family's head (built and dropped, never filled)
        # modules[i] is modules.json entry i; entry 0, the Transformer, is `encoder`.
        self.modules = nnx.List(
            [None, *(MODULES[type(spec)](spec, rngs=rngs, dtype=dtype) for spec in config.modules)]
        )

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> list[jax.Array]:
        """The encoder's hidden states (embeddings, then each layer), each [batch, seq, hidden]."""
        return self.encoder.encode(input_ids, attention_mask, token_type_ids)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """input_ids, attention_mask, token_type_ids [batch, seq] int -> scores [batch, num_labels]."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)[-1]
        features = {"token_embeddings": hidden, "attention_mask": attention_mask.astype(bool)}
        for module in list(self.modules)[1:]:
            features = module(features)
        return features["scores"].astype(jnp.float32)


# Module i's weights are keyed "i.<its own key>", as in sentence-transformers' state dict.
MODULE_RULES = (
    Rule("{module}.linear", "modules.{module}.linear", Kind.LINEAR),
    Rule("{module}.norm", "modules.{module}.norm", Kind.NORM),
)


def modular_family(family: Family) -> Family:
    """The Family record of modular cross-encoders over `family`'s plain encoder (e.g. `ModernBertModel`)."""
    return Family(
        family.model_type,
        family.config_from_dict,
        functools.partial(ModularCrossEncoder, encoder_module=family.module),
        family.key_table.headless("encoder.", MODULE_RULES),
        family.architecture.replace("ForSequenceClassification", "Model"),
        family.vocabulary_files,
    )
