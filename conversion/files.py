"""Find checkpoint weights (model.safetensors, pytorch_model.bin, sharded indexes of either) and read
either their inventory (names, shapes, dtypes, from headers alone) or all their tensors."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import ml_dtypes  # also registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import SafetensorError, safe_open

from flax_ce.json_file import read_json

from .errors import CheckpointError
from .torch_pickle import load_torch_state_dict, torch_state_dict_inventory

# Preference order, as transformers loads them: safetensors first, single file before sharded.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SHARD_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
# Every name a checkpoint's weights may have (glob patterns), for downloads and clean-ups.
WEIGHT_PATTERNS = WEIGHT_FILES + SHARD_PATTERNS

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
T = TypeVar("T")


class TensorInfo(NamedTuple):
    """What a checkpoint header says about one tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _refuse_duplicate_names(path: str) -> None:
    """CheckpointError if the safetensors header names a tensor twice (the library keeps one silently)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len <= min(os.fstat(f.fileno()).st_size - 8, MAX_HEADER_BYTES):
            return  # safe_open reports it
        header = f.read(header_len)
    repeated: set[str] = set()

    def note_repeats(pairs: list[tuple[str, object]]) -> dict:
        repeated.update(name for name, count in collections.Counter(n for n, _ in pairs).items() if count > 1)
        return dict(pairs)

    try:
        json.loads(header, object_pairs_hook=note_repeats)
    except (ValueError, RecursionError):
        return  # not JSON: safe_open reports it
    if repeated:
        raise CheckpointError(
            f"{path}: the header lists {', '.join(map(repr, sorted(repeated)))} more than once"
        )


def _with_safetensors(path: str, read: Callable[..., T]) -> T:
    """`read(handle)` on an open safetensors file; the library's errors become CheckpointErrors."""
    _refuse_duplicate_names(path)
    try:
        with safe_open(path, framework="numpy") as handle:
            return read(handle)
    except (SafetensorError, TypeError, ValueError) as e:  # TypeError: a dtype numpy lacks
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (bf16 via ml_dtypes); errors name the file."""
    return _with_safetensors(os.fspath(path), lambda f: {name: f.get_tensor(name) for name in f.keys()})


def safetensors_inventory(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a .safetensors file, from its header alone."""
    path = os.fspath(path)

    def inventory(f) -> dict[str, TensorInfo]:
        found = {}
        for name in f.keys():
            tensor = f.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype())
            if dtype is None:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has dtype {tensor.get_dtype()}, not supported"
                )
            found[name] = TensorInfo(tuple(tensor.get_shape()), np.dtype(dtype))
        return found

    return _with_safetensors(path, inventory)


def _read_sharded(index_path: str, read_one: Callable[[str], dict[str, T]]) -> dict[str, T]:
    """`read_one` of every shard an `*.index.json` names; shards must lie in the index's own directory."""
    directory = os.path.dirname(os.path.abspath(index_path))
    weight_map = read_json(index_path, dict, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index (no 'weight_map' object)")
    problems = []
    shards = sorted(set(weight_map.values()), key=str)
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            problems.append(f"shard {shard!r} is not a plain file name in {directory}")
        elif not os.path.isfile(os.path.join(directory, shard)):
            problems.append(f"shard {shard!r} is missing")
    if problems:
        raise CheckpointError(f"{index_path}: " + "; ".join(problems))
    found: dict[str, T] = {}
    for shard in shards:
        shard_path = os.path.join(directory, shard)
        for name, value in read_one(shard_path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(
                    f"{shard_path}: tensor {name!r} is not listed for this shard in {index_path}"
                )
            found[name] = value
    missing = sorted(set(weight_map) - set(found))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not found in their shards: {missing}")
    return found


def _read_any(path: str | os.PathLike, read_safetensors_file, read_torch_file) -> dict:
    """One file or a sharded index, read with the reader its extension calls for."""
    path = os.fspath(path)

    def read_one(file: str) -> dict:
        return read_safetensors_file(file) if file.endswith(".safetensors") else read_torch_file(file)

    try:
        if path.endswith(".index.json"):
            return _read_sharded(path, read_one)
        return read_one(path)
    except PermissionError as e:
        raise PermissionError(f"{path}: cannot read the weights file ({e.strerror})") from e


def find_weights(model_dir: str | os.PathLike) -> str:
    """Path of the weights file to read in `model_dir`, by transformers' preference order."""
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{model_dir}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def read_inventory(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """{torch name: TensorInfo} of a checkpoint file or sharded index, read from headers and pickles only."""

    def torch_inventory(file: str) -> dict[str, TensorInfo]:
        return {name: TensorInfo(*info) for name, info in torch_state_dict_inventory(file).items()}

    return _read_any(path, safetensors_inventory, torch_inventory)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint file or sharded index, as numpy arrays keyed by their torch names."""
    return _read_any(path, read_safetensors, load_torch_state_dict)
