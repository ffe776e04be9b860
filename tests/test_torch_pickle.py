"""Tests for the torch-free, code-execution-free ``pytorch_model.bin`` reader."""

from __future__ import annotations

import builtins
import codecs
import contextlib
import functools
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax_ce.conversion.errors import CheckpointError
from flax_ce.conversion.torch_pickle import load_torch_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
LAYOUTS = pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])

# ----------------------------------------------------------------------------------------------------------
# "Nothing executed" is checked two ways: payloads that would touch a marker file, and an audit hook that
# records code-execution events (including the default unpickler resolving a global) while the loader runs.
# Audit hooks cannot be removed, so this one only records while ``_watching`` is set.
_DANGEROUS_EVENTS = {
    "pickle.find_class",
    "os.system",
    "subprocess.Popen",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "exec",
    "compile",
    "import",
    "ctypes.dlopen",
    "socket.connect",
}
_watching: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _watching is not None and event in _DANGEROUS_EVENTS:
        _watching.append(event)


sys.addaudithook(_audit)
# Stdlib codecs imported lazily on first use (by zipfile for non-UTF-8 member names, by pickletools for
# protocol 0 strings) would show up as imports; load them now so only the loader's own behaviour is watched.
for _codec in ("cp437", "raw-unicode-escape"):
    codecs.lookup(_codec)


@contextlib.contextmanager
def _no_code_runs():
    global _watching
    _watching = events = []
    try:
        yield
    finally:
        _watching = None
    assert events == [], f"loader triggered {events}"


def _load(path: Path) -> dict[str, np.ndarray]:
    with _no_code_runs():
        return load_torch_state_dict(path)


def _refused(path: Path, pattern: str) -> CheckpointError:
    """Assert loading ``path`` raises CheckpointError matching ``pattern`` and naming the file."""
    with _no_code_runs(), pytest.raises(CheckpointError, match=pattern) as info:
        load_torch_state_dict(path)
    assert str(path) in str(info.value)
    return info.value


# ----------------------------------------------------------------------------------------------------------
# Round trips against torch.load.

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def _save(obj: object, path: Path, legacy: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _assert_matches_torch(path: Path) -> None:
    ours = _load(path)
    ref = torch.load(path, weights_only=True)
    assert list(ours) == list(ref)
    for name, tensor in ref.items():
        array = ours[name]
        assert type(array) is np.ndarray and array.flags.c_contiguous and array.flags.writeable, name
        assert array.dtype == _NUMPY_DTYPES[tensor.dtype] and array.shape == tuple(tensor.shape), name
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:  # numpy cannot take bf16 tensors; float32 holds bf16 exactly
            tensor, array = tensor.float(), array.astype(np.float32)
        np.testing.assert_array_equal(array, tensor.numpy(), err_msg=name)


def _sample_state_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    param_with_state = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
    param_with_state.note = "python attribute"
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(-5, 7).reshape(3, 4),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True, True]),
        "base": base,
        "transposed": base.t(),  # the views share ``base``'s storage
        "sliced": base[1:3, ::2],
        "column": base[:, 2],
        "offset_row": base[3],
        "bf16_transposed": torch.randn(3, 4, generator=g).bfloat16().t(),
        "expanded": torch.arange(5).expand(3, 5),  # stride 0
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7),
        "scalar_bool": torch.tensor(False),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "empty_1d": torch.empty(0, dtype=torch.int64),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "param_with_state": param_with_state,  # pickled via _rebuild_parameter_with_state
    }


@LAYOUTS
def test_matches_torch_load(tmp_path: Path, legacy: bool) -> None:
    _assert_matches_torch(_save(_sample_state_dict(), tmp_path / "model.bin", legacy))


@LAYOUTS
def test_arrays_do_not_share_memory(tmp_path: Path, legacy: bool) -> None:
    result = _load(_save(_sample_state_dict(), tmp_path / "model.bin", legacy))
    before = result["transposed"].copy()
    result["base"][...] = 0  # ``transposed`` views the same torch storage, but our arrays are copies
    np.testing.assert_array_equal(result["transposed"], before)


@LAYOUTS
def test_ordered_dict_with_metadata(tmp_path: Path, legacy: bool) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = module.state_dict()  # an OrderedDict with ``_metadata``, restored through BUILD
    _assert_matches_torch(_save(state, tmp_path / "model.bin", legacy))


@LAYOUTS
def test_bert_state_dict(tmp_path: Path, legacy: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    model = transformers.BertForSequenceClassification(config)
    _assert_matches_torch(_save(model.state_dict(), tmp_path / "pytorch_model.bin", legacy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.bool])
def test_big_endian_zip(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = (torch.arange(12) - 4).reshape(3, 4).to(dtype).t()
    little = _save({"t": tensor}, tmp_path / "little.bin", legacy=False)
    path = tmp_path / "big.bin"
    with zipfile.ZipFile(little) as source, zipfile.ZipFile(path, "w") as out:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif name.endswith("/data/0"):
                size = tensor.element_size()
                data = np.frombuffer(data, np.uint8).reshape(-1, size)[:, ::-1].tobytes()
            out.writestr(name, data)
    _assert_matches_torch(path)  # torch honours the byteorder record too
    np.testing.assert_array_equal(_load(path)["t"], _load(little)["t"])


def test_missing_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "absent.bin")


# ----------------------------------------------------------------------------------------------------------
# Hand-written pickles in torch's layouts.


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _tuple(items: bytes) -> bytes:
    return b"(" + items + b"t"  # MARK ... TUPLE


def _tensor_pickle(
    offset: int = 0,
    size: tuple = (2, 3),
    stride: tuple = (3, 1),
    numel: int = 6,
    key: str = "0",
    storage: tuple[str, str] = ("torch", "FloatStorage"),
    tag: str = "storage",
    legacy: bool = False,
) -> bytes:
    """Pickle of ``{"weight": _rebuild_tensor_v2(<storage>, offset, size, stride, False, OrderedDict())}``."""
    pid = _tuple(
        _str(tag) + _glob(*storage) + _str(key) + _str("cpu") + _int(numel) + (b"N" if legacy else b"")
    )
    args = pid + b"Q" + _int(offset) + _tuple(b"".join(map(_int, size))) + _tuple(b"".join(map(_int, stride)))
    args += b"\x89" + _glob("collections", "OrderedDict") + b")R"  # NEWFALSE, OrderedDict()
    tensor = _glob("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"
    return b"\x80\x02}" + _str("weight") + tensor + b"s."


def _write(
    path: Path,
    pkl: bytes,
    legacy: bool,
    storages: dict[str, np.ndarray] | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> Path:
    """Write ``pkl`` plus raw storages in torch's zip or legacy layout."""
    storages = {"0": np.arange(6, dtype=np.float32)} if storages is None else storages
    if legacy:
        sys_info = {
            "protocol_version": 1001,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        }
        head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, sys_info))
        tail = pickle.dumps(list(storages), protocol=2)
        tail += b"".join(struct.pack("<q", a.size) + a.tobytes() for a in storages.values())
        path.write_bytes(head + pkl + tail)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", pkl)
            zf.writestr("archive/byteorder", b"little")
            for key, array in storages.items():
                zf.writestr(f"archive/data/{key}", array.tobytes())
            zf.writestr("archive/version", b"3\n")
            for name, data in (extra_members or {}).items():
                zf.writestr(name, data)
    return path


@LAYOUTS
def test_hand_written_checkpoint_loads(tmp_path: Path, legacy: bool) -> None:
    """Positive control for the hostile variants below: the well-formed hand-written file loads like torch."""
    path = _write(tmp_path / "ok.bin", _tensor_pickle(legacy=legacy), legacy)
    _assert_matches_torch(path)
    np.testing.assert_array_equal(_load(path)["weight"], np.arange(6, dtype=np.float32).reshape(2, 3))


@LAYOUTS
def test_untyped_storage_is_bytes(tmp_path: Path, legacy: bool) -> None:
    pkl = _tensor_pickle(storage=("torch.storage", "UntypedStorage"), size=(6,), stride=(1,), legacy=legacy)
    path = _write(tmp_path / "u.bin", pkl, legacy, {"0": np.arange(6, dtype=np.uint8)})
    result = _load(path)["weight"]
    assert result.dtype == np.uint8 and result.tolist() == list(range(6))


@LAYOUTS
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"offset": 1}, "exceeds its storage '0' of 6 elements"),
        ({"offset": 10**9}, "exceeds its storage"),
        ({"size": (2, 4)}, "exceeds its storage"),
        ({"size": (3, 3), "stride": (0, 3)}, "exceeds its storage"),
        ({"offset": -1}, "invalid storage offset -1"),
        ({"size": (2, -3)}, "invalid tensor size"),
        ({"stride": (3, 1, 1)}, "invalid tensor stride"),
        ({"numel": 7}, r"expected 28 bytes|elements, not 7"),
        ({"numel": -1}, "invalid storage size -1"),
        ({"tag": "module"}, "unknown persistent id"),
        (
            {"storage": ("torch", "ComplexFloatStorage")},
            re.escape("refused global torch.ComplexFloatStorage"),
        ),
        ({"storage": ("torch", "Tensor")}, re.escape("refused global torch.Tensor")),
    ],
)
def test_malformed_tensor_refused(tmp_path: Path, legacy: bool, kwargs: dict, pattern: str) -> None:
    _refused(_write(tmp_path / "bad.bin", _tensor_pickle(legacy=legacy, **kwargs), legacy), pattern)


def test_missing_storage_member(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.bin", _tensor_pickle(key="1"), legacy=False)
    _refused(path, re.escape("missing zip member 'archive/data/1'"))


@pytest.mark.parametrize("name", ["../evil", "archive/../../evil", "/abs/evil", "archive/data/..\\..\\evil"])
def test_unsafe_zip_member_names(tmp_path: Path, name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = _write(work / "model.bin", _tensor_pickle(), legacy=False, extra_members={name: b"payload"})
    _refused(path, "unsafe zip member name")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["model.bin", "work"]  # nothing was extracted


# ----------------------------------------------------------------------------------------------------------
# Hostile pickles: each would run code under plain ``pickle.loads`` (checked as a positive control).


class _Reduce:
    """Pickles as ``fn(*args)``, the classic ``__reduce__`` payload."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "posix.system": _Reduce(os.system, f"touch '{marker}'"),  # os.system pickles as posix.system
        "builtins.eval": _Reduce(builtins.eval, code),
        "builtins.exec": _Reduce(builtins.exec, code),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
    }


def _check_control(pkl: bytes, marker: Path) -> None:
    result = pickle.loads(pkl)
    for obj in (result, *(result.values() if isinstance(result, dict) else ())):
        if isinstance(obj, subprocess.Popen):
            obj.wait()
    assert marker.exists(), "payload is not live, so the test would prove nothing"
    marker.unlink()


@LAYOUTS
@pytest.mark.parametrize("target", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "in_ordered_dict"])
def test_reduce_payload_refused(tmp_path: Path, legacy: bool, target: str, nested: bool) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[target]
    pkl = pickle.dumps(OrderedDict(weight=payload) if nested else payload, protocol=2, fix_imports=False)
    assert f"c{target.replace('.', chr(10))}\n".encode() in pkl
    _check_control(pkl, marker)
    _refused(_write(tmp_path / "evil.bin", pkl, legacy), re.escape(f"refused global {target}"))
    assert not marker.exists()


def _os_system_pickle(protocol: int, command: str, opcode: str = "global") -> bytes:
    """``os.system(command)`` written opcode by opcode."""
    if opcode == "inst":  # protocol 0 INST: MARK args INST module\nname\n
        return b"(V" + command.encode() + b"\nios\nsystem\n."
    if protocol == 0:
        return b"cos\nsystem\n(V" + command.encode() + b"\ntR."
    if protocol == 2:
        return b"\x80\x02" + _glob("os", "system") + _tuple(_str(command)) + b"R."
    short = b"".join(b"\x8c" + bytes([len(s)]) + s for s in (b"os", b"system"))  # SHORT_BINUNICODE
    return b"\x80" + bytes([protocol]) + short + b"\x93" + _tuple(_str(command)) + b"R."  # STACK_GLOBAL


@LAYOUTS
@pytest.mark.parametrize(
    ("protocol", "opcode"), [(0, "global"), (0, "inst"), (2, "global"), (4, "global"), (5, "global")]
)
def test_hand_written_global_refused(tmp_path: Path, legacy: bool, protocol: int, opcode: str) -> None:
    marker = tmp_path / "pwned"
    pkl = _os_system_pickle(protocol, f"touch '{marker}'", opcode)
    _check_control(pkl, marker)
    _refused(_write(tmp_path / "evil.bin", pkl, legacy), re.escape("refused global os.system"))
    assert not marker.exists()


@LAYOUTS
def test_build_on_stand_in_refused(tmp_path: Path, legacy: bool) -> None:
    # BUILD would otherwise set attributes (e.g. __defaults__) on the loader's own functions.
    state = b"}" + _str("__defaults__") + _tuple(_int(1)) + b"s"
    pkl = b"\x80\x02" + _glob("torch._utils", "_rebuild_tensor_v2") + state + b"b."
    _refused(_write(tmp_path / "evil.bin", pkl, legacy), "BUILD on Function is not allowed")
    _assert_matches_torch(_write(tmp_path / "ok.bin", _tensor_pickle(legacy=legacy), legacy))  # unharmed


@LAYOUTS
def test_whole_module_refused(tmp_path: Path, legacy: bool) -> None:
    path = _save(torch.nn.Linear(2, 2), tmp_path / "module.bin", legacy)
    _refused(path, re.escape("refused global torch.nn.modules.linear.Linear"))


@LAYOUTS
@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ([torch.ones(2)], "top level is a list"),
        ({"state_dict": {"w": torch.ones(2)}}, "entry 'state_dict' is a dict, expected a tensor"),
        ({"w": torch.ones(2), "step": 3}, "entry 'step' is an int, expected a tensor"),
        (torch.ones(2), "top level is a tensor"),
    ],
)
def test_not_a_flat_state_dict(tmp_path: Path, legacy: bool, obj: object, pattern: str) -> None:
    _refused(_save(obj, tmp_path / "model.bin", legacy), pattern)


@LAYOUTS
@pytest.mark.parametrize(
    ("pkl", "pattern"),
    [
        (b"\x80\x02Nr\xff\xff\xff\x7f.", "memo index 2147483647 is out of range"),  # 16 GiB memo
        (b"(I1\np99999999999\n.", "memo index 99999999999 is out of range"),
        (b"\x80\x02" + b"]" * 500 + b"a" * 499 + b".", "more than 100 levels deep"),
        (b"\x80\x04(" + b"(" * 500 + b"\x91" * 500 + b"t.", "more than 100 levels deep"),
    ],
    ids=["long_binput", "put", "lists", "frozensets"],
)
def test_pickle_bombs_refused(tmp_path: Path, legacy: bool, pkl: bytes, pattern: str) -> None:
    _refused(_write(tmp_path / "bomb.bin", pkl, legacy), pattern)


def test_deep_tuple_key_refused_without_crash(tmp_path: Path) -> None:
    # Hashing a dict key of tuples nested this deep overflows the C stack inside pickle itself (a segfault),
    # so the loader must refuse before unpickling; run it in a subprocess so a regression cannot kill pytest.
    pkl = b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"Ns."
    paths = [str(_write(tmp_path / f"deep{legacy}.bin", pkl, legacy)) for legacy in (False, True)]
    code = "import sys\nfrom flax_ce.conversion.torch_pickle import load_torch_state_dict as load\n"
    code += "for path in sys.argv[1:]:\n    try:\n        load(path)\n"
    code += "    except ValueError as exc:\n        print(exc)"
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for path in paths:
        assert f"{path}: pickle nests objects more than 100 levels deep" in proc.stdout


# ----------------------------------------------------------------------------------------------------------
# Damaged files.


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    _refused(path, "file is empty")


@pytest.mark.parametrize(
    "content", [b"this is not a checkpoint\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b'{"weight": [1, 2]}']
)
def test_not_a_pickle(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    _refused(path, "not a PyTorch checkpoint")


@LAYOUTS
@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file(tmp_path: Path, legacy: bool, fraction: float) -> None:
    data = _save(_sample_state_dict(), tmp_path / "full.bin", legacy).read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: int(len(data) * fraction)])
    _refused(path, "truncated|not a PyTorch checkpoint" if fraction < 0.05 else "truncated")


# ----------------------------------------------------------------------------------------------------------
# Fuzzing: random damage yields arrays or CheckpointError, never another exception and never code execution.


@functools.cache
def _fuzz_bases() -> dict[str, bytes]:
    state = {
        "a": torch.arange(6.0).reshape(2, 3),
        "b": torch.tensor([True, False]),
        "c": torch.ones(3).half(),
    }
    state["t"] = state["a"].t()
    bases = {}
    for legacy in (False, True):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
        bases["legacy" if legacy else "zip"] = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(bases["zip"])) as zf:
        bases["zip_pickle"] = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    return bases


@pytest.mark.parametrize("kind", ["zip", "legacy", "zip_pickle"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    bases = _fuzz_bases()
    content = bytearray(bases[kind])
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(1, len(content)), label="truncate at")
    content = content[:cut]
    path = tmp_path / "fuzz.bin"
    if kind == "zip_pickle":  # damage only the pickle but keep a valid archive (and CRC) around it
        with zipfile.ZipFile(io.BytesIO(bases["zip"])) as src, zipfile.ZipFile(path, "w") as out:
            for name in src.namelist():
                out.writestr(name, bytes(content) if name.endswith("/data.pkl") else src.read(name))
    else:
        path.write_bytes(bytes(content))
    try:
        result = _load(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:
        assert all(type(k) is str and type(v) is np.ndarray for k, v in result.items())
