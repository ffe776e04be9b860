"""Writing a benchmark's results: `<out>.json` (everything measured) and `<out>.md` (its tables)."""

from __future__ import annotations

import json
import os


def write_results(out: str, result: dict, markdown: str) -> None:
    """Save `result` as out.json and `markdown` as out.md, and print the tables."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown)
    print(markdown)


def run_fresh(script: str, spec: dict, env: dict, label: str) -> dict:
    """Run `script --worker <spec as JSON>` in a fresh Python process with `env`; its last stdout line, as
    JSON. A failed worker raises with the tail of its stderr, named by `label`."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.abspath(script)),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {label} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
