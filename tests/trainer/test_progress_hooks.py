"""Fast checks of the trainer-side glue: values read from nnU-Net's logger, and the atomic checkpoint
wrapper."""

from __future__ import annotations

import pytest
import torch
from nnunet_distill import progress_hooks as ph


def test_epoch_values_read_nnunets_series_and_drop_nan():
    log = {
        "train_losses": [0.9, 0.7],
        "mean_fg_dice": [float("nan"), 0.4],
        "epoch_start_timestamps": [100.0, 110.0],
        "epoch_end_timestamps": [109.0, 125.5],
    }
    first, second = ph.epoch_values(log, 0), ph.epoch_values(log, 1)
    assert first == {"train_loss": 0.9, "kd_loss": None, "pseudo_dice": None, "epoch_seconds": 9.0}
    assert second["pseudo_dice"] == 0.4 and second["epoch_seconds"] == 15.5
    assert ph.epoch_values({**log, "train_kd_losses": [0.2, 0.1]}, 1)["kd_loss"] == 0.1
    assert ph.epoch_values(log, 5) == {
        "train_loss": None,
        "kd_loss": None,
        "pseudo_dice": None,
        "epoch_seconds": None,
    }


class _Saver:
    """Stands in for the trainer's own save_checkpoint: torch.save, optionally dying half-way."""

    def __init__(self):
        self.crash = False

    def save_checkpoint(self, filename: str) -> None:
        if self.crash:
            with open(filename, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed mid-write")
        torch.save({"current_epoch": 3}, filename)


def test_checkpoint_writes_are_atomic(tmp_path):
    saver = _Saver()
    ph.make_checkpoints_atomic(saver)
    target = tmp_path / "checkpoint_latest.pth"
    saver.save_checkpoint(str(target))
    assert torch.load(target, weights_only=False)["current_epoch"] == 3
    saver.crash = True
    with pytest.raises(KeyboardInterrupt):
        saver.save_checkpoint(str(target))
    assert torch.load(target, weights_only=False)["current_epoch"] == 3  # the old checkpoint survived
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]  # no temp file left behind
    assert ph.temp_checkpoint_path(target).parent == tmp_path


def test_progress_record_is_the_progress_json_schema_for_teachers_and_students():
    from datetime import UTC, datetime

    log = {
        "train_losses": [0.9, 0.7, 0.6],
        "val_losses": [0.8, 0.75, 0.7],
        "mean_fg_dice": [0.1, float("nan"), 0.5],
        "ema_fg_dice": [0.1, 0.2, 0.3],
        "dice_per_class_or_region": [[0.1], [0.2], [0.5, float("nan")]],
        "epoch_start_timestamps": [0.0, 10.0, 30.0],
        "epoch_end_timestamps": [10.0, 30.0, 60.0],
    }
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    teacher = ph.progress_record(log, completed=3, total_epochs=5, now=now)
    assert teacher == {
        "epoch": 3,
        "totalEpochs": 5,
        "trainLoss": 0.6,
        "kdLoss": None,
        "hardLoss": None,
        "valLoss": 0.7,
        "pseudoDice": 0.5,
        "emaPseudoDice": 0.3,
        "dicePerClass": [0.5, None],
        "epochSeconds": 20.0,
        "lastEpochSeconds": 30.0,
        "etaSeconds": 40.0,
        "updatedAt": "2026-01-02T03:04:05+00:00",
    }
    student = ph.progress_record(
        {**log, "train_kd_losses": [0.3, 0.2, 0.1], "train_hard_losses": [1.0, 0.9, 0.8]}, 3, 3, now
    )
    assert (student["kdLoss"], student["hardLoss"], student["pseudoDice"]) == (0.1, 0.8, 0.5)
    assert student["etaSeconds"] == 0.0 and student["epochSeconds"] == 20.0
