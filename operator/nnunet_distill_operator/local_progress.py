"""A local run's status.progress, read from the `progress.json` its trainer writes (no log parsing): the same
figures a training pod reports to its DistillationJob."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_distill_operator.status import parse_time, rfc3339
from nnunet_distill_operator.status_model import Progress

# Where a trainer writes its progress: `progress.json` beside its checkpoints, in its nnU-Net output folder
# (<nnUNet_results>/<DatasetXXX_Name>/<trainer>__<plans>__<configuration>/fold_<f>/), the figures the pod
# reports as status.progress (nnunet_distill.trainer._write_progress).
PROGRESS_FILE = "progress.json"
PROGRESS_GLOB = f"*/*/fold_*/{PROGRESS_FILE}"
MTIME_SLACK_S = 0.1  # file times are a clock tick coarser than time.time(): a file written at start counts


@dataclass
class ProgressTracker:
    """status.progress of a local stage, from the `progress.json` its trainer writes (no log parsing).

    Only files written since the stage's command started count: a results folder holds the progress of
    earlier runs and of other models too.
    """

    stage: str
    results: Path
    since: float = field(default_factory=time.time)
    _seen: tuple[str, int] | None = None
    progress: dict[str, Any] | None = None

    def poll(self) -> bool:
        """Read the newest progress.json if it changed; True when status.progress changed."""
        newest = _newest(self.results.glob(PROGRESS_GLOB), self.since)
        if newest is None:
            return False
        path, mtime_ns = newest
        if self._seen == (str(path), mtime_ns):
            return False
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return False  # replaced atomically by the trainer, so this is rare: the next poll reads it
        self._seen = (str(path), mtime_ns)
        progress = progress_status(doc, self.stage)
        changed = progress != self.progress
        self.progress = progress
        return changed


def _newest(paths: Iterable[Path], since: float) -> tuple[Path, int] | None:
    found = []
    for path in paths:
        try:
            mtime_ns = path.stat().st_mtime_ns
        except OSError:
            continue
        if mtime_ns >= (since - MTIME_SLACK_S) * 1e9:
            found.append((mtime_ns, path))
    if not found:
        return None
    mtime_ns, path = max(found)
    return path, mtime_ns


def progress_status(doc: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The status.progress fields of a trainer's progress.json, typed by the status model (ETA in whole
    seconds, times in RFC 3339, absent values left out)."""
    eta = doc.get("etaSeconds")
    updated = parse_time(doc.get("updatedAt")) if isinstance(doc.get("updatedAt"), str) else None
    fields = {
        "stage": stage,
        "epoch": doc.get("epoch"),
        "total_epochs": doc.get("totalEpochs"),
        "train_loss": doc.get("trainLoss"),
        "kd_loss": doc.get("kdLoss"),
        "pseudo_dice": doc.get("pseudoDice"),
        "eta_seconds": max(0, round(eta)) if isinstance(eta, int | float) and math.isfinite(eta) else None,
        "updated_at": rfc3339(updated) if updated is not None else None,
    }
    return Progress.model_validate(fields).model_dump(by_alias=True, exclude_none=True, mode="json")
