"""The scoring engine: batching invariance, device meshes, multi-process, persistent cache, precision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoints import corpus, sample_pairs
from flax import nnx
from support import count_compiles

from flax_ce import CrossEncoder

PAIRS = sample_pairs(37, seed=11)


def _run(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run a Python snippet in a fresh process (device count and caches are fixed at JAX start-up)."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_scores_do_not_depend_on_batching(bert_dir):
    reference = CrossEncoder(bert_dir, token_budget=1 << 20).predict(PAIRS, batch_size=1)
    for budget in (64, 512, 4096):
        ce = CrossEncoder(bert_dir, token_budget=budget)
        assert np.abs(ce.predict(PAIRS) - reference).max() <= 1e-5
        order = np.random.RandomState(budget).permutation(len(PAIRS))
        assert np.abs(ce.predict([PAIRS[i] for i in order]) - reference[order]).max() <= 1e-5
    for batch_size in (2, 5, 64):
        assert np.abs(CrossEncoder(bert_dir).predict(PAIRS, batch_size=batch_size) - reference).max() <= 1e-5


def test_new_weights_are_scored_and_reuse_compiled_programs(bert_dir):
    ce = CrossEncoder(bert_dir)
    before = ce.predict(PAIRS)
    compiled = ce.engine.compile_count
    params = nnx.state(ce.model, nnx.Param)
    nnx.update(ce.model, jax.tree.map(lambda x: x * 1.05, params))  # what training does, in place
    with count_compiles() as compiles:
        after = ce.predict(PAIRS)  # no refresh call: ce.model is the only owner of the weights
    assert compiles[0] == 0 and ce.engine.compile_count == compiled
    assert np.abs(after - before).max() > 1e-2  # the new weights are the ones scored
    fresh = CrossEncoder(bert_dir)
    nnx.update(fresh.model, nnx.state(ce.model, nnx.Param))
    assert np.abs(fresh.predict(PAIRS) - after).max() <= 1e-6

    # Assigning one parameter is seen too.
    ce.model.head.out_proj.bias.set_value(ce.model.head.out_proj.bias.get_value() + 1.0)
    biased = ce.predict(PAIRS)
    assert np.abs(biased - after).max() > 1e-3

    # A submodule replaced by another of the same shapes, and a model left in train mode, are seen too
    # (the engine skips nnx.split while the model's pytree and arrays are the ones it saw last).
    old = ce.model.head.out_proj
    ce.model.head.out_proj = nnx.Linear(old.in_features, old.out_features, rngs=nnx.Rngs(3))
    replaced = ce.predict(PAIRS)
    assert np.abs(replaced - ce.predict(PAIRS)).max() <= 1e-6
    assert np.abs(replaced - biased).max() > 1e-3
    ce.model.head.out_proj = old
    ce.model.train()
    assert np.abs(ce.predict(PAIRS) - biased).max() <= 1e-6  # those weights again; scoring never drops out

    # Other shapes or dtypes are another program: compiled again, not fed to the old one.
    head = ce.model.head.out_proj.kernel
    head.set_value(head.get_value().astype(jnp.bfloat16))
    with count_compiles() as compiles:
        ce.predict(PAIRS)
    assert compiles[0] >= 1 and ce.engine.compile_count > compiled


def test_fresh_activation_callables_compile_nothing(bert_dir, monkeypatch):
    ce = CrossEncoder(bert_dir)
    # Free compilation: every call takes the plan that pads least, so later calls never add a shape.
    monkeypatch.setattr(ce.engine, "compile_units", lambda: 0.0)
    logits = ce.predict(PAIRS, activation_fn=lambda x: x)
    ce.predict(PAIRS, activation_fn=lambda x: x + 0.0)  # the first use of `+` on this shape compiles it
    compiled = ce.engine.compile_count
    with count_compiles() as compiles:
        for shift in (1.0, 2.0, 3.0):
            scores = ce.predict(PAIRS, activation_fn=lambda x, s=shift: x + s)
            np.testing.assert_allclose(scores, logits + shift, rtol=0, atol=1e-5)
    assert compiles[0] == 0 and ce.engine.compile_count == compiled


def test_compiled_programs_are_bounded(bert_dir):
    ce = CrossEncoder(bert_dir)
    ce.engine.max_programs = 3
    for batch_size in (1, 2, 3, 5, 7):
        ce.predict(PAIRS[:9], batch_size=batch_size)
    assert len(ce.engine._programs) == 3


def test_warmup_keeps_a_set_larger_than_the_cap(bert_dir):
    ce = CrossEncoder(bert_dir, max_length=64, token_budget=256, packing=False)
    ce.engine.max_programs = 2
    compiled = ce.warmup()
    assert compiled == len(ce.planned_shapes()) > 2
    assert len(ce.engine._programs) == compiled
    with count_compiles() as compiles:
        ce.predict(PAIRS)
    assert compiles[0] == 0


WEIGHTS_ON_A_MESH = """
import json, sys
import jax, numpy as np, torch
from flax import nnx
from sentence_transformers import CrossEncoder as STCrossEncoder
from flax_ce import CrossEncoder
jax.config.update("jax_default_matmul_precision", "float32")
pairs = json.loads(sys.argv[2])
ce = CrossEncoder(sys.argv[1], devices=jax.devices()[:2])
first = ce.predict(pairs)
nnx.update(ce.model, jax.tree.map(lambda x: x * 0.9, nnx.state(ce.model, nnx.Param)))
st = STCrossEncoder(sys.argv[1], device="cpu")
with torch.no_grad():
    for p in st.model.parameters():
        p.mul_(0.9)
print(json.dumps({"multiple": ce.engine.multiple, "ours": ce.predict(pairs).tolist(),
                  "before": first.tolist(), "reference": st.predict(pairs).tolist()}))
"""


def test_changed_weights_are_scored_on_a_mesh(bert_dir):
    out = _run(
        WEIGHTS_ON_A_MESH,
        bert_dir,
        json.dumps(PAIRS),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    ours, reference = np.array(out["ours"]), np.array(out["reference"])
    assert out["multiple"] == 2
    assert np.abs(ours - np.array(out["before"])).max() > 1e-2
    assert np.abs(ours - reference).max() <= 2e-5


SHARDED = """
import json, sys
import jax
from flax_ce import CrossEncoder
pairs = json.loads(sys.argv[2])
out = {}
for k in (1, 2, 4, 8):
    ce = CrossEncoder(sys.argv[1], devices=jax.devices()[:k], token_budget=512)
    scores = ce.predict(pairs)
    out[k] = {"scores": scores.tolist(), "multiple": ce.engine.multiple,
              "rows": sorted({r for r, _ in ce.planned_shapes()})}
print(json.dumps(out))
"""


def test_sharded_over_1_2_4_8_devices(bert_dir):
    out = _run(
        SHARDED, bert_dir, json.dumps(PAIRS), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    )
    reference = CrossEncoder(bert_dir).predict(PAIRS)
    for k in ("1", "2", "4", "8"):
        assert out[k]["multiple"] == int(k)
        assert all(rows % int(k) == 0 for rows in out[k]["rows"])
        assert np.abs(np.array(out[k]["scores"]) - reference).max() <= 1e-5


DISTRIBUTED = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id = int(sys.argv[3])
jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=process_id)
assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
from flax_ce import CrossEncoder
pairs = json.loads(sys.argv[4])[process_id::2]  # each process scores its own shard
scores = CrossEncoder(sys.argv[1]).predict(pairs)
print(json.dumps({"scores": scores.tolist()}))
jax.distributed.shutdown()
"""


def test_two_processes_under_jax_distributed(bert_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DISTRIBUTED, bert_dir, address, str(i), json.dumps(PAIRS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1])["scores"])
    combined = np.empty(len(PAIRS), dtype=np.float32)
    combined[0::2], combined[1::2] = outputs
    assert np.abs(combined - CrossEncoder(bert_dir).predict(PAIRS)).max() <= 1e-5


DEFAULT_CACHE = """
import json, sys
import flax_ce
from flax_ce.engine import enable_compilation_cache
if sys.argv[3]:  # the user's own cache directory, set before flax_ce would choose one
    enable_compilation_cache(sys.argv[3], **json.loads(sys.argv[5]))
ce = flax_ce.CrossEncoder(sys.argv[1], compilation_cache=sys.argv[2] == "on")
scores = ce.predict(json.loads(sys.argv[4]))
print(json.dumps({"xla_compiles": ce.engine.xla_compiles, "programs": ce.engine.compile_count,
                  "scores": scores.tolist()}))
"""


def _run_default_cache(bert_dir, home, argument="on", user_dir="", env_switch=None, cache_args=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FLAX_CE_COMPILATION_CACHE"}
    env["XDG_CACHE_HOME"] = str(home)
    if env_switch is not None:
        env["FLAX_CE_COMPILATION_CACHE"] = env_switch
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            DEFAULT_CACHE,
            bert_dir,
            argument,
            user_dir,
            json.dumps(PAIRS[:8]),
            json.dumps(cache_args or {}),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_compilation_cache_second_process_loads(bert_dir, tmp_path):
    first = _run_default_cache(bert_dir, tmp_path)
    second = _run_default_cache(bert_dir, tmp_path)
    assert first["xla_compiles"] == first["programs"] >= 1
    assert second["programs"] == first["programs"] and second["xla_compiles"] == 0
    assert second["scores"] == first["scores"]
    assert os.listdir(tmp_path / "flax_ce" / "jax")


@pytest.mark.parametrize("how", ["environment", "argument", "user-configured"])
def test_default_compilation_cache_opt_out(bert_dir, tmp_path, how):
    user_dir = str(tmp_path / "mine") if how == "user-configured" else ""
    argument = "off" if how == "argument" else "on"
    env_switch = "0" if how == "environment" else None
    run = _run_default_cache(bert_dir, tmp_path, argument, user_dir, env_switch)
    assert run["xla_compiles"] == run["programs"] >= 1
    # (flax_ce/native may hold the MKL matmul handler, flax_ce.cpu_matmul: not a compilation cache)
    assert not (tmp_path / "flax_ce" / "jax").exists()
    if user_dir:
        assert os.listdir(user_dir)


def _cached_bytes(directory) -> list[int]:
    return [
        os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith("-cache")
    ]


def test_compilation_cache_keeps_under_its_size_limit(bert_dir, tmp_path):
    unbounded = str(tmp_path / "unbounded")
    _run_default_cache(bert_dir, tmp_path, user_dir=unbounded, cache_args={"max_bytes": None})
    sizes = _cached_bytes(unbounded)
    assert len(sizes) >= 3, os.listdir(unbounded)  # the forward, the activation, the weights' placement
    limit = sum(sizes) - min(sizes) // 2  # one entry too many: the least recently used goes
    bounded = str(tmp_path / "bounded")
    run = _run_default_cache(bert_dir, tmp_path, user_dir=bounded, cache_args={"max_bytes": limit})
    kept = _cached_bytes(bounded)
    # The sizes on failure: this test failed three times in full-suite runs without its numbers.
    seen = {"unbounded": sorted(sizes), "bounded": sorted(kept), "limit": limit, "run": run}
    assert sum(kept) <= limit, seen
    assert 1 <= len(kept) < len(sizes), seen
    again = _run_default_cache(bert_dir, tmp_path, user_dir=bounded, cache_args={"max_bytes": limit})
    assert again["scores"] == run["scores"], {**seen, "again": again}


def _kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    return kendalltau(a, b).statistic


@pytest.mark.slow
def test_bf16_agrees_with_fp32_on_real_weights(minilm_dir):
    rng = np.random.RandomState(0)
    sentences = corpus()
    queries = [" ".join(s.split()[:6]) for s in rng.choice(sentences, 50, replace=False)]
    passages = [list(rng.choice(sentences, 20, replace=False)) for _ in queries]
    pairs = [(q, p) for q, ps in zip(queries, passages, strict=True) for p in ps]
    fp32 = CrossEncoder(minilm_dir).predict(pairs).reshape(50, 20)
    bf16 = CrossEncoder(minilm_dir, dtype=jnp.bfloat16).predict(pairs).reshape(50, 20)
    taus = [_kendall_tau(a, b) for a, b in zip(fp32, bf16, strict=True)]
    assert np.all(np.isfinite(bf16))
    assert np.mean(taus) >= 0.98, taus
    assert (fp32.argmax(axis=1) == bf16.argmax(axis=1)).all()
