"""Model families, keyed by the `model_type` of a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax_ce.models import bert, deberta


@dataclasses.dataclass(frozen=True)
class Family:
    """How to read a family's config and build its module."""

    config_from_dict: Callable[..., Any]
    module: type


FAMILIES: dict[str, Family] = {
    name: Family(bert.config_from_dict, bert.BertCrossEncoder) for name in bert.MODEL_TYPES
}
FAMILIES.update(
    {name: Family(deberta.config_from_dict, deberta.DebertaCrossEncoder) for name in deberta.MODEL_TYPES}
)
