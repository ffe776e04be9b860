"""The scoring engine: a fixed plan of compiled shapes, AOT compilation, device meshes, pipelined dispatch."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_ce.models.packing import Packing
from flax_ce.packing import PackedBatch, pack_rows, packed_arrays, slots_for_length

logger = logging.getLogger("flax_ce")

LENGTH_BUCKET = 32
# Batch sizes the planner may choose: a small, fixed menu keeps the set of compiled shapes small.
BATCH_MENU = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_TOKEN_BUDGET = 4096  # best of 2048-16384 on 2 CPU cores (benchmarks/results/cpu.md at 26a75b2)
PIPELINE_DEPTH = 2  # batches in flight before the host waits for the oldest result
# Packed scoring puts pairs of up to this many tokens side by side in rows of this length (or max_length);
# a longer pair opens a row of its own bucket, which shorter ones fill. On CPU a token costs about the same
# in rows of 32 to 128 tokens and more beyond (attention grows with the row), so 256-token rows, though
# they removed twice the padding, were no faster on the MiniLM workload (benchmarks/bench_packing.py).
PACK_LENGTH = 128
# With packing=None (auto), a call is packed only if that removes at least this share of its padded tokens.
PACKING_MIN_SAVING = 0.05
# Compiled programs kept per engine: more than any one plan's shape set (about 100 with the defaults).
MAX_PROGRAMS = 256


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


def plan_packed(
    lengths: Sequence[int],
    max_length: int,
    *,
    batch_size: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    multiple: int = 1,
    pack_length: int = PACK_LENGTH,
) -> list[PackedBatch]:
    """Packed rows in batches of one length: as many rows as `plan_batches` would give that length (a
    length's last batch shrinks to a menu size); with batch_size, also at most batch_size pairs a batch, as
    sentence-transformers' batch_size means.

    Pairs up to pack_length tokens share rows of pack_length, a longer pair opens a row of its bucket
    (flax_ce.packing.pack_rows); each row is then cut to the bucket of the tokens it holds, so a pair that
    found no partner costs what it costs unpacked."""
    pack_length = min(pack_length, max_length)

    def capacity(need: int) -> int:
        return bucket_length(need, max_length) if need > pack_length else pack_length

    def max_pairs(used: int) -> int:
        return slots_for_length(bucket_length(used, max_length), batch_size)

    by_length: dict[int, list[list[int]]] = {}
    for used, members in pack_rows(lengths, capacity, max_pairs):
        by_length.setdefault(bucket_length(used, max_length), []).append(members)
    batches = []
    for length in sorted(by_length, reverse=True):
        full = rows_for_length(length, batch_size, token_budget, multiple)
        rows_left, start = by_length[length], 0
        while start < len(rows_left):
            end, pairs = start, 0
            while end - start < full and end < len(rows_left):
                if batch_size is not None and pairs + len(rows_left[end]) > batch_size:
                    break
                pairs += len(rows_left[end])
                end += 1
            take = end - start
            rows = full if take == full else min(full, _round_up(_menu_at_least(take), multiple))
            grid = np.full((rows, slots_for_length(length, batch_size)), -1, dtype=np.int64)
            for r, members in enumerate(rows_left[start:end]):
                grid[r, : len(members)] = members
            batches.append(PackedBatch(grid, length))
            start = end
    return batches


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


COMPILATION_CACHE_ENV = "FLAX_CE_COMPILATION_CACHE"  # "0" (or false/no/off) opts out of the default cache


def default_compilation_cache_dir() -> str:
    """Where the default persistent compilation cache lives: $XDG_CACHE_HOME (or ~/.cache)/flax_ce/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_ce", "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Persistent XLA compilation cache in `path` (default: default_compilation_cache_dir()), caching
    every program however fast it compiled; returns its directory."""
    path = os.fspath(path or default_compilation_cache_dir())
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def use_default_compilation_cache() -> str | None:
    """Turn on the default cache unless FLAX_CE_COMPILATION_CACHE=0 or a cache directory is already
    configured (which is left as it is); returns the directory in use, or None."""
    if os.environ.get(COMPILATION_CACHE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    try:
        return enable_compilation_cache()
    except OSError as e:  # a read-only home must not stop scoring; it only costs compile time
        logger.warning("persistent compilation cache disabled: %s", e)
        return None


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """A 1-d ("batch",) mesh over `devices` (default: this process's devices), or None for one device."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), ("batch",)) if len(devices) > 1 else None


def cast_params(state, dtype) -> nnx.State:
    """Floating parameters in `dtype` (low-precision inference); LayerNorm still computes in fp32."""
    if jnp.dtype(dtype) == jnp.float32:
        return state
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def jit_forward(
    graphdef, mesh: Mesh | None = None, activation_fn: Callable | None = None, packed: bool = False
) -> Callable:
    """jitted fn(state, input_ids, attention_mask, token_type_ids) -> fp32 activation(logits) for a model's
    graphdef; with a mesh, inputs are split over its "batch" axis and the state is replicated. `packed`:
    fn(..., packing) for packed rows, returning the logits of row r's slot s at row r * slots + s."""
    activation_fn = activation_fn or (lambda x: x)

    def forward(state, input_ids, attention_mask, token_type_ids, *packing: Packing):
        logits = nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids, *packing)
        return activation_fn(logits.reshape(-1, logits.shape[-1])).astype(jnp.float32)

    if mesh is None:
        return jax.jit(forward)
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))
    inputs = (split,) * (4 if packed else 3)  # a Packing's arrays all split like the rows they describe
    return jax.jit(forward, in_shardings=(replicated, *inputs), out_shardings=split)


def make_scorer(model: nnx.Module, activation_fn: Callable | None = None, mesh: Mesh | None = None):
    """(jitted fn(state, input_ids, attention_mask, token_type_ids) -> fp32 scores, the model's state placed
    for it). With a mesh, inputs are split over its "batch" axis and the state is replicated."""
    graphdef, state = nnx.split(model)
    fn = jit_forward(graphdef, mesh, activation_fn)
    return fn, state if mesh is None else jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


class ScoringEngine:
    """Scores tokenized inputs with a model: plans shapes, compiles each once (AOT), pipelines batches.

    The model is passed to every call and is the only owner of the weights: the engine keeps compiled
    programs (bounded, least recently used dropped first) for the model's structure, and the weights as
    those programs take them, re-derived whenever the model's arrays are not the ones it saw last.
    """

    def __init__(
        self,
        *,
        pad_id: int,
        max_length: int,
        mesh: Mesh | None = None,
        dtype=jnp.float32,
        max_programs: int = MAX_PROGRAMS,
        packing: bool | None = False,
    ):
        self.pad_id = pad_id
        # Several pairs per row (flax_ce.packing) instead of one; None: whichever plan pads less.
        self.packing = packing
        self.pack_length = PACK_LENGTH
        self.max_length = max_length
        self.mesh = mesh
        self.dtype = dtype
        self.max_programs = max_programs
        self.multiple = mesh.size if mesh is not None else 1
        self.compile_count = 0  # programs built by this engine (compiled, or loaded from the cache)
        self.compile_seconds = 0.0
        self.xla_compiles = 0  # of those, real XLA compilations (not persistent-cache hits)
        self._programs: OrderedDict[tuple[int, int, int], Callable] = OrderedDict()
        self._signature = None
        self._forward: Callable | None = None
        self._packed_forward: Callable | None = None
        self._placed: tuple[list, nnx.State] | None = None

    def weights(self, model: nnx.Module) -> nnx.State:
        """`model`'s state as the compiled programs take it: in the engine's dtype, replicated over its mesh.

        A model of another structure, shape or dtype drops the compiled programs; arrays that are not the
        ones seen last are placed again (for fp32 on one device that is no copy at all).
        """
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        signature = (graphdef, treedef, [(x.shape, x.dtype) for x in leaves])
        if signature != self._signature:
            self._programs.clear()
            self._forward = jit_forward(graphdef, self.mesh)
            self._packed_forward = jit_forward(graphdef, self.mesh, packed=True)
            self._signature, self._placed = signature, None
        if self._placed is None or any(a is not b for a, b in zip(self._placed[0], leaves, strict=True)):
            self._placed = (leaves, self._place(state))
        return self._placed[1]

    def _place(self, state: nnx.State) -> nnx.State:
        state = cast_params(state, self.dtype)
        return jax.device_put(state, NamedSharding(self.mesh, PartitionSpec())) if self.mesh else state

    def compiled(self, state: nnx.State, rows: int, length: int, slots: int = 0) -> Callable:
        """The compiled program for one [rows, length] shape (packed rows of `slots` pairs when slots > 0),
        compiling (and timing) it the first time."""
        key = (rows, length, slots)
        if key in self._programs:
            self._programs.move_to_end(key)
            return self._programs[key]
        spec = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        before = dict(_events)
        start = time.perf_counter()
        if slots:
            packing = Packing(spec, spec, jax.ShapeDtypeStruct((rows, slots), jnp.int32))
            executable = self._packed_forward.lower(state, spec, spec, spec, packing).compile()
        else:
            executable = self._forward.lower(state, spec, spec, spec).compile()
        elapsed = time.perf_counter() - start
        # A persistent-cache hit is also reported as a backend compile (it wraps the retrieval).
        xla_compiles = (_events[BACKEND_COMPILE_EVENT] - before[BACKEND_COMPILE_EVENT]) - (
            _events[CACHE_HIT_EVENT] - before[CACHE_HIT_EVENT]
        )
        self.compile_count += 1
        self.compile_seconds += elapsed
        self.xla_compiles += xla_compiles
        logger.debug(
            "scoring shape [%d, %d] (%d slots): %s in %.2fs",
            rows,
            length,
            slots,
            "compiled" if xla_compiles else "loaded from the compilation cache",
            elapsed,
        )
        self._programs[key] = executable
        if len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return executable

    def warmup(
        self,
        model: nnx.Module,
        shapes: Iterable[tuple[int, int, int]],
        num_outputs: int,
        activation_fn: Callable[[jax.Array], jax.Array] | None = None,
    ) -> None:
        """Compile the given [rows, length, slots] programs (slots 0: unpacked, see `programs`) ahead of
        time, and the activation's operations for each batch's [rows (x slots), num_outputs] logits."""
        state = self.weights(model)
        for rows, length, slots in sorted(shapes):
            self.compiled(state, rows, length, slots)
            if activation_fn is not None:
                logits = jnp.zeros((rows * max(slots, 1), num_outputs), jnp.float32)
                jax.block_until_ready(activation_fn(logits))

    def programs(
        self, shapes: Iterable[tuple[int, int]], batch_size: int | None = None
    ) -> set[tuple[int, int, int]]:
        """The [rows, length, slots] programs `run` may use for these planned [rows, length] shapes: slots 0
        for unpacked batches, the length's slot count for packed ones (both when packing is None)."""
        programs = set()
        if self.packing is not True:
            programs |= {(rows, length, 0) for rows, length in shapes}
        if self.packing is not False:
            programs |= {(rows, length, slots_for_length(length, batch_size)) for rows, length in shapes}
        return programs

    def _host_arrays(self, ids: list[list[int]], types: list[list[int]] | None, batch: Batch | PackedBatch):
        """int32 [rows, length] arrays (and a Packing for packed rows); rows and slots beyond the inputs are
        padding (their scores are dropped)."""
        if isinstance(batch, PackedBatch):
            arrays = packed_arrays(ids, types, batch, self.pad_id)
        else:
            arrays = pad_rows(
                [ids[i] for i in batch.indices],
                None if types is None else [types[i] for i in batch.indices],
                (batch.rows, batch.length),
                self.pad_id,
            )
        if self.mesh is not None:
            return jax.device_put(arrays, NamedSharding(self.mesh, PartitionSpec("batch")))
        return arrays

    def plan(
        self, lengths: Sequence[int], batch_size: int | None, token_budget: int
    ) -> list[Batch] | list[PackedBatch]:
        """The batches for inputs of these lengths: packed, unpacked, or (packing None) the packed plan
        only if it pads at least PACKING_MIN_SAVING fewer tokens."""
        settings = {"batch_size": batch_size, "token_budget": token_budget, "multiple": self.multiple}
        if self.packing is False:
            return plan_batches(lengths, self.max_length, **settings)
        packed = plan_packed(lengths, self.max_length, pack_length=self.pack_length, **settings)
        if self.packing is None:
            unpacked = plan_batches(lengths, self.max_length, **settings)
            if padded_tokens(packed) > (1 - PACKING_MIN_SAVING) * padded_tokens(unpacked):
                return unpacked
        return packed

    def run(
        self,
        model: nnx.Module,
        ids: list[list[int]],
        types: list[list[int]] | None,
        num_outputs: int,
        *,
        activation_fn: Callable[[jax.Array], jax.Array] | None = None,
        batch_size: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        progress: Callable[[Iterable], Iterable] = lambda x: x,
    ) -> np.ndarray:
        """activation_fn(logits) [N, num_outputs] (fp32) of `model` for token id lists, in their original order.

        The activation runs on each batch's logits outside the compiled program, so any callable (a fresh
        lambda too) reuses the programs, and its own operations see only the planned batch shapes.
        """
        out = np.zeros((len(ids), num_outputs), dtype=np.float32)
        plan = self.plan([len(x) for x in ids], batch_size, token_budget)
        state = self.weights(model)
        pending: deque = deque()
        for batch in progress(plan):
            slots = batch.slots if isinstance(batch, PackedBatch) else 0
            executable = self.compiled(state, batch.rows, batch.length, slots)
            # Dispatch is asynchronous: building the next host batch overlaps this one's compute.
            logits = executable(state, *self._host_arrays(ids, types, batch))
            pending.append((batch, logits if activation_fn is None else activation_fn(logits)))
            if len(pending) > PIPELINE_DEPTH:
                _gather(out, *pending.popleft())
        for done, scores in pending:
            _gather(out, done, scores)
        return out


def padded_tokens(plan: list[Batch] | list[PackedBatch]) -> int:
    """Tokens a plan computes, padding included."""
    return sum(batch.rows * batch.length for batch in plan)


def _gather(out: np.ndarray, batch: Batch | PackedBatch, scores: jax.Array) -> None:
    """Write one batch's scores [rows (x slots), C] to their inputs' rows of `out`, dropping padding."""
    if isinstance(batch, PackedBatch):
        flat = batch.pairs.reshape(-1)  # row r's slot s is score row r * slots + s
        filled = np.flatnonzero(flat >= 0)
        out[flat[filled]] = np.asarray(scores)[filled]
    else:
        out[batch.indices] = np.asarray(scores)[: len(batch.indices)]
