"""Model configs: frozen dataclasses built from a checkpoint's config.json, rejecting what we do not implement."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from flax_ce.activations import HIDDEN_ACTIVATIONS
from flax_ce.json_file import read_json


class ConfigError(ValueError):
    """config.json asks for something flax_ce does not implement; the message lists every problem."""


class ConfigReader:
    """Reads typed fields from a raw config dict and collects every problem before raising once."""

    def __init__(self, raw: Mapping[str, Any], source: str):
        self.raw = raw
        self.source = source
        self.problems: list[str] = []

    def get(
        self, key: str, default: Any = dataclasses.MISSING, kind: type | tuple[type, ...] = object
    ) -> Any:
        """Value of `key` (or `default`); records a problem if missing or of the wrong type."""
        if key not in self.raw or self.raw[key] is None and default is not dataclasses.MISSING:
            if default is dataclasses.MISSING:
                self.problems.append(f"missing required key {key!r}")
                return None  # the callers' arithmetic must see no value, not the MISSING sentinel
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            self.problems.append(f"{key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
            return default if default is not dataclasses.MISSING else None
        return value

    def require(self, ok: bool, message: str) -> None:
        """Record `message` as a problem unless `ok`."""
        if not ok:
            self.problems.append(message)

    def activation(self, key: str, default: str) -> str:
        """A `hidden_act`-style name that we implement."""
        name = self.get(key, default, str)
        if name is not None and name not in HIDDEN_ACTIVATIONS:
            self.problems.append(
                f"{key}={name!r} is not supported (supported: {', '.join(sorted(HIDDEN_ACTIVATIONS))})"
            )
            return default
        return name

    def model_type(self, supported: tuple[str, ...]) -> str:
        """`model_type`, which must be one of `supported`."""
        model_type = self.get("model_type", kind=str)
        self.require(model_type in supported, f"model_type {model_type!r} is not one of {supported}")
        return model_type

    def width_and_heads(self) -> tuple[int | None, int | None]:
        """(hidden_size, num_attention_heads); the width must split evenly over the heads."""
        hidden = self.get("hidden_size", kind=int)
        heads = self.get("num_attention_heads", kind=int)
        if hidden and heads:
            self.require(
                hidden % heads == 0,
                f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
            )
        return hidden, heads

    def check_problem_type(self) -> None:
        """Only the published checkpoints' kinds of head: single-label classification or regression."""
        value = self.raw.get("problem_type")
        self.require(
            value in (None, "regression", "single_label_classification"),
            f"problem_type={value!r} is not supported",
        )

    def finish(self) -> None:
        """Raise one ConfigError listing every recorded problem."""
        if self.problems:
            listing = "\n  - ".join(self.problems)
            raise ConfigError(f"{self.source}: unsupported model configuration:\n  - {listing}")


class LabelsMixin:
    """`id2label` / `label2id` views of a config's `labels` tuple (label names by id)."""

    labels: tuple[str, ...]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def read_labels(reader: ConfigReader) -> tuple[int, tuple[str, ...]]:
    """num_labels and the label names by id, from `id2label` (as transformers reads it) or `num_labels`."""
    raw_labels = reader.raw.get("id2label")
    if isinstance(raw_labels, Mapping) and raw_labels:
        try:
            by_id = {int(k): str(v) for k, v in raw_labels.items()}
        except (TypeError, ValueError):
            reader.problems.append(f"id2label keys must be integers, got {list(raw_labels)!r}")
            return 1, ("LABEL_0",)
        reader.require(
            sorted(by_id) == list(range(len(by_id))), f"id2label ids must be 0..N-1, got {sorted(by_id)}"
        )
        return len(by_id), tuple(by_id.get(i, f"LABEL_{i}") for i in range(len(by_id)))
    num_labels = reader.get("num_labels", 2, int)
    reader.require(num_labels is None or num_labels >= 1, f"num_labels must be >= 1, got {num_labels}")
    num_labels = max(num_labels or 1, 1)
    return num_labels, tuple(f"LABEL_{i}" for i in range(num_labels))


def load_config_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse `<model_dir>/config.json` with errors that name the file."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config.json not found; a model directory needs one")
    return read_json(path, dict, ConfigError)
