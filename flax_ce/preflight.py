"""Checks that run before anything large is built or read, so a checkpoint that cannot be right fails in
milliseconds with a message naming the problem: the config's sizes, the config against the weights'
inventory, the tokenizer's files and vocabulary against the model, and max_length against one pair."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
from flax import nnx

from flax_ce.config import ConfigError
from flax_ce.conversion.errors import CheckpointError
from flax_ce.conversion.files import TensorInfo
from flax_ce.models import FAMILIES

# Sizes every family reads under these transformers names. Out of range they would surface as a
# ZeroDivisionError or a negative dimension deep inside module construction; token ids are int32, so no
# table (and no width) can usefully exceed 2**31 - 1.
POSITIVE_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "embedding_size",
    "max_position_embeddings",
    "num_labels",
)
MAX_SIZE = 2**31 - 1
# A model this many times larger than its weights is refused before it is built (a fresh head is
# allocated for real); a smaller excess gets the per-key report of what is missing.
PLAUSIBLE_EXCESS = 4
# A tokenizer with fewer ordinary entries than this maps nearly every word to its unknown token.
MIN_ORDINARY_TOKENS = 10


def check_config_values(config, source: str) -> None:
    """ConfigError listing every size outside 1..2**31-1, a pad id outside the vocabulary, a layer norm
    epsilon that is not positive and finite, or a dropout probability outside 0..1."""
    problems = []
    for name in POSITIVE_SIZES:
        value = getattr(config, name, None)
        if value is not None and not 1 <= value <= MAX_SIZE:
            problems.append(f"{name} must be between 1 and {MAX_SIZE}, got {value}")
    type_vocab = getattr(config, "type_vocab_size", None)
    if type_vocab is not None and not 0 <= type_vocab <= MAX_SIZE:
        problems.append(f"type_vocab_size must be between 0 and {MAX_SIZE}, got {type_vocab}")
    vocab, pad = getattr(config, "vocab_size", None), getattr(config, "pad_token_id", None)
    if pad is not None and vocab is not None and vocab >= 1 and not 0 <= pad < vocab:
        problems.append(f"pad_token_id must be an id of the vocabulary (0..{vocab - 1}), got {pad}")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not isinstance(value, float):
            continue
        if field.name.endswith("eps") and not 0.0 < value < math.inf:
            problems.append(f"{field.name} must be a positive finite number, got {value}")
        if "dropout" in field.name and not 0.0 <= value <= 1.0:
            problems.append(f"{field.name} must be a probability between 0 and 1, got {value}")
    if problems:
        listing = "\n  - ".join(problems)
        raise ConfigError(f"{source}: impossible model configuration:\n  - {listing}")


def parameter_counts(build: Callable, config, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """(elements outside the `skip` path prefixes, all elements) of the parameters of
    `build(config, rngs=...)`, built abstractly (nnx.eval_shape): nothing is allocated."""
    abstract = nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))
    outside = total = 0
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = math.prod(variable.value.shape)
        total += size
        outside += 0 if ".".join(map(str, path)).startswith(skip) else size
    return outside, total


def check_weights_fit(
    config,
    build: Callable,
    inventory: Mapping[str, TensorInfo],
    source: str,
    allow_missing: Iterable[str] = (),
) -> None:
    """CheckpointError if the config's model is implausibly large for the weights, before it is built.

    Every parameter is filled from its own tensor of the same size, so the weights' floating-point
    element count bounds the model (less `allow_missing`, which may stay fresh). Counts come from
    abstract 1- and 2-layer builds, extrapolated (the layers are alike), so a config asking for a
    million layers is refused in well under a second. Smaller gaps pass, for the per-key check to list
    exactly what is missing.
    """
    available = sum(
        math.prod(info.shape) for info in inventory.values() if jnp.issubdtype(info.dtype, jnp.floating)
    )
    skip = tuple(allow_missing)
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        (needed, total), per_layer = parameter_counts(build, config, skip), 0
    else:
        one, two = (
            parameter_counts(build, dataclasses.replace(config, num_hidden_layers=n), skip) for n in (1, 2)
        )
        needed, total = (a + (layers - 1) * (b - a) for a, b in zip(one, two, strict=True))
        per_layer = two[0] - one[0]
    # Building takes time per layer: more layers than the whole file could hold are refused unbuilt.
    if needed > available and per_layer and layers > available // per_layer:
        room = max((available - (one[0] - per_layer)) // per_layer, 0)
        raise CheckpointError(
            f"{source}: config.json asks for num_hidden_layers={layers} ({needed:,} parameters), but these "
            f"weights hold {available:,} floating-point values: room for {room} layers at config.json's "
            "other sizes"
        )
    if total > PLAUSIBLE_EXCESS * available:
        raise CheckpointError(
            f"{source}: config.json describes a model of {total:,} parameters, more than "
            f"{PLAUSIBLE_EXCESS} times the {available:,} floating-point values these weights hold"
        )


def find_tokenizer_files(model_dir: str | os.PathLike, model_type: str) -> list[str]:
    """Paths of the files the tokenizer will be built from; FileNotFoundError (an OSError) naming the
    directory and the files looked for when neither tokenizer.json nor the family's vocabulary is there."""
    vocabulary = FAMILIES[model_type].vocabulary_files
    choices = [("tokenizer.json",), *([vocabulary] if vocabulary else [])]
    for names in choices:
        paths = [os.path.join(model_dir, name) for name in names]
        if all(os.path.isfile(path) for path in paths):
            return paths
    looked_for = " or ".join(" + ".join(names) for names in choices)
    raise FileNotFoundError(
        f"{model_dir}: no tokenizer found (looked for {looked_for}); without one every word would be "
        "scored as an unknown token"
    )


def check_vocabulary(tokenizer, config, source: str) -> None:
    """CheckpointError if the tokenizer is little more than its special tokens, or if its ids run past
    the model's embedding table (config vocab_size)."""
    ids = set(tokenizer.get_vocab().values())
    special = ids & set(tokenizer.all_special_ids)
    if len(ids) - len(special) < MIN_ORDINARY_TOKENS:
        raise CheckpointError(
            f"{source}: the tokenizer has {len(ids)} entries, {len(special)} of them special tokens; a real "
            f"vocabulary has at least {MIN_ORDINARY_TOKENS} ordinary ones"
        )
    if max(ids) >= config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer's ids go up to {max(ids)}, past the model's embedding table "
            f"(vocab_size {config.vocab_size} in config.json)"
        )


def min_pair_length(tokenizer) -> int:
    """Tokens one pair needs at least: the template's special tokens plus one token of each text."""
    return tokenizer.num_special_tokens_to_add(pair=True) + 2
