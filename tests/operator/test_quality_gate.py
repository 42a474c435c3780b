"""The quality gate on the operator's side: the QualityGate condition, a blocking failure (phase Failed,
reason QualityGateFailed, no publish, the student kept), a failure that is only reported (enforce: false), in
the pure reconciliation, in the running operator against kmock, and in the local executor.

Gate verdicts come from the real gate (`nnunet_distill.gate` / `nnunet-distill gate`) judging hand-written
distillation summaries (schema 2, the distill stage's output); the tests play the kubelet, as elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from nnunet_distill import gate as trainer_gate
from nnunet_distill_operator import api, k8s, local, metrics, plan
from nnunet_distill_operator.reconcile import decide

from tests.operator.conftest import dj
from tests.operator.harness import (
    Clients,
    OperatorRunner,
    get,
    job_key,
    pod_for,
    terminated_status,
    wait_for,
)
from tests.operator.test_controller import COMPLETE, cond, events, job_appears, job_creations, status
from tests.operator.test_metrics import scrape, value
from tests.operator.test_reconcile import NOW, _progress_to, applied, cr, done, failed, job
from tests.operator.test_reconcile import cond as cond_of

SPEC = {
    "dataset": {"id": 27},
    "storage": {"claimName": "data"},
    "preprocess": {"mode": "Never"},
    "output": {"uri": "s3://models/liver"},
}
STUDENT_FOLDER = "/data/nnUNet_results/Dataset027_Liver/nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"
TEACHER = {"organ": 0.98, "lesion": 0.92, "vessel": 0.98}


def distillation_summary(student: dict[str, float], *, model_folder: str = STUDENT_FOLDER) -> dict[str, Any]:
    """A schema-2 distillation summary of a held-out evaluation on 6 imagesTs cases against teacher folds 0 1
    2."""
    per = {k: student[k] / TEACHER[k] for k in TEACHER}
    s_mean, t_mean = sum(student.values()) / 3, sum(TEACHER.values()) / 3
    worst = min(per, key=per.get)
    return {
        "schema_version": 2,
        "evaluation": "test_set",
        "note": "held-out test cases",
        "cases": {
            "ids": [f"case_{i}" for i in range(6)],
            "count": 6,
            "source": "imagesTs",
            "mirroring_tta": True,
        },
        "student": {"model_folder": model_folder, "fold": 0, "dice": student, "mean_dice": s_mean},
        "teacher_ensemble": {"folds": [0, 1, 2], "dice": TEACHER, "mean_dice": t_mean},
        "retention": {"mean": s_mean / t_mean, "per_label": per, "worst_label": worst, "worst": per[worst]},
        "per_label": [],
    }


GOOD = distillation_summary({"organ": 0.975, "lesion": 0.90, "vessel": 0.97})  # retention 0.988, lesion 0.978
BAD = distillation_summary({"organ": 0.95, "lesion": 0.0, "vessel": 0.95})  # lesion lost: retention 0.66


def gate_message(summary: dict[str, Any], enforce: bool = True) -> dict[str, Any]:
    """What the gate pod leaves as its termination message (the real gate's verdict)."""
    verdict = trainer_gate.evaluate(summary, trainer_gate.Thresholds(enforce=enforce))
    return trainer_gate.termination_message(
        verdict, f"{STUDENT_FOLDER}/fold_0/validation/distillation_summary.json"
    )


def gate_pod(message: dict[str, Any], code: int, name: str = "liver-gate-abcde") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-03-01T11:55:00Z"},
        "status": terminated_status(code, message),
    }


def _at_gate(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    body = cr(spec=spec)
    jobs: dict[str, Any] = {}
    d = decide(body, jobs, {}, NOW)
    while True:
        body = applied(body, d)
        manifest = d.create[0]
        stage = manifest["metadata"]["labels"][k8s.LABEL_STAGE]
        if stage == "gate":
            jobs[stage] = job(manifest, active=1, ready=1, startTime="2026-03-01T11:50:00Z")
            return applied(body, decide(body, jobs, {}, NOW)), jobs, manifest
        jobs[stage] = done(manifest)
        d = decide(body, jobs, {}, NOW)


# ------------------------------------------------------------------------------------- pure reconciliation


def test_the_condition_says_not_evaluated_with_the_thresholds_until_the_gate_ran() -> None:
    d = decide(cr(), {}, {}, NOW)
    gate = cond_of(d.status, "QualityGate")
    assert (gate["status"], gate["reason"]) == ("Unknown", "NotEvaluated")
    assert "retention >= 0.97 and every label >= 0.9" in gate["message"]
    assert [c["type"] for c in d.status["conditions"]][-2:] == ["GateComplete", "QualityGate"]
    body, _, _ = _at_gate(SPEC)
    assert body["status"]["currentStage"] == "gate"
    assert cond_of(body["status"], "QualityGate")["reason"] == "NotEvaluated"


def test_a_passing_gate_reports_its_figures_and_cases_and_publishing_follows() -> None:
    body, jobs, manifest = _at_gate(SPEC)
    jobs["gate"] = done(manifest)
    message = gate_message(GOOD)
    d = decide(body, jobs, {"gate": [gate_pod(message, 0)]}, NOW)
    assert [m["metadata"]["name"] for m in d.create] == ["liver-publish"]
    gate = cond_of(d.status, "QualityGate")
    assert (gate["status"], gate["reason"]) == ("True", "QualityGatePassed")
    assert gate["message"] == message["gate"]["message"]
    assert "retention 0.988 >= 0.970, worst label lesion 0.978 >= 0.900" in gate["message"]
    assert "test_set: 6 cases (imagesTs)" in gate["message"] and "teacher folds 0 1 2" in gate["message"]
    assert d.status["metrics"] == {**message["metrics"]}
    assert d.status["metrics"]["worstLabel"] == "lesion" and d.status["metrics"]["teacherFolds"] == [0, 1, 2]
    assert ("Normal", "QualityGatePassed") in [(e.type, e.reason) for e in d.events]
    again = decide(applied(body, d), jobs, {"gate": [gate_pod(message, 0)]}, NOW)
    assert "QualityGatePassed" not in [e.reason for e in again.events]  # reported once


def test_an_enforced_failure_fails_the_job_never_publishes_and_keeps_the_student() -> None:
    body, jobs, manifest = _at_gate(SPEC)
    jobs["gate"] = failed(manifest, reason="PodFailurePolicy")
    message = gate_message(BAD)
    pod = gate_pod(message, trainer_gate.EXIT_GATE_FAILED)
    d = decide(body, jobs, {"gate": [pod]}, NOW)
    st = d.status
    assert d.create == ()  # publish never runs
    assert st["phase"] == "Failed" and st["reason"] == "QualityGateFailed"
    verdict = message["gate"]["message"]
    assert verdict.startswith(
        "quality gate failed: retention 0.660 < 0.970; worst label lesion retention 0.000"
    )
    assert st["message"] == (
        f"{verdict}; not published: the student ({STUDENT_FOLDER}/fold_0) and its export "
        "(/data/nnUNet_results/nnunet-distill/liver/package) stay on the results volume for "
        "inspection"
    )
    gate = cond_of(st, "QualityGate")
    assert (gate["status"], gate["reason"], gate["message"]) == ("False", "QualityGateFailed", verdict)
    assert (cond_of(st, "Stalled")["status"], cond_of(st, "Stalled")["reason"]) == (
        "True",
        "QualityGateFailed",
    )
    assert (cond_of(st, "Ready")["status"], cond_of(st, "Ready")["reason"]) == ("False", "QualityGateFailed")
    assert cond_of(st, "GateComplete")["reason"] == "QualityGateFailed"
    assert cond_of(st, "PublishComplete")["reason"] == "NotStarted" and "publish" not in st["stages"]
    assert [(e.type, e.reason) for e in d.events] == [
        ("Warning", "QualityGateFailed")
    ]  # not also StageFailed
    assert "not published" in d.events[0].message
    assert st["metrics"]["retention"] == pytest.approx(BAD["retention"]["mean"])
    assert (st["metrics"]["worstLabel"], st["metrics"]["worstLabelRetention"]) == ("lesion", 0.0)
    assert d.finished_stages[0][:2] == ("gate", "Failed")

    # Later passes, with the gate pod (or even its Job) gone: the verdict and the reason stand, nothing new.
    body = applied(body, d)
    for later_jobs in (jobs, {k: v for k, v in jobs.items() if k != "gate"}):
        again = decide(body, later_jobs, {}, NOW)
        assert again.status_patch is None and again.events == () and again.create == ()


def test_a_failure_not_enforced_is_reported_and_the_job_publishes() -> None:
    spec = {**SPEC, "qualityGate": {"enforce": False}}
    body, jobs, manifest = _at_gate(spec)
    assert "--no-enforce" in manifest["spec"]["template"]["spec"]["containers"][0]["args"]
    jobs["gate"] = done(manifest)
    message = gate_message(BAD, enforce=False)
    assert message["ok"] is False and "error" not in message
    d = decide(body, jobs, {"gate": [gate_pod(message, 0)]}, NOW)
    assert [m["metadata"]["name"] for m in d.create] == ["liver-publish"]
    gate = cond_of(d.status, "QualityGate")
    assert (gate["status"], gate["reason"]) == ("False", "QualityGateNotEnforced")
    assert "retention 0.660 < 0.970" in gate["message"]
    assert d.status["phase"] == "Running" and d.status.get("reason") is None
    warnings = [e for e in d.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["QualityGateNotEnforced"] and "publishing anyway" in warnings[
        0
    ].message


def test_a_gate_that_cannot_read_the_summary_fails_the_stage_without_a_verdict() -> None:
    body, jobs, manifest = _at_gate(SPEC)
    jobs["gate"] = failed(manifest, reason="PodFailurePolicy")
    error = {
        "stage": "gate",
        "ok": False,
        "error": {
            "reason": "SummaryNotFound",
            "message": "no distillation summary matches /data/nnUNet_results/Dataset027_*/x",
        },
    }
    d = decide(body, jobs, {"gate": [gate_pod(error, 2)]}, NOW)
    assert d.status["phase"] == "Failed" and d.status["reason"] == "StageFailed"
    assert "SummaryNotFound" in d.status["message"]
    assert cond_of(d.status, "GateComplete")["reason"] == "SummaryNotFound"
    gate = cond_of(d.status, "QualityGate")
    assert (gate["status"], gate["reason"]) == ("Unknown", "NotEvaluated")
    assert gate["message"].startswith("the gate stage failed before reaching a verdict")
    assert [e.reason for e in d.events] == ["StageFailed"]


def test_quality_gate_spec_defaults_and_field_named_errors() -> None:
    spec = api.parse_spec({"dataset": {"id": 1}, "storage": {"claimName": "d"}})
    assert (
        spec.quality_gate.min_retention,
        spec.quality_gate.min_label_retention,
        spec.quality_gate.enforce,
    ) == (0.97, 0.90, True)
    assert api.spec_to_dict(spec)["qualityGate"] == {
        "minRetention": 0.97,
        "minLabelRetention": 0.9,
        "enforce": True,
    }
    with pytest.raises(api.InvalidSpec) as info:
        api.parse_spec(
            {
                "dataset": {"id": 1},
                "storage": {"claimName": "d"},
                "qualityGate": {"minRetention": 0, "minLabelRetention": 2, "enforce": "yes", "min": 1},
                "resources": {"gate": {"gpus": 1}},
            }
        )
    problems = info.value.problems
    assert any(p.startswith("spec.qualityGate.minRetention: ") and "greater than 0" in p for p in problems)
    assert any(p.startswith("spec.qualityGate.minLabelRetention: ") and "1.5" in p for p in problems)
    assert any(p.startswith("spec.qualityGate.enforce: ") for p in problems)
    assert any(p.startswith("spec.qualityGate.min: unknown field") for p in problems)
    assert any(p.startswith("spec.resources.gate: ") and "CPU only" in p for p in problems)


def test_the_gate_thresholds_may_change_until_the_gate_runs() -> None:
    """They shape only the gate Job, which does not exist yet while the student trains."""
    body, jobs, manifest = _progress_to("distill", SPEC)
    body["spec"]["qualityGate"] = {"minRetention": 0.9, "enforce": False}
    body["metadata"]["generation"] = 2
    jobs["distill"] = done(manifest)
    d = decide(body, jobs, {}, NOW)
    assert d.status.get("reason") is None and cond_of(d.status, "Stalled")["status"] == "False"
    body = applied(body, d)
    jobs["export"] = done(d.create[0])
    d = decide(body, jobs, {}, NOW)
    argv = d.create[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert argv[argv.index("--min-retention") + 1] == "0.9" and argv[-1] == "--no-enforce"


# ------------------------------------------------------------------------------------ operator + kmock


async def test_operator_fails_the_job_on_the_gates_verdict_and_never_creates_publish(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    spec = {
        "dataset": {"id": 27},
        "storage": {"claimName": "nnunet-data"},
        "preprocess": {"mode": "Never"},
        "output": {"uri": "s3://models/kidney", "secretRef": {"name": "s3"}},
    }
    await clients.create_dj(dj("kidney", spec))
    for stage in ("distill", "export"):
        await job_appears(kmock, f"kidney-{stage}")
        await clients.patch_job_status(f"kidney-{stage}", COMPLETE)
    gate_job = await job_appears(kmock, "kidney-gate")
    await wait_for(
        lambda: cond(kmock, "kidney", "QualityGate").get("reason") == "NotEvaluated", what="NotEvaluated"
    )
    main = gate_job["spec"]["template"]["spec"]["containers"][0]
    assert main["args"][:2] == ["nnunet-distill", "gate"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]},
    } in gate_job["spec"]["podFailurePolicy"]["rules"]

    # The kubelet: the gate pod exits 3 with its verdict; the Job controller applies the FailJob rule.
    pod = pod_for(gate_job)
    await clients.create_pod(pod)
    folder = "/data/nnUNet_results/Dataset027_Kidney/nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"
    message = trainer_gate.termination_message(
        trainer_gate.evaluate(
            distillation_summary({"organ": 0.95, "lesion": 0.0, "vessel": 0.95}, model_folder=folder),
            trainer_gate.Thresholds(),
        ),
        f"{folder}/fold_0/validation/distillation_summary.json",
    )
    await clients.patch_pod_status(
        pod["metadata"]["name"],
        terminated_status(3, message, reason="Error"),
    )
    await asyncio.sleep(0.1)  # separate watch events, as in a cluster: the pod ends before its Job does
    await clients.patch_job_status(
        "kidney-gate",
        {
            "failed": 1,
            "startTime": "2026-03-01T11:00:00Z",
            "conditions": [
                {
                    "type": "FailureTarget",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "Container main for pod default/kidney-gate-0-abcde failed with exit code 3 "
                    "matching FailJob rule at index 2",
                },
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "Container main for pod default/kidney-gate-0-abcde failed with exit code 3 "
                    "matching FailJob rule at index 2",
                },
            ],
        },
    )

    await wait_for(lambda: status(kmock, "kidney").get("phase") == "Failed", what="Failed")
    st = status(kmock, "kidney")
    verdict = message["gate"]["message"]
    assert st["reason"] == "QualityGateFailed"
    assert st["message"].startswith(verdict) and f"the student ({folder}/fold_0)" in st["message"]
    assert "stay on the results volume" in st["message"]
    gate = cond(kmock, "kidney", "QualityGate")
    assert (gate["status"], gate["reason"], gate["message"]) == ("False", "QualityGateFailed", verdict)
    assert "retention 0.660 < 0.970" in verdict and "test_set: 6 cases (imagesTs)" in verdict
    assert cond(kmock, "kidney", "Stalled")["reason"] == "QualityGateFailed"
    assert (
        st["metrics"]["worstLabel"] == "lesion"
        and st["metrics"]["evaluatedOn"] == "test_set: 6 cases (imagesTs)"
    )
    await wait_for(
        lambda: "QualityGateFailed" in [r for _, r, _ in events(kmock, "kidney")], what="Warning event"
    )
    assert ("Warning", "QualityGateFailed") in [(t, r) for t, r, _ in events(kmock, "kidney")]
    assert "StageFailed" not in [r for _, r, _ in events(kmock, "kidney")]
    # The decision that failed the job is the one that would have created publish: it never did.
    assert job_creations(kmock) == ["kidney-distill", "kidney-export", "kidney-gate"]
    assert get(kmock, job_key(kmock, "kidney-publish")) == {}

    await wait_for(
        lambda: metrics.JOBS._jobs.get(("default", "kidney"), ("",))[0] == "Failed", what="metrics view"
    )
    scraped = await scrape(operator.metrics_port)
    assert (
        value(
            scraped, "nnunet_distill_quality_gate_passed", namespace="default", name="kidney", enforced="true"
        )
        == 0
    )
    assert (
        value(
            scraped,
            "nnunet_distill_worst_label_retention",
            namespace="default",
            name="kidney",
            label="lesion",
        )
        == 0
    )
    assert value(
        scraped, "nnunet_distill_dice_retention", namespace="default", name="kidney"
    ) == pytest.approx(message["metrics"]["retention"])


# ------------------------------------------------------------------------------------------- local runs


def _local(tmp_path: Path, spec: dict[str, Any]) -> tuple[plan.DataPaths, list[plan.Stage]]:
    paths = plan.DataPaths(
        str(tmp_path / "raw"), str(tmp_path / "pre"), str(tmp_path / "results"), str(tmp_path / "work")
    )
    parsed = api.parse_spec(
        {"dataset": {"id": 27}, "storage": {"claimName": "d"}, "preprocess": {"mode": "Never"}, **spec}
    )
    stages = [
        s for s in plan.plan(parsed, name="local", paths=paths, device="cpu") if s.name in ("gate", "publish")
    ]
    return paths, stages


def _write_summary(tmp_path: Path, doc: dict[str, Any]) -> Path:
    folder = (
        tmp_path / "results" / "Dataset027_Liver" / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"
    )
    path = folder / "fold_0" / "validation" / "distillation_summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**doc, "student": {**doc["student"], "model_folder": str(folder)}}))
    return path


def _runner(paths: plan.DataPaths, out: io.StringIO) -> local.LocalRunner:
    return local.LocalRunner(
        name="local", paths=paths, workdir=Path(paths.work), env={"PATH": "/usr/bin:/bin"}, out=out
    )


def test_local_run_stops_at_a_failing_gate_and_never_publishes(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    paths, stages = _local(tmp_path, {"output": {"uri": f"file://{bucket}"}})
    assert [s.name for s in stages] == ["gate", "publish"]
    summary = _write_summary(tmp_path, BAD)
    out = io.StringIO()
    with pytest.raises(local.LocalRunError) as info:
        _runner(paths, out).run(stages)
    first, *rest = str(info.value).splitlines()
    assert first.startswith(
        "quality gate failed: retention 0.660 < 0.970; worst label lesion retention 0.000"
    )
    assert f"the student ({summary.parents[2]}/fold_0) and its export ({tmp_path}/work/package)" in first
    assert f"  summary: {summary}" in rest
    assert "[publish]" not in out.getvalue() and not bucket.exists()

    on_disk = yaml.safe_load((tmp_path / "work" / "status.yaml").read_text())
    assert on_disk == info.value.status == json.loads((tmp_path / "work" / "status.json").read_text())
    assert (on_disk["phase"], on_disk["reason"]) == ("Failed", "QualityGateFailed")
    assert on_disk["stages"]["gate"]["reason"] == "QualityGateFailed" and "publish" not in on_disk["stages"]
    conditions = {c["type"]: c for c in on_disk["conditions"]}
    assert (conditions["QualityGate"]["status"], conditions["QualityGate"]["reason"]) == (
        "False",
        "QualityGateFailed",
    )
    assert "test_set: 6 cases (imagesTs)" in conditions["QualityGate"]["message"]
    assert conditions["Stalled"]["reason"] == "QualityGateFailed"
    assert on_disk["metrics"]["worstLabel"] == "lesion" and on_disk["metrics"]["teacherFolds"] == [0, 1, 2]
    assert on_disk["metrics"]["retention"] == pytest.approx(BAD["retention"]["mean"])


def test_local_run_passes_the_gate_and_records_the_verdict(tmp_path: Path) -> None:
    paths, stages = _local(tmp_path, {})
    assert [s.name for s in stages] == ["gate"]
    _write_summary(tmp_path, GOOD)
    out = io.StringIO()
    result = _runner(paths, out).run(stages)
    assert result["phase"] == "Succeeded"
    assert "[gate] quality gate passed: retention 0.988 >= 0.970" in out.getvalue()
    gate = next(c for c in result["conditions"] if c["type"] == "QualityGate")
    assert (gate["status"], gate["reason"]) == ("True", "QualityGatePassed")
    assert result["metrics"]["worstLabel"] == "lesion" and result["metrics"]["evaluatedOn"].startswith(
        "test_set"
    )


def test_local_run_reports_a_failure_that_is_not_enforced_and_goes_on(tmp_path: Path) -> None:
    paths, stages = _local(tmp_path, {"qualityGate": {"enforce": False}})
    _write_summary(tmp_path, BAD)
    result = _runner(paths, io.StringIO()).run(stages)
    assert result["phase"] == "Succeeded"
    gate = next(c for c in result["conditions"] if c["type"] == "QualityGate")
    assert (gate["status"], gate["reason"]) == ("False", "QualityGateNotEnforced")
