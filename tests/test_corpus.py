"""`flax-ce score`: JSONL/Parquet in and out, resuming after SIGKILL, manifests, bad rows, two processes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from checkpoints import corpus, sample_pairs

from flax_ce import CrossEncoder
from flax_ce.cli import main
from flax_ce.corpus_job import KILL_AT_ENV, JobDirectory

pa = pytest.importorskip("pyarrow")
parquet = pytest.importorskip("pyarrow.parquet")

OPTIONS = ["--max-length", "64", "--batch-size", "8", "--chunk-size", "8", "--quiet"]
N_ROWS = 37  # 5 chunks of 8, the last one short


def write_jsonl(path, pairs, ids=True) -> str:
    """Rows in every accepted form, some with ids, and a blank line (not a row)."""
    keys = [
        ("query", "document"),
        ("text_a", "text_b"),
        ("premise", "hypothesis"),
        ("sentence1", "sentence2"),
    ]
    lines = []
    for i, (a, b) in enumerate(pairs):
        if i % 5 == 0:
            lines.append(json.dumps([a, b]))
        else:
            row = dict(zip(keys[i % 4], (a, b), strict=True))
            if ids and i % 3 == 0:
                row["id"] = i * 10
            lines.append(json.dumps(row))
        if i == 4:
            lines.append("")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def expected_ids(n: int) -> list[int]:
    return [i * 10 if i % 5 and i % 3 == 0 else i for i in range(n)]


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def subprocess_env(**extra) -> dict:
    """The test session's compilation cache, so subprocesses load compiled programs instead of compiling."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    return env


def score_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flax_ce.cli", "score", *args]


@pytest.fixture(scope="module")
def pairs():
    return sample_pairs(N_ROWS, seed=5)


@pytest.fixture(scope="module")
def predicted(bert_dir, pairs):
    return CrossEncoder(bert_dir, max_length=64).predict(pairs, batch_size=8)


@pytest.fixture(scope="module")
def corpus_input(tmp_path_factory, pairs):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "in.jsonl", pairs)


@pytest.fixture(scope="module")
def uninterrupted(bert_dir, corpus_input, tmp_path_factory) -> bytes:
    """The output of one uninterrupted run: what every resumed or multi-process run must reproduce."""
    output = tmp_path_factory.mktemp("uninterrupted") / "out.jsonl"
    assert main(["score", bert_dir, corpus_input, "--output", str(output), *OPTIONS]) == 0
    return output.read_bytes()


def test_jsonl_gz_and_parquet_equal_predict(bert_dir, roberta_dir, pairs, predicted, uninterrupted, tmp_path):
    rows = [json.loads(line) for line in uninterrupted.splitlines()]
    assert [r["id"] for r in rows] == expected_ids(N_ROWS)
    assert np.abs(np.array([r["score"] for r in rows]) - predicted).max() <= 1e-5

    gz_in = write_jsonl(tmp_path / "in.jsonl.gz", pairs)
    assert main(["score", bert_dir, gz_in, "--output", str(tmp_path / "out.jsonl.gz"), *OPTIONS]) == 0
    assert [json.loads(line) for line in uninterrupted.splitlines()] == read_jsonl(tmp_path / "out.jsonl.gz")

    # Parquet in and out, a 3-label model: "scores" lists, string ids kept.
    table = pa.table({"id": [f"p{i}" for i in range(N_ROWS)], "premise": [a for a, _ in pairs]})
    table = table.append_column("hypothesis", pa.array([b for _, b in pairs]))
    parquet.write_table(table, tmp_path / "in.parquet", row_group_size=10)
    out = tmp_path / "out.parquet"
    assert main(["score", roberta_dir, str(tmp_path / "in.parquet"), "-o", str(out), *OPTIONS]) == 0
    result = parquet.read_table(out)
    assert result.column_names == ["id", "scores"]
    assert result.column("id").to_pylist() == [f"p{i}" for i in range(N_ROWS)]
    expected = CrossEncoder(roberta_dir, max_length=64).predict(pairs, batch_size=8)
    assert np.abs(np.array(result.column("scores").to_pylist()) - expected).max() <= 1e-5


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_gives_every_row_once(bert_dir, corpus_input, uninterrupted, tmp_path):
    output = tmp_path / "out.jsonl"
    workdir = tmp_path / "out.jsonl.partial"
    command = score_command(bert_dir, corpus_input, "--output", str(output), *OPTIONS)
    for point, committed in [
        ("before-commit-0", []),  # the first chunk scored and written, not yet renamed
        ("after-commit-2", [0, 1, 2]),
        ("assemble-1", [0, 1, 2, 3, 4]),  # all committed, the output half written
        ("before-cleanup", None),  # the output in place, the job's files not yet removed
    ]:
        done = subprocess.run(command, env=subprocess_env(**{KILL_AT_ENV: point}), capture_output=True)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
        if committed is not None:
            assert sorted(JobDirectory(str(output)).committed()) == committed
            assert not output.exists()
    assert output.exists() and workdir.exists()
    assert main(["score", bert_dir, corpus_input, "--output", str(output), *OPTIONS]) == 0
    assert output.read_bytes() == uninterrupted
    assert not workdir.exists()


def test_manifest_mismatch_overwrite_and_finished_output(bert_dir, corpus_input, pairs, tmp_path, capsys):
    output = str(tmp_path / "out.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs[:20])
    with open(bad, "a") as f:
        f.write('{"query": "only a query"}\n')
    assert main(["score", bert_dir, bad, "--output", output, *OPTIONS]) == 2  # chunks 0 and 1 committed
    capsys.readouterr()
    assert main(["score", bert_dir, corpus_input, "--output", output, *OPTIONS]) == 2
    assert "a different input" in capsys.readouterr().err
    assert main(["score", bert_dir, bad, "--output", output, *OPTIONS, "--max-length", "32"]) == 2
    assert "max_length=64 (now 32)" in capsys.readouterr().err
    assert main(["score", bert_dir, corpus_input, "--output", output, *OPTIONS, "--overwrite"]) == 0
    assert main(["score", bert_dir, corpus_input, "--output", output, *OPTIONS]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_bad_row_stops_naming_line_then_skip_lists_it(bert_dir, pairs, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, pairs[:30])
    lines = path.read_text().splitlines()
    lines[19] = '{"query": "q", "document": 7}'  # row 18 (line 20) in chunk 2
    lines.insert(25, "{not json")  # line 26, row 24 in chunk 3
    path.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    args = ["score", bert_dir, str(path), "--output", str(output), *OPTIONS]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 20, text 1: expected str, got int" in err and "--skip-bad-rows" in err
    assert sorted(p.name for p in (tmp_path / "out.jsonl.partial").glob("chunk-*")) == [
        "chunk-00000000.jsonl",
        "chunk-00000001.jsonl",
    ]
    assert main([*args, "--skip-bad-rows"]) == 0
    rejected = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")
    assert [(r["row"], r["where"]) for r in rejected] == [(18, f"{path}, line 20"), (24, f"{path}, line 26")]
    assert "not valid JSON" in rejected[1]["reason"] and rejected[1]["input"] == "{not json"
    ids = [r["id"] for r in read_jsonl(output)]
    assert len(ids) == 29 and 18 not in ids and 24 not in ids


def test_pair_the_tokenizer_refuses_is_a_bad_row(roberta_dir, pairs, tmp_path, capsys):
    # One 40,000-token "word" on both sides: no cut keeps its truncation, so predict refuses the pair.
    unscorable = ("ab" * 20_000, "ab" * 20_000)
    path = write_jsonl(tmp_path / "in.jsonl", [*pairs[:2], unscorable, *pairs[2:4]], ids=False)
    args = ["score", roberta_dir, path, "--output", str(tmp_path / "out.jsonl"), *OPTIONS]
    assert main(args) == 2
    assert f"{path}, line 3: its texts are very long" in capsys.readouterr().err
    assert main([*args, "--skip-bad-rows"]) == 0
    assert [r["row"] for r in read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")] == [2]
    rows = read_jsonl(tmp_path / "out.jsonl")
    expected = CrossEncoder(roberta_dir, max_length=64).predict(pairs[:4], batch_size=8)
    assert [r["id"] for r in rows] == [0, 1, 3, 4]
    assert np.abs(np.array([r["scores"] for r in rows]) - expected).max() <= 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(bert_dir, corpus_input, uninterrupted, tmp_path):
    output = str(tmp_path / "out.jsonl")
    coordinator = f"127.0.0.1:{free_port()}"
    options = [o for o in OPTIONS if o != "--quiet"]
    runs = [
        subprocess.Popen(
            score_command(bert_dir, corpus_input, "-o", output, *options, "--coordinator", coordinator)
            + ["--num-processes", "2", "--process-id", str(i)],
            env=subprocess_env(),
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    errors = [run.communicate(timeout=300)[1].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    # Chunks 0, 2, 4 (8 + 8 + 5 rows) and 1, 3; only process 0 writes the output and the summary.
    assert "scored 21 + 16 by the processes" in errors[0] and "scored" not in errors[1]
    with open(output, "rb") as f:
        assert f.read() == uninterrupted


def peak_rss_mib(command: list[str]) -> float:
    """Peak resident memory of a subprocess (MiB), which must succeed."""
    process = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, process.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_memory_depends_on_chunk_size_not_on_input_size(bert_dir, tmp_path):
    sentences = [s for s in corpus() if len(s) < 120]
    peaks = {}
    for n in (20_000, 200_000):
        path = tmp_path / f"in{n}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                row = {
                    "query": sentences[i % len(sentences)][:30],
                    "document": sentences[7 * i % len(sentences)],
                }
                f.write(json.dumps(row) + "\n")
        output = str(tmp_path / f"out{n}.parquet")
        peaks[n] = peak_rss_mib(
            score_command(bert_dir, str(path), "-o", output, "--max-length", "32", "--quiet")
        )
        assert parquet.read_metadata(output).num_rows == n
    # Holding 200,000 rows' texts and token ids at once would take hundreds of MiB more.
    assert peaks[200_000] < peaks[20_000] + 40, peaks
