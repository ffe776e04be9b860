"""Files of a `flax-ce score` job: input rows from JSONL (optionally .gz) or Parquet read chunk by chunk,
fingerprints, and the output written in the format its name asks for."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Container, Iterable, Iterator

from flax_ce.inputs import PAIR_KEYS, jsonl_lines, pair_from_row, parse_json_line

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
# Rows converted from Arrow to Python at a time when reading Parquet.
PARQUET_READ_ROWS = 8192


def file_format(path: str) -> str:
    """ "jsonl" or "parquet" from the file name; a ValueError for anything else."""
    for suffix, kind in FORMATS.items():
        if path.endswith(suffix):
            return kind
    raise ValueError(f"{path}: unknown file type; use a name ending in {', '.join(FORMATS)}")


def _require_pyarrow(path: str):
    try:
        import pyarrow.parquet
    except ImportError:
        raise ImportError(f'{path}: Parquet needs pyarrow: pip install "flax-ce[parquet]"') from None
    return pyarrow.parquet


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One input row before parsing: its 0-based number, where it is (file and line/row) and its value
    (a JSONL line's bytes, or a Parquet row as a dict)."""

    index: int
    where: str
    value: object


def fingerprint(path: str) -> str:
    """A content hash of a file (blake2b, 128 bits), so a job can tell it is reading the same input."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def count_rows(path: str) -> int:
    """Rows of an input file: non-blank JSONL lines, or the Parquet row count."""
    if file_format(path) == "parquet":
        return _require_pyarrow(path).ParquetFile(path).metadata.num_rows
    return sum(1 for _ in jsonl_lines(path))


def read_chunks(path: str, chunk_size: int, wanted: Container[int]) -> Iterator[tuple[int, list[RawRow]]]:
    """(chunk number, rows) for the wanted chunks of `chunk_size` rows, in file order; others are skipped
    without being parsed, so memory depends on the chunk size, not on the file."""
    if file_format(path) == "parquet":
        rows = _parquet_rows(path, chunk_size, wanted)
    else:
        rows = (
            RawRow(index, f"{path}, line {number}", line)
            for index, (number, line) in enumerate(jsonl_lines(path))
            if index // chunk_size in wanted
        )
    chunk, current = None, []
    for row in rows:
        if row.index // chunk_size != chunk and current:
            yield chunk, current
            current = []
        chunk = row.index // chunk_size
        current.append(row)
    if current:
        yield chunk, current


def _parquet_rows(path: str, chunk_size: int, wanted: Container[int]) -> Iterator[RawRow]:
    parquet = _require_pyarrow(path)
    source = parquet.ParquetFile(path)
    names = source.schema_arrow.names
    pair = next(((a, b) for a, b in PAIR_KEYS if a in names and b in names), None)
    if pair is None:
        accepted = ", ".join(f"{a}/{b}" for a, b in PAIR_KEYS)
        raise ValueError(f"{path}: needs one of the column pairs {accepted}; it has {', '.join(names)}")
    columns = [*pair, "id"] if "id" in names else list(pair)
    offset = 0
    for batch in source.iter_batches(batch_size=PARQUET_READ_ROWS, columns=columns):
        end = offset + batch.num_rows
        # Only the slices of wanted chunks are converted to Python objects.
        for chunk in range(offset // chunk_size, (end - 1) // chunk_size + 1):
            if chunk not in wanted:
                continue
            start, stop = max(offset, chunk * chunk_size), min(end, (chunk + 1) * chunk_size)
            for index, value in enumerate(batch.slice(start - offset, stop - start).to_pylist(), start):
                yield RawRow(index, f"{path}, row {index}", value)
        offset = end


def parse_row(row: RawRow) -> tuple[str | int, tuple[str, str]]:
    """(id, pair) of a row: its `id` if it has one, else its row number; errors name the file and line/row."""
    value = parse_json_line(row.value, row.where) if isinstance(row.value, bytes) else row.value
    pair = pair_from_row(value, row.where)
    row_id = value.get("id") if isinstance(value, dict) else None
    if row_id is None:
        return row.index, pair
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise TypeError(f"{row.where}: id must be a string or an integer, got {type(row_id).__name__}")
    return row_id, pair


def write_output(
    path: str, kind: str, parts: Iterable[str], score_field: str, after_part: Callable[[int], None]
) -> int:
    """Write the JSONL part files, in order, to `path` as JSONL (gzipped for .gz) or Parquet (`id` and
    `score_field` columns); returns the row count. `after_part(i)` runs after part i is written."""
    if kind == "parquet":
        return _write_parquet(path, parts, score_field, after_part)
    rows = 0
    with gzip.open(path, "wb", compresslevel=6) if path.endswith(".gz") else open(path, "wb") as out:
        for i, part in enumerate(parts):
            with open(part, "rb") as f:
                data = f.read()
            out.write(data)
            rows += data.count(b"\n")
            after_part(i)
    return rows


def _write_parquet(
    path: str, parts: Iterable[str], score_field: str, after_part: Callable[[int], None]
) -> int:
    import pyarrow as pa

    parquet = _require_pyarrow(path)
    score_type = pa.float32() if score_field == "score" else pa.list_(pa.float32())
    writer, rows = None, 0
    try:
        for i, part in enumerate(parts):
            with open(part, "rb") as f:
                records = [json.loads(line) for line in f]
            if records:
                if writer is None:  # the first row's id decides the id column's type
                    id_type = pa.int64() if isinstance(records[0]["id"], int) else pa.string()
                    schema = pa.schema([("id", id_type), (score_field, score_type)])
                    writer = parquet.ParquetWriter(path, schema)
                writer.write_table(_score_table(pa, records, writer.schema, part))
                rows += len(records)
            after_part(i)
        if writer is None:  # no rows at all: an empty file with integer ids
            writer = parquet.ParquetWriter(path, pa.schema([("id", pa.int64()), (score_field, score_type)]))
    finally:
        if writer is not None:
            writer.close()
    return rows


def _score_table(pa, records: list[dict], schema, part: str):
    """An Arrow table of one part's {"id", "score"/"scores"} rows."""
    try:
        return pa.Table.from_pylist(records, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise ValueError(
            f"{os.path.basename(part)}: a Parquet output needs every id of one type (all strings or all "
            f"integers, and rows without an id get their row number); write JSONL instead ({e})"
        ) from None
