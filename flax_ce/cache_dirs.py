"""Where flax_ce keeps what it builds for this user (compiled programs, the MKL matmul handler)."""

from __future__ import annotations

import os


def cache_dir(name: str) -> str:
    """$XDG_CACHE_HOME (or ~/.cache)/flax_ce/`name`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_ce", name)
