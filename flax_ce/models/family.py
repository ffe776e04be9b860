"""The record that owns everything family-specific: config parser, module, key table, export name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from flax_ce.conversion.rules import KeyTable


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture (`model_type` in config.json) as flax_ce loads, runs and exports it.

    `module(config, rngs=..., dtype=...)` returns an NNX module whose `__call__(input_ids, attention_mask,
    token_type_ids, packing=None)` gives fp32 logits (per row, or per row and slot for packed rows, see
    `flax_ce.models.packing`) and whose `encode(...)` gives the hidden states after the embeddings and
    after each layer. Its config has `position_limit` (longest sequence its positions
    allow, or None), `vocab_size`, `type_vocab_size`, `num_labels` and `labels`.
    """

    model_type: str
    config_from_dict: Callable[[Mapping[str, Any], str], Any]
    module: Callable[..., nnx.Module]
    key_table: KeyTable
    architecture: str  # the transformers `*ForSequenceClassification` class save_pretrained names
    # Besides tokenizer.json, the files its (slow) transformers tokenizer saves its vocabulary in.
    vocabulary_files: tuple[str, ...] = ()
