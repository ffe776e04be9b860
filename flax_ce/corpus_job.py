"""The state of a `flax-ce score` job: a manifest and committed chunk parts in OUTPUT.partial/, the
final assembly, and the barriers and messages that let jax.distributed processes share one job."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal

from flax_ce.corpus_files import fingerprint, write_output
from flax_ce.json_file import read_json

MANIFEST_VERSION = 1
# Crash tests set this to a point name ("before-commit-K", "after-commit-K", "assemble-K",
# "before-cleanup") and the job SIGKILLs itself there, so every window can be tested deterministically.
KILL_AT_ENV = "FLAX_CE_SCORE_KILL_AT"
# How long a process waits for the others (e.g. for a slower process's last chunk).
BARRIER_TIMEOUT_MS = 24 * 3600 * 1000
_PART_NAME = re.compile(r"chunk-(\d{8})\.jsonl$")


def kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: str, lines: list[str], kill_at: str | None = None) -> None:
    """Write to a temporary file, sync it, then rename: readers see the whole file or none of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    if kill_at:
        kill_point(kill_at)
    os.replace(tmp, path)


def model_fingerprint(model_dir: str) -> str:
    """A hash over the names and contents of the model directory's files."""
    names = sorted(n for n in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, n)))
    listing = json.dumps([(n, fingerprint(os.path.join(model_dir, n))) for n in names])
    return hashlib.blake2b(listing.encode(), digest_size=16).hexdigest()


def manifest_differences(saved: dict, current: dict) -> list[str]:
    """What makes a saved job different from this one, in words; empty when it can be continued."""
    if saved.get("version") != current["version"]:
        return [f"manifest version {saved.get('version')!r} (now {current['version']})"]
    differences = []
    if saved["model"]["fingerprint"] != current["model"]["fingerprint"]:
        differences.append(f"a different model ({saved['model']['name']!r}, or its files changed)")
    old, new = saved["input"], current["input"]
    if (old["size"], old["fingerprint"]) != (new["size"], new["fingerprint"]):
        differences.append(f"a different input ({old['path']}, {old['size']} bytes; now {new['size']} bytes)")
    for name, value in current["options"].items():
        if saved["options"].get(name) != value:
            differences.append(f"{name}={saved['options'].get(name)!r} (now {value!r})")
    return differences


class JobDirectory:
    """OUTPUT.partial/: manifest.json and one part per committed chunk (chunk-K.jsonl, whose rename is the
    commit, and chunk-K.rejected.jsonl); assembled into OUTPUT (and OUTPUT.rejected.jsonl) at the end."""

    def __init__(self, output: str):
        self.output = output
        self.path = output + ".partial"
        self.manifest = os.path.join(self.path, "manifest.json")
        self.rejected = output + ".rejected.jsonl"

    def part(self, chunk: int) -> str:
        return os.path.join(self.path, f"chunk-{chunk:08d}.jsonl")

    def rejected_part(self, chunk: int) -> str:
        return os.path.join(self.path, f"chunk-{chunk:08d}.rejected.jsonl")

    def committed(self) -> set[int]:
        """Chunks whose part has been renamed into place."""
        if not os.path.isdir(self.path):
            return set()
        return {int(m.group(1)) for name in os.listdir(self.path) if (m := _PART_NAME.match(name))}

    def check_resumable(self, manifest: dict) -> None:
        """Refuse to mix jobs: a saved manifest must match this one; a finished output is not replaced."""
        if os.path.exists(self.manifest):
            differences = manifest_differences(read_json(self.manifest), manifest)
            if differences:
                raise ValueError(
                    f"{self.manifest}: this job was started with {'; '.join(differences)}. Rerun the "
                    "command that started it to continue, or pass --overwrite to start afresh"
                )
        elif os.path.exists(self.output):
            raise ValueError(f"{self.output} already exists; pass --overwrite to replace it")
        elif self.committed():
            raise ValueError(f"{self.path} holds chunks but no manifest; pass --overwrite to start afresh")

    def prepare(self, manifest: dict, overwrite: bool) -> None:
        """(One process) clear an old job if asked, remove unfinished temporary files, save the manifest."""
        if overwrite:
            shutil.rmtree(self.path, ignore_errors=True)
            for path in (self.output, self.rejected):
                if os.path.exists(path):
                    os.remove(path)
        os.makedirs(self.path, exist_ok=True)
        for name in os.listdir(self.path):
            if ".tmp" in name or name.startswith("assembling-"):
                os.remove(os.path.join(self.path, name))
        if not os.path.exists(self.manifest):
            write_atomic(self.manifest, [json.dumps(manifest, indent=2) + "\n"])

    def commit(self, chunk: int, lines: list[str], rejected: list[str]) -> None:
        """Commit one chunk: its rejected rows first, then its scores, whose rename marks it done."""
        if rejected:
            write_atomic(self.rejected_part(chunk), rejected)
        elif os.path.exists(self.rejected_part(chunk)):
            os.remove(self.rejected_part(chunk))
        write_atomic(self.part(chunk), lines, kill_at=f"before-commit-{chunk}")
        kill_point(f"after-commit-{chunk}")

    def assemble(self, chunks: int, kind: str, score_field: str) -> tuple[int, int]:
        """(rows, rejected rows): every part, in order, written to OUTPUT (and OUTPUT.rejected.jsonl), each
        by a rename; then the job directory is removed."""
        missing = [k for k in range(chunks) if not os.path.exists(self.part(k))]
        if missing:
            raise RuntimeError(f"{self.path}: chunks {missing[:10]} were not committed")
        rejected_parts = [
            self.rejected_part(k) for k in range(chunks) if os.path.exists(self.rejected_part(k))
        ]
        rejected = 0
        if rejected_parts:
            tmp = os.path.join(self.path, "assembling-rejected.jsonl")
            rejected = write_output(tmp, "jsonl", rejected_parts, "", lambda i: None)
            os.replace(tmp, self.rejected)
        elif os.path.exists(self.rejected):
            os.remove(self.rejected)
        tmp = os.path.join(self.path, "assembling-" + os.path.basename(self.output))
        parts = (self.part(k) for k in range(chunks))
        rows = write_output(tmp, kind, parts, score_field, lambda i: kill_point(f"assemble-{i}"))
        os.replace(tmp, self.output)
        kill_point("before-cleanup")
        shutil.rmtree(self.path)
        return rows, rejected


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
            # The key-value store and barriers jax.distributed keeps (orbax uses them the same way): no
            # device collectives, so CPU processes need no gloo.
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

    def share(self, name: str, error: Exception | None, **fields) -> list[dict]:
        """Every process's `fields`; if any process failed, raise in all of them (the failed one its own
        error, the others a ValueError naming it)."""
        report = {"error": None if error is None else f"{error}", **fields}
        reports = [json.loads(r) for r in self.gather(name, json.dumps(report))]
        if error is not None:
            raise error
        failed = [(i, r["error"]) for i, r in enumerate(reports) if r["error"] is not None]
        if failed:
            raise ValueError("; ".join(f"process {i}: {message}" for i, message in failed))
        return reports
