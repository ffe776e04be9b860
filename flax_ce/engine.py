"""The scoring engine: a fixed plan of compiled shapes, AOT compilation, device meshes, pipelined dispatch."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger("flax_ce")

LENGTH_BUCKET = 32
# Batch sizes the planner may choose: a small, fixed menu keeps the set of compiled shapes small.
BATCH_MENU = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_TOKEN_BUDGET = 4096  # best of 2048-16384 on the 2-core CPU benchmark (benchmarks/results/cpu.md)
PIPELINE_DEPTH = 2  # batches in flight before the host waits for the oldest result


def bucket_length(longest: int, max_length: int) -> int:
    """Padded sequence length: the next multiple of 32, capped at max_length."""
    return min(-(-max(longest, 1) // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Batch:
    """Which inputs go into one compiled call, and its padded shape [rows, length]."""

    indices: np.ndarray
    rows: int
    length: int


def rows_for_length(length: int, batch_size: int | None, token_budget: int, multiple: int = 1) -> int:
    """Rows of a full batch at `length`: batch_size if given, else the largest menu size within the budget."""
    if batch_size is not None:
        return _round_up(batch_size, multiple)
    fitting = [b for b in BATCH_MENU if b * length <= token_budget] or [1]
    return _round_up(fitting[-1], multiple)


def plan_batches(
    lengths: Sequence[int],
    max_length: int,
    *,
    batch_size: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    multiple: int = 1,
) -> list[Batch]:
    """Longest-first batches over 32-token buckets; a bucket's last, partial batch shrinks to a menu size."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    buckets = np.minimum(-(-np.maximum(lengths[order], 1) // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)
    batches, start = [], 0
    while start < len(order):
        length = int(buckets[start])
        full = rows_for_length(length, batch_size, token_budget, multiple)
        # Only inputs of the same bucket join this batch, so a short tail is not padded to a long length.
        in_bucket = int(np.searchsorted(-buckets[start:], -length, side="right"))
        take = order[start : start + min(full, in_bucket)]
        rows = full if len(take) == full else min(full, _round_up(_menu_at_least(len(take)), multiple))
        batches.append(Batch(take, rows, length))
        start += len(take)
    return batches


def _menu_at_least(n: int) -> int:
    return next((b for b in BATCH_MENU if b >= n), _round_up(n, BATCH_MENU[-1]))


def planned_shapes(
    max_length: int,
    *,
    batch_size: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    multiple: int = 1,
) -> set[tuple[int, int]]:
    """Every (rows, length) shape `plan_batches` can produce for this setting: the compile set."""
    shapes = set()
    lengths = sorted({bucket_length(n, max_length) for n in range(1, max_length + 1)})
    for length in lengths:
        full = rows_for_length(length, batch_size, token_budget, multiple)
        shapes.add((full, length))
        shapes.update(
            (min(full, _round_up(b, multiple)), length) for b in BATCH_MENU if _round_up(b, multiple) < full
        )
    return shapes


def pad_rows(
    ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, shape: tuple[int, int], pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, token_type_ids), int32 of `shape`, from token lists of at most
    shape[1] tokens; rows after the lists are all padding."""
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    mask = np.zeros(shape, dtype=np.int32)
    token_types = np.zeros(shape, dtype=np.int32)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        if types is not None:
            token_types[row, : len(seq)] = types[row]
    return input_ids, mask, token_types


# XLA compilations and persistent-cache hits, counted process-wide through jax.monitoring, so an engine
# can tell a real compile from a program loaded from the persistent cache.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_events = {BACKEND_COMPILE_EVENT: 0, CACHE_HIT_EVENT: 0}


def _count_event(event: str, *args, **kwargs) -> None:
    if event in _events:
        _events[event] += 1


jax.monitoring.register_event_listener(_count_event)
jax.monitoring.register_event_duration_secs_listener(_count_event)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Opt-in persistent XLA compilation cache (default ~/.cache/flax_ce/jax); returns its directory."""
    path = os.fspath(path or os.path.join(os.path.expanduser("~"), ".cache", "flax_ce", "jax"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """A 1-d ("batch",) mesh over `devices` (default: this process's devices), or None for one device."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), ("batch",)) if len(devices) > 1 else None


def cast_params(state, dtype) -> nnx.State:
    """Floating parameters in `dtype` (low-precision inference); LayerNorm still computes in fp32."""
    if jnp.dtype(dtype) == jnp.float32:
        return state
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def make_scorer(model: nnx.Module, activation_fn: Callable | None = None, mesh: Mesh | None = None):
    """(jitted fn(params, input_ids, attention_mask, token_type_ids) -> fp32 scores, params placed for it).

    With a mesh, inputs are split over its "batch" axis and the parameters are replicated.
    """
    graphdef, params = nnx.split(model)
    activation_fn = activation_fn or (lambda x: x)

    def forward(params, input_ids, attention_mask, token_type_ids):
        logits = nnx.merge(graphdef, params)(input_ids, attention_mask, token_type_ids)
        return activation_fn(logits).astype(jnp.float32)

    if mesh is None:
        return jax.jit(forward), params
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
    fn = jax.jit(forward, in_shardings=(replicated, split, split, split), out_shardings=split)
    return fn, jax.device_put(params, replicated)


class ScoringEngine:
    """Scores tokenized inputs with one model: plans shapes, compiles each once (AOT), pipelines batches."""

    def __init__(
        self, model: nnx.Module, *, pad_id: int, max_length: int, mesh: Mesh | None = None, dtype=jnp.float32
    ):
        self.pad_id = pad_id
        self.max_length = max_length
        self.mesh = mesh
        self.dtype = dtype
        self.multiple = mesh.size if mesh is not None else 1
        self.compile_count = 0  # programs built by this engine (compiled, or loaded from the cache)
        self.compile_seconds = 0.0
        self.xla_compiles = 0  # of those, real XLA compilations (not persistent-cache hits)
        self.set_model(model)

    def set_model(self, model: nnx.Module) -> None:
        """Score with `model`'s weights from now on (e.g. after a training step or evaluation).

        Compiled programs take the weights as an argument, so they are kept when the new model has the
        same structure, shapes and dtypes; otherwise they are rebuilt on demand.
        """
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        signature = (graphdef, treedef, [(x.shape, x.dtype) for x in leaves])
        if signature != getattr(self, "_signature", None):
            self._scorers: dict[Callable, tuple[Callable, nnx.State]] = {}
            self._compiled: dict[tuple[Callable, int, int], Callable] = {}
        else:
            self._scorers = {key: (fn, self._place(state)) for key, (fn, _) in self._scorers.items()}
        self.model, self._signature = model, signature

    def _place(self, params: nnx.State) -> nnx.State:
        """The weights as the compiled programs take them: in the engine's dtype, replicated over its mesh."""
        params = cast_params(params, self.dtype)
        return jax.device_put(params, NamedSharding(self.mesh, PartitionSpec())) if self.mesh else params

    def _scorer(self, activation_fn: Callable):
        if activation_fn not in self._scorers:
            fn, params = make_scorer(self.model, activation_fn, self.mesh)
            self._scorers[activation_fn] = (fn, self._place(params))
        return self._scorers[activation_fn]

    def compiled(self, activation_fn: Callable, rows: int, length: int) -> Callable:
        """The compiled program for one [rows, length] shape, compiling (and timing) it the first time."""
        key = (activation_fn, rows, length)
        if key not in self._compiled:
            fn, params = self._scorer(activation_fn)
            spec = jax.ShapeDtypeStruct((rows, length), jnp.int32)
            before = dict(_events)
            start = time.perf_counter()
            executable = fn.lower(params, spec, spec, spec).compile()
            elapsed = time.perf_counter() - start
            # A persistent-cache hit is also reported as a backend compile (it wraps the retrieval).
            xla_compiles = (_events[BACKEND_COMPILE_EVENT] - before[BACKEND_COMPILE_EVENT]) - (
                _events[CACHE_HIT_EVENT] - before[CACHE_HIT_EVENT]
            )
            self.compile_count += 1
            self.compile_seconds += elapsed
            self.xla_compiles += xla_compiles
            logger.debug(
                "scoring shape [%d, %d]: %s in %.2fs",
                rows,
                length,
                "compiled" if xla_compiles else "loaded from the compilation cache",
                elapsed,
            )
            self._compiled[key] = executable
        return self._compiled[key]

    def warmup(self, activation_fn: Callable, shapes: Iterable[tuple[int, int]]) -> None:
        """Compile the given [rows, length] shapes ahead of time."""
        for rows, length in sorted(shapes):
            self.compiled(activation_fn, rows, length)

    def _host_arrays(self, ids: list[list[int]], types: list[list[int]] | None, batch: Batch):
        """int32 [rows, length] arrays; rows beyond the inputs are padding (their scores are dropped)."""
        input_ids, mask, token_types = pad_rows(
            [ids[i] for i in batch.indices],
            None if types is None else [types[i] for i in batch.indices],
            (batch.rows, batch.length),
            self.pad_id,
        )
        if self.mesh is not None:
            split = NamedSharding(self.mesh, PartitionSpec("batch"))
            return tuple(jax.device_put(a, split) for a in (input_ids, mask, token_types))
        return input_ids, mask, token_types

    def run(
        self,
        ids: list[list[int]],
        types: list[list[int]] | None,
        activation_fn: Callable,
        num_outputs: int,
        *,
        batch_size: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        progress: Callable[[Iterable], Iterable] = lambda x: x,
    ) -> np.ndarray:
        """activation(logits) [N, num_outputs] for token id lists, in their original order."""
        out = np.zeros((len(ids), num_outputs), dtype=np.float32)
        plan = plan_batches(
            [len(x) for x in ids],
            self.max_length,
            batch_size=batch_size,
            token_budget=token_budget,
            multiple=self.multiple,
        )
        _, params = self._scorer(activation_fn)
        pending: deque = deque()
        for batch in progress(plan):
            executable = self.compiled(activation_fn, batch.rows, batch.length)
            # Dispatch is asynchronous: building the next host batch overlaps this one's compute.
            pending.append((batch, executable(params, *self._host_arrays(ids, types, batch))))
            if len(pending) > PIPELINE_DEPTH:
                done, scores = pending.popleft()
                out[done.indices] = np.asarray(scores)[: len(done.indices)]
        for done, scores in pending:
            out[done.indices] = np.asarray(scores)[: len(done.indices)]
        return out
