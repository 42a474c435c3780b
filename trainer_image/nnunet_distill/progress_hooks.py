"""Glue between nnU-Net trainers and the in-pod runtime: live progress, crash-safe checkpoints, final summary.

The distillation trainer owns its hooks (``trainer.py`` overrides ``on_epoch_end``/``save_checkpoint``).
Teachers are *stock* nnU-Net trainers looked up by name, which we must not subclass: a subclass would change
``checkpoint['trainer_name']`` and the model folder name, and stock ``nnUNetv2_predict`` could no longer find
them. So for teachers the hooks wrap two bound methods of the one trainer instance (``save_checkpoint``,
``on_epoch_end``); nnU-Net calls them through ``self``, so the wrappers see every call, and the class (and
everything nnU-Net writes) stays stock.

One way for both: ``start_reporting`` hooks the student (distill.py) and the teachers (cli/train_teacher.py)
alike. At every epoch end it writes ``progress.json`` (contract.PROGRESS_NAME: losses, pseudo Dice, ETA)
beside the checkpoints, which local runs read, and reports the same epoch to the DistillationJob.

Two promises:
- a checkpoint file is always complete: nnU-Net's own ``save_checkpoint`` writes to a temp file in the same
  folder, which is fsynced and ``os.replace``d over the target, so a kill mid-write leaves the old file (the
  temp file's name is never one that nnU-Net or ``-c_continue`` loads);
- reporting never stops training: every reporter call is guarded here as well as inside the reporter.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nnunet_distill.atomic import atomic_write_json, replacing, temp_path
from nnunet_distill.contract import ENV_JOB_STAGE, PROGRESS_NAME
from nnunet_distill.report import ETA_WINDOW, ProgressReporter

log = logging.getLogger(__name__)

#: Checkpoints whose arrival is reported as ``lastCheckpointEpoch`` (``checkpoint_best`` is not a resume
#: point).
RESUME_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")


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
    """What ``status.progress`` shows for 0-based ``epoch``, read from nnU-Net's logger
    (``my_fantastic_logging``).

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


def progress_record(
    logging_dict: Mapping[str, Any], completed: int, total_epochs: int, now: datetime | None = None
) -> dict[str, Any]:
    """``progress.json`` after ``completed`` epochs, from nnU-Net's logger: the last epoch's losses and pseudo
    Dice (kd/hard losses only for distillation trainers), and an ETA from the mean of the last epochs."""
    epoch = completed - 1
    starts = logging_dict.get("epoch_start_timestamps") or []
    ends = logging_dict.get("epoch_end_timestamps") or []
    durations = [float(e) - float(s) for s, e in zip(starts, ends, strict=False)][-ETA_WINDOW:]
    epoch_seconds = sum(durations) / len(durations) if durations else None
    remaining = max(total_epochs - completed, 0)

    def value(key: str) -> float | None:
        return _finite(_at(logging_dict.get(key), epoch))

    return {
        "epoch": completed,  # epochs completed
        "totalEpochs": total_epochs,
        "trainLoss": value("train_losses"),
        "kdLoss": value("train_kd_losses"),
        "hardLoss": value("train_hard_losses"),
        "valLoss": value("val_losses"),
        "pseudoDice": value("mean_fg_dice"),
        "emaPseudoDice": value("ema_fg_dice"),
        "dicePerClass": [_finite(d) for d in _at(logging_dict.get("dice_per_class_or_region"), epoch) or []],
        "epochSeconds": epoch_seconds,
        "lastEpochSeconds": durations[-1] if durations else None,
        "etaSeconds": epoch_seconds * remaining if epoch_seconds is not None else None,
        "updatedAt": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
    }


def write_progress(trainer: Any) -> dict[str, Any]:
    """The trainer's ``progress.json`` (rank 0 writes it; DDP's other ranks only compute it)."""
    progress = progress_record(logged_series(trainer.logger), trainer.current_epoch, trainer.num_epochs)
    if getattr(trainer, "local_rank", 0) == 0:
        atomic_write_json(progress, Path(trainer.output_folder) / PROGRESS_NAME)
    return progress


def logged_series(logger: Any) -> Mapping[str, Any]:
    """nnU-Net's per-epoch series: 2.8's MetaLogger keeps them in ``local_logger``, older loggers on
    themselves."""
    local = getattr(logger, "local_logger", logger)
    return getattr(local, "my_fantastic_logging", {})


#: Same folder (``os.replace`` must not cross file systems), a name no loader looks for.
temp_checkpoint_path = temp_path


def _safely(what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reporting must never stop training
        log.warning("progress reporting failed to %s (%s); training continues", what, type(exc).__name__)


def make_checkpoints_atomic(trainer: Any) -> None:
    """Route the trainer's own ``save_checkpoint`` through a temp file + fsync + ``os.replace``."""
    save = trainer.save_checkpoint

    def atomic_save_checkpoint(filename: str) -> None:
        # nothing is written on other DDP ranks or with checkpointing disabled: `replacing` then keeps the
        # target
        with replacing(filename) as tmp:
            save(str(tmp))

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
        before = trainer.current_epoch
        try:
            epoch_end()  # logs, checkpoints, then current_epoch += 1 (the student may then raise on SIGTERM)
        finally:
            if trainer.current_epoch > before:  # the epoch was logged: report it, pre-empted or not
                epoch = trainer.current_epoch - 1
                _safely("write progress.json", lambda: write_progress(trainer))

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
        env, total_epochs=trainer.num_epochs, stage=env.get(ENV_JOB_STAGE) or stage
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
    "progress_record",
    "start_reporting",
    "teacher_summary",
    "temp_checkpoint_path",
    "validation_dice",
    "write_progress",
]
