"""Long inputs on CPU: a ModernBERT re-ranker at 1K, 4K and 8K tokens, sentence-transformers vs flax_ce.

    python benchmarks/bench_long.py             # 3 rounds (about 25 min on an idle 2-core machine)
    python benchmarks/bench_long.py --rounds 1  # one round

The model has gte-reranker-modernbert-base's shape (22 layers, 768 wide, 128-token local window, global
attention every 3rd layer, 8192 positions) with random weights and a byte-level BPE trained here on
Python's own documentation (the published tokenizer cannot be downloaded here); timing does not depend
on the weights. Each engine runs alone in a fresh process, the order alternating each round: it loads the
model, scores every length once (compiling), then times a second call per length. Numbers are medians over
the rounds. Writes benchmarks/results/long.md and long.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import run_fresh, write_results  # noqa: E402

# tokens per pair -> pairs scored in one call at that length
LENGTHS = {1024: 4, 4096: 2, 8192: 1}

GTE_RERANKER_MODERNBERT_BASE = dict(
    hidden_size=768,
    num_hidden_layers=22,
    num_attention_heads=12,
    intermediate_size=1152,
    max_position_embeddings=8192,
    local_attention=128,
    global_attn_every_n_layers=3,
    global_rope_theta=160_000.0,
    local_rope_theta=10_000.0,
    vocab_size=50368,
)


def build_model(path: str) -> str:
    """The gte-reranker-modernbert-base-shaped checkpoint with its own trained tokenizer, saved to `path`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from workload import paragraphs

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        paragraphs(), trainers.BpeTrainer(vocab_size=8000, special_tokens=specials, initial_alphabet=alphabet)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    names = dict(
        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]"
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
        **names,
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    ids = {
        f"{name}_id": tok.token_to_id(token)
        for name, token in [("pad_token", "[PAD]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]")]
    }
    config = transformers.ModernBertConfig(
        num_labels=1, bos_token_id=cls, eos_token_id=sep, **ids, **GTE_RERANKER_MODERNBERT_BASE
    )
    transformers.ModernBertForSequenceClassification(config).eval().save_pretrained(path)
    return path


def pairs_of_length(tokenizer, tokens: int, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (query, document) pairs of exactly `tokens` tokens each (the documents cut to fit)."""
    import random

    from workload import paragraphs

    rng = random.Random(seed)
    texts = paragraphs()
    out = []
    for _ in range(count):
        source = rng.choice(texts).split()
        query = " ".join(source[: rng.randint(4, 9)])
        words: list[str] = []
        while len(tokenizer(query, " ".join(words))["input_ids"]) < tokens:
            words += rng.choice(texts).split()
        lo, hi = 0, len(words)  # the longest prefix of words that still fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenizer(query, " ".join(words[:mid]))["input_ids"]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append((query, " ".join(words[:lo])))
    return out


def worker(spec: dict) -> dict:
    """Load one engine in this fresh process; per length, a first (compiling) call then a timed one."""
    with open(spec["workload"]) as f:
        workload = {int(k): [tuple(p) for p in v] for k, v in json.load(f).items()}
    if spec["engine"] == "st":
        from sentence_transformers import CrossEncoder

        st = CrossEncoder(spec["model"], device="cpu")
        predict = lambda pairs: st.predict(pairs, show_progress_bar=False)  # noqa: E731
    else:
        from flax_ce import CrossEncoder

        ce = CrossEncoder(spec["model"])
        predict = ce.predict
    result: dict = {"first_s": {}, "warm_s": {}, "scores": {}}
    for tokens, pairs in workload.items():
        start = time.perf_counter()
        predict(pairs)
        result["first_s"][tokens] = time.perf_counter() - start
        start = time.perf_counter()
        scores = predict(pairs)
        result["warm_s"][tokens] = time.perf_counter() - start
        result["scores"][tokens] = [float(s) for s in scores]
    return result


def run_worker(spec: dict) -> dict:
    """One fresh process; flax_ce's compilation cache starts empty in it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLAX_CE_COMPILATION_CACHE": "0"}
    return run_fresh(__file__, spec, env, spec["engine"])


def to_markdown(result: dict) -> str:
    lines = [
        "# Long inputs on CPU: ModernBERT (gte-reranker-modernbert-base shape), flax_ce vs sentence-transformers",
        "",
        f"`{result['command']}` on {result['date']}: {os.cpu_count()} cores, {result['rounds']} rounds "
        f"(fresh process per engine, alternating), {result['minutes']:.0f} min, load average "
        f"{result['load'][0]:.1f} before and {result['load'][1]:.1f} after (the machine is shared). Random "
        "weights; fp32. Warm: the second call in the process; first: the call that compiles (flax_ce, empty "
        "compilation cache) or warms up (torch).",
        "",
        "| tokens per pair | pairs per call | ST warm s/pair | flax_ce warm s/pair | ratio | ST first s | "
        "flax_ce first s | ratio | max abs score diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens, row in result["summary"].items():
        lines.append(
            f"| {tokens} | {row['pairs']} | {row['st_warm']:.2f} | {row['flax_warm']:.2f} | "
            f"**{row['st_warm'] / row['flax_warm']:.2f}x** | {row['st_first']:.1f} | {row['flax_first']:.1f} | "
            f"{row['st_first'] / row['flax_first']:.2f}x | {row['max_abs_diff']:.1e} |"
        )
    lines += ["", "Ratios: sentence-transformers time over flax_ce time (above 1: flax_ce is faster)."]
    return "\n".join(lines) + "\n"


def summarise(runs: dict[str, list[dict]], workload: dict) -> dict:
    """Per length: median seconds per pair (warm) and per first call, and the engines' score agreement."""

    def median(engine: str, what: str, key: str) -> float:
        return statistics.median(r[what][key] for r in runs[engine])

    summary = {}
    for tokens, pairs in workload.items():
        key, n = str(tokens), len(pairs)
        st, flax = runs["st"][0]["scores"][key], runs["flax"][0]["scores"][key]
        summary[key] = {
            "pairs": n,
            "st_warm": median("st", "warm_s", key) / n,
            "flax_warm": median("flax", "warm_s", key) / n,
            "st_first": median("st", "first_s", key),
            "flax_first": median("flax", "first_s", key),
            "max_abs_diff": max(abs(a - b) for a, b in zip(st, flax, strict=True)),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", default="1024,4096,8192", help="tokens per pair, comma-separated")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "long"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import transformers

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="flax_ce_long_")
    model = build_model(os.path.join(root, "modernbert"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    lengths = [int(t) for t in args.lengths.split(",")]
    workload = {t: pairs_of_length(tokenizer, t, LENGTHS.get(t, 1), seed=t) for t in lengths}
    path = os.path.join(root, "workload.json")
    with open(path, "w") as f:
        json.dump(workload, f)
    runs: dict[str, list[dict]] = {"st": [], "flax": []}
    for r in range(args.rounds):
        for engine in ("st", "flax") if r % 2 == 0 else ("flax", "st"):
            t = time.perf_counter()
            runs[engine].append(run_worker({"engine": engine, "model": model, "workload": path}))
            print(
                f"round {r + 1}/{args.rounds} {engine}: {time.perf_counter() - t:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    result = {
        "command": " ".join(["python", "benchmarks/bench_long.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "rounds": args.rounds,
        "minutes": (time.perf_counter() - start) / 60,
        "load": [load_before, os.getloadavg()[0]],
        "summary": summarise(runs, workload),
        "runs": runs,
    }
    write_results(args.out, result, to_markdown(result))


if __name__ == "__main__":
    main()
