"""Fine-tuning: it learns, compiles once per bucket shape, is reproducible, and is the same on 1 or 4 devices."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from checkpoints import build_modernbert, build_random, build_xlm_roberta, corpus, sample_pairs
from flax import nnx
from support import count_compiles

from flax_ce import CrossEncoder
from flax_ce.evaluation import ClassificationEvaluator
from flax_ce.training import Trainer, decay_mask, default_loss, example_losses, fit


def duplicate_task(sentences: list[str], seed: int) -> list[tuple[str, str, float]]:
    """(s, s, 1) and (s, another sentence, 0): a pair task a cross-encoder can learn in a few dozen steps."""
    rng = random.Random(seed)
    examples = []
    for i, sentence in enumerate(sentences):
        examples.append((sentence, sentence, 1.0))
        examples.append((sentence, sentences[(i + rng.randrange(1, len(sentences))) % len(sentences)], 0.0))
    return examples


def flat_params(ce: CrossEncoder) -> dict:
    return {
        path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(ce.model, nnx.Param))
    }


def assert_updates_agree(max_abs: dict, relative: dict, key_bias_bound: float) -> None:
    """Two trainings that should be the same, compared on what they moved (weights after minus before):
    per tensor, the largest element difference (`max_abs`) and the difference's norm over the update's norm.

    Adam divides each gradient by its own running RMS, so an element whose gradient is near zero turns
    float reduction-order noise (which differs with batch splits, shard counts and the CPU's XLA kernels)
    into a visible step: single elements may differ by a few percent of one step (lr 1e-3 in these
    tests), while each tensor's update as a whole must agree to 0.1%. Attention key biases have an exactly
    zero gradient (softmax ignores a per-query constant), so their whole update is that noise: each step
    moves an element by at most its learning rate, either way, so they differ by at most twice the sum of
    the learning rates (`key_bias_bound`). A gradient summed wrongly moves every tensor
    differently by the order of a whole step.
    """
    for name, diff in max_abs.items():
        if "attention/key/bias" in name:
            assert diff < key_bias_bound, name
        else:
            assert diff < 1e-4, name
            assert relative[name] < 1e-3, name


def update_differences(before: dict, after_a: dict, after_b: dict) -> tuple[dict, dict]:
    """(max_abs, relative) as `assert_updates_agree` takes them, keyed by "/"-joined parameter path."""
    max_abs, relative = {}, {}
    for path, start in before.items():
        name = "/".join(map(str, path))
        moved_a, moved_b = after_a[path] - start, after_b[path] - start
        max_abs[name] = float(np.abs(moved_a - moved_b).max())
        relative[name] = float(np.linalg.norm(moved_a - moved_b) / max(np.linalg.norm(moved_a), 1e-30))
    return max_abs, relative


@pytest.mark.slow
def test_loss_decreases_and_held_out_precision_improves(minilm_dir):
    # Real pretrained weights learn this task decisively in one epoch (loss ~0.7 -> ~0.2, held-out average
    # precision ~0.5 -> ~1.0); a tiny random model only drifts (0.72 -> 0.64..0.70 depending on the seed,
    # the same in torch), so bounds on it fail by chance.
    sentences = corpus()
    random.Random(0).shuffle(sentences)
    train, held_out = duplicate_task(sentences[:300], 0), duplicate_task(sentences[300:400], 1)
    evaluator = ClassificationEvaluator([(a, b) for a, b, _ in held_out], [int(y) for *_, y in held_out])
    ce = CrossEncoder(minilm_dir, max_length=32)
    before = evaluator(ce)["average_precision"]
    compiled = ce.engine.compile_count
    result = fit(ce, train, batch_size=16, learning_rate=5e-5, evaluator=evaluator, eval_steps=20, seed=0)
    assert result.steps == -(-len(train) // 16) == 38  # the last batch of the epoch is topped up
    assert [step for step, _ in result.evaluations] == [20, 38]
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]) - 0.3
    after = result.evaluations[-1][1]["average_precision"]
    assert before < 0.7 and after > 0.95
    # ce now scores with the trained weights, and its dropout stays off for scoring.
    assert evaluator(ce)["average_precision"] == pytest.approx(after)
    assert ce.engine.compile_count == compiled  # evaluating new weights reuses the scoring programs
    assert all(m.deterministic for _, m in nnx.iter_modules(ce.model) if isinstance(m, nnx.Dropout))


NEW_FAMILIES = {
    "xlm-roberta": lambda path: build_xlm_roberta(path, positions=130),
    "modernbert-cls": lambda path: build_modernbert(path, max_length=128),
    "modernbert-mean-3-labels": lambda path: build_modernbert(
        path, max_length=128, pooling="mean", num_labels=3
    ),
}


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_newer_families_fit_a_small_set(name, tmp_path):
    ce = CrossEncoder(NEW_FAMILIES[name](str(tmp_path / name)), max_length=64)
    labels = [i % 3 if ce.num_labels == 3 else float(i % 2) for i in range(8)]
    examples = [(a, b, y) for (a, b), y in zip(sample_pairs(8, seed=3), labels, strict=True)]
    result = fit(ce, examples, batch_size=8, epochs=30, learning_rate=3e-3, seed=0, show_progress_bar=False)
    # Measured: first five losses 0.47-0.74, last five 0.006-0.05 (seeds 0-2).
    assert np.mean(result.losses[-5:]) < 0.2 < np.mean(result.losses[:5])
    scores = np.asarray(ce.predict([(a, b) for a, b, _ in examples]))
    predicted = scores.argmax(-1) if ce.num_labels > 1 else (scores > 0.5).astype(int)
    assert predicted.tolist() == [int(y) for y in labels]


def test_train_step_compiles_once_per_bucket_shape(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=64)
    sentences = corpus()
    short = [(sentences[i][:12], sentences[i + 1][:12]) for i in range(24)]
    long = [(sentences[i], " ".join(sentences[i : i + 6])) for i in range(24)]
    examples = [(a, b, float(i % 2)) for i, (a, b) in enumerate(short + long)]
    trainer = Trainer(ce, total_steps=12, batch_size=8)
    encoded = trainer.encode(examples)
    rng = np.random.default_rng(0)
    batches = list(trainer.batches(encoded, rng)) + list(trainer.batches(encoded, rng))
    shapes = {b.input_ids.shape for b in batches}
    assert shapes == {(8, 32), (8, 64)}
    with count_compiles() as compiles:
        losses = [trainer.step(batch) for batch in batches]
    assert compiles[0] == len(shapes)
    assert np.isfinite(jax.device_get(losses)).all()


def test_seeded_training_is_reproducible(bert_dir):
    examples = [(a, b, float(i % 2)) for i, (a, b) in enumerate(sample_pairs(32, seed=2))]
    runs = []
    for _ in range(2):
        ce = CrossEncoder(bert_dir, max_length=32)
        fit(ce, examples, batch_size=8, max_steps=3, learning_rate=1e-3, seed=7, show_progress_bar=False)
        runs.append(flat_params(ce))
    for path, value in runs[0].items():
        np.testing.assert_array_equal(value, runs[1][path], err_msg=str(path))
    assert not np.array_equal(
        runs[0][("head", "out_proj", "kernel")],
        flat_params(CrossEncoder(bert_dir))[("head", "out_proj", "kernel")],
    )


def test_dropout_follows_train_and_eval(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=32)
    ids = np.array([[2, 40, 41, 3, 50, 51, 3]], dtype=np.int32)
    model = ce.model

    def logits():
        return np.asarray(model(ids, np.ones_like(ids), np.zeros_like(ids)))

    evaluated = logits()
    model.train()
    nnx.reseed(model, dropout=0)
    first, second = logits(), logits()  # each call draws new masks from the model's own streams
    assert float(first[0, 0]) != float(second[0, 0]) and float(first[0, 0]) != float(evaluated[0, 0])
    nnx.reseed(model, dropout=0)
    np.testing.assert_array_equal(first, logits())
    model.eval()
    np.testing.assert_array_equal(evaluated, logits())
    # predict() always scores in eval mode, as sentence-transformers does.
    model.train()
    scores = ce.predict([("a b", "c d")] * 2)
    assert scores[0] == scores[1] and all(
        m.deterministic for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)
    )


def test_losses_match_sentence_transformers_defaults():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 3)).astype(np.float32)
    classes = rng.integers(0, 3, 6)
    soft = rng.random(6).astype(np.float32)
    bce = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits[:, 0]), torch.tensor(soft))
    ce = torch.nn.CrossEntropyLoss()(torch.tensor(logits), torch.tensor(classes))
    mse = torch.nn.MSELoss()(torch.tensor(logits), torch.tensor(logits[::-1].copy()))
    assert float(jnp.mean(example_losses("bce", logits, soft))) == pytest.approx(float(bce), rel=1e-5)
    assert float(jnp.mean(example_losses("ce", logits, classes))) == pytest.approx(float(ce), rel=1e-5)
    assert float(jnp.mean(example_losses("mse", logits, logits[::-1]))) == pytest.approx(float(mse), rel=1e-5)
    assert (default_loss(1), default_loss(3)) == ("bce", "ce")


def test_weight_decay_skips_biases_and_layer_norms(bert_dir):
    ce = CrossEncoder(bert_dir)
    mask = {
        tuple(path): bool(var.get_value())
        for path, var in nnx.to_flat_state(decay_mask(nnx.state(ce.model, nnx.Param)))
    }
    decayed = {path[-1] for path, on in mask.items() if on}
    kept = {path[-1] for path, on in mask.items() if not on}
    assert decayed == {"kernel", "embedding"} and kept == {"bias", "scale"}


def test_labels_are_checked_and_nli_names_accepted(roberta_dir, bert_dir):
    nli = CrossEncoder(roberta_dir, max_length=32)
    trainer = Trainer(nli, total_steps=1, batch_size=4)
    _, _, labels = trainer.encode([("a", "b", "entailment"), ("c", "d", 2)])
    np.testing.assert_array_equal(labels, [1, 2])
    with pytest.raises(ValueError, match="class ids"):
        trainer.encode([("a", "b", 3)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Trainer(CrossEncoder(bert_dir), total_steps=1, batch_size=4).encode([("a", "b", 2.0)])
    with pytest.raises(ValueError, match="needs a 1-label model"):
        Trainer(nli, total_steps=1, batch_size=4, loss="bce")


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    no_dropout = build_random(
        "bert", str(tmp_path / "bert"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    examples = [(a, b, float(i % 2)) for i, (a, b) in enumerate(sample_pairs(16, seed=6))]
    results = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        ce = CrossEncoder(no_dropout, max_length=32)
        before = flat_params(ce)
        result = fit(
            ce, examples, batch_size=batch_size, accumulation_steps=accumulation, max_steps=1,
            learning_rate=1e-3, show_progress_bar=False,
        )  # fmt: skip
        assert result.steps == 1
        results.append(flat_params(ce))
    assert_updates_agree(*update_differences(before, *results), key_bias_bound=2.1e-3)  # one step at 1e-3


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=32)
    examples = [(a, b, float(i % 2)) for i, (a, b) in enumerate(sample_pairs(16, seed=8))]
    result = fit(ce, examples, batch_size=8, max_steps=2, compute_dtype=jnp.bfloat16, show_progress_bar=False)
    assert np.isfinite(result.losses).all()
    assert {v.dtype for v in flat_params(ce).values()} == {np.dtype(np.float32)}


DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from flax_ce import CrossEncoder
    from flax_ce.training import fit

    def flat(ce):
        return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ce.model, nnx.Param))}

    assert jax.device_count() == 4
    examples = json.loads(sys.argv[2])
    runs = []
    for devices in (jax.devices()[:1], jax.devices()):
        ce = CrossEncoder(sys.argv[1], max_length=32)
        before = flat(ce)
        result = fit(ce, examples, batch_size=8, max_steps=3, learning_rate=1e-3, devices=devices, show_progress_bar=False)
        runs.append((result.losses, {k: v - before[k] for k, v in flat(ce).items()}))
    (losses_1, moved_1), (losses_4, moved_4) = runs
    print(json.dumps({
        "losses": float(np.abs(np.subtract(losses_1, losses_4)).max()),
        "max_abs": {k: float(np.abs(moved_1[k] - moved_4[k]).max()) for k in moved_1},
        "relative": {
            k: float(np.linalg.norm(moved_1[k] - moved_4[k]) / max(np.linalg.norm(moved_1[k]), 1e-30))
            for k in moved_1
        },
    }))
    """
)


@pytest.mark.slow
def test_one_and_four_devices_train_the_same(bert_dir):
    examples = [(a, b, float(i % 2)) for i, (a, b) in enumerate(sample_pairs(24, seed=9))]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", DEVICES_SCRIPT, bert_dir, json.dumps(examples)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(diffs, indent=1))
    assert diffs["losses"] < 1e-5  # same batches, same dropout masks, one device or four
    # Three steps at learning rates 1e-3, 2/3e-3 and 1/3e-3.
    assert_updates_agree(diffs["max_abs"], diffs["relative"], key_bias_bound=4.1e-3)


def test_optimizer_schedule_warms_up_then_decays():
    from flax_ce.training import make_optimizer

    params = {"w": {"kernel": jnp.ones(3)}}
    optimizer = make_optimizer(10, learning_rate=1.0, warmup_ratio=0.2, weight_decay=0.0, max_grad_norm=None)
    state = optimizer.init(params)
    sizes = []
    for _ in range(10):
        updates, state = optimizer.update({"w": {"kernel": jnp.ones(3)}}, state, params)
        sizes.append(float(jnp.abs(updates["w"]["kernel"][0])))
    assert (
        sizes[0] == 0.0
        and sizes[1] == pytest.approx(0.5, rel=0.01)
        and sizes[2] == pytest.approx(1.0, rel=0.01)
    )
    assert sizes[2] > sizes[5] > sizes[9] > 0
    assert isinstance(optimizer, optax.GradientTransformation)
