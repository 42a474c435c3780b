"""Atomic file writes: a reader (or a pod restarted mid-write) sees the old file or the new one, never half.

Used for every JSON the trainer leaves for others (student plans, progress, summaries): parallel folds write
the same plans file, and a pod can be killed at any instant.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _json_default(o: Any) -> Any:
    # numpy scalars/arrays and paths are what nnU-Net's logs and plans hand us; anything else is a bug.
    if hasattr(o, "item") and callable(o.item) and getattr(o, "ndim", None) == 0:
        return o.item()
    if hasattr(o, "tolist") and callable(o.tolist):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(obj: Any, filename: str | os.PathLike, *, indent: int = 2) -> Path:
    """Write JSON to a temp file in the same folder, then ``os.replace`` it over ``filename``."""
    path = Path(filename)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=indent, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
