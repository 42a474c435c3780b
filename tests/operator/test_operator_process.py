"""The `nnunet-distill-operator` console script as a real process: flags, kubeconfig login, metrics,
liveness, and a clean exit on SIGTERM. Peering is left to kopf's auto-detection (this API server has no
kopf peering CRD, so the operator runs unpaired, as it does in a cluster without them)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.operator.conftest import dj
from tests.operator.harness import exists, get, job_key, wait_for

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


async def test_operator_process_reconciles_serves_metrics_and_liveness_and_stops_on_sigterm(
    kmock: Any, kubeconfig: Path, clients: Any, tmp_path: Path
) -> None:
    metrics_port, liveness_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["NNUNET_DISTILL_TRAINER_IMAGE"] = "registry.example/trainer@sha256:" + "a" * 64
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "nnunet-distill-operator"),
            "--all-namespaces",
            f"--kubeconfig={kubeconfig}",
            f"--metrics-port={metrics_port}",
            "--metrics-addr=127.0.0.1",
            f"--liveness-port={liveness_port}",
            "--log-level=info",
            "--trainer-service-account=trainer",
            stdout=out,
            stderr=out,
            env=env,
        )
        try:
            await clients.create_dj(dj("proc", preprocess={"mode": "Never"}))
            await wait_for(
                lambda: exists(kmock, job_key(kmock, "proc-distill")),
                timeout=60,
                what="the operator process to create the Job",
            )
            pod = get(kmock, job_key(kmock, "proc-distill"))["spec"]["template"]["spec"]
            assert pod["containers"][0]["image"] == env["NNUNET_DISTILL_TRAINER_IMAGE"]
            assert pod["serviceAccountName"] == "trainer"

            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200 and b'nnunet_distill_stage_jobs_created_total{stage="distill"} 1.0' in body
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{liveness_port}/healthz")
            assert status == 200 and "distillationjobs" in json.loads(body)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    # At INFO the log says what the operator did, without kopf's line for every watch event it handled.
    assert "proc: StageStarted: created Job proc-distill" in text, text[-3000:]
    assert "[kopf.activities.startup] Activity 'startup' succeeded." in text, text[-3000:]
    assert "Handler 'on_distillationjob' succeeded." not in text, text[-3000:]


def test_the_operator_loads_none_of_the_clients_typed_apis(kubeconfig: Path) -> None:
    """Every call goes through `Clients.request`: the client's typed API classes and the models they load were
    26 MiB of the operator's memory and 0.5 s of CPU at each start. A clean interpreter imports what the
    operator process does and builds its clients."""
    code = (
        "import sys; from nnunet_distill_operator import cli, controller, effects\n"
        "from nnunet_distill_operator.operator_state import Clients\n"
        f"Clients({str(kubeconfig)!r}).close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
