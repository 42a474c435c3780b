"""The progress reporter against a real (in-process) Kubernetes API emulator, kmock with the project's
ApiServerLikeEmulator (tests/operator/kmock_ext.py, set up by tests/operator/harness.py): patches land in
`status.progress` through the status subresource, the rate limit holds, API failures never reach training.
(The termination message: test_termination.py.)

The reporter uses the synchronous kubernetes client, so every call runs in a thread (`asyncio.to_thread`):
kmock serves on the test's event loop and a blocking call from that loop would deadlock it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from nnunet_distill import report
from nnunet_distill.report import GROUP, PLURAL, VERSION, ProgressReporter

from tests.operator.harness import declare_resources, write_kubeconfig

NS, NAME = "ml", "liver-r2"
TOKEN = "kmock-test-token"  # the harness kubeconfig's bearer token: must never show up in logs


class ManualClock:
    """Time that moves only when the test says so: rate limits are checked without sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture()
def api_server(kmock):
    """kmock's own fixture, i.e. the project's ApiServerLikeEmulator (`kmock_cls`), serving
    DistillationJobs."""
    assert type(kmock).__name__ == "ApiServerLikeEmulator"  # status isolation + uid preconditions are needed
    declare_resources(kmock)
    return kmock


@pytest.fixture()
def kubeconfig(api_server, tmp_path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", str(api_server.url).rstrip("/"))


def _custom_api(kubeconfig: Path) -> k8s_client.CustomObjectsApi:
    cfg = k8s_client.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return k8s_client.CustomObjectsApi(k8s_client.ApiClient(cfg))


@pytest.fixture()
async def job(kubeconfig) -> dict:
    """A DistillationJob created through the API, with a status the operator already wrote."""
    api = _custom_api(kubeconfig)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"datasetId": 5},
    }
    await asyncio.to_thread(api.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body)
    await asyncio.to_thread(
        api.patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        NAME,
        {"status": {"phase": "Running", "progress": {"restarts": 2}}},
    )
    return await asyncio.to_thread(api.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME)


def _env(kubeconfig: Path, **extra: str) -> dict[str, str]:
    return {
        "DISTILLATIONJOB_NAME": NAME,
        "DISTILLATIONJOB_NAMESPACE": NS,
        "KUBECONFIG": str(kubeconfig),
        **extra,
    }


async def _status(kubeconfig: Path) -> dict:
    api = _custom_api(kubeconfig)
    obj = await asyncio.to_thread(api.get_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, NAME)
    return obj.get("status", {})


def _status_patches(server) -> list:
    """The reporter's PATCHes of the status subresource (the fixture's own status write excluded)."""
    return [
        r
        for r in server
        if r.method == "PATCH"
        and str(r.url.path).endswith(f"/{PLURAL}/{NAME}/status")
        and "updatedAt" in ((r.data or {}).get("status") or {}).get("progress", {})
    ]


# ------------------------------------------------------------------------------------------- reporting


async def test_progress_lands_in_status_through_the_subresource(api_server, kubeconfig, job):
    clock = ManualClock()
    rep = ProgressReporter.from_env(
        _env(kubeconfig, DISTILLATIONJOB_UID=job["metadata"]["uid"]),
        total_epochs=10,
        stage="distill",
        clock=clock,
    )
    assert rep.active
    clock.advance(12.0)  # the first epoch took 12 s
    sent = await asyncio.to_thread(
        rep.on_epoch_end, 0, train_loss=0.91, kd_loss=0.42, pseudo_dice=float("nan")
    )
    assert sent

    status = await _status(kubeconfig)
    progress = status["progress"]
    assert progress["epoch"] == 1 and progress["totalEpochs"] == 10 and progress["stage"] == "distill"
    assert progress["trainLoss"] == pytest.approx(0.91) and progress["kdLoss"] == pytest.approx(0.42)
    assert "pseudoDice" not in progress  # NaN is not JSON; left out rather than sent as garbage
    assert progress["etaSeconds"] == 9 * 12
    assert progress["restarts"] == 2  # untouched fields survive the merge patch
    assert status["phase"] == "Running"
    updated = dt.datetime.strptime(progress["updatedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - updated).total_seconds()) < 60

    patches = _status_patches(api_server)
    assert len(patches) == 1
    assert patches[0].headers["Content-Type"].startswith("application/merge-patch+json")
    # (the uid in the patch is a precondition: see test_a_replaced_job_is_not_written_to)


async def test_rate_limit_one_patch_per_epoch_and_interval_plus_heartbeat(api_server, kubeconfig, job):
    clock = ManualClock()
    rep = ProgressReporter.from_env(
        _env(kubeconfig), total_epochs=100, min_interval_s=30, heartbeat_s=180, clock=clock
    )
    clock.advance(10)
    assert await asyncio.to_thread(rep.on_epoch_end, 0, train_loss=1.0)
    for _ in range(5):  # the same epoch again, and heartbeats inside the interval: nothing goes out
        clock.advance(1)
        assert not await asyncio.to_thread(rep.on_epoch_end, 0, train_loss=0.9)
        assert not await asyncio.to_thread(rep.heartbeat)
    assert len(_status_patches(api_server)) == 1

    clock.advance(10)  # epoch 1 ends 15 s after the last patch: too early
    assert not await asyncio.to_thread(rep.on_epoch_end, 1, train_loss=0.8)
    clock.advance(20)  # epoch 2 ends 35 s after: due
    assert await asyncio.to_thread(rep.on_epoch_end, 2, train_loss=0.7)
    assert len(_status_patches(api_server)) == 2
    progress = (await _status(kubeconfig))["progress"]
    assert progress["epoch"] == 3 and progress["trainLoss"] == pytest.approx(0.7)
    eta_at_epoch = progress["etaSeconds"]

    # a long epoch: no epoch end for minutes, the heartbeat keeps updatedAt moving and counts the ETA down
    clock.advance(100)
    assert not await asyncio.to_thread(rep.heartbeat)  # nothing new and no heartbeat due yet
    clock.advance(100)
    assert await asyncio.to_thread(rep.heartbeat)
    progress = (await _status(kubeconfig))["progress"]
    assert progress["epoch"] == 3 and progress["etaSeconds"] == eta_at_epoch - 200
    assert len(_status_patches(api_server)) == 3

    # an epoch held back by the interval goes out with a later heartbeat once the interval has passed
    clock.advance(5)
    assert not await asyncio.to_thread(rep.on_epoch_end, 3, train_loss=0.6)
    clock.advance(30)
    assert await asyncio.to_thread(rep.heartbeat)
    assert (await _status(kubeconfig))["progress"]["epoch"] == 4


async def test_checkpoint_restart_and_final_flush(api_server, kubeconfig, job):
    clock = ManualClock()
    rep = ProgressReporter.from_env(
        _env(kubeconfig, DISTILLATIONJOB_STAGE="distill"), total_epochs=5, clock=clock
    )
    assert await asyncio.to_thread(rep.mark_restart) == 3  # status said 2 restarts so far
    clock.advance(3)
    await asyncio.to_thread(rep.on_epoch_end, 3, train_loss=0.5)
    rep.on_checkpoint(3)  # after the patch: waits for the next one
    clock.advance(3)
    assert not await asyncio.to_thread(rep.on_epoch_end, 4, train_loss=0.4)  # inside the 30 s interval
    await asyncio.to_thread(rep.close)  # end of training: whatever is pending goes out
    progress = (await _status(kubeconfig))["progress"]
    assert progress == {
        **progress,
        "epoch": 5,
        "restarts": 3,
        "lastCheckpointEpoch": 4,
        "etaSeconds": 0,
        "stage": "distill",
        "trainLoss": 0.4,
    }


async def test_heartbeat_thread_patches_during_a_long_epoch(api_server, kubeconfig, job):
    rep = ProgressReporter.from_env(_env(kubeconfig), total_epochs=3, min_interval_s=0.05, heartbeat_s=0.1)
    rep.start_heartbeat(every_s=0.05)
    try:
        deadline = time.monotonic() + 10
        while len(_status_patches(api_server)) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(rep.close, final_flush=False)
    assert len(_status_patches(api_server)) >= 3
    assert rep._thread is None  # joined, nothing left running


async def test_api_errors_are_logged_once_and_never_raise(api_server, kubeconfig, caplog):
    clock = ManualClock()
    caplog.set_level(logging.DEBUG, logger="nnunet_distill.report")
    rep = ProgressReporter.from_env(_env(kubeconfig), total_epochs=4, clock=clock)  # no such job: 404
    for epoch in range(3):
        clock.advance(60)
        assert not await asyncio.to_thread(rep.on_epoch_end, epoch, train_loss=1.0)
    assert rep.failures == 3 and rep.patches_sent == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0].getMessage()
    assert TOKEN not in caplog.text


async def test_forbidden_is_logged_with_the_rbac_hint(api_server, kubeconfig, job, caplog):
    clock = ManualClock()
    rep = ProgressReporter.from_env(_env(kubeconfig), total_epochs=4, clock=clock)
    api_server[f"patch /apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}/{NAME}/status"] << 403
    for epoch in range(2):
        clock.advance(60)
        assert not await asyncio.to_thread(rep.on_epoch_end, epoch)
    assert rep.failures == 2
    forbidden = [r.getMessage() for r in caplog.records if "HTTP 403" in r.getMessage()]
    assert len(forbidden) == 1 and "distillationjobs/status" in forbidden[0]


async def test_a_replaced_job_is_not_written_to(api_server, kubeconfig, job, caplog):
    """A pod of a deleted-and-recreated job (same name, new uid) must not write into its successor."""
    rep = ProgressReporter.from_env(
        _env(kubeconfig, DISTILLATIONJOB_UID="uid-of-the-deleted-job"), total_epochs=4
    )
    assert not await asyncio.to_thread(rep.on_epoch_end, 0, train_loss=1.0)
    assert rep.failures == 1
    assert "epoch" not in (await _status(kubeconfig))["progress"]
    assert any("HTTP 409" in r.getMessage() and "uid" in r.getMessage() for r in caplog.records)


async def test_unreachable_api_server_does_not_raise_or_stall(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    rep = ProgressReporter.from_env(_env(cfg), total_epochs=2)
    t = time.monotonic()
    assert not await asyncio.to_thread(rep.on_epoch_end, 0, train_loss=1.0)
    assert not await asyncio.to_thread(rep.flush)
    assert time.monotonic() - t < 30 and rep.failures == 2


def test_inactive_without_downward_api_env(tmp_path):
    rep = ProgressReporter.from_env({"KUBECONFIG": str(tmp_path / "absent")}, total_epochs=3)
    assert not rep.active
    assert not rep.on_epoch_end(0, train_loss=1.0) and not rep.heartbeat() and not rep.flush()
    assert rep.mark_restart() is None
    rep.start_heartbeat()
    assert rep._thread is None
    rep.close()


def test_importing_the_reporter_does_not_import_kubernetes():
    code = "import sys, nnunet_distill.report, nnunet_distill.publish; sys.exit('kubernetes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


# ----------------------------------------------------------------------------------------------- pure


def test_eta_and_patch_body():
    assert report.eta_seconds([], 0, 10) is None and report.eta_seconds([5.0], 1, None) is None
    assert report.eta_seconds([100.0, 10.0, 10.0, 10.0, 10.0, 10.0], 6, 10) == 40  # mean of the last 5
    assert report.eta_seconds([10.0], 12, 10) == 0
    body = report.progress_patch({"epoch": 1, "kdLoss": None}, uid="u-1")
    assert body == {"status": {"progress": {"epoch": 1}}, "metadata": {"uid": "u-1"}}
