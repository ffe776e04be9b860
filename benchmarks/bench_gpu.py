"""GPU benchmark (prepared for sessions that are lent a device): flax_ce bf16 vs sentence-transformers fp16.

    python benchmarks/bench_gpu.py [--n 20000] [--out benchmarks/results/gpu]

Same pairs and weights as bench_cpu.py (real all-MiniLM-L6-v2 encoder, seeded head). flax_ce runs in bf16
with `jax.nn.dot_product_attention` (XLA picks cuDNN's fused attention where it supports the shapes);
sentence-transformers runs torch fp16 on the same GPU. Reports pairs/s, the ratio, compile count/time,
MFU against the chip's dense bf16 peak, and the score agreement with fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cpu import timed  # noqa: E402
from models import build_minilm_reranker, flops_per_pair  # noqa: E402

# Dense bf16 peak of the chips the device tool lends (TFLOP/s), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--token-budget", type=int, default=65536)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu"))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from workload import msmarco_like_pairs

    from flax_ce import CrossEncoder

    device = jax.devices()[0]
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    model_dir = build_minilm_reranker(os.path.join(tempfile.mkdtemp(prefix="flax_ce_gpu_"), "minilm"))
    pairs = msmarco_like_pairs(args.n, seed=0)

    st = STCrossEncoder(model_dir, device="cuda", model_kwargs={"torch_dtype": torch.float16})
    ours = CrossEncoder(model_dir, dtype=jnp.bfloat16, token_budget=args.token_budget)
    fp32 = CrossEncoder(model_dir, token_budget=args.token_budget)
    tokens = [len(x) for x in ours.tokenize(pairs)["input_ids"]]
    flops = sum(flops_per_pair(tokens, ours.config))

    _, cold = timed(ours.predict, pairs)
    st_times, flax_times = [], []
    for _ in range(args.repeats):
        st_scores, seconds = timed(st.predict, pairs, batch_size=128)
        st_times.append(seconds)
        flax_scores, seconds = timed(ours.predict, pairs)
        flax_times.append(seconds)
    with jax.default_matmul_precision("float32"):
        reference = fp32.predict(pairs)
    st_s, flax_s = statistics.median(st_times), statistics.median(flax_times)
    result = {
        "device": str(device),
        "gpu": name,
        "n_pairs": len(pairs),
        "st_fp16_pairs_per_s": len(pairs) / st_s,
        "flax_bf16_pairs_per_s": len(pairs) / flax_s,
        "ratio": st_s / flax_s,
        "flax_first_call_s": cold,
        "compiles": ours.engine.compile_count,
        "compile_seconds": ours.engine.compile_seconds,
        "flax_mfu": flops / flax_s / 1e12 / peak if peak else None,
        "st_mfu": flops / st_s / 1e12 / peak if peak else None,
        "max_abs_diff_bf16_vs_fp32": float(np.abs(flax_scores - reference).max()),
        "max_abs_diff_st_fp16_vs_fp32": float(np.abs(st_scores - reference).max()),
        "command": " ".join(["python", "benchmarks/bench_gpu.py", *sys.argv[1:]]),
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
