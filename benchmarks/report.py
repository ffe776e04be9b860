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
