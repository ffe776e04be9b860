"""Find and read checkpoint weights: model.safetensors, pytorch_model.bin, and sharded indexes of either."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from .errors import CheckpointError
from .torch_pickle import load_torch_state_dict

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

# Preference order, as transformers loads them: safetensors first, single file before sharded.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays (bf16 via ml_dtypes); errors name the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CheckpointError(f"{path}: file is truncated (no safetensors header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise CheckpointError(f"{path}: file is truncated (header claims {header_len} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    body = memoryview(data)[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            start, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: tensor {name!r} has an unsupported or corrupt entry {info!r}"
            ) from e
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= start <= end <= len(body) or end - start != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong size (file is truncated?)"
            )
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    return tensors


def _read_one(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return load_torch_state_dict(path)


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    """Read every shard an `*.index.json` names; shards must lie in the index's own directory."""
    directory = os.path.dirname(os.path.abspath(index_path))
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index ({e})") from e
    problems = []
    shards = sorted(set(weight_map.values()), key=str)
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            problems.append(f"shard {shard!r} is not a plain file name in {directory}")
        elif not os.path.isfile(os.path.join(directory, shard)):
            problems.append(f"shard {shard!r} is missing")
    if problems:
        raise CheckpointError(f"{index_path}: " + "; ".join(problems))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        shard_path = os.path.join(directory, shard)
        for name, array in _read_one(shard_path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(
                    f"{shard_path}: tensor {name!r} is not listed for this shard in {index_path}"
                )
            tensors[name] = array
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not found in their shards: {missing}")
    return tensors


def find_weights(model_dir: str | os.PathLike) -> str:
    """Path of the weights file to read in `model_dir`, by transformers' preference order."""
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{model_dir}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint file or sharded index, as numpy arrays keyed by their torch names."""
    path = os.fspath(path)
    try:
        if path.endswith(".index.json"):
            return _read_sharded(path)
        return _read_one(path)
    except PermissionError as e:
        raise PermissionError(f"{path}: cannot read the weights file ({e.strerror})") from e
