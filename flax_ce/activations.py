"""Activation functions by the names transformers configs use, and the allow-list for score activations."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, torch's formula x * 0.5 * (1 + erf(x / sqrt(2))), returning x itself above 10 (what the
    formula rounds to there in every float dtype, gradient included).

    The select is for XLA CPU (jaxlib 0.10): without it YNNPACK fuses a whole layer (attention-output dense,
    LayerNorm, both feed-forward matmuls, GELU, LayerNorm) into one kernel; with it XLA computes GELU in one
    elementwise pass between the matmuls, and the MiniLM-L6 forward ran 1.1-1.25x faster at 4096-token
    batches ([32, 128] and [8, 512], 2-core AMD EPYC, one process, interleaved; jax.nn.gelu's erfc form,
    which also splits the fusion but takes two passes, 1.1x less). A lone dense + GELU + dense block measures the
    other way round: judge this on the whole forward.
    """
    return jnp.where(x > 10, x, x * (0.5 + 0.5 * jax.lax.erf(x * (1 / math.sqrt(2)))))


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_fast(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# The names transformers' ACT2FN accepts in `hidden_act` / `pooler_hidden_act` that we implement.
# "gelu" is the exact erf GELU in transformers; JAX's default is the tanh approximation.
HIDDEN_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": _mish,
    "linear": lambda x: x,
}


def _torch_softmax(x: jax.Array) -> jax.Array:
    # torch.nn.Softmax() with dim=None picks dim 0 for 0-, 1- and 3-d inputs and dim 1 otherwise.
    return jax.nn.softmax(x, axis=0 if x.ndim in (0, 1, 3) else 1)


def _torch_log_softmax(x: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(x, axis=0 if x.ndim in (0, 1, 3) else 1)


# torch.nn activation classes that a config may name, mapped to JAX functions. Nothing is imported.
SCORE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Identity": lambda x: x,
    "Sigmoid": jax.nn.sigmoid,
    "Tanh": jnp.tanh,
    "ReLU": jax.nn.relu,
    "GELU": _gelu_exact,
    "SiLU": jax.nn.silu,
    "LogSigmoid": jax.nn.log_sigmoid,
    "Softplus": jax.nn.softplus,
    "Softmax": _torch_softmax,
    "LogSoftmax": _torch_log_softmax,
}
TORCH_MODULES = ("torch.nn.", "torch.nn.modules.linear.", "torch.nn.modules.activation.")


def activation_from_name(name: str) -> Callable[[jax.Array], jax.Array]:
    """JAX function for a torch activation class path such as `torch.nn.modules.activation.Sigmoid`."""
    for module in TORCH_MODULES:
        short = name.removeprefix(module)
        if name.startswith(module) and short in SCORE_ACTIVATIONS:
            return SCORE_ACTIVATIONS[short]
    raise ValueError(
        f"activation {name!r} is not supported; use a JAX callable or one of "
        f"{', '.join('torch.nn.' + n for n in SCORE_ACTIVATIONS)}"
    )


def torch_name(fn: Callable) -> str | None:
    """The torch class path sentence-transformers writes for one of our activations, if it is one."""
    for short, candidate in SCORE_ACTIVATIONS.items():
        if candidate is fn:
            module = "torch.nn.modules.linear." if short == "Identity" else "torch.nn.modules.activation."
            return module + short
    return None
