"""Building blocks shared by every encoder family: dense, layer norm, feed-forward, classification head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_ce import cpu_matmul
from flax_ce.activations import HIDDEN_ACTIVATIONS
from flax_ce.conversion.rules import Kind, Rule
from flax_ce.models.packing import first_tokens

# transformers' encoder layers name these blocks alike in BERT-like models and DeBERTa, and so do ours
# (an attention block's output `ResidualOutput`, the `FeedForward`): their key rules are shared.
LAYER = "encoder.layer.{layer}"
BLOCK_RULES = (
    Rule(f"{LAYER}.attention.output.dense", "layers.{layer}.attention.output.dense", Kind.LINEAR),
    Rule(f"{LAYER}.attention.output.LayerNorm", "layers.{layer}.attention.output.norm", Kind.NORM),
    Rule(f"{LAYER}.intermediate.dense", "layers.{layer}.ffn.intermediate", Kind.LINEAR),
    Rule(f"{LAYER}.output.dense", "layers.{layer}.ffn.output.dense", Kind.LINEAR),
    Rule(f"{LAYER}.output.LayerNorm", "layers.{layer}.ffn.output.norm", Kind.NORM),
)


class Dense(nnx.Linear):
    """nnx.Linear whose fp32 matmul goes to MKL in programs traced under `flax_ce.cpu_matmul.scope()`."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        kernel = self.kernel[...]
        if out_sharding is None and self.dtype in (None, jnp.float32) and cpu_matmul.applies(inputs, kernel):
            y = cpu_matmul.matmul(inputs, kernel)
            return y if self.bias is None else y + self.bias[...]
        return super().__call__(inputs, out_sharding)


def dense(
    in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True
) -> nnx.Linear:
    """A Linear layer initialised as transformers does with the default `initializer_range` (normal, std 0.02);
    parameters are fp32, computation in `dtype`."""
    return Dense(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with the checkpoint's eps and exact (two-pass) variance, always computed in fp32."""
    return nnx.LayerNorm(
        features, epsilon=eps, use_fast_variance=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
    )


def embedding(num: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Embed:
    """An embedding table (fp32 parameters)."""
    return nnx.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def dropout(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """Dropout that is off until `model.train()` (and off again after `model.eval()`); it draws its masks
    from its own fork of `rngs`' dropout stream."""
    return nnx.Dropout(rate, deterministic=True, rngs=rngs)


class ResidualOutput(nnx.Module):
    """`LN(dropout(dense(x)) + residual)`: the attention-output and feed-forward-output block."""

    def __init__(
        self, in_features: int, hidden: int, eps: float, dropout_rate: float, *, rngs: nnx.Rngs, dtype
    ):
        self.dense = dense(in_features, hidden, rngs=rngs, dtype=dtype)
        self.norm = layer_norm(hidden, eps, rngs=rngs)
        self.dropout = dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        y = self.dropout(self.dense(x))
        return self.norm(y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)


class FeedForward(nnx.Module):
    """`LN(dense_out(act(dense_in(x))) + x)`, identical in BERT-family and DeBERTa layers."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act: str,
        eps: float,
        dropout_rate: float,
        *,
        rngs: nnx.Rngs,
        dtype,
    ):
        self.intermediate = dense(hidden, intermediate, rngs=rngs, dtype=dtype)
        self.act = HIDDEN_ACTIVATIONS[act]
        self.output = ResidualOutput(intermediate, hidden, eps, dropout_rate, rngs=rngs, dtype=dtype)

    @classmethod
    def from_config(cls, config, *, rngs: nnx.Rngs, dtype) -> FeedForward:
        """The block as a BERT-family or DeBERTa config describes it (same field names in both)."""
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            config.layer_norm_eps,
            config.hidden_dropout_prob,
            rngs=rngs,
            dtype=dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.act(self.intermediate(x)), x)


class ClassificationHead(nnx.Module):
    """`out_proj(act(dense(h[:, 0])))`: BERT's pooler+classifier, RoBERTa/ELECTRA heads, DeBERTa's pooler."""

    def __init__(
        self,
        hidden: int,
        pooled: int,
        num_labels: int,
        act: str,
        dropout_rate: float,
        *,
        rngs: nnx.Rngs,
        dtype,
        input_dropout_rate: float = 0.0,
    ):
        # BERT's pooler reads h[:, 0] directly (rate 0); RoBERTa/ELECTRA drop it at the head's rate,
        # DeBERTa at `pooler_dropout`.
        self.input_dropout = dropout(input_dropout_rate, rngs=rngs)
        self.dense = dense(hidden, pooled, rngs=rngs, dtype=dtype)
        self.out_proj = dense(pooled, num_labels, rngs=rngs, dtype=dtype)
        self.act = HIDDEN_ACTIVATIONS[act]
        self.dropout = dropout(dropout_rate, rngs=rngs)

    def __call__(self, hidden_states: jax.Array, starts: jax.Array | None = None) -> jax.Array:
        """[batch, seq, hidden] -> logits [batch, num_labels] (fp32); with packed rows' `starts` [batch, slots],
        each pair's first token is read instead: logits [batch, slots, num_labels]."""
        return self.classify(hidden_states[:, 0] if starts is None else first_tokens(hidden_states, starts))

    def classify(self, x: jax.Array) -> jax.Array:
        """Logits (fp32) from first-token vectors [..., hidden] -> [..., num_labels]."""
        x = self.input_dropout(x)
        x = self.dropout(self.act(self.dense(x)))
        return self.out_proj(x).astype(jnp.float32)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[batch, seq, heads * d] -> [batch, seq, heads, d]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
