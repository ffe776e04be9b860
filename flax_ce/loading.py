"""Load a checkpoint directory or hub id into (model, tokenizer, config), with no torch needed."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from flax_ce.config import ConfigError, load_config_json
from flax_ce.conversion.convert import build_module
from flax_ce.conversion.files import find_weights, read_inventory, read_weights
from flax_ce.hub import resolve_model_dir
from flax_ce.models import build_model, config_from_dict, family_of
from flax_ce.models.modular import ModularConfig
from flax_ce.preflight import check_config_values, check_vocabulary, check_weights_fit, find_tokenizer_files
from flax_ce.st_modules import is_modular_cross_encoder, modular_tensors, read_modular_config


def load_model(model_dir: str | os.PathLike, config, dtype=jnp.float32, allow_missing: tuple[str, ...] = ()):
    """The family module for `config`, filled strictly from the weights in `model_dir` (and, for a modular
    cross-encoder, its modules' folders)."""
    weights_path = find_weights(model_dir)
    inventory = read_inventory(weights_path)
    if isinstance(config, ModularConfig):
        # The root file holds the encoder alone: measured against the family model less its head.
        check_weights_fit(config.encoder, build_model, inventory, weights_path, ("head.",))
        tensors = modular_tensors(model_dir, config, read_weights(weights_path), weights_path)
    else:
        check_weights_fit(config, build_model, inventory, weights_path, allow_missing)
        tensors = read_weights(weights_path)
    return build_module(
        lambda rngs: build_model(config, rngs=rngs, dtype=dtype),
        tensors,
        family_of(config).key_table,
        weights_path,
        allow_missing=allow_missing,
    )


def load_tokenizer(model_dir: str | os.PathLike, config):
    """The checkpoint's fast tokenizer (transformers), never running code from the repository; its files
    must be there and its vocabulary must fit `config`'s embedding table."""
    from transformers import AutoTokenizer

    files = find_tokenizer_files(model_dir, config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir), trust_remote_code=False)
    # transformers also validates config.json here, with its own exception types (strict dataclasses).
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the caller gets one error naming the directory
        raise OSError(f"{model_dir}: could not load the tokenizer ({type(e).__name__}: {e})") from e
    check_vocabulary(tokenizer, config, files[0])
    return tokenizer


def read_config(model_dir: str | os.PathLike, num_labels: int | None = None):
    """(raw config.json dict, validated config, fresh_head) for a model directory.

    `num_labels` (as sentence-transformers' argument) replaces the checkpoint's label set; the head is
    then new and randomly initialised, as it is for a bare encoder checkpoint (e.g. `BertModel`).
    A sentence-transformers modular cross-encoder gives a ModularConfig (its modules fix the labels).
    """
    raw = load_config_json(model_dir)
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        raise ConfigError(
            f"{os.path.join(model_dir, 'config.json')}: 'architectures' must be a list, got {architectures!r:.80}"
        )
    if is_modular_cross_encoder(model_dir):
        return raw, read_modular(model_dir, raw, architectures, num_labels), False
    fresh_head = num_labels is not None or not any(
        str(a).endswith("ForSequenceClassification") for a in architectures
    )
    if num_labels is not None:
        labels = raw.get("id2label") or {}
        if len(labels) != num_labels:
            raw = {k: v for k, v in raw.items() if k not in ("id2label", "label2id")}
        raw = {**raw, "num_labels": num_labels}
    config = config_from_dict(raw, os.path.join(model_dir, "config.json"))
    check_config_values(config, os.path.join(model_dir, "config.json"))
    return raw, config, fresh_head


def read_modular(model_dir: str | os.PathLike, raw: dict, architectures: list, num_labels: int | None):
    """The ModularConfig of a modular cross-encoder: its plain encoder's config.json, then its modules."""
    source = os.path.join(model_dir, "config.json")
    encoder = config_from_dict(raw, source)
    check_config_values(encoder, source)
    config = read_modular_config(model_dir, encoder)
    plain = family_of(config).architecture
    if architectures not in ([], [plain]):
        raise ConfigError(
            f"{source}: architectures {architectures!r}: the Transformer module of a modular cross-encoder "
            f"must be the plain encoder ({plain!r})"
        )
    if num_labels is not None and num_labels != config.num_labels:
        raise ValueError(
            f"num_labels={num_labels} cannot change a modular cross-encoder: its Dense modules give "
            f"{config.num_labels} scores per pair"
        )
    return config


def load(
    model_name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dtype=jnp.float32,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
):
    """`(model, tokenizer, config)` for a local directory or hub id; the model is an NNX module."""
    model_dir = resolve_model_dir(
        model_name_or_path, cache_dir, revision, token=token, local_files_only=local_files_only
    )
    _, config, fresh_head = read_config(model_dir, num_labels)
    model = load_model(model_dir, config, dtype=dtype, allow_missing=("head.",) if fresh_head else ())
    return model, load_tokenizer(model_dir, config), config


def score(model: nnx.Module, input_ids, attention_mask, token_type_ids=None, packing=None):
    """Logits [batch, num_labels] (fp32) for int arrays [batch, seq]; pure, so callers can jit it. With a
    `flax_ce.models.packing.Packing` (rows of several pairs), logits [batch, slots, num_labels]."""
    if packing is None:
        return model(input_ids, attention_mask, token_type_ids)
    return model(input_ids, attention_mask, token_type_ids, packing)
