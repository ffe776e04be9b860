"""Ray Data: `Dataset.map_batches(CrossEncoderScorer, ...)` scores text pairs with one model per actor."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np


class CrossEncoderScorer:
    """A callable class for `ray.data.Dataset.map_batches`: the model loads once per actor; each batch (a
    dict of numpy arrays, a pandas DataFrame or a pyarrow Table) comes back with a `score` column
    ([N], 1-label models) or `scores` ([N, num_labels]).

        ds.map_batches(CrossEncoderScorer, fn_constructor_kwargs={"model_name_or_path": "..."},
                       compute=ray.data.ActorPoolStrategy(size=2), batch_size=256)
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        text_columns: Sequence[str] = ("query", "document"),
        output_column: str | None = None,
        batch_size: int | None = None,
        apply_softmax: bool = False,
        **model_kwargs,
    ):
        from flax_ce import CrossEncoder

        if isinstance(text_columns, str) or len(text_columns) != 2:
            raise ValueError(f"text_columns must name 2 columns (text_a, text_b), got {text_columns!r}")
        self.model = CrossEncoder(model_name_or_path, **model_kwargs)
        self.text_columns = tuple(text_columns)
        self.output_column = output_column or ("score" if self.model.num_labels == 1 else "scores")
        self.predict_options = {"batch_size": batch_size, "apply_softmax": apply_softmax}

    def __call__(self, batch):
        """The batch, of the same kind, with the score column added."""
        texts = [_column(batch, name) for name in self.text_columns]
        if texts[0]:
            scores = self.model.predict(
                list(zip(*texts, strict=True)), show_progress_bar=False, **self.predict_options
            )
        else:
            scores = np.zeros((0,) if self.model.num_labels == 1 else (0, self.model.num_labels), np.float32)
        return _with_column(batch, self.output_column, scores)


def _kind(batch) -> str:
    """ "numpy", "pandas" or "pyarrow" (looked up without importing pandas or pyarrow)."""
    if isinstance(batch, dict):
        return "numpy"
    for kind, type_name in (("pandas", "DataFrame"), ("pyarrow", "Table")):
        module = sys.modules.get(kind)
        if module is not None and isinstance(batch, getattr(module, type_name)):
            return kind
    raise TypeError(
        f"expected a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, got {type(batch).__name__}"
    )


def _column(batch, name: str) -> list:
    kind = _kind(batch)
    names = (
        list(batch.keys()) if kind == "numpy" else list(batch.column_names if kind == "pyarrow" else batch)
    )
    if name not in names:
        raise ValueError(f"the batch has no column {name!r} (it has {names}); set text_columns=(a, b)")
    if kind == "pyarrow":
        return batch.column(name).to_pylist()
    return list(np.asarray(batch[name]).tolist())


def _with_column(batch, name: str, scores: np.ndarray):
    kind = _kind(batch)
    if kind == "numpy":
        return {**batch, name: scores}
    if kind == "pandas":
        return batch.assign(**{name: scores if scores.ndim == 1 else list(scores)})
    import pyarrow as pa

    values = pa.array(scores) if scores.ndim == 1 else pa.array(scores.tolist(), pa.list_(pa.float32()))
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, values)
    return batch.append_column(name, values)
