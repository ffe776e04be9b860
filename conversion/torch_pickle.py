"""Read ``torch.save``-d state dicts into numpy arrays without importing torch or running pickle code.

Both layouts written by ``torch.save`` are supported: the zip archive (torch >= 1.6) and the legacy stream of
pickles followed by raw storages. Pickles are read by an unpickler whose ``find_class`` only hands out inert
stand-ins defined here, so no function named by the file (nor any torch function) is ever called.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
from typing import IO, Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# An overlapping view (e.g. from ``expand``) may have more elements than its storage; cap the copy we make
# so that a hostile size/stride pair cannot demand terabytes.
_MAX_OVERLAP_ELEMENTS = 1 << 24
_MAX_DEPTH = 100  # state dict pickles nest about 6 deep


class _Refused(Exception):
    """A problem found while reading; ``load_torch_state_dict`` prefixes the file path."""


class _Inert:
    """Base of the stand-ins: no ``__dict__`` and a refusing ``__setstate__``, so BUILD cannot alter them."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise _Refused(f"BUILD on {type(self).__name__.lstrip('_')} is not allowed")


class _StorageType(_Inert):
    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _Storage(_Inert):
    __slots__ = ("key", "dtype", "numel", "array")

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel, self.array = key, dtype, numel, None


class _Tensor(_Inert):
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Function(_Inert):
    # A plain function would accept BUILD (``setattr(f, "__defaults__", ...)``), so ours are wrapped.
    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: object) -> _Tensor:
        return self.fn(*args)


def _is_index(x: object) -> bool:
    return type(x) is int and x >= 0  # excludes bool, an int subclass


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: validate and record a view of a storage."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"_rebuild_tensor_v2 expects a storage, got {type(storage).__name__}")
    if not _is_index(storage_offset):
        raise _Refused(f"invalid storage offset {storage_offset!r}")
    if not (type(size) is tuple and all(map(_is_index, size))):
        raise _Refused(f"invalid tensor size {size!r}")
    if not (type(stride) is tuple and len(stride) == len(size) and all(map(_is_index, stride))):
        raise _Refused(f"invalid tensor stride {stride!r} for size {size!r}")
    if type(requires_grad) is not bool or not isinstance(backward_hooks, dict) or backward_hooks:
        raise _Refused("invalid requires_grad/backward_hooks arguments to _rebuild_tensor_v2")
    if metadata is not None and (type(metadata) is not dict or metadata):
        raise _Refused(f"unsupported tensor metadata {metadata!r:.80}")
    count = math.prod(size)
    if count:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise _Refused(
                f"tensor of size {size} stride {stride} at offset {storage_offset} exceeds its storage "
                f"{storage.key!r} of {storage.numel} elements"
            )
        if count > max(storage.numel, _MAX_OVERLAP_ELEMENTS):
            raise _Refused(f"overlapping tensor of size {size} is too large for storage {storage.key!r}")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is just its tensor."""
    if type(data) is not _Tensor or type(requires_grad) is not bool or not isinstance(backward_hooks, dict):
        raise _Refused("invalid arguments to _rebuild_parameter")
    if state is not None and type(state) not in (dict, tuple):
        raise _Refused(f"invalid parameter state of type {type(state).__name__}")
    return data  # ``state`` holds Python attributes of the parameter, which do not change its values


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # a builtin type: immutable, safe to hand out
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage persistent ids."""

    def __init__(self, file: Any, layout: str | None) -> None:
        super().__init__(file, encoding="utf-8")
        self.pid_length = {"zip": 5, "legacy": 6}.get(layout or "")  # None: no persistent id may appear
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"refused global {module}.{name} (only plain tensor state dicts are allowed)")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata, None since torch 0.4.
        if type(pid) is not tuple or len(pid) != self.pid_length or pid[0] != "storage":
            raise _Refused(f"unknown persistent id {pid!r:.80}")
        storage_type, key, location, numel = pid[1:5]
        if type(storage_type) is not _StorageType or type(key) is not str or type(location) is not str:
            raise _Refused(f"malformed storage reference {pid!r:.80}")
        if not _is_index(numel):
            raise _Refused(f"invalid storage size {numel!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise _Refused("storage views from torch < 0.4 are not supported")
        storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
            raise _Refused(f"storage {key!r} is declared twice with different types or sizes")
        return storage


class _BoundedReader:
    """File wrapper whose reads never ask for more than the bytes left in the file."""

    # Length fields (in a pickle or a storage header) are untrusted: BINUNICODE8 2**62 would otherwise make
    # ``read`` try to allocate that much before finding out that the file is short.
    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.size = fh, os.fstat(fh.fileno()).st_size
        self.readline, self.tell, self.seek = fh.readline, fh.tell, fh.seek

    def read(self, n: int | None = -1) -> bytes:
        left = max(self.size - self.fh.tell(), 0)
        return self.fh.read(left if n is None or n < 0 else min(n, left))


def _scan(fh: Any) -> None:
    """Walk one pickle's opcodes without building anything, bounding memo indices and object nesting."""
    # Two inputs break the C unpickler itself: LONG_BINPUT 2**32 makes it allocate a 32 GiB memo, and
    # hashing a dict key of tuples nested 10**5 deep overflows the C stack (a segfault). So track depths.
    start = fh.tell()
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    for op, arg, pos in pickletools.genops(fh):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if op.name == "MEMOIZE" else arg
            if index > pos - start:  # entries are numbered consecutively, so honest indices stay below this
                raise _Refused(f"pickle memo index {index} is out of range")
            memo[index] = stack[-1]
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif op.name == "MARK":
            marks.append(len(stack))
        elif op.name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()  # as in the C unpickler, POP right after MARK discards the mark
        else:
            sliced: list[int] = []
            count = len(op.stack_before)
            if pickletools.markobject in op.stack_before:
                count = op.stack_before.index(pickletools.markobject)
                mark = marks.pop()
                sliced, stack[mark:] = stack[mark:], []
            below = [stack.pop() for _ in range(count)]  # top first, so a container being filled is last
            if op.name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"):
                depth = max([below[-1]] + [d + 1 for d in sliced + below[:-1]])
            else:
                depth = 1 + max(sliced + below, default=0)
            if depth > _MAX_DEPTH:
                raise _Refused(f"pickle nests objects more than {_MAX_DEPTH} levels deep")
            stack.extend([depth] * len(op.stack_after))


def _unpickle(fh: Any, layout: str | None = None) -> tuple[Any, dict[str, _Storage]]:
    """Scan one pickle, then load it; returns the object and the storages it references."""
    start = fh.tell()
    _scan(fh)
    fh.seek(start)
    unpickler = _RestrictedUnpickler(fh, layout)
    return unpickler.load(), unpickler.storages


def _decode(data: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """Raw storage bytes -> read-only 1-D ``dtype`` array in native byte order (``_materialize`` copies)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if big_endian and dtype.itemsize > 1:
        raw = raw.reshape(-1, dtype.itemsize)[:, ::-1].reshape(-1)  # per-element swap works for bf16 too
    if dtype == np.bool_:
        return raw != 0  # numpy bools must be 0/1 bytes
    return raw.view(dtype)


def _load_zip(fh: IO[bytes], read_storages: bool) -> tuple[Any, dict[str, _Storage]]:
    with zipfile.ZipFile(fh) as zf:
        names = zf.namelist()
        for name in names:  # we never extract, but a checkpoint with such names is not one torch wrote
            if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
                raise _Refused(f"unsafe zip member name {name!r}")
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise _Refused(f"expected one '<prefix>/data.pkl' zip member, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = b"little"  # files from torch < 1.10 have no byteorder record and are little-endian
        if prefix + "byteorder" in names:
            with zf.open(prefix + "byteorder") as member:
                byteorder = member.read(16)
        if byteorder not in (b"little", b"big"):
            raise _Refused(f"unknown byteorder {byteorder!r}")
        obj, storages = _unpickle(io.BytesIO(zf.read(pickles[0])), "zip")
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise _Refused(f"missing zip member {member!r}")
            nbytes = storage.numel * storage.dtype.itemsize
            if zf.getinfo(member).file_size != nbytes:  # checked before reading: no decompression bomb
                raise _Refused(f"zip member {member!r} does not hold the expected {nbytes} bytes")
            if read_storages:
                storage.array = _decode(zf.read(member), storage.dtype, byteorder == b"big")
    return obj, storages


def _load_legacy(raw_fh: IO[bytes], read_storages: bool) -> tuple[Any, dict[str, _Storage]]:
    fh = _BoundedReader(raw_fh)
    try:
        magic = _unpickle(fh)[0]
    except Exception:  # whatever the first bytes are, they are not torch's magic-number pickle
        magic = None
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _Refused("not a PyTorch checkpoint (neither a zip archive nor a legacy magic number)")
    if _unpickle(fh)[0] != _LEGACY_PROTOCOL:
        raise _Refused("unsupported legacy protocol version")
    _unpickle(fh)  # sys_info; torch writes legacy storages little-endian whatever it says
    obj, storages = _unpickle(fh, "legacy")
    keys = _unpickle(fh)[0]
    if type(keys) is not list or sorted(keys, key=str) != sorted(storages):
        raise _Refused("storage key list does not match the storages used by the pickle")
    if not read_storages:  # the storages follow the pickles: an inventory checks only that they fit
        needed, left = sum(8 + s.numel * s.dtype.itemsize for s in storages.values()), fh.size - fh.tell()
        if needed > left:
            raise _Refused(f"file is truncated: its storages need {needed} bytes, {left} are left")
        return obj, storages
    for key in keys:  # each storage: int64 little-endian element count, then the raw bytes
        storage = storages[key]
        header, nbytes = fh.read(8), storage.numel * storage.dtype.itemsize
        count = int.from_bytes(header, "little")
        if len(header) == 8 and count != storage.numel:
            raise _Refused(f"storage {key!r} holds {count} elements, not {storage.numel}")
        data = fh.read(nbytes)
        if len(header) < 8 or len(data) < nbytes:
            raise _Refused("file is truncated")
        storage.array = _decode(data, storage.dtype, big_endian=False)
    return obj, storages


def _materialize(tensor: _Tensor) -> np.ndarray:
    """Copy the strided view a ``_Tensor`` describes into a fresh contiguous array."""
    dtype = tensor.storage.dtype
    if 0 in tensor.size:
        return np.zeros(tensor.size, dtype)
    strides = tuple(
        0 if n == 1 else s * dtype.itemsize for n, s in zip(tensor.size, tensor.stride, strict=True)
    )
    base = tensor.storage.array[tensor.offset :]
    return np.lib.stride_tricks.as_strided(base, tensor.size, strides, writeable=False).copy()


def _describe(obj: object) -> str:
    names = {_Tensor: "tensor", _Storage: "storage", _Function: "function", _StorageType: "storage type"}
    name = names.get(type(obj), type(obj).__name__)
    return ("an " if name[0] in "aeiou" else "a ") + name


def _read(path: str | os.PathLike, read_storages: bool, convert) -> dict[str, Any]:
    """``{name: convert(tensor)}`` for a flat state dict file; storages are read only if asked."""
    with open(path, "rb") as fh:  # a missing or unreadable file raises OSError, not a checkpoint problem
        try:
            head = fh.read(4)
            if not head:
                raise _Refused("file is empty")
            fh.seek(0)
            load = _load_zip if head == b"PK\x03\x04" else _load_legacy
            obj, _ = load(fh, read_storages)
            if not isinstance(obj, dict):
                raise _Refused(
                    f"top level is {_describe(obj)}, expected a mapping of parameter names to tensors"
                )
            for key, value in obj.items():
                if type(key) is not str or type(value) is not _Tensor:
                    raise _Refused(
                        f"entry {key!r:.80} is {_describe(value)}, expected a tensor (flat state dict)"
                    )
            return {key: convert(value) for key, value in obj.items()}
        except _Refused as exc:
            raise CheckpointError(f"{os.fspath(path)}: {exc}") from None
        # Malformed bytes make pickle, pickletools and zipfile raise almost any exception: report all alike.
        except Exception as exc:
            problem = f"file is truncated or corrupt ({type(exc).__name__}: {exc})"
            raise CheckpointError(f"{os.fspath(path)}: {problem}") from exc


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save``-d state dict as a flat ``{name: array}`` dict without executing pickle code."""
    return _read(path, True, _materialize)


def torch_state_dict_inventory(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of a ``torch.save``-d state dict, from its pickle alone (no storage read)."""
    return _read(path, False, lambda tensor: (tensor.size, tensor.storage.dtype))
