"""Strict conversion both ways: a torch state dict into a flax_ce module (every key used, every parameter
filled, every shape checked) and a module's parameters back into a transformers state dict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from .errors import CheckpointError
from .rules import LAYOUTS, KeyTable, normalise_key


def _format(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def map_state_dict(
    tensors: Mapping[str, np.ndarray],
    table: KeyTable,
    expected: Mapping[tuple, jax.ShapeDtypeStruct],
    source: str,
    allow_missing: Iterable[str] = (),
) -> dict[tuple, np.ndarray]:
    """Torch tensors -> {flax path: array}; one CheckpointError lists every unmapped, missing or bad key.

    `allow_missing` names flax path prefixes that may stay unfilled (a fresh head on a bare encoder).
    """
    problems: list[str] = []
    filled: dict[tuple, np.ndarray] = {}
    sources: dict[tuple, str] = {}
    for key, array in tensors.items():
        name = normalise_key(key)
        mapped = table.to_flax(name)
        if mapped is None:
            if not table.ignored(name):
                problems.append(
                    f"unexpected key {key!r} (shape {tuple(array.shape)}) has no place in the model"
                )
            continue
        path, layout = mapped
        if path not in expected:
            if table.ignored(name):  # the reference drops it when the config has no place for it
                continue
            problems.append(f"key {key!r} maps to {_format(path)!r}, which this config's model does not have")
            continue
        if path in filled:
            problems.append(f"keys {sources[path]!r} and {key!r} both map to {_format(path)!r}")
            continue
        value = LAYOUTS[layout](np.asarray(array))
        want = tuple(expected[path].shape)
        if value.shape != want:
            problems.append(
                f"key {key!r} has shape {tuple(array.shape)}, but {_format(path)!r} needs "
                f"{want} (after the {layout} layout change)"
            )
            continue
        if not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):  # bfloat16 (ml_dtypes) too
            problems.append(f"key {key!r} has dtype {value.dtype}, expected a floating-point tensor")
            continue
        filled[path] = value.astype(expected[path].dtype)
        sources[path] = key
    prefixes = tuple(allow_missing)
    missing = [
        _format(p) for p in expected if p not in filled and not _format(p).startswith(prefixes or ("\0",))
    ]
    if missing:
        problems.append(f"missing weights for {len(missing)} model parameters: {', '.join(missing)}")
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointError(
            f"{source}: checkpoint does not match the model ({len(problems)} problems):\n  - {listing}"
        )
    return filled


def build_module(
    constructor,
    tensors: Mapping[str, np.ndarray],
    table: KeyTable,
    source: str,
    allow_missing: Iterable[str] = (),
    seed: int = 0,
) -> nnx.Module:
    """Build `constructor(rngs)` abstractly, check and fill its parameters from `tensors`, return it.

    Parameters named in `allow_missing` keep a fresh random initialisation from `seed`.
    """
    abstract = nnx.eval_shape(lambda: constructor(nnx.Rngs(seed, dropout=seed)))
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    expected = {path: var.value for path, var in nnx.to_flat_state(params)}
    filled = map_state_dict(tensors, table, expected, source, allow_missing)
    need_init = [p for p in expected if p not in filled]

    # What the checkpoint does not hold gets real values: a fresh head (allowed missing) and the dropout
    # layers' RNG streams. jit drops the initialisation of everything not returned, so this costs only those.
    @jax.jit
    def initialise_rest():
        model = constructor(nnx.Rngs(seed, dropout=seed))
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        return {p: flat[p].value for p in need_init}, nnx.state(model, nnx.Not(nnx.Param))

    fresh, rest = initialise_rest()
    filled = {**fresh, **filled}
    flat_params = nnx.to_flat_state(params)
    for path, var in flat_params:
        var.value = jax.numpy.asarray(filled[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat_params), rest)


def torch_state_dict(params: Mapping[tuple, np.ndarray], table: KeyTable) -> dict[str, np.ndarray]:
    """{flax path: array} -> transformers `*ForSequenceClassification` state dict (fp32, torch layouts)."""
    tensors: dict[str, np.ndarray] = {}
    for path, array in params.items():
        key, layout = table.to_torch(path)
        tensors[key] = np.ascontiguousarray(LAYOUTS[layout](np.asarray(array, dtype=np.float32)))
    return tensors
