"""/metrics of the running operator, scraped over HTTP and parsed; and kopf's liveness endpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import urllib.request
from typing import Any

from nnunet_distill_operator import metrics
from prometheus_client.parser import text_string_to_metric_families

from tests.external import promtool
from tests.operator.conftest import dj
from tests.operator.harness import (
    OperatorRunner,
    dj_key,
    exists,
    get,
    job_key,
    pod_for,
    terminated_status,
    wait_for,
)


async def scrape_text(port: int) -> str:
    return await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )


def promtool_check_metrics(text: str) -> None:
    """Prometheus' own linter over a real scrape (format, naming, HELP/TYPE, counters' _total)."""
    proc = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


async def scrape(port: int) -> dict[str, list[Any]]:
    text = await scrape_text(port)
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        families.setdefault(family.name, []).extend(family.samples)
        families.setdefault(
            family.name + ("_total" if family.type == "counter" else ""), families[family.name]
        )
    return families


def value(families: dict[str, list[Any]], sample: str, **labels: str) -> float | None:
    for family in families.values():
        for s in family:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def test_metrics_are_served_parsed_and_follow_the_jobs(
    kmock: Any, clients: Any, operator: OperatorRunner
) -> None:
    before = await scrape(operator.metrics_port)
    for name in metrics.METRIC_NAMES:  # every advertised family is exported (dashboards query these)
        assert name in before, name
    created_before = value(before, "nnunet_distill_stage_jobs_created_total", stage="distill") or 0.0

    await clients.create_dj(dj("heart", preprocess={"mode": "Never"}))
    await wait_for(lambda: exists(kmock, job_key(kmock, "heart-distill")), what="Job")
    await wait_for(lambda: get(kmock, dj_key(kmock, "heart")).get("status", {}).get("phase"), what="status")
    after = await scrape(operator.metrics_port)
    assert value(after, "nnunet_distill_stage_jobs_created_total", stage="distill") == created_before + 1
    assert value(after, "nnunet_distill_jobs", namespace="default", phase="Pending") == 1
    assert value(after, "nnunet_distill_jobs", namespace="default", phase="Running") == 0
    assert (
        value(after, "nnunet_distill_reconcile_total", trigger="distillationjob", result="changed") or 0
    ) >= 1
    assert (
        value(after, "nnunet_distill_reconcile_duration_seconds_count", trigger="distillationjob") or 0
    ) >= 1
    assert (value(after, "nnunet_distill_job_start_latency_seconds_count") or 0) >= 1
    assert value(after, "nnunet_distill_operator_info", version=metrics.__version__) == 1

    # A training pod reports progress through the status subresource; the gauges follow.
    progress = {
        "stage": "distill",
        "epoch": 12,
        "totalEpochs": 100,
        "trainLoss": -0.61,
        "kdLoss": 0.08,
        "pseudoDice": 0.83,
        "etaSeconds": 5400,
        "updatedAt": "2026-03-01T12:00:00Z",
    }
    await asyncio.to_thread(
        clients.custom.patch_namespaced_custom_object_status,
        "distillation.nnunet.io",
        "v1alpha1",
        "default",
        "distillationjobs",
        "heart",
        {"status": {"progress": progress}},
        _content_type="application/merge-patch+json",
    )
    labels = {"namespace": "default", "name": "heart", "stage": "distill"}

    async def gauge(sample: str) -> float | None:
        return value(await scrape(operator.metrics_port), sample, **labels)

    deadline = asyncio.get_running_loop().time() + 10
    while await gauge("nnunet_distill_epoch") != 12:
        assert asyncio.get_running_loop().time() < deadline, "epoch gauge never appeared"
        await asyncio.sleep(0.05)
    now = await scrape(operator.metrics_port)
    promtool_check_metrics(await scrape_text(operator.metrics_port))  # with per-job series present
    assert value(now, "nnunet_distill_pseudo_dice", **labels) == 0.83
    assert value(now, "nnunet_distill_kd_loss", **labels) == 0.08
    assert value(now, "nnunet_distill_train_loss", **labels) == -0.61
    assert value(now, "nnunet_distill_total_epochs", **labels) == 100
    assert value(now, "nnunet_distill_eta_seconds", **labels) == 5400
    assert value(now, "nnunet_distill_progress_updated_timestamp_seconds", **labels) == 1772366400.0
    assert get(kmock, dj_key(kmock, "heart"))["status"]["progress"]["epoch"] == 12  # the operator kept it

    # The distill pod's termination summary carries the final accuracy (status.metrics).
    job = get(kmock, job_key(kmock, "heart-distill"))
    pod = pod_for(job)
    await clients.create_pod(pod)
    summary = {
        "stage": "distill",
        "ok": True,
        "metrics": {"finalDice": 0.82, "teacherDice": 0.84, "retention": 0.976},
    }
    await clients.patch_pod_status(
        pod["metadata"]["name"],
        terminated_status(0, summary, reason="Completed"),
    )

    # Finished jobs drop out of the per-job series (bounded cardinality).
    complete = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    await clients.patch_job_status("heart-distill", complete)
    await wait_for(lambda: exists(kmock, job_key(kmock, "heart-export")), what="export Job")
    await clients.patch_job_status("heart-export", complete)
    await wait_for(lambda: exists(kmock, job_key(kmock, "heart-gate")), what="gate Job")
    gate_pod = pod_for(get(kmock, job_key(kmock, "heart-gate")))
    await clients.create_pod(gate_pod)
    verdict = {
        "stage": "gate",
        "ok": True,
        "gate": {"passed": True, "enforced": True, "message": "passed"},
        "metrics": {"worstLabelRetention": 0.95, "worstLabel": "vessel"},
    }
    await clients.patch_pod_status(
        gate_pod["metadata"]["name"],
        terminated_status(0, verdict, reason="Completed"),
    )
    await asyncio.sleep(0.1)
    await clients.patch_job_status("heart-gate", complete)
    await wait_for(
        lambda: get(kmock, dj_key(kmock, "heart"))["status"].get("phase") == "Succeeded", what="done"
    )
    await wait_for(lambda: metrics.JOBS._jobs.get(("default", "heart"), ("",))[0] == "Succeeded", what="view")
    done = await scrape(operator.metrics_port)
    promtool_check_metrics(await scrape_text(operator.metrics_port))  # with finished-stage histograms
    assert value(done, "nnunet_distill_epoch", **labels) is None
    assert value(done, "nnunet_distill_jobs", namespace="default", phase="Succeeded") == 1
    assert (
        value(done, "nnunet_distill_stage_duration_seconds_count", stage="distill", result="Succeeded") or 0
    ) >= 1
    assert get(kmock, dj_key(kmock, "heart"))["status"]["metrics"] == {
        **summary["metrics"],
        **verdict["metrics"],
    }
    assert value(done, "nnunet_distill_dice_retention", namespace="default", name="heart") == 0.976
    assert value(done, "nnunet_distill_final_dice", namespace="default", name="heart") == 0.82
    assert (
        value(done, "nnunet_distill_worst_label_retention", namespace="default", name="heart", label="vessel")
        == 0.95
    )
    assert (
        value(done, "nnunet_distill_quality_gate_passed", namespace="default", name="heart", enforced="true")
        == 1
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_liveness_endpoint_reports_the_operator(kmock: Any, clients: Any, operator_config: Any) -> None:
    port = _free_port()
    runner = OperatorRunner(operator_config)
    runner.liveness_endpoint = f"http://127.0.0.1:{port}/healthz"
    await runner.start()
    try:
        await clients.create_dj(dj("probe", preprocess={"mode": "Never"}))
        await wait_for(lambda: exists(kmock, dj_key(kmock, "probe")), what="object")

        def fetch() -> tuple[int, dict[str, Any]]:
            with urllib.request.urlopen(runner.liveness_endpoint, timeout=5) as resp:
                return resp.status, json.loads(resp.read())

        code, body = await asyncio.to_thread(fetch)
        assert code == 200 and "distillationjobs" in body
        await wait_for(lambda: operator_probe(runner) == 1, what="index populated")
    finally:
        await runner.stop()


def operator_probe(runner: OperatorRunner) -> int:
    return len(runner.state.djs)
