"""Atomic file writes: a reader (or a pod restarted mid-write) sees the old file or the new one, never half.

Every file the trainer leaves for others goes through `replacing`: JSON (student plans, progress, summaries,
metadata), checkpoints (ours and, wrapped, nnU-Net's own `save_checkpoint` for teachers) and exported models.
Parallel folds write the same plans file, and a pod can be killed at any instant. The temp file sits in the
target's folder (`os.replace` must not cross file systems) under a name no loader looks for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nnunet_distill.contract import atomic_temp_path, replacing

__all__ = [
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "replacing",
    "temp_path",
]

# The one atomic replace (temp file beside the target, fsync, os.replace) is the contract's, standard library
# only, so the operator writes its local status files the same way.
temp_path = atomic_temp_path


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
    """JSON (numpy values and paths allowed) written through `replacing`."""
    path = Path(filename)
    with replacing(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=indent, default=_json_default)
    return path


def atomic_write_bytes(data: bytes, filename: str | os.PathLike, *, mode: int | None = None) -> Path:
    """Bytes written through `replacing` (`mode`: e.g. 0o644 so a shared volume's other users can read)."""
    path = Path(filename)
    with replacing(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_torch_save(obj: Any, filename: str | os.PathLike) -> None:
    """`torch.save` through `replacing`: readers (and -c_continue) see the old checkpoint or the new one."""
    import torch

    with replacing(filename) as tmp:
        torch.save(obj, tmp)
