"""The model families flax_ce supports, keyed by the `model_type` of a checkpoint's config.json."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_ce.config import ConfigError
from flax_ce.models import bert, deberta, modernbert
from flax_ce.models.family import Family
from flax_ce.models.modular import ModularConfig, modular_family

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        bert.BERT,
        bert.ROBERTA,
        bert.XLM_ROBERTA,
        bert.ELECTRA,
        deberta.DEBERTA,
        deberta.DEBERTA_V2,
        modernbert.MODERNBERT,
    )
}
# sentence-transformers' modular cross-encoders over each family's plain encoder (flax_ce/models/modular.py).
MODULAR_FAMILIES: dict[str, Family] = {name: modular_family(family) for name, family in FAMILIES.items()}


def family_of(config_or_model_type: Any) -> Family:
    """The Family of a config (or a `model_type` string)."""
    if isinstance(config_or_model_type, ModularConfig):
        return MODULAR_FAMILIES[config_or_model_type.model_type]
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    return FAMILIES[model_type]


def config_from_dict(raw: Mapping[str, Any], source: str | os.PathLike = "config.json"):
    """The family's frozen config for a raw config.json dict; one ConfigError lists every unsupported setting."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list is unhashable
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type].config_from_dict(raw, os.fspath(source))


def build_model(config, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
    """A randomly initialised module for a validated config (any family)."""
    return family_of(config).module(config, rngs=rngs, dtype=dtype)
