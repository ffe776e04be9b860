"""The scoring engine: AOT compilation of the planned shapes (flax_ce.planning), device meshes, pipelined
dispatch."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_ce import cpu_matmul
from flax_ce.cache_dirs import cache_dir
from flax_ce.models.packing import Packing
from flax_ce.packing import PackedBatch, packed_arrays, slots_for_length
from flax_ce.planning import (
    ACCELERATOR_COMPILE_UNITS,
    DEFAULT_TOKEN_BUDGET,
    PACK_LENGTH,
    PACKING_MIN_SAVING,
    Batch,
    ShapeCosts,
    cpu_compile_units,
    plan_batches,
    plan_packed,
    plan_units,
)

logger = logging.getLogger("flax_ce")

PIPELINE_DEPTH = 2  # batches in flight before the host waits for the oldest result
# Compiled programs kept per engine: more than a warmed-up shape set (129 shapes at max_length 512 with
# the defaults, each twice when packing=None may or may not pack a call).
MAX_PROGRAMS = 320
# A plan may spend the padding paid so far (ScoringEngine.plan) on any number of new programs; it is priced
# exactly for k of them when each costs a compilation less 1/k of that padding. These k are tried.
CREDIT_SPLITS = (1, 2, 4, 8, 16)


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
# Beyond this size the persistent cache deletes its least recently used programs (a MiniLM-L6 program
# takes about 75 KB, so all 129 shapes of one model at max_length 512, packed and unpacked, about 20 MB).
COMPILATION_CACHE_MAX_BYTES = 2 * 1024**3


def default_compilation_cache_dir() -> str:
    """Where the default persistent compilation cache lives: $XDG_CACHE_HOME (or ~/.cache)/flax_ce/jax."""
    return cache_dir("jax")


def enable_compilation_cache(
    path: str | os.PathLike | None = None, max_bytes: int | None = COMPILATION_CACHE_MAX_BYTES
) -> str:
    """Persistent XLA compilation cache in `path` (default: default_compilation_cache_dir()), caching
    every program however fast it compiled and deleting the least recently used ones beyond `max_bytes`
    (None: no limit); returns its directory."""
    path = os.fspath(path or default_compilation_cache_dir())
    os.makedirs(path, exist_ok=True)
    if max_bytes is not None and importlib.util.find_spec("filelock") is None:
        # JAX's size limit locks the directory with filelock (huggingface_hub depends on it).
        logger.warning("compilation cache not size-limited: the filelock package is not installed")
        max_bytes = None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", -1 if max_bytes is None else int(max_bytes))
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
        # Several pairs per row (flax_ce.packing) instead of one; None: whichever plan costs less.
        self.packing = packing
        self.pack_length = PACK_LENGTH
        self.max_length = max_length
        self.mesh = mesh
        self.dtype = dtype
        self.max_programs = max_programs
        self.multiple = mesh.size if mesh is not None else 1
        # fp32 dense layers through MKL (flax_ce.cpu_matmul): one CPU device only, decided once, so every
        # program of this engine is traced alike.
        self.cpu_matmul = mesh is None and jnp.dtype(dtype) == jnp.float32 and cpu_matmul.wanted()
        # On CPU a given batch_size is also held to the token budget at lengths where it would exceed it
        # (flax_ce.planning.rows_for_length); accelerators take batch_size rows as asked.
        self.budget_caps_batch_size = jax.default_backend() == "cpu"
        self.compile_count = 0  # programs built by this engine (compiled, or loaded from the cache)
        self.compile_seconds = 0.0
        self.xla_compiles = 0  # of those, real XLA compilations (not persistent-cache hits)
        self._programs: OrderedDict[tuple[int, int, int], Callable] = OrderedDict()
        self._signature = None
        self._seen: tuple[list, Any] | None = None  # the model's pytree leaves and treedef after `weights`
        self._forward: Callable | None = None
        self._packed_forward: Callable | None = None
        self._placed: tuple[list, nnx.State] | None = None
        # Time and cost units of the calls run so far, for the price of a compilation in units.
        self._run_seconds = 0.0
        self._run_units = 0.0
        # Seconds and count of real XLA compilations, from groups without persistent-cache hits: a shape
        # the planner adds is usually not in the cache, so loads must not make compiling look cheap.
        self._xla_compile_seconds = 0.0
        self._xla_compile_programs = 0
        # The weight matrices of the model last seen (`weights`): they price a compilation before one is
        # measured.
        self._matrix_sizes: list[int] = []
        # Units spent on padding beyond the plan that pads least and not spent on compiling yet.
        self._padding_paid = 0.0

    def weights(self, model: nnx.Module) -> nnx.State:
        """`model`'s state as the compiled programs take it: in the engine's dtype, replicated over its mesh.
        The model is put in eval mode first (scoring never drops out, as sentence-transformers' predict).

        A model of another structure, shape or dtype drops the compiled programs; arrays that are not the
        ones seen last are placed again (for fp32 on one device that is no copy at all).
        """
        # NNX modules are pytrees: flattening one (about 2 ms for MiniLM) yields the arrays and a treedef
        # that holds the module types, static attributes and modes. The same treedef and the very same
        # arrays as at the end of the last call mean the same weights in the same graph, which spares
        # nnx.split's graph walk (about 15-20 ms, a tenth of scoring a call of 24 short pairs on 2 cores).
        seen = jax.tree.flatten(model)
        if self._seen is not None and _same_pytree(seen, self._seen):
            return self._placed[1]
        graphdef, state = nnx.split(model)
        # Modes are static attributes of the graph: a graph equal to the last one seen after eval() is in
        # eval mode already, which spares a second walk over the model (about 30 ms for MiniLM) per call.
        if self._signature is None or graphdef != self._signature[0]:
            model.eval()
            graphdef, state = nnx.split(model)
            seen = jax.tree.flatten(model)  # eval() may have changed the modes
        leaves, treedef = jax.tree.flatten(state)
        signature = (graphdef, treedef, [(x.shape, x.dtype) for x in leaves])
        if signature != self._signature:
            self._programs.clear()
            self._padding_paid = 0.0
            self._forward = jit_forward(graphdef, self.mesh)
            self._packed_forward = jit_forward(graphdef, self.mesh, packed=True)
            self._signature, self._placed = signature, None
            self._matrix_sizes = _matrix_sizes(state)
        if self._placed is None or any(a is not b for a, b in zip(self._placed[0], leaves, strict=True)):
            self._placed = (leaves, self._place(state))
        # A module that is not a pytree is a leaf of its own, and its arrays could change unseen.
        self._seen = seen if all(isinstance(x, jax.Array) for x in seen[0]) else None
        return self._placed[1]

    def _place(self, state: nnx.State) -> nnx.State:
        state = cast_params(state, self.dtype)
        return jax.device_put(state, NamedSharding(self.mesh, PartitionSpec())) if self.mesh else state

    def compiled(self, state: nnx.State, rows: int, length: int, slots: int = 0) -> Callable:
        """The compiled program for one [rows, length] shape (packed rows of `slots` pairs when slots > 0),
        compiling (and timing) it the first time."""
        key = (rows, length, slots)
        if key not in self._programs:
            self.compile_programs(state, [key])
        self._programs.move_to_end(key)
        return self._programs[key]

    def compile_programs(self, state: nnx.State, keys: Iterable[tuple[int, int, int]]) -> None:
        """Compile the [rows, length, slots] programs not compiled yet: each is traced and lowered here, then
        XLA compiles them side by side on up to one thread per CPU (it releases the GIL, and one compile
        keeps one core busy), or loads them from the persistent cache."""
        missing = list(dict.fromkeys(key for key in keys if key not in self._programs))
        if not missing:
            return
        before = dict(_events)
        start = time.perf_counter()
        lowered = [self._lower(state, *key) for key in missing]
        workers = min(len(lowered), os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="flax_ce-compile") as pool:
                executables = list(pool.map(lambda program: program.compile(), lowered))
        else:
            executables = [program.compile() for program in lowered]
        elapsed = time.perf_counter() - start
        # A persistent-cache hit is also reported as a backend compile (it wraps the retrieval).
        xla_compiles = (_events[BACKEND_COMPILE_EVENT] - before[BACKEND_COMPILE_EVENT]) - (
            _events[CACHE_HIT_EVENT] - before[CACHE_HIT_EVENT]
        )
        self.compile_count += len(missing)
        self.compile_seconds += elapsed
        if xla_compiles == len(missing):
            self._xla_compile_seconds += elapsed
            self._xla_compile_programs += len(missing)
        self.xla_compiles += xla_compiles
        logger.debug(
            "scoring shapes %s: %d compiled, %d loaded from the compilation cache, in %.2fs",
            ", ".join(f"[{rows}, {length}] ({slots} slots)" for rows, length, slots in missing),
            xla_compiles,
            len(missing) - xla_compiles,
            elapsed,
        )
        for key, executable in zip(missing, executables, strict=True):
            self._programs[key] = executable
            if len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)

    def _lower(self, state: nnx.State, rows: int, length: int, slots: int) -> jax.stages.Lowered:
        spec = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        with cpu_matmul.scope(self.cpu_matmul):
            if slots:
                packing = Packing(spec, spec, jax.ShapeDtypeStruct((rows, slots), jnp.int32))
                return self._packed_forward.lower(state, spec, spec, spec, packing)
            return self._forward.lower(state, spec, spec, spec)

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
        shapes = sorted(shapes)
        # What was asked to be warmed stays compiled: a set larger than the cap (ModernBERT's at 8,192
        # tokens) raises the cap rather than evicting its own first shapes while compiling the last.
        self.max_programs = max(self.max_programs, len(set(self._programs) | set(shapes)))
        self.compile_programs(state, shapes)
        if activation_fn is not None:
            for rows, _, slots in shapes:
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

    def compile_units(self) -> float:
        """What compiling one more shape costs, in the planner's units (flax_ce.planning): this engine's
        mean XLA compile time over its measured time per unit; before it has both, a per-backend default
        (on CPU scaled to the size of the model last passed, flax_ce.planning.cpu_compile_units)."""
        if self._xla_compile_programs and self._run_units and self._run_seconds > 0:
            seconds_per_unit = self._run_seconds / self._run_units
            return (self._xla_compile_seconds / self._xla_compile_programs) / seconds_per_unit
        return (
            cpu_compile_units(self._matrix_sizes)
            if jax.default_backend() == "cpu"
            else ACCELERATOR_COMPILE_UNITS
        )

    def shape_costs(self, packed: bool, batch_size: int | None, compile_units: float) -> ShapeCosts:
        """The planner's prices: this engine's compiled shapes of that kind are free, others cost
        `compile_units`."""
        known = {
            (rows, length)
            for rows, length, slots in self._programs
            if slots == (slots_for_length(length, batch_size) if packed else 0)
        }
        return ShapeCosts(frozenset(known), compile_units)

    def plan(
        self, lengths: Sequence[int], batch_size: int | None, token_budget: int
    ) -> list[Batch] | list[PackedBatch]:
        """The batches for inputs of these lengths: packed, unpacked, or (packing None) the packed plan
        only if its estimated cost, compilations included, is at least PACKING_MIN_SAVING lower.

        As in ski rental, calls pay for padding until that would have paid for compiling, then compile:
        a plan's new programs cost a compilation each, less the padding that calls without new programs
        have paid beyond the plan that pads least (`plan_call` counts it), which a plan that compiles
        spends. Repeated calls approach the plan that pads least: a set of programs is compiled once the
        padding it would end has paid for it (and the padding it would still save this call). The padding
        is spent once, not on every program: lowering each one's price by all of it made one call of 600
        MS MARCO-like pairs, repeated, compile the least plan's 15 programs at once after two calls
        (24-27 s against 8-11 s for the calls around it)."""
        compile_units, paid = self.compile_units(), self._padding_paid
        kinds = [self.packing is not False] + ([False] if self.packing is None else [])
        best = {
            packed: self._plan_with_credit(lengths, packed, compile_units, paid, batch_size, token_budget)
            for packed in kinds
        }
        plan, cost = best[kinds[0]]
        if self.packing is None and cost > (1 - PACKING_MIN_SAVING) * best[False][1]:
            plan = best[False][0]
        return plan

    def _plan_with_credit(
        self,
        lengths: Sequence[int],
        packed: bool,
        compile_units: float,
        paid: float,
        batch_size: int | None,
        token_budget: int,
    ) -> tuple[list[Batch] | list[PackedBatch], float]:
        """The cheapest plan of one kind and its cost, when `paid` units may go toward its compilations.
        A plan of k new programs costs its units plus k compilations less `paid`, which is exactly its
        cost in the planner's units with a compilation priced compile_units - paid / k: the plans at the
        CREDIT_SPLITS prices (and at compile_units) are compared at their exact costs."""

        def exact(plan: list) -> float:
            return plan_units(plan) + max(0.0, len(self._new_programs(plan)) * compile_units - paid)

        prices = sorted({max(0.0, compile_units - paid / k) for k in CREDIT_SPLITS} | {compile_units})
        # Cheapest price first: a plan that compiles nothing even then is the plan at every price.
        cheapest = self._plan(lengths, packed, prices[0], batch_size, token_budget)
        best = (cheapest, exact(cheapest))
        if not self._new_programs(cheapest):
            return best
        for price in prices[1:]:
            plan = self._plan(lengths, packed, price, batch_size, token_budget)
            cost = exact(plan)
            if cost < best[1]:
                best = (plan, cost)
        return best

    def _plan(
        self,
        lengths: Sequence[int],
        packed: bool,
        compile_units: float,
        batch_size: int | None,
        token_budget: int,
    ) -> list[Batch] | list[PackedBatch]:
        costs = self.shape_costs(packed, batch_size, compile_units)
        settings = {
            "batch_size": batch_size,
            "token_budget": token_budget,
            "multiple": self.multiple,
            "budget_caps_batch_size": self.budget_caps_batch_size,
        }
        if packed:
            return plan_packed(
                lengths, self.max_length, pack_length=self.pack_length, costs=costs, **settings
            )
        return plan_batches(lengths, self.max_length, costs=costs, **settings)

    def _new_programs(self, plan: list[Batch] | list[PackedBatch]) -> set[tuple[int, int, int]]:
        """The programs running `plan` would compile."""
        return {_program(batch) for batch in plan} - self._programs.keys()

    def plan_call(
        self, lengths: Sequence[int], batch_size: int | None, token_budget: int
    ) -> list[Batch] | list[PackedBatch]:
        """The plan (`plan`) of a call about to run, its padding counted: a call that compiles spends the
        padding paid so far (up to its compilations' cost), one that does not adds what it pads beyond the
        plan that pads least (of the same kind, packed or not)."""
        plan = self.plan(lengths, batch_size, token_budget)
        new = self._new_programs(plan)
        if new:
            self._padding_paid = max(0.0, self._padding_paid - len(new) * self.compile_units())
        else:
            packed = any(isinstance(batch, PackedBatch) for batch in plan)
            least = self._plan(lengths, packed, 0.0, batch_size, token_budget)
            self._padding_paid += max(0.0, plan_units(plan) - plan_units(least))
        return plan

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
        start, compiling = time.perf_counter(), self.compile_seconds
        out = np.zeros((len(ids), num_outputs), dtype=np.float32)
        lengths = [len(x) for x in ids]
        state = self.weights(model)  # first: a new model drops the programs the plan would count on
        plan = self.plan_call(lengths, batch_size, token_budget)
        self.compile_programs(state, [_program(batch) for batch in plan])
        pending: deque = deque()
        for batch in progress(plan):
            executable = self.compiled(state, *_program(batch))
            # Dispatch is asynchronous: building the next host batch overlaps this one's compute.
            logits = executable(state, *self._host_arrays(ids, types, batch))
            pending.append((batch, logits if activation_fn is None else activation_fn(logits)))
            if len(pending) > PIPELINE_DEPTH:
                _gather(out, *pending.popleft())
        for done, scores in pending:
            _gather(out, done, scores)
        self._run_seconds += time.perf_counter() - start - (self.compile_seconds - compiling)
        self._run_units += plan_units(plan)
        return out


def _matrix_sizes(state: nnx.State) -> list[int]:
    """Sizes of the weight matrices a token is multiplied by: arrays of two or more dimensions, embedding
    tables (nnx.Embed's `embedding`) left out."""
    return [
        leaf.size
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if leaf.ndim >= 2 and not any(getattr(key, "key", None) == "embedding" for key in path)
    ]


def _same_pytree(a: tuple[list, Any], b: tuple[list, Any]) -> bool:
    """Whether two jax.tree.flatten results have equal treedefs (so as many leaves) and the very same leaf
    objects."""
    return a[1] == b[1] and all(x is y for x, y in zip(a[0], b[0], strict=True))


def _program(batch: Batch | PackedBatch) -> tuple[int, int, int]:
    """The [rows, length, slots] program a batch runs on (slots 0: unpacked)."""
    return batch.rows, batch.length, batch.slots if isinstance(batch, PackedBatch) else 0


def _gather(out: np.ndarray, batch: Batch | PackedBatch, scores: jax.Array) -> None:
    """Write one batch's scores [rows (x slots), C] to their inputs' rows of `out`, dropping padding."""
    if isinstance(batch, PackedBatch):
        flat = batch.pairs.reshape(-1)  # row r's slot s is score row r * slots + s
        filled = np.flatnonzero(flat >= 0)
        out[flat[filled]] = np.asarray(scores)[filled]
    else:
        out[batch.indices] = np.asarray(scores)[: len(batch.indices)]
