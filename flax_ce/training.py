"""Fine-tuning a CrossEncoder with optax: jitted steps over length buckets, data-parallel over devices."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from flax_ce.engine import make_mesh, pad_rows
from flax_ce.loading import build_model
from flax_ce.planning import bucket_length

if TYPE_CHECKING:
    from flax_ce.cross_encoder import CrossEncoder

logger = logging.getLogger("flax_ce")

LOSSES = ("bce", "ce", "mse")
# Chunks of this many batches are sorted by length before batching, so a batch holds similar lengths
# (less padding) while the order of batches stays random.
GROUP_BATCHES = 50


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded training batch (numpy): ids/mask/types [rows, length], labels, weights [rows] (0: filler)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass
class TrainResult:
    """What fit() did: optimiser steps, mean loss per step, and (step, metrics) of each evaluation."""

    steps: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    evaluations: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)


def default_loss(num_labels: int) -> str:
    """sentence-transformers' default: binary cross-entropy for one label, cross-entropy for several."""
    return "bce" if num_labels == 1 else "ce"


def example_losses(loss: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example loss [batch] from logits [batch, num_labels] (fp32)."""
    if loss == "bce":
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels)
    if loss == "ce":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    errors = logits.reshape(labels.shape[0], -1) - labels.reshape(labels.shape[0], -1)
    return jnp.mean(jnp.square(errors), axis=1)


def decay_mask(params) -> object:
    """True for matrices and embeddings; biases and LayerNorm scales get no weight decay."""

    def decays(path, _) -> bool:
        # The path ends in the Variable's `.value`; the parameter's name is the last dict key.
        name = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)][-1]
        return name in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    total_steps: int,
    *,
    learning_rate: float = 2e-5,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    accumulation_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then linear decay to 0, global-norm clipping, optional accumulation."""
    warmup = int(round(warmup_ratio * total_steps))
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
            optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )
    chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    chain.append(optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
    optimizer = optax.chain(*chain)
    # Accumulated gradients are averaged, then clipped and applied once every `accumulation_steps`.
    return optax.MultiSteps(optimizer, accumulation_steps) if accumulation_steps > 1 else optimizer


def train_step(graphdef, optimizer, loss: str, params, rngs, opt_state, batch):
    """One optimiser (or accumulation) step: (params, rngs, opt_state, loss). Pure, for jax.jit.

    `graphdef` is the model in training mode (dropout on); `rngs` holds its dropout streams, which the
    step advances and returns.
    """

    model = nnx.merge(graphdef, params, rngs)

    def loss_fn(model):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        losses = example_losses(loss, logits, batch["labels"])
        return jnp.sum(losses * batch["weights"]) / jnp.sum(batch["weights"])

    value, grads = nnx.value_and_grad(loss_fn)(model)  # gradients of the parameters only
    rngs = nnx.state(model, nnx.RngState)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rngs, opt_state, value


class Trainer:
    """Optimiser state and the jitted step for fine-tuning one CrossEncoder; `install()` hands weights back."""

    def __init__(
        self,
        ce: CrossEncoder,
        total_steps: int,
        *,
        batch_size: int = 16,
        loss: str | None = None,
        compute_dtype=jnp.float32,
        seed: int = 0,
        devices: Sequence[jax.Device] | None = None,
        **optimizer_settings,
    ):
        self.ce = ce
        self.batch_size = batch_size
        self.loss = loss or default_loss(ce.num_labels)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "bce" and ce.num_labels != 1:
            raise ValueError(f"loss 'bce' needs a 1-label model; this one has {ce.num_labels} labels")
        devices = list(devices) if devices is not None else jax.local_devices()
        if batch_size % len(devices):
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the device count ({len(devices)})"
            )
        mesh = make_mesh(devices)
        # Parameters are replicated and batches split over the "batch" axis; one device takes both whole.
        replicated = NamedSharding(mesh, PartitionSpec()) if mesh else devices[0]
        self.batch_placement = NamedSharding(mesh, PartitionSpec("batch")) if mesh else devices[0]

        # bf16 compute keeps fp32 master weights: the layers hold fp32 parameters and cast per matmul.
        def build():
            return build_model(ce.config, rngs=nnx.Rngs(seed, dropout=seed), dtype=compute_dtype)

        template = nnx.eval_shape(build)
        template.train()
        graphdef = nnx.split(template)[0]
        # Dropout streams seeded by `seed`; jit drops the parameter initialisation nobody returns.
        rngs = jax.jit(lambda: nnx.state(build(), nnx.RngState))()
        self.optimizer = make_optimizer(total_steps, **optimizer_settings)
        # A copy: the step donates its input buffers, and ce.model must stay usable until install().
        params = jax.tree.map(jnp.copy, nnx.state(ce.model, nnx.Param))
        self.params, self.rngs, self.opt_state = jax.device_put(
            (params, rngs, self.optimizer.init(params)), replicated
        )
        self.micro_steps = 0
        self._step = jax.jit(
            functools.partial(train_step, graphdef, self.optimizer, self.loss),
            donate_argnums=(0, 1, 2),
            **({"out_shardings": replicated} if mesh else {}),
        )

    def encode(self, examples: Sequence[tuple[str, str, object]]) -> tuple[list, list | None, np.ndarray]:
        """(token ids, token types, labels) of (text_a, text_b, label) examples, checked for this loss."""
        labels = self._labels([e[2] for e in examples])
        tokens = self.ce.tokenize([(a, b) for a, b, _ in examples])
        return tokens["input_ids"], tokens["token_type_ids"], labels

    def batches(
        self, encoded: tuple[list, list | None, np.ndarray], rng: np.random.Generator
    ) -> Iterator[Batch]:
        """One epoch of shuffled, length-grouped, fixed-size batches; the last is topped up with
        zero-weight repeats."""
        ids, types, labels = encoded
        order = rng.permutation(len(ids))
        chunk = self.batch_size * GROUP_BATCHES
        order = np.concatenate(
            [sorted(order[i : i + chunk], key=lambda j: -len(ids[j])) for i in range(0, len(order), chunk)]
        )
        for start in rng.permutation(range(0, len(order), self.batch_size)):
            index = order[start : start + self.batch_size]
            # Fillers repeat real rows (weight 0): an all-padding row would make attention NaN.
            rows = np.resize(index, self.batch_size)
            weights = (np.arange(self.batch_size) < len(index)).astype(np.float32)
            row_types = None if types is None else [types[i] for i in rows]
            yield self._pad([ids[i] for i in rows], row_types, labels[rows], weights)

    def _labels(self, labels: list) -> np.ndarray:
        """Labels as the loss needs them: floats for bce/mse, class ids (names allowed) for ce."""
        if self.loss == "ce":
            label2id = self.ce.config.label2id
            ids = [label2id.get(x, x) if isinstance(x, str) else x for x in labels]
            bad = [x for x in ids if not (isinstance(x, (int, np.integer)) and 0 <= x < self.ce.num_labels)]
            if bad:
                raise ValueError(
                    f"cross-entropy labels must be class ids 0..{self.ce.num_labels - 1} or names "
                    f"{list(label2id)}; got {bad[:5]}"
                )
            return np.asarray(ids, dtype=np.int32)
        values = np.asarray(labels, dtype=np.float32)
        if self.loss == "bce" and (values.ndim != 1 or values.min() < 0 or values.max() > 1):
            raise ValueError("binary cross-entropy labels must be single numbers in [0, 1]")
        if self.loss == "mse" and values.reshape(len(labels), -1).shape[1] != self.ce.num_labels:
            raise ValueError(f"mse labels must have {self.ce.num_labels} value(s) per example")
        return values

    def _pad(self, ids, types, labels, weights) -> Batch:
        shape = (len(ids), bucket_length(max(len(x) for x in ids), self.ce.max_length))
        return Batch(*pad_rows(ids, types, shape, self.ce.engine.pad_id), labels, weights)

    def step(self, batch: Batch) -> jax.Array:
        """Run one jitted step on `batch`; returns its loss (a device scalar)."""
        arrays = jax.device_put(dataclasses.asdict(batch), self.batch_placement)
        self.params, self.rngs, self.opt_state, loss = self._step(
            self.params, self.rngs, self.opt_state, arrays
        )
        self.micro_steps += 1
        return loss

    def install(self) -> None:
        """Put the current weights into the CrossEncoder, so predict()/rank()/save_pretrained() use them."""
        # One copy on the default device, whatever the training mesh was; scoring places it as it needs.
        nnx.update(self.ce.model, jax.device_put(jax.device_get(self.params)))


def fit(
    ce: CrossEncoder,
    train_examples: Sequence[tuple[str, str, object]],
    *,
    epochs: int = 1,
    batch_size: int = 16,
    max_steps: int | None = None,
    accumulation_steps: int = 1,
    learning_rate: float = 2e-5,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    loss: str | None = None,
    compute_dtype=jnp.float32,
    seed: int = 0,
    evaluator: Callable[[CrossEncoder], dict[str, float]] | None = None,
    eval_steps: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    show_progress_bar: bool = True,
) -> TrainResult:
    """Fine-tune `ce` in place on (text_a, text_b, label) examples; afterwards it scores with the new weights.

    `loss`: "bce" (1 label, labels in [0, 1]), "ce" (class ids or names) or "mse" (e.g. a teacher's
    logits); default as sentence-transformers. Steps count optimiser updates (`accumulation_steps`
    batches each). `evaluator(ce)` runs every `eval_steps` steps and at the end.
    """
    total_steps = count_steps(len(train_examples), epochs, batch_size, accumulation_steps, max_steps)
    trainer = Trainer(
        ce,
        total_steps,
        batch_size=batch_size,
        loss=loss,
        compute_dtype=compute_dtype,
        seed=seed,
        devices=devices,
        learning_rate=learning_rate,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        accumulation_steps=accumulation_steps,
    )
    encoded = trainer.encode(train_examples)
    result = run_steps(
        trainer, encoded, total_steps, accumulation_steps, seed, evaluator, eval_steps, show_progress_bar
    )
    if evaluator is not None and (not result.evaluations or result.evaluations[-1][0] != result.steps):
        result.evaluations.append((result.steps, _evaluate(ce, evaluator, result.steps)))
    return result


def count_steps(
    examples: int, epochs: int, batch_size: int, accumulation_steps: int, max_steps: int | None
) -> int:
    """Optimiser steps that `epochs` over `examples` make (at most `max_steps`); at least one, or a ValueError."""
    if not examples:
        raise ValueError("no training examples")
    total_steps = epochs * -(-examples // batch_size) // accumulation_steps
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    if total_steps < 1:
        raise ValueError(
            f"{examples} examples make no full step of batch_size {batch_size} x "
            f"accumulation_steps {accumulation_steps}"
        )
    return total_steps


def run_steps(
    trainer: Trainer,
    encoded: tuple[list, list | None, np.ndarray],
    total_steps: int,
    accumulation_steps: int,
    seed: int,
    evaluator: Callable | None,
    eval_steps: int | None,
    show_progress_bar: bool,
) -> TrainResult:
    """Train for `total_steps` optimiser steps, evaluating every `eval_steps`; the weights end up installed."""
    result = TrainResult()
    rng = np.random.default_rng(seed)
    pending: list[jax.Array] = []
    with tqdm(total=total_steps, desc="Training", disable=not show_progress_bar) as bar:
        while result.steps < total_steps:
            for batch in trainer.batches(encoded, rng):
                pending.append(trainer.step(batch))
                if len(pending) < accumulation_steps:
                    continue
                result.losses.append(float(np.mean(jax.device_get(pending))))
                pending.clear()
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
                if evaluator is not None and eval_steps and result.steps % eval_steps == 0:
                    trainer.install()
                    result.evaluations.append((result.steps, _evaluate(trainer.ce, evaluator, result.steps)))
                if result.steps == total_steps:
                    break
    trainer.install()
    return result


def _evaluate(ce: CrossEncoder, evaluator: Callable, steps: int) -> dict[str, float]:
    metrics = evaluator(ce)
    logger.info("step %d: %s", steps, metrics)
    return metrics
