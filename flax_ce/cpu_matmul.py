"""fp32 dense layers of CPU scoring programs through Intel MKL's sgemm, as an XLA FFI custom call.

XLA's own fp32 GEMM on CPU (YNNPACK) is the one place where flax_ce loses to torch on Intel Xeons: at
4096x384x1536 on an Ice Lake core it reaches 130 GFLOP/s where MKL (which torch uses) reaches 167. Inside
programs traced under `scope()`, every fp32 dense layer with at least MIN_ROWS rows calls MKL instead:
a small C++ handler (cpu_matmul.cc, built once per machine with the system C++ compiler against jaxlib's
FFI headers and cached) cuts the rows into one chunk per thread of XLA's intra-op pool and runs a
single-threaded `cblas_sgemm_64` on each. Results agree with XLA's dot within fp32 rounding.

The scoring engine traces its programs under `scope()`, so `CrossEncoder.predict`/`rank` and corpus jobs
use it; `flax_ce.score` in your own programs does not, unless you trace them under `scope()` too (the
custom call has no gradient, batching or sharding rules: keep it to inference on one CPU device).

FLAX_CE_CPU_MATMUL picks the matmul: `auto` (default) uses MKL on Intel CPUs when it is installed (the
`mkl` extra: `pip install "flax-ce[mkl]"`) and a C++ compiler is found, XLA's otherwise; `mkl` requires it
(an error says what is missing); `xla` never uses it. AMD CPUs stay on XLA under `auto`: there XLA's
GEMM is already ahead of torch in flax_ce's benchmarks and MKL is unmeasured. FLAX_CE_MKL names
libmkl_rt explicitly, CXX the compiler, FLAX_CE_NATIVE_DIR where the built handler is kept.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import glob
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from flax_ce.cache_dirs import cache_dir

logger = logging.getLogger("flax_ce")

MODE_ENV = "FLAX_CE_CPU_MATMUL"
MODES = ("auto", "mkl", "xla")
MKL_ENV = "FLAX_CE_MKL"
NATIVE_DIR_ENV = "FLAX_CE_NATIVE_DIR"
TARGET = "flax_ce_cpu_matmul"
# Dense layers with fewer rows (a head reading one token per pair) stay on XLA's dot.
MIN_ROWS = 64
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_matmul.cc")

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("flax_ce_cpu_matmul", default=False)
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_reason = ""  # why loading failed
_told = False  # the `auto` fallback was logged
_libraries: list[ctypes.CDLL] = []  # kept alive for the process: XLA calls into them


class CpuMatmulUnavailable(RuntimeError):
    """FLAX_CE_CPU_MATMUL=mkl, but MKL, a C++ compiler or the native handler is missing."""


def mode() -> str:
    """FLAX_CE_CPU_MATMUL, checked: auto (default), mkl or xla."""
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@functools.cache
def intel_cpu() -> bool:
    """Whether this is an x86-64 Linux machine with an Intel CPU (vendor GenuineIntel)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def find_mkl() -> str:
    """Path of libmkl_rt: FLAX_CE_MKL, else the `mkl` PyPI package's, else the system's."""
    explicit = os.environ.get(MKL_ENV)
    if explicit:
        if not os.path.isfile(explicit):
            raise CpuMatmulUnavailable(f"{MKL_ENV}={explicit}: no such file")
        return explicit
    candidates = []
    try:
        dist = importlib.metadata.distribution("mkl")
        candidates = [str(dist.locate_file(f)) for f in dist.files or () if "libmkl_rt.so" in f.name]
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    found = [path for path in candidates if os.path.isfile(path)]
    if found:
        return os.path.realpath(found[0])
    system = ctypes.util.find_library("mkl_rt")
    if system:
        return system
    raise CpuMatmulUnavailable(
        'Intel MKL not found: pip install "flax-ce[mkl]" (the mkl package), or set '
        f"{MKL_ENV} to a libmkl_rt.so"
    )


def native_dir() -> str:
    """Where built handlers are kept: $FLAX_CE_NATIVE_DIR, else $XDG_CACHE_HOME (or ~/.cache)/flax_ce/native."""
    return os.environ.get(NATIVE_DIR_ENV) or cache_dir("native")


def build_handler() -> str:
    """The handler's shared library, compiled from cpu_matmul.cc unless a build for this source, jaxlib
    and compiler is cached; returns its path."""
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise CpuMatmulUnavailable("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), compiler.encode()])).hexdigest()
    path = os.path.join(native_dir(), f"cpu_matmul-{key[:20]}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
    try:
        done = subprocess.run(
            [*command, SOURCE, "-o", partial], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CpuMatmulUnavailable(f"building {SOURCE} with {compiler} failed: {e}") from e
    if done.returncode != 0:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise CpuMatmulUnavailable(f"building {SOURCE} with {compiler} failed:\n{done.stderr[-2000:]}")
    os.replace(partial, path)  # atomic: processes building at once each write their own file first
    return path


def _load() -> None:
    mkl = ctypes.CDLL(find_mkl())  # RTLD_LOCAL: nobody else's MKL symbols resolve to it
    handler = ctypes.CDLL(build_handler())
    try:
        sgemm = ctypes.cast(mkl.cblas_sgemm_64, ctypes.c_void_p)  # 64-bit sizes (MKL 2023 and later)
        set_local = ctypes.cast(mkl.MKL_Set_Num_Threads_Local, ctypes.c_void_p)
    except AttributeError as e:
        raise CpuMatmulUnavailable(f"{mkl._name} is not MKL 2023 or later's runtime library: {e}") from e
    handler.flax_ce_set_sgemm(sgemm, set_local)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler.FlaxCeCpuMatmul), platform="cpu")
    _libraries.extend([mkl, handler])


def load() -> bool:
    """Find MKL, build (or reuse) the handler and register it with XLA, once per process; whether that
    worked. `reason()` says why not."""
    global _loaded, _reason
    with _lock:
        if _loaded is None:
            try:
                _load()
                _loaded = True
            except CpuMatmulUnavailable as e:
                _loaded, _reason = False, str(e)
            except OSError as e:  # a library that does not load
                _loaded, _reason = False, f"loading failed: {e}"
        return _loaded


def reason() -> str:
    """Why the last `load()` failed ("" if it did not)."""
    return _reason


def wanted() -> bool:
    """Whether programs should use MKL now, per FLAX_CE_CPU_MATMUL, the backend and the CPU; loads it.
    Under `auto` a failure is logged once and XLA's dot kept; under `mkl` it raises."""
    global _told
    chosen = mode()
    if chosen == "xla" or jax.default_backend() != "cpu":
        return False
    if chosen == "auto" and not intel_cpu():
        return False
    if load():
        return True
    if chosen == "mkl":
        raise CpuMatmulUnavailable(f"{MODE_ENV}=mkl: {_reason}")
    if not _told:
        _told = True
        logger.info("CPU dense layers use XLA's matmul (MKL is faster on Intel CPUs): %s", _reason)
    return False


@contextlib.contextmanager
def scope(enabled: bool | None = None) -> Iterator[bool]:
    """Programs traced inside use MKL for their fp32 dense layers; enabled=None decides by `wanted()`.

    Tracing is what counts: `jax.jit(f).lower(...)` inside, or the first call of a jitted function. JAX
    keeps one trace per Python function (even across `jax.jit` wrappers), so trace a given function under
    one setting only. Yields whether MKL is in use.
    """
    on = wanted() if enabled is None else bool(enabled)
    if on and not load():
        raise CpuMatmulUnavailable(_reason)
    token = _active.set(on)
    try:
        yield on
    finally:
        _active.reset(token)


def applies(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether a dense layer x @ kernel traced now goes to MKL: inside an enabled `scope()`, fp32, 2-d
    kernel, at least MIN_ROWS rows."""
    if not _active.get() or x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or kernel.ndim != 2:
        return False
    return x.ndim >= 1 and x.size >= MIN_ROWS * max(x.shape[-1], 1)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., k] @ kernel [k, n] -> [..., n] in fp32 through the registered MKL handler."""
    out = jax.ShapeDtypeStruct((*x.shape[:-1], kernel.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, kernel)
