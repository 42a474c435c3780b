"""Pod pre-emption: SIGTERM a real distillation process mid-epoch, resume it with the same command line, and
check
that no completed iteration was lost or trained twice.

The run is the real console script on the session's nnU-Net dataset and teachers. SIGTERM is sent as soon as
the training log shows epoch 0 starting, so it lands inside the epoch's iterations. The trainer counts every
optimizer step it takes in its checkpoints (``distillation.optimizer_steps``, carried across resumes): after
the resume the final checkpoint must hold exactly epochs x iterations steps.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from nnunet_distill.nnunet_env import Workspace

from tests.trainer.distill_helpers import (
    STUDENT_FOLDER,
    load_checkpoint,
    private_workspace,
    resumable_distill_argv,
)

pytestmark = pytest.mark.slow

EPOCHS, ITERATIONS = 2, 3


@pytest.fixture()
def workspace(nnunet_teachers, tmp_path) -> Workspace:
    """A private copy of the session workspace (preprocessed data + trained teachers), without other
    students."""
    return private_workspace(nnunet_teachers, tmp_path / "ws")


def _epochs_started(fold: Path) -> list[int]:
    text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    return [int(m) for m in re.findall(r": Epoch (\d+)\s*$", text, re.MULTILINE)]


def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_loses_no_iteration(workspace, tmp_path):
    import os

    env = workspace.env({**os.environ, "PYTHONUNBUFFERED": "1"})
    argv = resumable_distill_argv(EPOCHS, ITERATIONS)
    fold = workspace.results / "Dataset901_Synth" / STUDENT_FOLDER / "fold_0"
    log = tmp_path / "first.log"

    with open(log, "wb") as fh:
        first = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 1200
        while 0 not in _epochs_started(fold):
            assert first.poll() is None, (
                f"the run ended early ({first.returncode}):\n{log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "training did not start within 10 minutes"
            time.sleep(0.02)
        first.send_signal(signal.SIGTERM)  # what the kubelet sends a pre-empted pod
        rc = first.wait(300)
    finally:
        if first.poll() is None:
            first.kill()
    out = log.read_text()
    assert rc == 130 and "interrupted; resume with -c_continue" in out, out[-3000:]
    assert "Traceback" not in out

    saved = load_checkpoint(fold / "checkpoint_latest.pth")
    done = saved["preempted"]["iterations_done"]
    assert saved["current_epoch"] == 0 and saved["preempted"]["epoch"] == 0  # the epoch is still open
    assert 1 <= done < ITERATIONS, done  # mid-epoch: at least the iteration in flight was finished and kept
    assert saved["distillation"]["optimizer_steps"] == done
    assert len(saved["preempted"]["train_outputs"]) == done

    log2 = tmp_path / "second.log"
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=2400, check=False)
    log2.write_text(second.stdout + second.stderr)
    assert second.returncode == 0, log2.read_text()[-3000:]
    assert "resuming from" in second.stdout and "at epoch 0 of 2" in second.stdout
    training_log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"resuming epoch 0 after iteration {done} (pre-empted run)" in training_log

    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == EPOCHS and "preempted" not in final
    # every iteration trained exactly once across both processes
    assert final["distillation"]["optimizer_steps"] == EPOCHS * ITERATIONS
    assert len(final["logging"]["train_losses"]) == EPOCHS
