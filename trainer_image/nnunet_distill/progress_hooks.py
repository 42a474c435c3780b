"""Glue between nnU-Net trainers and the in-pod runtime: live progress, crash-safe checkpoints, final summary.

The distillation trainer owns its hooks (``trainer.py`` overrides ``on_epoch_end``/``save_checkpoint``).
Teachers are *stock* nnU-Net trainers looked up by name, which we must not subclass: a subclass would change
``checkpoint['trainer_name']`` and the model folder name, and stock ``nnUNetv2_predict`` could no longer find
them. So for teachers the hooks wrap two bound methods of the one trainer instance (``save_checkpoint``,
``on_epoch_end``); nnU-Net calls them through ``self``, so the wrappers see every call, and the class (and
everything nnU-Net writes) stays stock.

Two promises:
- a checkpoint file is always complete: nnU-Net's own ``save_checkpoint`` writes to a temp file in the same
  folder, which is fsynced and ``os.replace``d over the target, so a kill mid-write leaves the old file (the temp
  file's name is never one that nnU-Net or ``-c_continue`` loads);
- reporting never stops training: every reporter call is guarded here as well as inside the reporter.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nnunet_distill.report import ProgressReporter

log = logging.getLogger(__name__)

#: Checkpoints whose arrival is reported as ``lastCheckpointEpoch`` (``checkpoint_best`` is not a resume point).
RESUME_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")
TEMP_SUFFIX = ".tmp"


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _at(series: Any, index: int) -> Any:
    if isinstance(series, (list, tuple)) and -len(series) <= index < len(series):
        return series[index]
    return None


def epoch_values(logging_dict: Mapping[str, Any], epoch: int) -> dict[str, float | None]:
    """What ``status.progress`` shows for 0-based ``epoch``, read from nnU-Net's logger (``my_fantastic_logging``).

    ``kd_loss`` exists only for distillation trainers (``train_kd_losses``); NaN (nnU-Net's pseudo Dice of a
    class never predicted) becomes None, which the reporter leaves out of the patch.
    """
    start = _finite(_at(logging_dict.get("epoch_start_timestamps"), epoch))
    end = _finite(_at(logging_dict.get("epoch_end_timestamps"), epoch))
    return {
        "train_loss": _finite(_at(logging_dict.get("train_losses"), epoch)),
        "kd_loss": _finite(_at(logging_dict.get("train_kd_losses"), epoch)),
        "pseudo_dice": _finite(_at(logging_dict.get("mean_fg_dice"), epoch)),
        "epoch_seconds": end - start if start is not None and end is not None and end >= start else None,
    }


def logged_series(logger: Any) -> Mapping[str, Any]:
    """nnU-Net's per-epoch series: 2.8's MetaLogger keeps them in ``local_logger``, older loggers on themselves."""
    local = getattr(logger, "local_logger", logger)
    return getattr(local, "my_fantastic_logging", {})


def temp_checkpoint_path(target: Path) -> Path:
    """Same folder (``os.replace`` must not cross file systems), a name no loader looks for."""
    return target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")


def _safely(what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reporting must never stop training
        log.warning("progress reporting failed to %s (%s); training continues", what, type(exc).__name__)


def make_checkpoints_atomic(trainer: Any) -> None:
    """Route the trainer's own ``save_checkpoint`` through a temp file + fsync + ``os.replace``."""
    save = trainer.save_checkpoint

    def atomic_save_checkpoint(filename: str) -> None:
        target = Path(filename)
        tmp = temp_checkpoint_path(target)
        try:
            save(str(tmp))
            if tmp.is_file():  # nothing is written on other DDP ranks or with checkpointing disabled
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    trainer.save_checkpoint = atomic_save_checkpoint


def attach_reporter(trainer: Any, reporter: ProgressReporter) -> None:
    """Report every epoch end (losses, pseudo Dice) and every resume checkpoint of a stock nnU-Net trainer."""
    save, epoch_end = trainer.save_checkpoint, trainer.on_epoch_end

    def save_checkpoint(filename: str) -> None:
        save(filename)
        if Path(filename).name in RESUME_CHECKPOINTS and Path(filename).is_file():
            # nnU-Net saves before it increments current_epoch: it is the 0-based epoch this file completes
            _safely("record a checkpoint", lambda: reporter.on_checkpoint(trainer.current_epoch))

    def on_epoch_end() -> None:
        epoch_end()  # logs, checkpoints, then current_epoch += 1
        epoch = trainer.current_epoch - 1

        def report() -> None:
            values = epoch_values(logged_series(trainer.logger), epoch)
            reporter.on_epoch_end(epoch, total_epochs=trainer.num_epochs, **values)

        _safely("report an epoch", report)

    trainer.save_checkpoint = save_checkpoint
    trainer.on_epoch_end = on_epoch_end


def start_reporting(
    trainer: Any, *, stage: str, resumed: bool, env: Mapping[str, str] = os.environ
) -> ProgressReporter:
    """The stage's reporter (a no-op outside a pod), hooked into ``trainer`` and started."""
    reporter = ProgressReporter.from_env(
        env, total_epochs=trainer.num_epochs, stage=env.get("DISTILLATIONJOB_STAGE") or stage
    )
    attach_reporter(trainer, reporter)
    if resumed:
        _safely("count the restart", reporter.mark_restart)
        completed = int(getattr(trainer, "current_epoch", 0) or 0)
        if completed > 0:
            _safely("record the resume checkpoint", lambda: reporter.on_checkpoint(completed - 1))
    _safely("start the heartbeat", reporter.start_heartbeat)
    return reporter


def validation_dice(output_folder: str | os.PathLike) -> float | None:
    """Mean foreground Dice of nnU-Net's final validation (``validation/summary.json``), if it ran."""
    path = Path(output_folder) / "validation" / "summary.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return _finite((doc.get("foreground_mean") or {}).get("Dice"))


def teacher_summary(trainer: Any, fold: int | str, parameters: int | None) -> dict[str, Any]:
    """The teacher stage's termination message: where the fold is, its size and its validation Dice.

    ``teacherDice`` is left to the distill stage (the ensemble's Dice on the student's cases); a fold's own
    validation Dice is reported as ``foldDice``.
    """
    folder = Path(trainer.output_folder)
    return {
        "stage": "teachers",
        "ok": True,
        "artifacts": {
            "teacherModelPath": str(folder.parent),
            "fold": fold,
            "checkpoint": str(folder / "checkpoint_final.pth"),
            "teacherParameters": parameters,
        },
        "metrics": {"foldDice": validation_dice(folder)},
    }


__all__ = [
    "attach_reporter",
    "epoch_values",
    "make_checkpoints_atomic",
    "start_reporting",
    "teacher_summary",
    "temp_checkpoint_path",
    "validation_dice",
]
