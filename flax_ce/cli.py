"""`flax-ce` command line: predict, rank, score (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from flax_ce.inputs import read_jsonl, read_pairs_file
from flax_ce.windows import DEFAULT_DOCUMENT_OVERLAP, LONG_DOCUMENT_MODES

# Subcommands: name -> (add_arguments, run). Other modules register theirs in `commands()`.
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

PROGRESS_THRESHOLD = 1000


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local model directory or Hugging Face hub id")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="at most this many pairs per forward pass (default: batches planned by the token budget)",
    )
    parser.add_argument("--activation", default=None, help="torch activation name, e.g. torch.nn.Identity")
    parser.add_argument(
        "--long-documents",
        choices=LONG_DOCUMENT_MODES,
        default="truncate",
        help="second texts over max-length: truncate (as sentence-transformers) or score overlapping "
        "windows and take their max, first or mean",
    )
    parser.add_argument("--document-overlap", type=int, default=DEFAULT_DOCUMENT_OVERLAP, metavar="TOKENS")


def _add_predict(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--pair", nargs=2, action="append", metavar=("TEXT_A", "TEXT_B"), default=[])
    parser.add_argument(
        "--pairs",
        metavar="FILE.jsonl",
        help='JSONL: ["a", "b"] or {"query": .., "document": ..} per line; "-" for stdin',
    )
    parser.add_argument("--softmax", action="store_true", help="softmax over labels (multi-label models)")


def _add_rank(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--query", required=True)
    parser.add_argument("--documents", nargs="*", default=[])
    parser.add_argument(
        "--documents-file", metavar="FILE.jsonl", help='JSONL: one string (or {"text": ..}) per line'
    )
    parser.add_argument("--top-k", type=int, default=None)


def _load(args: argparse.Namespace):
    from flax_ce import CrossEncoder

    return CrossEncoder(args.model, max_length=args.max_length, activation_fn=args.activation)


def _run_predict(args: argparse.Namespace) -> int:
    pairs = [list(p) for p in args.pair]
    if args.pairs:
        pairs += read_pairs_file(args.pairs)
    if not pairs:
        raise ValueError("no pairs given: use --pair A B or --pairs FILE.jsonl")
    ce = _load(args)
    scores = ce.predict(
        pairs,
        batch_size=args.batch_size,
        apply_softmax=args.softmax,
        show_progress_bar=len(pairs) >= PROGRESS_THRESHOLD,
        long_documents=args.long_documents,
        document_overlap=args.document_overlap,
    )
    labels = ce.config.labels
    for pair, score in zip(pairs, scores, strict=True):
        row = {"text_a": pair[0], "text_b": pair[1]}
        if ce.num_labels == 1:
            row["score"] = float(score)
        else:
            row["scores"] = {label: float(s) for label, s in zip(labels, score, strict=True)}
            row["label"] = labels[int(score.argmax())]
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _run_rank(args: argparse.Namespace) -> int:
    documents = list(args.documents)
    if args.documents_file:
        for where, row in read_jsonl(args.documents_file):
            documents.append(row.get("text") if isinstance(row, dict) else row)
            if not isinstance(documents[-1], str):
                raise ValueError(f'{where}: expected a string or {{"text": ...}}')
    if not documents:
        raise ValueError("no documents given: use --documents ... or --documents-file FILE.jsonl")
    ce = _load(args)
    ranked = ce.rank(
        args.query,
        documents,
        top_k=args.top_k,
        return_documents=True,
        batch_size=args.batch_size,
        show_progress_bar=len(documents) >= PROGRESS_THRESHOLD,
        long_documents=args.long_documents,
        document_overlap=args.document_overlap,
    )
    print(json.dumps(ranked, ensure_ascii=False, indent=2))
    return 0


def commands() -> dict[str, Command]:
    """All subcommands, including those of optional modules."""
    from flax_ce import corpus, demo, parity

    return {
        "predict": (_add_predict, _run_predict),
        "rank": (_add_rank, _run_rank),
        "score": (corpus.add_arguments, corpus.run),
        "parity": (parity.add_arguments, parity.run),
        "demo": (demo.add_arguments, demo.run),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 on usage or input/load errors (message on stderr)."""
    parser = argparse.ArgumentParser(prog="flax-ce", description="Cross-encoders in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    table = commands()
    for name, (add_arguments, _) in table.items():
        add_arguments(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return table[args.command][1](args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"flax-ce {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
