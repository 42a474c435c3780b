"""The in-pod runtime of the training stages, for real: nnU-Net training processes reporting to the kmock API
server.

- distill: a run is SIGKILLed mid-training after its first checkpoints, a half-written checkpoint temp file is
  left beside them, and the very same command line (the operator's, with ``-c_continue``) is started again: it
  resumes from the newest checkpoint (losing at most one epoch), finishes with the right epoch count, and the
  DistillationJob's ``status.progress`` shows epochs, losses, pseudo Dice, ``lastCheckpointEpoch`` and one
  restart; the termination message holds the final summary.
- teachers: ``nnunet-distill train-teacher`` reports its progress the same way and leaves its summary.

Each test works on a private copy of the session's trained workspace, so no other test sees its students.
The processes run with ``asyncio`` subprocesses: kmock serves on this test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from nnunet_distill.nnunet_env import Workspace
from nnunet_distill.report import GROUP, PLURAL, VERSION

from tests.conftest import CONFIGURATION, python_module
from tests.operator.harness import declare_resources, write_kubeconfig
from tests.trainer.distill_helpers import (
    STUDENT_FOLDER,
    load_checkpoint,
    private_workspace,
    resumable_distill_argv,
)

pytestmark = pytest.mark.slow

NS, NAME = "ml", "spleen-r2"
EPOCHS = 6


@pytest.fixture()
def workspace(nnunet_teachers, tmp_path) -> Workspace:
    """A private copy of the session workspace (preprocessed data + trained teachers)."""
    root = tmp_path / "ws"
    workspace = private_workspace(nnunet_teachers, root)
    (root / "nnUNet_raw").mkdir()
    shutil.copytree(
        nnunet_teachers.dataset.raw_dataset, root / "nnUNet_raw" / nnunet_teachers.dataset.dataset_name
    )
    return workspace


@pytest.fixture()
def kubeconfig(kmock, tmp_path) -> Path:
    declare_resources(kmock)
    return write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))


def _custom(kubeconfig: Path) -> k8s_client.CustomObjectsApi:
    cfg = k8s_client.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return k8s_client.CustomObjectsApi(k8s_client.ApiClient(cfg))


async def _create_job(kubeconfig: Path) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"dataset": {"id": 901}},
    }
    return await asyncio.to_thread(
        _custom(kubeconfig).create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body
    )


async def _progress(kubeconfig: Path) -> dict:
    obj = await asyncio.to_thread(
        _custom(kubeconfig).get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME
    )
    return (obj.get("status") or {}).get("progress") or {}


def _pod_env(
    workspace: Workspace, kubeconfig: Path, uid: str, stage: str, termination: Path
) -> dict[str, str]:
    return workspace.env(
        {
            **os.environ,
            "DISTILLATIONJOB_NAME": NAME,
            "DISTILLATIONJOB_NAMESPACE": NS,
            "DISTILLATIONJOB_UID": uid,
            "DISTILLATIONJOB_STAGE": stage,
            "KUBECONFIG": str(kubeconfig),
            "TERMINATION_MESSAGE_PATH": str(termination),
            "NNUNET_DISTILL_PROGRESS_INTERVAL_S": "0",
            # as k8s.py sets it in every stage container: a SIGKILL must not eat the log
            "PYTHONUNBUFFERED": "1",
        }
    )


async def _start(argv: list[str], env: dict, log: Path) -> asyncio.subprocess.Process:
    fh = open(log, "ab")  # noqa: SIM115, ASYNC230 - handed to the child, opening is instant
    try:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=fh, stderr=asyncio.subprocess.STDOUT
        )
    finally:
        fh.close()


def _completed_epochs(fold: Path) -> int:
    try:
        return int(json.loads((fold / "progress.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _epoch_started(log: Path, epoch: int) -> bool:
    """nnU-Net's on_train_epoch_start prints `Epoch N` (0-based) and then the learning rate it trains with."""
    pattern = rf"^.*: Epoch {epoch}\s*\n.*: Current learning rate"
    return re.search(pattern, log.read_text(errors="replace"), re.M) is not None


async def test_distill_killed_mid_training_resumes_and_reports(workspace, kubeconfig, tmp_path):
    job = await _create_job(kubeconfig)
    termination = tmp_path / "termination-log"
    env = _pod_env(workspace, kubeconfig, job["metadata"]["uid"], "distill", termination)
    argv = resumable_distill_argv(EPOCHS, 2)
    fold = workspace.results / "Dataset901_Synth" / STUDENT_FOLDER / "fold_0"
    log = tmp_path / "distill.log"

    # --- first pod: no checkpoint yet -> starts fresh; killed mid-epoch once two epochs are checkpointed
    first = await _start(argv, env, log)
    deadline = time.monotonic() + 600
    while _completed_epochs(fold) < 2:
        assert first.returncode is None, (
            f"the first run ended early ({first.returncode}):\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, "no progress within 10 minutes"
        await asyncio.sleep(0.1)
    # into the next epoch: nnU-Net has logged its start (and the learning rate it trains with), so the kill
    # lands after the checkpoint of epoch 2 and before the next one
    started = _completed_epochs(fold)
    while not _epoch_started(log, started):
        assert first.returncode is None, f"the first run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"epoch {started} did not start within 10 minutes"
        await asyncio.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    first_out = log.read_text()
    assert "no checkpoint" in first_out and "starting a new training" in first_out

    completed_at_kill = _completed_epochs(fold)
    saved_epoch = load_checkpoint(fold / "checkpoint_latest.pth")["current_epoch"]
    assert completed_at_kill - saved_epoch <= 1, "more than one epoch would be lost"
    assert 1 <= saved_epoch < EPOCHS
    progress = await _progress(kubeconfig)
    assert progress["totalEpochs"] == EPOCHS and progress["stage"] == "distill"
    assert progress["epoch"] >= 2 and progress["lastCheckpointEpoch"] >= 1
    assert progress["trainLoss"] > 0 and progress["kdLoss"] >= 0 and 0 <= progress["pseudoDice"] <= 1
    assert "restarts" not in progress
    assert not termination.exists() or termination.read_text() == ""  # a killed pod leaves no summary

    # a checkpoint write cut off by the kill: only the temp file is damaged, and it is never loaded
    good = (fold / "checkpoint_latest.pth").read_bytes()
    (fold / ".checkpoint_latest.pth.424242.tmp").write_bytes(good[: len(good) // 3])

    # --- the restarted pod: the same command line
    log2 = tmp_path / "distill-restart.log"
    second = await _start(argv, env, log2)
    assert await asyncio.wait_for(second.wait(), 900) == 0, log2.read_text()[-3000:]
    out = log2.read_text()
    assert f"resuming from {fold / 'checkpoint_latest.pth'} at epoch {saved_epoch} of {EPOCHS}" in out
    training_logs = sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    resumed_log = training_logs[-1].read_text()
    epochs_run = [int(m) for m in re.findall(r": Epoch (\d+)\s*$", resumed_log, re.MULTILINE)]
    assert epochs_run == list(range(saved_epoch, EPOCHS))  # continues where the checkpoint ended

    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == EPOCHS
    assert len(final["logging"]["train_losses"]) == EPOCHS  # the curves continue across the restart

    progress = await _progress(kubeconfig)
    assert progress["epoch"] == EPOCHS and progress["lastCheckpointEpoch"] == EPOCHS
    assert progress["restarts"] == 1 and progress["etaSeconds"] == 0

    summary = json.loads(termination.read_text())
    assert summary["stage"] == "distill" and summary["ok"] is True
    artifacts, metrics = summary["artifacts"], summary["metrics"]
    assert artifacts["modelPath"] == str(fold.parent)
    assert 0 < artifacts["studentParameters"] < artifacts["teacherParameters"]
    dist = json.loads((fold / "validation" / "distillation_summary.json").read_text())
    assert dist["evaluation"] == "test_set"  # Dataset901 has a labelled imagesTs
    assert metrics["finalDice"] == pytest.approx(dist["student"]["mean_dice"])
    assert metrics["evaluatedOn"] == f"test_set: {dist['cases']['count']} cases (imagesTs)"
    if dist["retention"] is not None:
        assert metrics["retention"] == pytest.approx(dist["retention"]["mean"])


async def test_teacher_training_reports_progress_and_summary(workspace, kubeconfig, tmp_path):
    job = await _create_job(kubeconfig)
    termination = tmp_path / "termination-log"
    env = _pod_env(workspace, kubeconfig, job["metadata"]["uid"], "teachers", termination)
    argv = python_module(
        "nnunet_distill.cli.train_teacher",
        "-d",
        "901",
        "-c",
        CONFIGURATION,
        "-f",
        "2",
        "-tr",
        "nnUNetTrainer",
        "-p",
        "nnUNetPlans",
        "-e",
        "2",
        "--iterations_per_epoch",
        "2",
        "--val_iterations",
        "1",
        "-device",
        "cpu",
        "--c",
    )
    log = tmp_path / "teacher.log"
    proc = await _start(argv, env, log)
    assert await asyncio.wait_for(proc.wait(), 600) == 0, log.read_text()[-3000:]
    fold = workspace.results / "Dataset901_Synth" / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}" / "fold_2"

    progress = await _progress(kubeconfig)
    assert progress["stage"] == "teachers" and progress["epoch"] == 2 and progress["totalEpochs"] == 2
    assert progress["lastCheckpointEpoch"] == 2 and progress["trainLoss"] is not None
    assert "kdLoss" not in progress and "restarts" not in progress
    # the teacher stays a stock nnU-Net model: stock trainer name, no leftover temp files
    assert load_checkpoint(fold / "checkpoint_final.pth")["trainer_name"] == "nnUNetTrainer"
    assert not list(fold.glob(".*.tmp"))

    summary = json.loads(termination.read_text())
    assert summary["stage"] == "teachers" and summary["ok"] is True
    assert summary["artifacts"]["teacherModelPath"] == str(fold.parent)
    assert summary["artifacts"]["teacherParameters"] > 0 and summary["artifacts"]["fold"] == 2
    dice = json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert summary["metrics"]["foldDice"] == pytest.approx(dice)
