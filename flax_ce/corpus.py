"""`flax-ce score`: score a corpus file in chunks that are committed as they finish, so a job killed at any
moment continues where it stopped; under jax.distributed the processes split the chunks between them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
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
    write_output,
)
from flax_ce.inputs import check_positive

DEFAULT_CHUNK_ROWS = 2048
MANIFEST_VERSION = 1
# Crash tests set this to a point name ("before-commit-K", "after-commit-K", "assemble-K",
# "before-cleanup") and the job SIGKILLs itself there, so every window can be tested deterministically.
KILL_AT_ENV = "FLAX_CE_SCORE_KILL_AT"
# How long a process waits for the others (e.g. for a slower process's last chunk).
BARRIER_TIMEOUT_MS = 24 * 3600 * 1000
_PART_NAME = re.compile(r"chunk-(\d{8})\.jsonl$")


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """What a finished job did: `scored` counts the rows this run scored (all processes together)."""

    output: str
    rows: int
    rejected: int
    scored: int
    resumed_chunks: int
    seconds: float
    scoring_seconds: float
    compiles: int

    def line(self) -> str:
        """One line for people: rows, rate, compiles, time."""
        rate = self.scored / self.scoring_seconds if self.scoring_seconds > 0 else 0.0
        resumed = f", {self.resumed_chunks} chunks from an earlier run" if self.resumed_chunks else ""
        rejected = f", {self.rejected} rejected (see {self.output}.rejected.jsonl)" if self.rejected else ""
        return (
            f"{self.output}: {self.rows} rows{rejected}{resumed}; scored {self.scored} pairs in "
            f"{self.scoring_seconds:.1f}s ({rate:.1f} pairs/s), {self.compiles} compiles, "
            f"{self.seconds:.1f}s in all"
        )


class JobFiles:
    """Where a job keeps its state: OUTPUT.partial/ holds manifest.json and the committed chunk parts."""

    def __init__(self, output: str):
        self.output = output
        self.workdir = output + ".partial"
        self.manifest = os.path.join(self.workdir, "manifest.json")
        self.rejected = output + ".rejected.jsonl"

    def part(self, chunk: int) -> str:
        return os.path.join(self.workdir, f"chunk-{chunk:08d}.jsonl")

    def rejected_part(self, chunk: int) -> str:
        return os.path.join(self.workdir, f"chunk-{chunk:08d}.rejected.jsonl")

    def committed(self) -> set[int]:
        """Chunks whose part file has been renamed into place."""
        if not os.path.isdir(self.workdir):
            return set()
        return {int(m.group(1)) for name in os.listdir(self.workdir) if (m := _PART_NAME.match(name))}


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: str, lines: list[str], kill_point: str | None = None) -> None:
    """Write to a temporary file, sync it, then rename: readers see the whole file or none of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    if kill_point:
        _kill_point(kill_point)
    os.replace(tmp, path)


def _model_fingerprint(model_dir: str) -> str:
    """A hash over the model directory's files (names and contents)."""
    names = sorted(n for n in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, n)))
    return fingerprint_text(json.dumps([(n, fingerprint(os.path.join(model_dir, n))) for n in names]))


def fingerprint_text(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _manifest_differences(saved: dict, current: dict) -> list[str]:
    """What makes a saved job different from this one, in words; empty when it can be continued."""
    if saved.get("version") != current["version"]:
        return [f"manifest version {saved.get('version')!r} (now {current['version']})"]
    differences = []
    if saved["model"]["fingerprint"] != current["model"]["fingerprint"]:
        differences.append(f"a different model ({saved['model']['name']!r}, files changed or other)")
    if (saved["input"]["size"], saved["input"]["fingerprint"]) != (
        current["input"]["size"],
        current["input"]["fingerprint"],
    ):
        differences.append(
            f"a different input ({saved['input']['path']}, {saved['input']['size']} bytes; "
            f"now {current['input']['size']} bytes)"
        )
    for name, value in current["options"].items():
        if saved["options"].get(name) != value:
            differences.append(f"{name}={saved['options'].get(name)!r} (now {value!r})")
    return differences


def _check_resumable(files: JobFiles, manifest: dict) -> None:
    """Refuse to mix jobs: a saved manifest must match this job; a finished output is not overwritten."""
    if os.path.exists(files.manifest):
        with open(files.manifest, encoding="utf-8") as f:
            saved = json.load(f)
        differences = _manifest_differences(saved, manifest)
        if differences:
            raise ValueError(
                f"{files.manifest}: this job was started with {'; '.join(differences)}. Rerun the "
                "command that started it to continue, or pass --overwrite to start afresh"
            )
    elif os.path.exists(files.output):
        raise ValueError(f"{files.output} already exists; pass --overwrite to replace it")
    elif files.committed():
        raise ValueError(f"{files.workdir} holds chunks but no manifest; pass --overwrite to start afresh")


def _prepare(files: JobFiles, manifest: dict, overwrite: bool) -> None:
    """(First process only) clear an old job if asked, remove unfinished temporary files, save the manifest."""
    if overwrite:
        shutil.rmtree(files.workdir, ignore_errors=True)
        for path in (files.output, files.rejected):
            if os.path.exists(path):
                os.remove(path)
    os.makedirs(files.workdir, exist_ok=True)
    for name in os.listdir(files.workdir):
        if ".tmp" in name or name.startswith("assembling-"):
            os.remove(os.path.join(files.workdir, name))
    if not os.path.exists(files.manifest):
        _write_atomic(files.manifest, [json.dumps(manifest, indent=2) + "\n"])


class Processes:
    """This process's place among jax.distributed processes, with barriers and shared messages."""

    _jobs = 0  # every process runs the same jobs in the same order, so this numbers them alike

    def __init__(self):
        import jax

        self.count, self.index = jax.process_count(), jax.process_index()
        Processes._jobs += 1
        self._prefix = f"flax_ce_score/{Processes._jobs}"
        self._client = None
        if self.count > 1:
            # The key-value store and barriers that jax.distributed keeps (orbax uses them the same way);
            # they need no device collectives, so CPU processes need no gloo.
            from jax._src import distributed

            self._client = distributed.global_state.client

    def gather(self, name: str, value: str) -> list[str]:
        """Every process's `value`, in process order (waits for all of them)."""
        if self._client is None:
            return [value]
        self._client.key_value_set(f"{self._prefix}/{name}/{self.index}", value)
        return [
            self._client.blocking_key_value_get(f"{self._prefix}/{name}/{i}", BARRIER_TIMEOUT_MS)
            for i in range(self.count)
        ]

    def barrier(self, name: str) -> None:
        if self._client is not None:
            self._client.wait_at_barrier(f"{self._prefix}/{name}", BARRIER_TIMEOUT_MS)


def _share(processes: Processes, name: str, error: Exception | None, **fields) -> list[dict]:
    """Every process's `fields`; if any process failed, raise in all of them (the failed one re-raises
    its own error, the others a ValueError that names it)."""
    report = {"error": None if error is None else f"{error}", **fields}
    reports = [json.loads(r) for r in processes.gather(name, json.dumps(report))]
    if error is not None:
        raise error
    failed = [(i, r["error"]) for i, r in enumerate(reports) if r["error"] is not None]
    if failed:
        raise ValueError("; ".join(f"process {i}: {message}" for i, message in failed))
    return reports


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
                failed[i] = f"{e}"
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


def _commit(files: JobFiles, chunk: int, lines: list[str], rejected: list[str]) -> None:
    """Commit one chunk: its rejected rows first, then its scores, whose rename marks the chunk done."""
    if rejected:
        _write_atomic(files.rejected_part(chunk), rejected)
    elif os.path.exists(files.rejected_part(chunk)):
        os.remove(files.rejected_part(chunk))
    _write_atomic(files.part(chunk), lines, kill_point=f"before-commit-{chunk}")
    _kill_point(f"after-commit-{chunk}")


def _assemble(files: JobFiles, chunks: int, kind: str, score_field: str) -> tuple[int, int]:
    """(rows, rejected rows): the committed parts written, in order, to OUTPUT (and OUTPUT.rejected.jsonl)."""
    missing = [k for k in range(chunks) if not os.path.exists(files.part(k))]
    if missing:
        raise RuntimeError(f"{files.workdir}: chunks {missing[:10]} were not committed")
    rejected_parts = [files.rejected_part(k) for k in range(chunks) if os.path.exists(files.rejected_part(k))]
    rejected = 0
    if rejected_parts:
        tmp = os.path.join(files.workdir, "assembling-rejected.jsonl")
        rejected = write_output(tmp, "jsonl", rejected_parts, "", lambda i: None)
        os.replace(tmp, files.rejected)
    elif os.path.exists(files.rejected):
        os.remove(files.rejected)
    tmp = os.path.join(files.workdir, "assembling-" + os.path.basename(files.output))
    parts = (files.part(k) for k in range(chunks))
    rows = write_output(tmp, kind, parts, score_field, lambda i: _kill_point(f"assemble-{i}"))
    os.replace(tmp, files.output)
    _kill_point("before-cleanup")
    shutil.rmtree(files.workdir)
    return rows, rejected


def _progress_bar(total: int, show: bool, processes: Processes):
    from tqdm.auto import tqdm

    desc = "Scoring" if processes.count == 1 else f"Scoring (process {processes.index})"
    return tqdm(total=total, unit="rows", desc=desc, disable=not show, file=sys.stderr, dynamic_ncols=True)


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
    a killed job continues from the last committed chunk. Under jax.distributed every process must make
    the same call: each scores its share of the chunks and process 0 writes OUTPUT.
    """
    import jax.numpy as jnp

    from flax_ce import CrossEncoder
    from flax_ce.hub import resolve_model_dir

    started = time.perf_counter()
    check_positive("chunk_size", chunk_size)
    check_positive("batch_size", batch_size, allow_none=True)
    output_kind = file_format(output_path)
    file_format(input_path)
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: no such input file")
    model_dir = resolve_model_dir(model_name_or_path)
    ce = CrossEncoder(model_dir, max_length=max_length, activation_fn=activation, dtype=jnp.dtype(dtype))
    manifest = {
        "version": MANIFEST_VERSION,
        "model": {"name": os.fspath(model_name_or_path), "fingerprint": _model_fingerprint(model_dir)},
        "input": {
            "path": os.path.abspath(input_path),
            "size": os.path.getsize(input_path),
            "fingerprint": fingerprint(input_path),
        },
        "options": {
            "max_length": ce.max_length,
            "activation": activation,
            "apply_softmax": apply_softmax,
            "dtype": jnp.dtype(dtype).name,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
        },
    }
    files, processes = JobFiles(output_path), Processes()
    if not overwrite:
        _check_resumable(files, manifest)
    if processes.index == 0:
        _prepare(files, manifest, overwrite)
    processes.barrier("prepared")

    total = count_rows(input_path)
    chunks = math.ceil(total / chunk_size)
    committed = files.committed()
    mine = [k for k in range(chunks) if k % processes.count == processes.index and k not in committed]
    scoring_started = time.perf_counter()
    error, scored = None, 0
    options = {"batch_size": batch_size, "apply_softmax": apply_softmax, "show_progress_bar": False}
    own_rows = sum(min(chunk_size, total - k * chunk_size) for k in mine)
    with _progress_bar(own_rows, show_progress, processes) as bar:
        try:
            for chunk, rows in read_chunks(input_path, chunk_size, set(mine)):
                lines, rejected = _score_chunk(ce, rows, options, skip_bad_rows)
                _commit(files, chunk, lines, rejected)
                scored += len(lines)
                bar.update(len(rows))
        except Exception as e:  # noqa: BLE001 - the other processes must hear of it, then it is re-raised
            error = e
    reports = _share(processes, "scored", error, scored=scored)
    scoring_seconds = time.perf_counter() - scoring_started
    rows = rejected = 0
    if processes.index == 0:
        try:
            score_field = "score" if ce.num_labels == 1 else "scores"
            rows, rejected = _assemble(files, chunks, output_kind, score_field)
        except Exception as e:  # noqa: BLE001 - shared below, then re-raised
            error = e
    _share(processes, "assembled", error)
    return ScoreSummary(
        output=output_path,
        rows=rows,
        rejected=rejected,
        scored=sum(r["scored"] for r in reports),
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
