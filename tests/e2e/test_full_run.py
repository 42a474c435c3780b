"""The project's end-to-end proof: a DistillationJob goes from `apply` to `Succeeded`, a verified model in S3.

Real parts only: the operator (kopf, in-process), the kmock API server, a moto S3 server, and the trainer's
own commands. The test plays the Job controller and the kubelet (`Kubelet` below): for every Job the operator
creates it runs the pod template's containers (init containers first, then `main`) as local processes with the
Job's env — the volume mount paths mapped to a private copy of the session's nnU-Net workspace, downward-API
env from the pod's metadata, `secretKeyRef` env from the Secret in kmock — then records what a kubelet would:
a Pod whose `main` container terminated with the termination message the stage wrote, and the Job's
completion.

The session fixtures' preprocessed dataset and trained teachers are reused (`preprocess.mode: Never`, no
teacher training), and the student trains for a tiny budget on the CPU.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
from moto.server import ThreadedMotoServer
from nnunet_distill.nnunet_env import CPU_FRIENDLY_ENV, Workspace
from nnunet_distill_operator import api, controller, k8s

from tests.operator.harness import (
    Clients,
    OperatorRunner,
    declare_resources,
    dj_key,
    get,
    pod_for,
    terminated_status,
    wait_for,
    write_kubeconfig,
)

pytestmark = pytest.mark.slow

NAME, NS, BUCKET, SECRET = "spleen", "default", "models", "s3-creds"
MOUNT_ROOT = "/data/"  # api.MOUNT_RAW etc. live under it


@pytest.fixture()
def moto_endpoint():
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


def _s3(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture()
def workspace(nnunet_teachers, tmp_path) -> Workspace:
    """The 'volume': a private copy of the session workspace (preprocessed data + trained teachers)."""
    root = tmp_path / "volume"
    shutil.copytree(nnunet_teachers.dataset.root, root, ignore=shutil.ignore_patterns("fixtures.log"))
    return Workspace(root)


class Kubelet:
    """Runs each Job the operator creates, once, like the Job controller + kubelet of a one-node cluster."""

    def __init__(self, clients: Clients, volume: Path, work: Path):
        self.clients, self.volume, self.work = clients, volume, work
        self.seen: set[str] = set()
        self.ran: list[str] = []
        self.errors: list[str] = []
        self.tmpdir = tempfile.mkdtemp(prefix="pod-", dir="/tmp")

    def _host_path(self, text: str) -> str:
        return text.replace(MOUNT_ROOT, f"{self.volume}/")

    async def _secret(self, name: str) -> dict[str, str]:
        try:
            secret = await asyncio.to_thread(self.clients.core.read_namespaced_secret, name, NS)
        except Exception:  # noqa: BLE001 - a missing optional secret is not an error
            return {}
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    async def _env(
        self, container: dict, pod_meta: dict, index: int | None, termination: Path
    ) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "AWS_", "DISTILLATIONJOB_"))
        }
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        for item in container.get("env") or ():
            if "value" in item:
                env[item["name"]] = self._host_path(str(item["value"]))
                continue
            ref = item.get("valueFrom") or {}
            if "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                if path == "metadata.namespace":
                    env[item["name"]] = pod_meta["namespace"]
                elif path.startswith("metadata.annotations['"):
                    env[item["name"]] = pod_meta["annotations"][path[len("metadata.annotations['") : -2]]
                else:
                    raise AssertionError(f"unsupported fieldRef {path}")
            elif "secretKeyRef" in ref:
                sk = ref["secretKeyRef"]
                value = (await self._secret(sk["name"])).get(sk["key"])
                if value is None:
                    assert sk.get("optional"), f"missing secret key {sk}"
                    continue
                env[item["name"]] = value
        for var in ("HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME"):  # the pod's writable /tmp
            env[var] = str(self.work / "tmp" / var.lower())
            Path(env[var]).mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = self.tmpdir  # short: multiprocessing puts AF_UNIX sockets (<= 107 chars) there
        env.update(CPU_FRIENDLY_ENV)  # a 2-core test node: no DA worker processes
        env["NNUNET_DISTILL_PROGRESS_INTERVAL_S"] = "0"
        env["TERMINATION_MESSAGE_PATH"] = str(termination)
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
        return env

    async def _run_container(
        self, job_name: str, container: dict, pod_meta: dict, index: int | None
    ) -> tuple[int, str]:
        termination = self.work / f"{job_name}-{index or 0}-{container['name']}.termination"
        termination.write_text("")
        env = await self._env(container, pod_meta, index, termination)
        argv = [
            self._host_path(a) for a in [*(container.get("command") or ()), *(container.get("args") or ())]
        ]
        log = self.work / f"{job_name}-{index or 0}-{container['name']}.log"
        with open(log, "wb") as fh:  # noqa: ASYNC230 - opening a local file is instant
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=fh, stderr=asyncio.subprocess.STDOUT
            )
            code = await proc.wait()
        if code != 0:
            self.errors.append(f"{job_name}/{container['name']} exited {code}:\n{log.read_text()[-3000:]}")
        return code, termination.read_text()

    async def run_job(self, job: dict) -> None:
        name = job["metadata"]["name"]
        self.ran.append(name)
        completions = int(job["spec"].get("completions") or 1)
        indexed = job["spec"].get("completionMode") == "Indexed"
        spec = job["spec"]["template"]["spec"]
        ok = True
        for i in range(completions):
            pod = pod_for(job, index=i)
            code, message, failed_container = 0, "", None
            for container in [*(spec.get("initContainers") or ()), *spec["containers"]]:
                code, message = await self._run_container(
                    name, container, pod["metadata"], i if indexed else None
                )
                if code != 0:
                    failed_container = container["name"]
                    break
            await self.clients.create_pod(pod)
            await self.clients.patch_pod_status(
                pod["metadata"]["name"],
                terminated_status(code, message, reason="Completed" if code == 0 else "Error"),
            )
            ok = ok and code == 0
            if failed_container:
                break
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status: dict[str, Any] = {"startTime": now, "completionTime": now} if ok else {"startTime": now}
        if ok:
            status.update(
                succeeded=completions,
                conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": now}],
            )
        else:
            status.update(
                failed=1,
                conditions=[
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                        "lastTransitionTime": now,
                    }
                ],
            )
        await self.clients.patch_job_status(name, status, NS)

    async def serve(self) -> None:
        while True:
            jobs = await asyncio.to_thread(self.clients.batch.list_namespaced_job, NS)
            for job in jobs.items:
                raw = self.clients.api_client.sanitize_for_serialization(job)
                if raw["metadata"]["name"] not in self.seen:
                    self.seen.add(raw["metadata"]["name"])
                    await self.run_job(raw)
            await asyncio.sleep(0.2)


def _spec(endpoint_bucket_uri: str, quality_gate: dict[str, Any] | None = None) -> dict[str, Any]:
    cpu = {"gpus": 0, "cpu": "1", "memory": "4Gi"}
    # The session's teachers and this student train for a handful of iterations: the gate reports, not blocks,
    # unless a test asks for it (see test_an_undertrained_student_is_stopped_by_the_quality_gate).
    return {
        "dataset": {"id": 901},
        "storage": {"claimName": "nnunet-data"},
        "preprocess": {"mode": "Never"},
        "teachers": {"train": False},
        "student": {"reductionFactor": 2},
        "distillation": {"epochs": 2, "iterationsPerEpoch": 2, "valIterations": 1, "disableMirroring": True},
        "export": {"modelName": "spleen"},
        "qualityGate": quality_gate if quality_gate is not None else {"enforce": False},
        "resources": {"distill": cpu, "export": cpu, "gate": cpu, "publish": cpu, "sharedMemory": "1Gi"},
        "output": {"uri": endpoint_bucket_uri, "secretRef": {"name": SECRET}},
    }


async def _run_to_the_end(
    kmock, tmp_path, workspace, moto_endpoint, monkeypatch, spec: dict[str, Any]
) -> tuple[Kubelet, str]:
    """Apply one DistillationJob and play the cluster until it Succeeds or Fails; (kubelet, phase)."""
    declare_resources(kmock)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # the pods' reporter finds the API server through it
    await asyncio.to_thread(_s3(moto_endpoint).create_bucket, Bucket=BUCKET)
    clients = Clients(kubeconfig)
    config = controller.OperatorConfig(
        defaults=k8s.Defaults(
            image="registry.example/nnunet-distill-trainer:e2e", service_account="nnunet-distill-trainer"
        ),
        metrics_port=0,
        metrics_addr="127.0.0.1",
        resync_seconds=3600,
        kubeconfig=str(kubeconfig),
    )
    operator = OperatorRunner(config)
    work = tmp_path / "kubelet"
    work.mkdir()
    kubelet = Kubelet(clients, workspace.root, work)
    await operator.start()
    node = asyncio.create_task(kubelet.serve())
    try:
        await asyncio.to_thread(
            clients.core.create_namespaced_secret,
            NS,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET},
                "stringData": {},
                "data": {
                    k: base64.b64encode(v.encode()).decode()
                    for k, v in {
                        "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": moto_endpoint,
                        "STORAGE_ALLOW_HTTP": "true",
                    }.items()
                },
            },
        )
        body = {
            "apiVersion": f"{api.GROUP}/{api.VERSION}",
            "kind": api.KIND,
            "metadata": {"name": NAME, "namespace": NS},
            "spec": spec,
        }
        await clients.create_dj(body, NS)
        expect_failure = spec.get("qualityGate", {}).get("enforce", True)

        def phase() -> str | None:
            if kubelet.errors and not expect_failure:
                raise AssertionError("\n".join(kubelet.errors))
            p = (get(kmock, dj_key(kmock, NAME, NS)).get("status") or {}).get("phase")
            return p if p in ("Succeeded", "Failed") else None

        finished = await wait_for(phase, timeout=540, interval=0.5, what="a finished DistillationJob")
    finally:
        node.cancel()
        await asyncio.gather(node, return_exceptions=True)
        await operator.stop()
        clients.close()
        shutil.rmtree(kubelet.tmpdir, ignore_errors=True)
    return kubelet, finished


async def test_an_undertrained_student_is_stopped_by_the_quality_gate(
    kmock, tmp_path, workspace, moto_endpoint, monkeypatch
):
    """One iteration of training: the gate fails it, nothing is published, the job says why with figures."""
    spec = _spec(f"s3://{BUCKET}/spleen", {"minRetention": 0.97, "minLabelRetention": 0.9, "enforce": True})
    spec["distillation"].update(epochs=1, iterationsPerEpoch=1)
    kubelet, finished = await _run_to_the_end(kmock, tmp_path, workspace, moto_endpoint, monkeypatch, spec)
    status = get(kmock, dj_key(kmock, NAME, NS))["status"]
    assert finished == "Failed", json.dumps(status, indent=1)
    assert status["reason"] == "QualityGateFailed"
    assert kubelet.ran == [k8s.job_name(NAME, s) for s in ("distill", "export", "gate")]  # never publish
    assert _s3(moto_endpoint).list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    gate = {c["type"]: c for c in status["conditions"]}["QualityGate"]
    assert gate["status"] == "False" and gate["reason"] == "QualityGateFailed"
    assert (
        "test_set" in gate["message"] and "0.97" in gate["message"]
    )  # the figures, the threshold, the cases
    # the student and its export stay on the volume for inspection
    results = workspace.results / "Dataset901_Synth"
    fold = results / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres" / "fold_0"
    summary = json.loads((fold / "validation" / "distillation_summary.json").read_text())
    assert (fold / "checkpoint_final.pth").is_file() and summary["evaluation"] == "test_set"
    assert list(workspace.root.glob("**/export/model.onnx")), "the export stays for inspection"
    metrics = status["metrics"]
    assert metrics["evaluatedOn"].startswith("test_set") and metrics["teacherFolds"] == [0, 1]


async def test_apply_to_succeeded_with_a_verified_model_in_the_bucket(
    kmock, tmp_path, workspace, moto_endpoint, monkeypatch
):
    kubelet, finished = await _run_to_the_end(
        kmock, tmp_path, workspace, moto_endpoint, monkeypatch, _spec(f"s3://{BUCKET}/spleen")
    )
    assert finished == "Succeeded", json.dumps(get(kmock, dj_key(kmock, NAME, NS)).get("status"), indent=1)

    assert kubelet.ran == [k8s.job_name(NAME, s) for s in ("distill", "export", "gate", "publish")]
    status = get(kmock, dj_key(kmock, NAME, NS))["status"]
    artifacts, progress, metrics = status["artifacts"], status["progress"], status["metrics"]

    # the bucket holds a complete, verified version, and the status names exactly it
    s3 = _s3(moto_endpoint)
    latest = s3.get_object(Bucket=BUCKET, Key="spleen/LATEST")["Body"].read().decode().strip()
    assert artifacts["uri"] == f"s3://{BUCKET}/spleen/{latest}"
    marker = json.loads(s3.get_object(Bucket=BUCKET, Key=f"spleen/{latest}/_PUBLISHED")["Body"].read())
    sums = s3.get_object(Bucket=BUCKET, Key=f"spleen/{latest}/SHA256SUMS")["Body"].read().decode()
    listed = dict(reversed(line.split(maxsplit=1)) for line in sums.splitlines() if line.strip())
    total = 0
    for rel, digest in listed.items():
        data = s3.get_object(Bucket=BUCKET, Key=f"spleen/{latest}/{rel.lstrip('*')}")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == digest, rel
        total += len(data)
    assert marker["version"] == latest and artifacts["sizeBytes"] >= total
    onnx_key = next(r for r in listed if r.endswith(".onnx"))
    assert artifacts["sha256"] == listed[onnx_key]

    # parameter counts and metrics from the distill pod, progress from its reporter
    assert 0 < artifacts["studentParameters"] < artifacts["teacherParameters"]
    assert 0 <= metrics["finalDice"] <= 1 and "retention" in metrics
    assert progress["epoch"] == 2 and progress["totalEpochs"] == 2 and progress["lastCheckpointEpoch"] == 2
    assert progress["stage"] == "distill" and progress["trainLoss"] is not None and "kdLoss" in progress
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["PublishComplete"]["status"] == "True"
