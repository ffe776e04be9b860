"""Validation of what users pass to predict/rank: clear errors naming the offending item."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def is_single_pair(inputs) -> bool:
    """sentence-transformers' rule: a list/tuple whose first item is not itself a list/tuple is one pair."""
    if isinstance(inputs, (list, tuple)):
        return len(inputs) > 0 and not isinstance(inputs[0], (list, tuple, np.ndarray))
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in ("U", "O"):
        return inputs.size > 0 and inputs.ndim < 2
    return True


def normalise_pairs(inputs) -> tuple[list[tuple[str, str]], bool]:
    """(pairs, was_single) from one pair, a list of pairs or a 2-d string array; raises on anything else."""
    if inputs is None:
        raise TypeError("inputs must be a pair of strings or a list of pairs, got None")
    if isinstance(inputs, str):
        raise TypeError("inputs must be a pair of strings or a list of pairs, got a single string")
    if isinstance(inputs, np.ndarray):
        if inputs.dtype.kind not in ("U", "O"):
            raise TypeError(f"a numpy array of inputs must hold strings, got dtype {inputs.dtype}")
        inputs = inputs.tolist()
    elif isinstance(inputs, dict) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a pair of strings or a list of pairs, got {type(inputs).__name__}")
    single = is_single_pair(inputs)
    items = [inputs] if single else list(inputs)
    pairs = []
    for i, pair in enumerate(items):
        where = "the pair" if single else f"pair {i}"
        if not isinstance(pair, (list, tuple)):
            raise TypeError(f"{where} must be a list or tuple of two strings, got {type(pair).__name__}")
        if len(pair) != 2:
            raise ValueError(f"{where} must have exactly 2 texts, got {len(pair)}")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise TypeError(f"{where}, text {j}: expected str, got {type(text).__name__} ({text!r:.60})")
        pairs.append((pair[0], pair[1]))
    return pairs, single


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """Raise for a non-positive (or non-integer) count such as batch_size or top_k."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
