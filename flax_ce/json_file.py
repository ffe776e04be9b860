"""The one JSON reader for the files of a model directory: every problem names the file."""

from __future__ import annotations

import json
import os
from typing import Any

_KINDS = {dict: "a JSON object", list: "a JSON array"}


def read_json(path: str | os.PathLike, kind: type = dict, error: type[Exception] = ValueError) -> Any:
    """The parsed content of `path`, which must be a `kind` (dict or list); a bad file raises `error`.

    A missing or unreadable file raises the OSError that `open` raises (its message names the file).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        value = json.loads(data)
    # ValueError covers bad JSON, bad UTF-8 and integers too long to convert; RecursionError deep nesting.
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, kind):
        raise error(f"{path}: expected {_KINDS.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value
