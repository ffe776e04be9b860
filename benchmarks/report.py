"""Writing a benchmark's results: `<out>.json` (everything measured) and `<out>.md` (its tables)."""

from __future__ import annotations

import json
import os
import time


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with the vector extensions that decide fp32 matmul speed (AVX2,
    AVX-512, AMX): the same benchmark's ratios differ by machine type, and `platform` only says x86_64."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    first_cpu = info.split("\n\n")[0].splitlines()
    fields = {
        key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first_cpu if ":" in line)
    }
    flags = set(fields.get("flags", "").split())
    extensions = [
        name
        for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile"))
        if flag in flags
    ]
    name = fields.get("model name", platform.machine())
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    return ", ".join(part for part in (name, family, " + ".join(extensions)) if part)


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


def run_engine(script: str, spec: dict, cache_home: str) -> dict:
    """One fresh process of `script` for `spec`, as a user's would start: flax_ce's default compilation cache
    lives under `cache_home` (FLAX_CE_COMPILATION_CACHE unset), the hub offline. The MKL matmul handler
    (flax_ce.cpu_matmul, built once per machine like an installed package) is shared by every process beside
    `cache_home`, so only the first run pays for its C++ compilation. Adds the process's wall time as
    `process_s`."""
    env = {**os.environ, "XDG_CACHE_HOME": cache_home, "HF_HUB_OFFLINE": "1"}
    env["FLAX_CE_NATIVE_DIR"] = os.path.join(os.path.dirname(cache_home), "native")
    env.pop("FLAX_CE_COMPILATION_CACHE", None)
    start = time.perf_counter()
    result = run_fresh(script, spec, env, spec["name"])
    result["process_s"] = time.perf_counter() - start
    return result
