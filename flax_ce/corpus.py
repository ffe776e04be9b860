"""`flax-ce score`: score a corpus file in chunks that are committed as they finish, so a job killed at any
moment continues where it stopped; under jax.distributed the processes split the chunks between them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from flax_ce.corpus_files import (
    RawRow,
    count_rows,
    file_format,
    fingerprint,
    parse_row,
    read_chunks,
)
from flax_ce.corpus_job import MANIFEST_VERSION, JobDirectory, Processes, model_fingerprint
from flax_ce.inputs import check_positive

DEFAULT_CHUNK_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """What a finished job did. `scored` counts the rows this run scored (all processes together); `rows`
    (written to OUTPUT) and `rejected` are counted by process 0, which assembles, and are 0 elsewhere."""

    output: str
    rows: int
    rejected: int
    scored: int
    scored_by_process: list[int]
    resumed_chunks: int
    seconds: float
    scoring_seconds: float
    compiles: int

    def line(self) -> str:
        """One line for people: rows, rate, compiles, time."""
        rate = self.scored / self.scoring_seconds if self.scoring_seconds > 0 else 0.0
        resumed = f", {self.resumed_chunks} chunks from an earlier run" if self.resumed_chunks else ""
        if len(self.scored_by_process) > 1:
            resumed += f"; scored {' + '.join(map(str, self.scored_by_process))} by the processes"
        rejected = f", {self.rejected} rejected (see {self.output}.rejected.jsonl)" if self.rejected else ""
        return (
            f"{self.output}: {self.rows} rows{rejected}{resumed}; scored {self.scored} pairs in "
            f"{self.scoring_seconds:.1f}s ({rate:.1f} pairs/s), {self.compiles} compiles, "
            f"{self.seconds:.1f}s in all"
        )


def _rejection(row: RawRow, reason: str) -> str:
    """A line of OUTPUT.rejected.jsonl: the row's number, where it is, why, and what it held."""
    value = row.value.decode("utf-8", "replace").rstrip("\r\n") if isinstance(row.value, bytes) else row.value
    record = {"row": row.index, "where": row.where, "reason": reason, "input": value}
    return json.dumps(record, ensure_ascii=False, default=repr) + "\n"


def _score_pairs(
    ce, pairs: list[tuple[str, str]], predict_options: dict
) -> tuple[np.ndarray, dict[int, str]]:
    """(scores of the pairs that could be scored, {position: reason} for those that could not)."""
    if not pairs:
        return np.zeros((0, ce.num_labels), dtype=np.float32), {}
    try:
        return ce.predict(pairs, **predict_options), {}
    except ValueError:
        # A pair the tokenizer cannot take (e.g. texts too long to shorten safely): find which, score the rest.
        failed = {}
        for i, pair in enumerate(pairs):
            try:
                ce.predict([pair], **predict_options)
            except ValueError as e:
                failed[i] = f"{e}".removeprefix("pair 0: ")
        if not failed:
            raise
        kept = [pair for i, pair in enumerate(pairs) if i not in failed]
        return _score_pairs(ce, kept, predict_options)[0], failed


def _output_line(row_id, score: np.ndarray) -> str:
    if score.ndim == 0:
        return json.dumps({"id": row_id, "score": float(score)}, ensure_ascii=False) + "\n"
    return json.dumps({"id": row_id, "scores": [float(s) for s in score]}, ensure_ascii=False) + "\n"


def _bad_row(reason: str) -> ValueError:
    return ValueError(
        f"{reason} (every chunk before it is committed: fix the row and rerun, or rerun with "
        "--skip-bad-rows to list bad rows in OUTPUT.rejected.jsonl and go on)"
    )


def _score_chunk(ce, chunk: list[RawRow], predict_options: dict, skip_bad_rows: bool):
    """(output lines, rejected lines) of one chunk; a bad row raises a ValueError naming it unless
    skip_bad_rows."""
    parsed, rejected = [], []
    for row in chunk:
        try:
            parsed.append((row, *parse_row(row)))
        except (ValueError, TypeError) as e:
            if not skip_bad_rows:
                raise _bad_row(f"{e}") from e
            rejected.append((row, f"{e}"))
    scores, failed = _score_pairs(ce, [pair for _, _, pair in parsed], predict_options)
    if failed and not skip_bad_rows:
        position = min(failed)
        raise _bad_row(f"{parsed[position][0].where}: {failed[position]}")
    rejected += [(parsed[i][0], reason) for i, reason in failed.items()]
    kept = [row_id for i, (_, row_id, _) in enumerate(parsed) if i not in failed]
    lines = [_output_line(row_id, score) for row_id, score in zip(kept, scores, strict=True)]
    return lines, [_rejection(row, reason) for row, reason in sorted(rejected, key=lambda r: r[0].index)]


def _progress_bar(total: int, show: bool, processes: Processes):
    from tqdm.auto import tqdm

    desc = "Scoring" if processes.count == 1 else f"Scoring (process {processes.index})"
    return tqdm(total=total, unit="rows", desc=desc, disable=not show, file=sys.stderr, dynamic_ncols=True)


def _load(model_name_or_path, input_path: str, options: dict):
    """(CrossEncoder, manifest): the model, and what identifies this job (model, input, options)."""
    import jax.numpy as jnp

    from flax_ce import CrossEncoder
    from flax_ce.hub import resolve_model_dir

    model_dir = resolve_model_dir(model_name_or_path)
    dtype = jnp.dtype(options["dtype"])
    ce = CrossEncoder(
        model_dir, max_length=options["max_length"], activation_fn=options["activation"], dtype=dtype
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "model": {"name": os.fspath(model_name_or_path), "fingerprint": model_fingerprint(model_dir)},
        "input": {
            "path": os.path.abspath(input_path),
            "size": os.path.getsize(input_path),
            "fingerprint": fingerprint(input_path),
        },
        "options": {**options, "max_length": ce.max_length, "dtype": dtype.name},
    }
    return ce, manifest


def _score_chunks(ce, input_path: str, job: JobDirectory, chunks: list[int], options: dict, bar) -> int:
    """Score and commit the given chunks, in order; returns the rows scored."""
    scored = 0
    predict_options = {
        "batch_size": options["batch_size"],
        "apply_softmax": options["apply_softmax"],
        "show_progress_bar": False,
    }
    for chunk, rows in read_chunks(input_path, options["chunk_size"], set(chunks)):
        lines, rejected = _score_chunk(ce, rows, predict_options, options["skip_bad_rows"])
        job.commit(chunk, lines, rejected)
        scored += len(lines)
        bar.update(len(rows))
    return scored


def score_corpus(
    model_name_or_path: str | os.PathLike,
    input_path: str,
    output_path: str,
    *,
    max_length: int | None = None,
    activation: str | None = None,
    apply_softmax: bool = False,
    dtype: str = "float32",
    batch_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    show_progress: bool = False,
) -> ScoreSummary:
    """Score every pair of INPUT (.jsonl, .jsonl.gz or .parquet) into OUTPUT (same formats), resumably.

    Rows are read and scored `chunk_size` at a time; each chunk is committed atomically, so a rerun of
    a killed job continues from the last committed chunk. Under jax.distributed every process makes the
    same call: each scores its share of the chunks and process 0 writes OUTPUT.
    """
    started = time.perf_counter()
    check_positive("chunk_size", chunk_size)
    check_positive("batch_size", batch_size, allow_none=True)
    output_kind, _ = file_format(output_path), file_format(input_path)
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: no such input file")
    options = dict(max_length=max_length, activation=activation, apply_softmax=apply_softmax, dtype=dtype)
    options.update(batch_size=batch_size, chunk_size=chunk_size)
    ce, manifest = _load(model_name_or_path, input_path, options)
    job, processes = JobDirectory(output_path), Processes()
    if not overwrite:
        job.check_resumable(manifest)
    if processes.index == 0:
        job.prepare(manifest, overwrite)
    processes.barrier("prepared")

    total = count_rows(input_path)
    chunks = math.ceil(total / chunk_size)
    committed = job.committed()
    mine = [k for k in range(chunks) if k % processes.count == processes.index and k not in committed]
    scoring_started, error, scored = time.perf_counter(), None, 0
    own_rows = sum(min(chunk_size, total - k * chunk_size) for k in mine)
    with _progress_bar(own_rows, show_progress, processes) as bar:
        try:
            scored = _score_chunks(
                ce, input_path, job, mine, {**options, "skip_bad_rows": skip_bad_rows}, bar
            )
        except Exception as e:  # noqa: BLE001 - the other processes must hear of it; re-raised by share()
            error = e
    reports = processes.share("scored", error, scored=scored)
    scoring_seconds = time.perf_counter() - scoring_started
    rows = rejected = 0
    if processes.index == 0:
        try:
            rows, rejected = job.assemble(chunks, output_kind, "score" if ce.num_labels == 1 else "scores")
        except Exception as e:  # noqa: BLE001 - shared, then re-raised
            error = e
    processes.share("assembled", error)
    return ScoreSummary(
        output=output_path,
        rows=rows,
        rejected=rejected,
        scored=sum(r["scored"] for r in reports),
        scored_by_process=[r["scored"] for r in reports],
        resumed_chunks=len(committed),
        seconds=time.perf_counter() - started,
        scoring_seconds=scoring_seconds,
        compiles=ce.engine.compile_count,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `flax-ce score`."""
    parser.add_argument("model", help="local model directory or Hugging Face hub id")
    parser.add_argument(
        "input",
        help='.jsonl, .jsonl.gz or .parquet; a pair per row: ["a", "b"] or {"query": .., "document": ..} '
        "(or text_a/text_b, premise/hypothesis, sentence1/sentence2), with an optional id",
    )
    parser.add_argument("--output", "-o", required=True, help=".jsonl, .jsonl.gz or .parquet")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: token budget)")
    parser.add_argument("--activation", default=None, help="torch activation name, e.g. torch.nn.Identity")
    parser.add_argument("--softmax", action="store_true", help="softmax over labels (multi-label models)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per commit")
    parser.add_argument("--skip-bad-rows", action="store_true", help="list bad rows in OUTPUT.rejected.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="start afresh, replacing OUTPUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    group = parser.add_argument_group("several processes (jax.distributed)")
    group.add_argument(
        "--distributed", action="store_true", help="jax.distributed.initialize() (auto-detect)"
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="process 0's address (implies --distributed)"
    )
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    """Run `flax-ce score`; the summary goes to stderr (from process 0)."""
    if args.distributed or args.coordinator is not None:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    summary = score_corpus(
        args.model,
        args.input,
        args.output,
        max_length=args.max_length,
        activation=args.activation,
        apply_softmax=args.softmax,
        dtype=args.dtype,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        skip_bad_rows=args.skip_bad_rows,
        overwrite=args.overwrite,
        show_progress=not args.quiet and sys.stderr.isatty(),
    )
    import jax

    if not args.quiet and jax.process_index() == 0:
        print(summary.line(), file=sys.stderr)
    return 0
