"""The operator running for real (kopf, in-process) against the kmock API server.

The tests play the Job controller and the kubelet: they patch Job status and create/patch pods the way
the cluster would, and observe only what the operator writes to the API (Jobs, status, Events).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from nnunet_distill_operator import api, k8s, rbac

from tests.operator.conftest import dj
from tests.operator.harness import (
    Clients,
    OperatorRunner,
    dj_key,
    exists,
    get,
    job_key,
    pod_for,
    terminated_status,
    wait_for,
)

COMPLETE = {
    "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-03-01T11:30:00Z"}],
    "succeeded": 1,
    "startTime": "2026-03-01T11:00:00Z",
    "completionTime": "2026-03-01T11:30:00Z",
}


def status(kmock: Any, name: str, namespace: str = "default") -> dict[str, Any]:
    return get(kmock, dj_key(kmock, name, namespace)).get("status") or {}


def cond(kmock: Any, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(kmock, name).get("conditions", []) if c["type"] == type_), {})


def events(kmock: Any, name: str) -> list[tuple[str, str, str]]:
    out = []
    for (res, _ns, _n), obj in list(kmock.objects.items()):
        if res.plural == "events" and not obj.deleted:
            raw = obj.raw
            if raw.get("involvedObject", {}).get("name") == name:
                out.append((raw["type"], raw["reason"], raw["message"]))
    return out


async def job_appears(kmock: Any, name: str, timeout: float = 10) -> dict[str, Any]:
    await wait_for(lambda: exists(kmock, job_key(kmock, name)), timeout=timeout, what=f"Job {name}")
    return get(kmock, job_key(kmock, name))


async def complete(clients: Clients, kmock: Any, cr: str, stage: str) -> None:
    await clients.patch_job_status(k8s.job_name(cr, stage), COMPLETE)
    await wait_for(
        lambda: status(kmock, cr).get("stages", {}).get(stage, {}).get("state") == "Succeeded",
        what=f"stage {stage} succeeded",
    )


def job_creations(kmock: Any) -> list[str]:
    """Every Job create request the API server received (409s included), by Job name."""
    return sorted(
        name
        for (plural, _ns, name), count in kmock.creations.items()
        if plural == "jobs"
        for _ in range(count)
    )


async def test_stages_run_in_order_with_gpus_mounts_env_and_owner(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    spec = {
        "dataset": {"id": 27},
        "storage": {"claimName": "nnunet-data"},
        "teachers": {"train": True, "folds": [0, 1, 2]},
        "output": {"uri": "s3://models/liver", "secretRef": {"name": "s3-creds"}},
    }
    created = await clients.create_dj(dj("liver", spec))
    uid = created["metadata"]["uid"]

    pre = await job_appears(kmock, "liver-preprocess")
    assert pre["metadata"]["ownerReferences"][0]["uid"] == uid
    assert pre["metadata"]["ownerReferences"][0]["kind"] == "DistillationJob"
    main = pre["spec"]["template"]["spec"]["containers"][0]
    assert main["image"] == "registry.example/nnunet-distill-trainer:test"
    assert {m["mountPath"] for m in main["volumeMounts"]} >= {
        "/data/nnUNet_raw",
        "/data/nnUNet_preprocessed",
        "/data/nnUNet_results",
        "/dev/shm",
    }
    assert pre["spec"]["template"]["spec"]["serviceAccountName"] == "liver-trainer"  # the job's own identity
    await wait_for(lambda: status(kmock, "liver").get("phase") == "Pending", what="Pending")
    assert not exists(kmock, job_key(kmock, "liver-teachers"))  # strictly one stage at a time

    await complete(clients, kmock, "liver", "preprocess")
    teachers = await job_appears(kmock, "liver-teachers")
    assert teachers["spec"]["completionMode"] == "Indexed" and teachers["spec"]["completions"] == 3
    limits = teachers["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    await clients.patch_job_status(
        "liver-teachers", {"active": 3, "ready": 3, "startTime": "2026-03-01T11:00:00Z"}
    )
    await wait_for(
        lambda: cond(kmock, "liver", "TeachersComplete").get("reason") == "Running", what="teachers running"
    )
    assert status(kmock, "liver")["phase"] == "Running"

    for stage in ("teachers", "distill", "export"):
        if stage != "teachers":
            await job_appears(kmock, f"liver-{stage}")
        await complete(clients, kmock, "liver", stage)

    # The quality gate: its pod passes the student and says so in its termination message.
    gate = await job_appears(kmock, "liver-gate")
    gate_pod = pod_for(gate)
    await clients.create_pod(gate_pod)
    verdict = {
        "stage": "gate",
        "ok": True,
        "gate": {
            "passed": True,
            "enforced": True,
            "reason": "QualityGatePassed",
            "message": "quality gate passed: retention 0.991 >= 0.970, worst label lesion 0.962 >= 0.900; "
            "evaluated on test_set: 6 cases (imagesTs), teacher folds 0 1 2",
        },
        "metrics": {
            "finalDice": 0.91,
            "teacherDice": 0.918,
            "retention": 0.991,
            "worstLabelRetention": 0.962,
            "worstLabel": "lesion",
            "evaluatedOn": "test_set: 6 cases (imagesTs)",
            "teacherFolds": [0, 1, 2],
        },
    }
    await clients.patch_pod_status(
        gate_pod["metadata"]["name"],
        terminated_status(0, verdict, reason="Completed"),
    )
    await asyncio.sleep(0.1)
    await complete(clients, kmock, "liver", "gate")

    publish = await job_appears(kmock, "liver-publish")
    env = {e["name"]: e for e in publish["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["AWS_REGION"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # The kubelet: the publish pod ran and left its summary as the termination message.
    pod = pod_for(publish)
    await clients.create_pod(pod)
    summary = {
        "stage": "publish",
        "ok": True,
        "artifacts": {
            "uri": "s3://models/liver/v1",
            "sha256": "a" * 64,
            "sizeBytes": 4096,
            "studentParameters": 1400000,
        },
    }
    await clients.patch_pod_status(
        pod["metadata"]["name"],
        terminated_status(0, summary, reason="Completed"),
    )
    await asyncio.sleep(0.1)
    await complete(clients, kmock, "liver", "publish")

    await wait_for(lambda: status(kmock, "liver").get("phase") == "Succeeded", what="Succeeded")
    final = status(kmock, "liver")
    assert final["artifacts"]["uri"] == "s3://models/liver/v1" and final["artifacts"]["sizeBytes"] == 4096
    assert cond(kmock, "liver", "Ready")["status"] == "True"
    assert cond(kmock, "liver", "Stalled")["status"] == "False"
    assert [c["type"] for c in final["conditions"]][4:] == [
        "PreprocessComplete",
        "TeachersComplete",
        "DistillComplete",
        "ExportComplete",
        "GateComplete",
        "PublishComplete",
        "QualityGate",
    ]
    assert cond(kmock, "liver", "QualityGate")["status"] == "True"
    assert cond(kmock, "liver", "QualityGate")["message"] == verdict["gate"]["message"]
    assert final["metrics"] == verdict["metrics"]
    assert final["observedGeneration"] == 1 and final["completionTime"]
    await wait_for(
        lambda: ("Normal", "Succeeded") in [(t, r) for t, r, _ in events(kmock, "liver")],
        what="Succeeded event",
    )
    reasons = [r for _, r, _ in events(kmock, "liver")]
    assert reasons.count("StageStarted") == 6 and reasons.count("StageSucceeded") == 6
    assert reasons.count("QualityGatePassed") == 1
    assert sorted(job_creations(kmock)) == sorted(
        f"liver-{s}" for s in ("preprocess", "teachers", "distill", "export", "gate", "publish")
    )

    # Every API call the operator made is granted by the RBAC rules the Helm chart is built from.
    granted = {(r.group, r.resource, v) for r in rbac.OPERATOR_RULES for v in r.verbs}
    made = set(kmock.operator_calls)  # (group, resource[/subresource], verb) of each call, server side
    assert made, "no operator requests recorded"
    assert made <= granted, made - granted


async def test_pod_causes_and_failure_reach_conditions_and_events(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    await clients.create_dj(dj("kidney", preprocess={"mode": "Never"}))
    job = await job_appears(kmock, "kidney-distill")
    pod = pod_for(job)
    await clients.create_pod(pod)
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    await clients.patch_pod_status(
        pod["metadata"]["name"],
        {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            ],
        },
    )
    await wait_for(
        lambda: cond(kmock, "kidney", "DistillComplete").get("reason") == "Unschedulable",
        what="Unschedulable condition",
    )
    assert cond(kmock, "kidney", "DistillComplete")["message"] == message
    assert cond(kmock, "kidney", "Reconciling")["status"] == "True"
    await wait_for(lambda: ("Warning", "Unschedulable", message) in events(kmock, "kidney"), what="event")

    await clients.patch_pod_status(
        pod["metadata"]["name"],
        terminated_status(137, reason="OOMKilled", conditions=[]),
    )
    await clients.patch_job_status(
        "kidney-distill",
        {
            "failed": 4,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        },
    )
    await wait_for(lambda: status(kmock, "kidney").get("phase") == "Failed", what="Failed")
    st = status(kmock, "kidney")
    assert st["reason"] == "StageFailed" and "OOMKilled" in st["message"]
    assert "spec.resources.distill.memory" in st["message"]
    assert cond(kmock, "kidney", "Stalled")["status"] == "True"
    assert cond(kmock, "kidney", "Ready")["status"] == "False"
    await wait_for(
        lambda: "StageFailed" in [r for _, r, _ in events(kmock, "kidney")], what="StageFailed event"
    )
    await handled_a_later_change(clients, kmock, "kidney")
    assert not exists(kmock, job_key(kmock, "kidney-export"))  # nothing runs after a failure


async def test_suspend_suspends_the_running_job_and_resume_resumes_it(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    await clients.create_dj(dj("spleen", preprocess={"mode": "Never"}))
    await job_appears(kmock, "spleen-distill")
    await clients.patch_job_status("spleen-distill", {"active": 1, "ready": 1})
    await wait_for(lambda: status(kmock, "spleen").get("phase") == "Running", what="Running")

    await clients.patch_dj("spleen", {"spec": {"suspend": True}})
    await wait_for(
        lambda: get(kmock, job_key(kmock, "spleen-distill"))["spec"].get("suspend") is True,
        what="Job suspended",
    )
    await clients.patch_job_status("spleen-distill", {"active": 0, "ready": 0})
    await wait_for(lambda: status(kmock, "spleen").get("phase") == "Suspended", what="Suspended phase")
    assert cond(kmock, "spleen", "Suspended")["status"] == "True"
    assert cond(kmock, "spleen", "Reconciling")["status"] == "False"
    assert status(kmock, "spleen")["observedGeneration"] == 2

    await clients.patch_dj("spleen", {"spec": {"suspend": False}})
    await wait_for(
        lambda: get(kmock, job_key(kmock, "spleen-distill"))["spec"].get("suspend") is False,
        what="Job resumed",
    )
    annotations = get(kmock, job_key(kmock, "spleen-distill"))["metadata"].get("annotations", {})
    assert "distillation.nnunet.io/suspended-by-operator" not in annotations
    await clients.patch_job_status("spleen-distill", {"active": 1, "ready": 1})
    await wait_for(lambda: status(kmock, "spleen").get("phase") == "Running", what="Running again")
    reasons = [r for _, r, _ in events(kmock, "spleen")]
    assert "Suspended" in reasons and "Resumed" in reasons


async def test_killed_and_restarted_operator_continues_without_duplicate_jobs(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    first = await OperatorRunner(operator_config).start()
    await clients.create_dj(dj("colon"))
    await job_appears(kmock, "colon-preprocess")
    await wait_for(lambda: status(kmock, "colon").get("stages", {}).get("preprocess"), what="status")
    await first.kill()  # no cleanup handlers, all memory lost

    # While the operator is down the Job finishes.
    await clients.patch_job_status("colon-preprocess", COMPLETE)
    assert not exists(kmock, job_key(kmock, "colon-distill"))  # no operator runs that could create it

    second = await OperatorRunner(operator_config).start()
    try:
        await job_appears(kmock, "colon-distill")
        await wait_for(
            lambda: status(kmock, "colon").get("currentStage") == "distill", what="status continues"
        )
        st = status(kmock, "colon")
        assert st["stages"]["preprocess"]["state"] == "Succeeded"
        assert st["startTime"]  # kept from the first run
        await handled_a_later_change(clients, kmock, "colon")
        creations = job_creations(kmock)
        assert sorted(creations) == ["colon-distill", "colon-preprocess"], creations  # each POSTed once
        reasons = [r for _, r, _ in events(kmock, "colon")]
        assert reasons.count("StageStarted") == 2
    finally:
        await second.stop()


def operator_writes(kmock: Any) -> list[tuple[str, str, str | None]]:
    """Every write request of the operator so far, in order: (verb, resource[/subresource], object name)."""
    out = []
    for request in list(kmock):
        agent = next((v for k, v in (request.headers or {}).items() if k.lower() == "user-agent"), "")
        action = str(getattr(request.action, "value", request.action)).lower()
        if agent.startswith(("nnunet-distill-operator", "kopf")) and action in ("create", "update", "delete"):
            sub = f"/{request.subresource}" if request.subresource else ""
            out.append((action, request.resource.plural + sub, request.name))
    return out


async def test_a_restarted_operator_writes_nothing_for_a_job_that_did_not_change(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """Issue 13 (8): catching up after a restart costs no API write for a job whose Jobs and spec did not
    change: no identity, Job or Event is sent again and the status is not rewritten; the only writes after the
    restart are those of a later spec change (a new generation, a safe field: the accepted spec and the
    status that reports it)."""
    first = await OperatorRunner(operator_config).start()
    await clients.create_dj(dj("calm", preprocess={"mode": "Never"}))
    await job_appears(kmock, "calm-distill")
    await wait_for(
        lambda: cond(kmock, "calm", "DistillComplete").get("reason") == "JobCreated", what="status"
    )
    await first.kill()
    before = len(operator_writes(kmock))

    second = await OperatorRunner(operator_config).start()
    try:
        await handled_a_later_change(clients, kmock, "calm")
        after = operator_writes(kmock)[before:]
        assert after == [("update", "distillationjobs/status", "calm")] * 2, after
    finally:
        await second.stop()


async def test_invalid_spec_stalls_without_jobs_until_fixed(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    await clients.create_dj(dj("bad", distillation={"alpha": 4}, teachers={"folds": [0, 9]}))
    await wait_for(lambda: status(kmock, "bad").get("reason") == "InvalidSpec", what="InvalidSpec")
    st = status(kmock, "bad")
    assert st["phase"] == "Failed" and "spec.distillation.alpha" in st["message"]
    assert cond(kmock, "bad", "Stalled")["status"] == "True"
    await handled_a_later_change(clients, kmock, "bad")
    assert not any(n.startswith("bad-") for n in job_creations(kmock))
    assert [r for _, r, _ in events(kmock, "bad")].count("InvalidSpec") == 1  # reported, not retried

    await clients.patch_dj("bad", {"spec": {"distillation": {"alpha": 0.4}}})
    await wait_for(
        lambda: "spec.teachers.folds[1]" in status(kmock, "bad").get("message", ""), what="next problem named"
    )
    await clients.patch_dj("bad", {"spec": {"teachers": {"folds": [0, 1]}}})
    await job_appears(kmock, "bad-preprocess")
    await wait_for(lambda: cond(kmock, "bad", "Stalled").get("status") == "False", what="not stalled")
    assert status(kmock, "bad")["observedGeneration"] == 4  # 3 spec changes (one by handled_a_later_change)


async def test_unsafe_spec_change_after_start_is_reported_and_ignored(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    await clients.create_dj(dj("lung", preprocess={"mode": "Never"}))
    await job_appears(kmock, "lung-distill")
    await clients.patch_dj("lung", {"spec": {"student": {"reductionFactor": 4}}})
    await wait_for(lambda: status(kmock, "lung").get("reason") == "SpecChangeRejected", what="rejected")
    assert "spec.student.reductionFactor" in status(kmock, "lung")["message"]
    assert cond(kmock, "lung", "Stalled")["status"] == "True"
    await clients.patch_job_status("lung-distill", COMPLETE)
    export = await job_appears(kmock, "lung-export")
    argv = export["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert argv[argv.index("-r") + 1] == "2"  # the accepted spec, not the edit
    await clients.patch_dj("lung", {"spec": {"student": {"reductionFactor": 2}}})  # reverted
    await wait_for(lambda: cond(kmock, "lung", "Stalled").get("status") == "False", what="stall cleared")


async def test_deleting_the_job_collects_its_jobs_and_drops_its_metrics(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    from nnunet_distill_operator import metrics

    await clients.create_dj(dj("brain", preprocess={"mode": "Never"}))
    await job_appears(kmock, "brain-distill")
    await wait_for(lambda: ("default", "brain") in metrics.JOBS._jobs, what="metrics entry")
    await clients.delete_dj("brain")
    await wait_for(lambda: not exists(kmock, job_key(kmock, "brain-distill")), what="Job garbage-collected")
    await wait_for(lambda: ("default", "brain") not in metrics.JOBS._jobs, what="metrics dropped")
    assert not get(kmock, dj_key(kmock, "brain")).get("metadata", {}).get("finalizers")


async def test_a_deletion_during_a_reconcile_does_not_bring_back_its_metrics(
    kmock: Any, clients: Clients, operator: OperatorRunner, monkeypatch: Any
) -> None:
    """A resync pass reconciles the DistillationJob while its DELETED event arrives: the pass in flight must
    not re-add the metrics series (nor the status) that the deletion dropped: one leaked series per job."""
    import threading

    from nnunet_distill_operator import controller, metrics

    await clients.create_dj(dj("heart", preprocess={"mode": "Never"}))
    await job_appears(kmock, "heart-distill")
    await wait_for(lambda: ("default", "heart") in metrics.JOBS._jobs, what="metrics entry")
    body = operator.state.djs[("default", "heart")]
    paused, go, forgotten, waiting = (threading.Event() for _ in range(4))
    real_reconcile, real_forget, real_lock = (
        controller._reconcile_locked,
        controller._forget,
        operator.state.lock,
    )

    def reconcile_paused(state: Any, body: dict[str, Any], key: Any, trigger: str) -> Any:
        if trigger == "resync" and not go.is_set():  # the test's own pass, below
            paused.set()
            go.wait(timeout=30)  # until the deletion has reached the operator
        return real_reconcile(state, body, key, trigger)

    def forget_seen(state: Any, namespace: str, name: str, uid: str) -> None:
        real_forget(state, namespace, name, uid)
        forgotten.set()

    def lock_seen(namespace: str, name: str) -> threading.Lock:
        if name == "heart" and paused.is_set():
            waiting.set()  # another handler now waits for the paused pass
        return real_lock(namespace, name)

    monkeypatch.setattr(controller, "_reconcile_locked", reconcile_paused)
    monkeypatch.setattr(controller, "_forget", forget_seen)
    monkeypatch.setattr(operator.state, "lock", lock_seen)
    # A resync pass, as the resync loop runs one (in a thread: the API server shares this test's event loop).
    # The job is settled, so the pass writes no status; it would only update the metrics.
    in_flight = asyncio.ensure_future(
        asyncio.to_thread(controller.reconcile_one, operator.state, body, "resync")
    )
    try:
        await wait_for(paused.is_set, what="a reconcile in flight")
        await clients.delete_dj("heart")
        # The DELETED handler has run, or waits for the lock: either way the paused pass may go on.
        await wait_for(lambda: forgotten.is_set() or waiting.is_set(), what="the deletion under way")
    finally:
        go.set()
    await in_flight
    await wait_for(lambda: ("default", "heart") not in operator.state.djs, what="the job forgotten")
    await wait_for(lambda: ("default", "heart") not in metrics.JOBS._jobs, what="metrics dropped")
    assert not [k for k in operator.state.owned_status if k[1] == "heart"]  # nothing kept for it either
    # The resync loop may still hold the body from before the deletion: reconciling it now does nothing.
    assert await asyncio.to_thread(controller.reconcile_one, operator.state, body, "resync") is None
    assert ("default", "heart") not in metrics.JOBS._jobs


async def test_ttl_after_finished_deletes_the_job(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    await clients.create_dj(dj("short", preprocess={"mode": "Never"}, ttlSecondsAfterFinished=0))
    for stage in ("distill", "export", "gate"):
        await job_appears(kmock, f"short-{stage}")
        await clients.patch_job_status(f"short-{stage}", COMPLETE)
    await wait_for(lambda: not exists(kmock, dj_key(kmock, "short")), what="DistillationJob deleted by TTL")


async def test_many_jobs_are_all_reconciled(kmock: Any, clients: Clients, operator: OperatorRunner) -> None:
    kmock.request_log_limit = 8  # kmock's request matching is O(history); count creations on the server
    names = [f"bulk-{i}" for i in range(30)]
    await asyncio.gather(*(clients.create_dj(dj(n, preprocess={"mode": "Never"})) for n in names))
    await wait_for(
        lambda: all(exists(kmock, job_key(kmock, f"{n}-distill")) for n in names),
        timeout=30,
        what="a Job for every DistillationJob",
    )
    await wait_for(
        lambda: all(status(kmock, n).get("phase") == "Pending" for n in names),
        timeout=30,
        what="status for every DistillationJob",
    )
    assert job_creations(kmock) == sorted(f"{n}-distill" for n in names)  # one create request each


async def test_resource_discovery_matches_the_crd(kmock: Any, clients: Clients) -> None:
    """The emulator serves the resource as the generated CRD declares it (what kubectl and kopf use)."""
    info = kmock.resources[f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"]
    assert info.kind == api.KIND and set(info.shortnames) == {"dj", "distill"}


async def test_namespaced_mode_watches_only_its_namespaces(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """--namespace ml: exact names need no namespace scanning (kmock cannot even list namespaces)."""
    runner = await OperatorRunner(operator_config, namespaces=["ml"]).start()
    try:
        await clients.create_dj(dj("inside", namespace="ml", preprocess={"mode": "Never"}), namespace="ml")
        await clients.create_dj(dj("outside", preprocess={"mode": "Never"}))
        await wait_for(
            lambda: exists(kmock, job_key(kmock, "inside-distill", "ml")), what="Job in the watched namespace"
        )
        # A DistillationJob created later in the watched namespace gets its Job: the operator has handled
        # the events after "outside" was created, and never acted on it.
        await clients.create_dj(dj("later", namespace="ml", preprocess={"mode": "Never"}), namespace="ml")
        await wait_for(lambda: exists(kmock, job_key(kmock, "later-distill", "ml")), what="a later Job")
        assert not exists(kmock, job_key(kmock, "outside-distill"))
        # Issue 12 (8): with listed namespaces the operator makes no cluster-scoped call, and the chart's
        # watchNamespaces mode (Roles only) grants every call it makes.
        from tests.operator.conftest import chart_operator_grants

        missing = kmock.operator_calls - chart_operator_grants({"watchNamespaces": ["ml"]})
        assert not missing, sorted(missing)
    finally:
        await runner.stop()


async def test_a_refused_job_is_reported_and_retried(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """ResourceQuota / admission webhooks refuse a Job: the reason shows in status, the operator retries."""
    from kmock import KubernetesError

    refusals = []

    def quota(request: Any) -> Any:
        if (
            request.resource.plural == "jobs"
            and str(request.method).upper().endswith("POST")
            and not refusals
        ):
            refusals.append(request)
            return KubernetesError(
                status=403,
                reason="Forbidden",
                message='jobs.batch "q-distill" is forbidden: '
                "exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1",
            )
        return None

    kmock.admission = quota
    operator_config.retry_seconds = 0.2  # retried with backoff, not on the (hourly, here) resync
    runner = await OperatorRunner(operator_config).start()
    try:
        await clients.create_dj(dj("q", preprocess={"mode": "Never"}))
        await wait_for(
            lambda: cond(kmock, "q", "DistillComplete").get("reason") == "QuotaExceeded", what="QuotaExceeded"
        )
        assert "exceeded quota: gpu-quota" in cond(kmock, "q", "DistillComplete")["message"]
        assert cond(kmock, "q", "Stalled")["status"] == "False"  # it may clear by itself
        await wait_for(
            lambda: ("Warning", "QuotaExceeded") in [(t, r) for t, r, _ in events(kmock, "q")],
            what="Warning event",
        )
        await job_appears(kmock, "q-distill")  # the next resync succeeds
        await wait_for(
            lambda: cond(kmock, "q", "DistillComplete").get("reason") == "JobCreated", what="cleared"
        )
        assert len(refusals) == 1
    finally:
        await runner.stop()


async def test_accepted_spec_lives_in_status_and_survives_tampering_and_a_restart(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """Issue 12 (2): apply r=2, edit to r=4 (refused), try to erase what was accepted, restart the operator:
    the running job keeps r=2 and the refusal stays."""
    first = await OperatorRunner(operator_config).start()
    await clients.create_dj(dj("tamper", preprocess={"mode": "Never"}))
    await job_appears(kmock, "tamper-distill")
    accepted = status(kmock, "tamper").get("acceptedSpec") or {}
    assert accepted["student"]["reductionFactor"] == 2 and accepted["distillation"]["alpha"] == 0.3
    await clients.patch_dj("tamper", {"spec": {"student": {"reductionFactor": 4}}})
    await wait_for(lambda: status(kmock, "tamper").get("reason") == "SpecChangeRejected", what="rejected")

    # What a user with edit rights can do: drop the old annotation, write status through the main endpoint
    # (the API server ignores status there), and restart nothing but the operator.
    await clients.patch_dj(
        "tamper",
        {
            "metadata": {"annotations": {"distillation.nnunet.io/accepted-spec": None}},
            "status": {"acceptedSpec": None},
        },
    )
    await first.kill()
    assert status(kmock, "tamper")["acceptedSpec"]["student"]["reductionFactor"] == 2

    second = await OperatorRunner(operator_config).start()
    try:
        await clients.patch_job_status("tamper-distill", COMPLETE)
        export = await job_appears(kmock, "tamper-export")
        argv = export["spec"]["template"]["spec"]["initContainers"][0]["args"]
        assert argv[argv.index("-r") + 1] == "2"
        st = status(kmock, "tamper")
        assert st["reason"] == "SpecChangeRejected" and "spec.student.reductionFactor" in st["message"]
        assert st["acceptedSpec"]["student"]["reductionFactor"] == 2
        assert cond(kmock, "tamper", "Stalled")["status"] == "True"
    finally:
        await second.stop()


async def test_a_job_the_api_server_refuses_as_invalid_stalls_naming_the_spec_field(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """Issue 12 (3): a 422 for a stage Job (an admission policy, a field this cluster does not know) is a
    Stalled condition and an Event naming the spec field; no retry loop; fixing the spec creates the Job."""
    from kmock import KubernetesError

    attempts = []

    def validating_policy(request: Any) -> Any:
        if request.resource.plural == "jobs" and str(request.method).upper().endswith("POST"):
            attempts.append(request)
            tolerations = request.data["spec"]["template"]["spec"].get("tolerations") or []
            if any(t.get("key") == "forbidden.example/gpu" for t in tolerations):
                return KubernetesError(
                    status=422,
                    reason="Invalid",
                    message="Job is invalid",
                    details={
                        "causes": [
                            {
                                "reason": "FieldValueForbidden",
                                "field": "spec.template.spec.tolerations[0].key",
                                "message": "Forbidden: this taint may not be tolerated in this namespace",
                            }
                        ]
                    },
                )
        return None

    kmock.admission = validating_policy
    operator_config.retry_seconds = 0.05
    runner = await OperatorRunner(operator_config).start()
    try:
        await clients.create_dj(
            dj(
                "pol",
                preprocess={"mode": "Never"},
                scheduling={
                    "tolerations": [
                        {"key": "forbidden.example/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ]
                },
            )
        )
        await wait_for(lambda: status(kmock, "pol").get("reason") == "JobInvalid", what="JobInvalid")
        st = status(kmock, "pol")
        assert "spec.scheduling.tolerations" in st["message"] and "may not be tolerated" in st["message"]
        assert cond(kmock, "pol", "Stalled")["status"] == "True"
        assert cond(kmock, "pol", "Reconciling")["status"] == "False"
        assert cond(kmock, "pol", "DistillComplete")["reason"] == "JobInvalid"
        await wait_for(
            lambda: any(
                r == "JobInvalid" and "spec.scheduling.tolerations" in m for _, r, m in events(kmock, "pol")
            ),
            what="JobInvalid event",
        )
        assert len(attempts) == 1  # refused as invalid: not retried until the spec changes

        await clients.patch_dj(
            "pol",
            {
                "spec": {
                    "scheduling": {
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                        ]
                    }
                }
            },
        )
        await job_appears(kmock, "pol-distill")
        await wait_for(lambda: cond(kmock, "pol", "Stalled").get("status") == "False", what="stall cleared")
        assert len(attempts) == 2
    finally:
        await runner.stop()


async def test_a_failing_api_server_is_retried_with_backoff_until_the_job_exists(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """Issue 12 (3): 5xx answers to the Job creation are retried with growing delays, not dropped."""
    from kmock import KubernetesError

    attempts: list[float] = []

    def flaky(request: Any) -> Any:
        if request.resource.plural == "jobs" and str(request.method).upper().endswith("POST"):
            attempts.append(asyncio.get_running_loop().time())
            if len(attempts) <= 3:
                return KubernetesError(status=503, reason="ServiceUnavailable", message="etcd is slow")
        return None

    kmock.admission = flaky
    operator_config.retry_seconds = 0.1
    runner = await OperatorRunner(operator_config).start()
    try:
        await clients.create_dj(dj("flaky", preprocess={"mode": "Never"}))
        await job_appears(kmock, "flaky-distill")
        assert len(attempts) == 4
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39, gaps  # 0.1, 0.2, 0.4: exponential
        await wait_for(lambda: status(kmock, "flaky").get("phase") == "Pending", what="status")
        assert job_creations(kmock) == ["flaky-distill"]  # refused ones never reached the store
    finally:
        await runner.stop()


async def test_malformed_affinity_is_refused_naming_the_field_and_creates_nothing(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    """Issue 12 (3): `affinity: {nodeAffinity: garbage}` used to crash every reconciliation."""
    from nnunet_distill_operator import crd

    body = dj("aff", preprocess={"mode": "Never"}, scheduling={"affinity": {"nodeAffinity": "garbage"}})
    assert any(e.startswith("spec.scheduling.affinity.nodeAffinity") for e in crd.validate_object(body))
    await clients.create_dj(body)  # kmock does not apply the CRD schema; a real API server refuses it here
    await wait_for(lambda: status(kmock, "aff").get("reason") == "InvalidSpec", what="InvalidSpec")
    assert "spec.scheduling.affinity.nodeAffinity" in status(kmock, "aff")["message"]
    assert cond(kmock, "aff", "Stalled")["status"] == "True"
    assert not [n for n in job_creations(kmock) if n.startswith("aff-")]


async def test_each_job_gets_its_own_least_privilege_trainer_identity(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    """Issue 12 (1): ServiceAccount + Role (get/patch of this job's status only) + RoleBinding in the job's
    namespace, owned by the DistillationJob; only progress-reporting stages mount a token."""
    created = await clients.create_dj(
        dj("ident", namespace="ml-train", preprocess={"mode": "Never"}), namespace="ml-train"
    )
    uid = created["metadata"]["uid"]
    await wait_for(lambda: exists(kmock, job_key(kmock, "ident-distill", "ml-train")), what="Job")
    job = get(kmock, job_key(kmock, "ident-distill", "ml-train"))
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ident-trainer" and pod["automountServiceAccountToken"] is True

    def obj(resource: str) -> dict[str, Any]:
        return get(kmock, (kmock.resource(resource), "ml-train", "ident-trainer"))

    sa, role, binding = (
        obj("v1/serviceaccounts"),
        obj("rbac.authorization.k8s.io/v1/roles"),
        obj("rbac.authorization.k8s.io/v1/rolebindings"),
    )
    for o in (sa, role, binding):
        assert o["metadata"]["ownerReferences"][0]["uid"] == uid, o
    assert sa["automountServiceAccountToken"] is False
    assert role["rules"] == [
        {
            "apiGroups": [api.GROUP],
            "resources": ["distillationjobs/status"],
            "resourceNames": ["ident"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "ident-trainer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ident-trainer", "namespace": "ml-train"}
    ]

    await clients.patch_job_status("ident-distill", COMPLETE, namespace="ml-train")
    await wait_for(lambda: exists(kmock, job_key(kmock, "ident-export", "ml-train")), what="export Job")
    export = get(kmock, job_key(kmock, "ident-export", "ml-train"))["spec"]["template"]["spec"]
    assert export["serviceAccountName"] == "ident-trainer" and export["automountServiceAccountToken"] is False
    # Issue 13 (8): one create request each, with the first Job; the export Job (its distill Job runs under
    # the identity, which proves it exists) sent none.
    assert {
        plural: count
        for (plural, ns, name), count in kmock.creations.items()
        if (ns, name) == ("ml-train", "ident-trainer")
    } == {"serviceaccounts": 1, "roles": 1, "rolebindings": 1}

    await clients.delete_dj("ident", namespace="ml-train")
    await wait_for(lambda: not obj("rbac.authorization.k8s.io/v1/roles"), what="identity garbage-collected")
    assert not obj("v1/serviceaccounts") and not obj("rbac.authorization.k8s.io/v1/rolebindings")


async def test_a_multi_node_distill_is_one_indexed_job_with_its_headless_service(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    """Issue 11: resources.distill.nodes runs one Indexed Job (all pods at once) and, before it, the headless
    Service its pods rendezvous through, owned by the DistillationJob and collected with it."""
    created = await clients.create_dj(
        dj("multi", preprocess={"mode": "Never"}, resources={"distill": {"gpus": 2, "nodes": 2}})
    )
    uid = created["metadata"]["uid"]
    job = await job_appears(kmock, "multi-distill")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == (
        "Indexed",
        2,
        2,
    )
    assert job["spec"]["template"]["spec"]["subdomain"] == "multi-distill"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:3] == ["torchrun", "--nnodes", "2"]

    def service() -> dict[str, Any]:
        return get(kmock, (kmock.resource("v1/services"), "default", "multi-distill"))

    svc = service()
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "multi-distill"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == uid
    assert [n for (plural, _ns, n), count in kmock.creations.items() if plural == "services"] == [
        "multi-distill"
    ]

    await clients.delete_dj("multi")
    await wait_for(lambda: not service(), what="Service garbage-collected with the DistillationJob")


async def test_the_chart_grants_exactly_the_calls_the_operator_makes(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    """Issue 12 (8), both directions: a run that takes every path that calls the API (trainer identity, Job
    creation, suspend/resume patches, Events, status, TTL deletion, the watches) makes exactly the calls the
    rendered chart grants, plus nothing more; get on distillationjobs/status is held only to be granted to
    the trainer Roles. (Every other test checks the first direction: see conftest.)"""
    from tests.operator.conftest import chart_operator_grants

    await clients.create_dj(
        dj(
            "rbac",
            preprocess={"mode": "Never"},
            ttlSecondsAfterFinished=0,
            resources={"distill": {"gpus": 1, "nodes": 2}},  # a multi-node Job: its rendezvous Service too
        )
    )
    await job_appears(kmock, "rbac-distill")
    await clients.patch_job_status("rbac-distill", {"active": 1, "ready": 1})
    await wait_for(lambda: status(kmock, "rbac").get("phase") == "Running", what="Running")
    await clients.patch_dj("rbac", {"spec": {"suspend": True}})
    await wait_for(
        lambda: get(kmock, job_key(kmock, "rbac-distill"))["spec"].get("suspend") is True, what="suspend"
    )
    await clients.patch_dj("rbac", {"spec": {"suspend": False}})
    await wait_for(
        lambda: get(kmock, job_key(kmock, "rbac-distill"))["spec"].get("suspend") is False, what="resume"
    )
    await clients.patch_job_status(
        "rbac-distill",
        {
            "active": 0,
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}
            ],
        },
    )
    await wait_for(
        lambda: not exists(kmock, dj_key(kmock, "rbac")), what="deleted by ttlSecondsAfterFinished"
    )

    made = kmock.operator_calls | rbac.GRANTED_ONLY
    granted = chart_operator_grants()
    assert made == granted, (
        f"not granted: {sorted(made - granted)}; granted but unused: {sorted(granted - made)}"
    )
    assert granted == {(r.group, r.resource, v) for r in rbac.OPERATOR_RULES for v in r.verbs}


async def test_events_are_posted_at_least_once_across_failures_and_restarts(
    kmock: Any, clients: Clients, operator_config: Any
) -> None:
    """Issue 12 (6): an Event that could not be posted before the operator died is posted after the restart;
    one posted just before a failed status write is not duplicated (deterministic names: uid + transition)."""
    from kmock import KubernetesError

    blocked = {"events": True, "status": 0, "refused_events": 0}

    def admission(request: Any) -> Any:
        post = str(request.method).upper().endswith("POST")
        if request.resource.plural == "events" and post and blocked["events"]:
            blocked["refused_events"] += 1
            return KubernetesError(status=503, reason="ServiceUnavailable", message="events are down")
        if (
            request.resource.plural == "distillationjobs"
            and request.subresource == "status"
            and blocked["status"] > 0
            and "stages" in json.dumps(request.data)
        ):
            blocked["status"] -= 1
            return KubernetesError(status=500, reason="InternalError", message="etcd timeout")
        return None

    kmock.admission = admission
    operator_config.retry_seconds = 0.05
    first = await OperatorRunner(operator_config).start()
    await clients.create_dj(dj("ev", preprocess={"mode": "Never"}))
    await job_appears(kmock, "ev-distill")
    # A second refused Event is the retry's: the first pass, whose Event was refused, has ended.
    await wait_for(lambda: blocked["refused_events"] >= 2, what="the Event's retry")
    assert "stages" not in status(kmock, "ev")  # the transition is not recorded before its Event
    await first.kill()

    blocked["events"] = False
    second = await OperatorRunner(operator_config).start()
    try:
        await wait_for(
            lambda: ("Normal", "StageStarted") in [(t, r) for t, r, _ in events(kmock, "ev")],
            what="StageStarted after the restart",
        )
        await wait_for(
            lambda: status(kmock, "ev").get("stages", {}).get("distill"), what="status after the Event"
        )

        blocked["status"] = (
            1  # the Event of the next transition gets posted, then its status write fails once
        )
        await clients.patch_job_status("ev-distill", COMPLETE)
        await wait_for(
            lambda: status(kmock, "ev").get("stages", {}).get("distill", {}).get("state") == "Succeeded",
            what="distill Succeeded",
        )
        await job_appears(kmock, "ev-export")
        await wait_for(
            lambda: [r for _, r, _ in events(kmock, "ev")].count("StageStarted") == 2, what="2nd start"
        )
        reasons = [r for _, r, _ in events(kmock, "ev")]
        assert reasons.count("StageStarted") == 2 and reasons.count("StageSucceeded") == 1, reasons
        posts = {name: n for (plural, _ns, name), n in kmock.creations.items() if plural == "events"}
        assert max(posts.values()) >= 2, posts  # a repeated post of the same Event, answered 409
        assert creations_of_jobs_are_unique(kmock)
    finally:
        await second.stop()


async def handled_a_later_change(clients: Clients, kmock: Any, name: str, namespace: str = "default") -> None:
    """Change a field that only shapes Jobs not created yet (spec.backoffLimit: a new generation) and wait
    until the status reports that generation: the operator has reconciled a state newer than everything
    before the call, so what it has not done by now, it did not do in response to any of it."""
    generation = get(kmock, dj_key(kmock, name, namespace))["metadata"]["generation"]
    await clients.patch_dj(name, {"spec": {"backoffLimit": 7}}, namespace)
    await wait_for(
        lambda: (status(kmock, name, namespace).get("observedGeneration") or 0) > generation,
        what=f"the operator to handle generation {generation + 1} of {name}",
    )


def creations_of_jobs_are_unique(kmock: Any) -> bool:
    names = job_creations(kmock)
    return len(names) == len(set(names))


async def test_resume_never_unsuspends_a_job_kueue_has_not_admitted(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    """Issue 12 (4): suspend then resume hands a Kueue Job back to Kueue, still suspended."""
    await clients.create_dj(dj("kq", preprocess={"mode": "Never"}, scheduling={"queueName": "gpu"}))
    job = await job_appears(kmock, "kq-distill")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    await wait_for(lambda: cond(kmock, "kq", "DistillComplete").get("reason") == "Queued", what="Queued")

    def annotations() -> dict[str, str]:
        return get(kmock, job_key(kmock, "kq-distill"))["metadata"].get("annotations") or {}

    mark = "distillation.nnunet.io/suspended-by-operator"
    for admitted in (False, True):
        if admitted:  # Kueue admits the workload: it un-suspends the Job
            await kmock_patch_job(clients, "kq-distill", {"spec": {"suspend": False}})
            await clients.patch_job_status("kq-distill", {"active": 1, "ready": 1})
            await wait_for(lambda: status(kmock, "kq").get("phase") == "Running", what="Running")
        await clients.patch_dj("kq", {"spec": {"suspend": True}})
        await wait_for(lambda: annotations().get(mark) == "true", what="suspended by the operator")
        assert get(kmock, job_key(kmock, "kq-distill"))["spec"]["suspend"] is True
        await clients.patch_job_status("kq-distill", {"active": 0, "ready": 0})
        await wait_for(lambda: status(kmock, "kq").get("phase") == "Suspended", what="Suspended")
        await clients.patch_dj("kq", {"spec": {"suspend": False}})
        await wait_for(lambda: mark not in annotations(), what="handed back to Kueue")
        assert get(kmock, job_key(kmock, "kq-distill"))["spec"]["suspend"] is True  # only Kueue un-suspends
        await wait_for(
            lambda: cond(kmock, "kq", "DistillComplete").get("reason") == "Queued", what="Queued again"
        )


async def kmock_patch_job(
    clients: Clients, name: str, patch: dict[str, Any], namespace: str = "default"
) -> None:
    await asyncio.to_thread(
        clients.batch.patch_namespaced_job,
        name,
        namespace,
        patch,
        _content_type="application/merge-patch+json",
    )


async def test_a_missing_credentials_secret_is_a_clear_condition(
    kmock: Any, clients: Clients, operator: OperatorRunner
) -> None:
    """Issue 12 (5): required secretKeyRefs stop the publish pod; the kubelet's CreateContainerConfigError
    becomes SecretMissing naming spec.output.secretRef.name (no value is ever echoed)."""
    await clients.create_dj(
        dj(
            "cred",
            preprocess={"mode": "Never"},
            output={"uri": "s3://models/liver", "secretRef": {"name": "s3-creds"}},
        )
    )
    for stage in ("distill", "export", "gate"):
        await job_appears(kmock, f"cred-{stage}")
        await complete(clients, kmock, "cred", stage)
    publish = await job_appears(kmock, "cred-publish")
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in publish["spec"]["template"]["spec"]["containers"][0]["env"]
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    assert "optional" not in refs["AWS_ACCESS_KEY_ID"] and "optional" not in refs["AWS_SECRET_ACCESS_KEY"]
    pod = pod_for(publish)
    await clients.create_pod(pod)
    await clients.patch_pod_status(
        pod["metadata"]["name"],
        {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "main",
                    "ready": False,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "s3-creds" not found',
                        }
                    },
                }
            ],
        },
    )
    await wait_for(
        lambda: cond(kmock, "cred", "PublishComplete").get("reason") == "SecretMissing", what="SecretMissing"
    )
    assert "spec.output.secretRef.name" in cond(kmock, "cred", "PublishComplete")["message"]
    await wait_for(lambda: "SecretMissing" in [r for _, r, _ in events(kmock, "cred")], what="Warning event")
    await clients.patch_pod_status(
        pod["metadata"]["name"],
        {
            "containerStatuses": [
                {
                    "name": "main",
                    "ready": False,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": "couldn't find key AWS_SECRET_ACCESS_KEY in Secret default/s3-creds",
                        }
                    },
                }
            ]
        },
    )
    await wait_for(
        lambda: cond(kmock, "cred", "PublishComplete").get("reason") == "SecretKeyMissing",
        what="SecretKeyMissing",
    )
    assert "AWS_SECRET_ACCESS_KEY" in cond(kmock, "cred", "PublishComplete")["message"]
