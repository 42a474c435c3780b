"""The pure reconciliation: what the operator does for a given observed state, and the status it writes."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from nnunet_distill_operator import k8s
from nnunet_distill_operator.pod_issues import pod_issue
from nnunet_distill_operator.reconcile import Decision, decide
from nnunet_distill_operator.trees import compact
from nnunet_distill_operator.status import ANNOTATION_SUSPENDED_BY_OPERATOR, observe_job

from tests.operator.harness import ended_pod, terminated_status

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
UID = "uid-1"


def cr(
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 1,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "distillation.nnunet.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {
            "name": "liver",
            "namespace": "ml",
            "uid": UID,
            "generation": generation,
            "creationTimestamp": "2026-03-01T11:00:00Z",
            "annotations": annotations or {},
        },
        "spec": spec if spec is not None else {"dataset": {"id": 27}, "storage": {"claimName": "data"}},
        "status": status or {},
    }


def applied(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The CR after the operator applied a decision (accepted spec, then the rest, merge-patched into
    status)."""
    out = copy.deepcopy(body)
    if decision.accepted_spec:
        out.setdefault("status", {})["acceptedSpec"] = decision.accepted_spec
    if decision.status_patch:
        merged = {**out.get("status", {}), **decision.status_patch["status"]}
        out["status"] = compact(merged)
    return out


def job(manifest: dict[str, Any], **status: Any) -> dict[str, Any]:
    j = copy.deepcopy(manifest)
    j["metadata"]["uid"] = "job-" + j["metadata"]["name"]
    j["status"] = status
    return j


def done(manifest: dict[str, Any], start: str = "2026-03-01T11:00:00Z", end: str = "2026-03-01T11:30:00Z"):
    return job(
        manifest,
        succeeded=1,
        startTime=start,
        completionTime=end,
        conditions=[{"type": "Complete", "status": "True"}],
    )


def failed(manifest: dict[str, Any], reason: str = "BackoffLimitExceeded") -> dict[str, Any]:
    return job(
        manifest,
        failed=4,
        startTime="2026-03-01T11:00:00Z",
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": "2026-03-01T11:40:00Z",
            }
        ],
    )


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_new_job_creates_the_first_stage_and_reports_pending() -> None:
    d = decide(cr(), {}, {}, NOW)
    assert [m["metadata"]["name"] for m in d.create] == ["liver-preprocess"]
    assert d.status["phase"] == "Pending" and d.status["currentStage"] == "preprocess"
    assert d.status["startTime"] == "2026-03-01T12:00:00Z" and d.status["observedGeneration"] == 1
    assert cond(d.status, "Ready")["status"] == "False"
    assert cond(d.status, "Reconciling")["status"] == "True"
    assert cond(d.status, "Stalled")["status"] == "False"
    assert cond(d.status, "PreprocessComplete")["reason"] == "JobCreated"
    assert cond(d.status, "DistillComplete")["reason"] == "NotStarted"
    assert d.accepted_spec["distillation"]["alpha"] == 0.3  # type: ignore[index]


def test_same_state_twice_changes_nothing() -> None:
    first = decide(cr(), {}, {}, NOW)
    body = applied(cr(), first)
    jobs = {"preprocess": job(first.create[0])}
    second = decide(body, jobs, {}, NOW + timedelta(seconds=5))
    assert second.create == () and second.status_patch is None and second.events == ()
    assert second.accepted_spec is None


def test_stages_advance_one_at_a_time_and_finish_with_events() -> None:
    body = cr(
        spec={"dataset": {"id": 27}, "storage": {"claimName": "data"}, "output": {"uri": "s3://models/liver"}}
    )
    d = decide(body, {}, {}, NOW)
    jobs: dict[str, Any] = {}
    order = []
    for _ in range(10):
        body = applied(body, d)
        if not d.create:
            break
        manifest = d.create[0]
        stage = manifest["metadata"]["labels"][k8s.LABEL_STAGE]
        order.append(stage)
        jobs[stage] = done(manifest)
        pods = {}
        if stage == "gate":
            verdict = {"passed": True, "enforced": True, "message": "quality gate passed: retention 0.990"}
            pods = {"gate": [ended_pod("g", 0, {"stage": "gate", "ok": True, "gate": verdict})]}
        if stage == "publish":
            artifacts = {"uri": "s3://models/liver/v1", "sha256": "ab" * 32, "sizeBytes": 123}
            pods = {"publish": [ended_pod("p", 0, {"stage": "publish", "ok": True, "artifacts": artifacts})]}
        d = decide(body, jobs, pods, NOW)
        assert "StageSucceeded" in [e.reason for e in d.events]
        assert d.finished_stages and d.finished_stages[0][:2] == (stage, "Succeeded")
        assert d.finished_stages[0][2] == 1800.0
    assert order == ["preprocess", "distill", "export", "gate", "publish"]
    assert body["status"]["phase"] == "Succeeded"
    assert cond(body["status"], "Ready")["status"] == "True"
    assert cond(body["status"], "Reconciling")["status"] == "False"
    assert body["status"]["artifacts"] == {
        "uri": "s3://models/liver/v1",
        "sha256": "ab" * 32,
        "sizeBytes": 123,
    }
    assert all(cond(body["status"], f"{s.capitalize()}Complete")["status"] == "True" for s in order)
    assert cond(body["status"], "QualityGate")["status"] == "True"
    assert body["status"]["completionTime"] == "2026-03-01T12:00:00Z"


def _progress_to(
    stage: str, spec: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    body = cr(spec=spec)
    jobs: dict[str, Any] = {}
    d = decide(body, jobs, {}, NOW)
    while True:
        body = applied(body, d)
        manifest = d.create[0]
        name = manifest["metadata"]["labels"][k8s.LABEL_STAGE]
        if name == stage:
            jobs[name] = job(manifest, active=1, ready=0, startTime="2026-03-01T11:00:00Z")
            return body, jobs, manifest
        jobs[name] = done(manifest)
        d = decide(body, jobs, {}, NOW)


def test_oom_killed_stage_fails_the_job_with_the_field_to_change() -> None:
    body, jobs, manifest = _progress_to("distill")
    jobs["distill"] = failed(manifest)
    pod = {
        "metadata": {"name": "liver-distill-x", "creationTimestamp": "2026-03-01T11:30:00Z"},
        "spec": manifest["spec"]["template"]["spec"],
        "status": terminated_status(137, reason="OOMKilled"),
    }
    d = decide(body, jobs, {"distill": [pod]}, NOW)
    assert d.create == ()
    assert d.status["phase"] == "Failed" and d.status["reason"] == "StageFailed"
    assert "OOMKilled" in d.status["message"] and "spec.resources.distill.memory" in d.status["message"]
    assert "32Gi" in d.status["message"]
    assert cond(d.status, "Stalled")["status"] == "True"
    assert cond(d.status, "DistillComplete")["reason"] == "OOMKilled"
    assert [e.reason for e in d.events if e.type == "Warning"] == ["StageFailed"]
    assert d.finished_stages[0][:2] == ("distill", "Failed")


def test_unschedulable_pod_shows_the_schedulers_message_while_pending() -> None:
    body, jobs, _ = _progress_to("distill")
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pod = {
        "metadata": {"name": "liver-distill-x"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            ],
        },
    }
    d = decide(body, jobs, {"distill": [pod]}, NOW)
    assert d.status["phase"] == "Running"  # preprocess already ran
    assert cond(d.status, "DistillComplete")["reason"] == "Unschedulable"
    assert cond(d.status, "DistillComplete")["message"] == message
    assert (
        cond(d.status, "Reconciling")["status"] == "True"
        and message in cond(d.status, "Reconciling")["message"]
    )
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Unschedulable")]
    again = decide(applied(body, d), jobs, {"distill": [pod]}, NOW)
    assert again.events == ()  # no repeated event for the same cause


def test_pod_issues_in_user_terms() -> None:
    pull = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "main",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling x"}},
                }
            ],
        },
    }
    issue = pod_issue(pull, "distill")
    assert issue is not None and issue.reason == "ImagePullBackOff" and "spec.image" in issue.message
    evicted = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "The node was low on resource: memory.",
        },
    }
    assert pod_issue(evicted).reason == "Evicted"  # type: ignore[union-attr]
    preempted = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
        },
    }
    assert pod_issue(preempted).reason == "Preempted"  # type: ignore[union-attr]
    secret = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "main",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "s3" not found',
                        }
                    },
                }
            ],
        },
    }
    assert "secretRef" in pod_issue(secret).message  # type: ignore[union-attr]
    crashed = ended_pod(
        "p", 1, {"ok": False, "error": {"reason": "TeacherError", "message": "fold 3 not found"}}
    )
    assert "TeacherError: fold 3 not found" in pod_issue(crashed).message  # type: ignore[union-attr]
    running = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    assert pod_issue(running) is None


def test_job_observation() -> None:
    assert observe_job({"metadata": {"name": "j"}, "spec": {}, "status": {}}).state == "Pending"
    assert (
        observe_job({"metadata": {"name": "j"}, "spec": {}, "status": {"active": 1, "ready": 1}}).state
        == "Running"
    )
    queued = observe_job(
        {
            "metadata": {"name": "j", "labels": {"kueue.x-k8s.io/queue-name": "q"}},
            "spec": {"suspend": True},
            "status": {},
        }
    )
    assert (queued.state, queued.reason) == ("Pending", "Queued")
    mine = observe_job(
        {
            "metadata": {"name": "j", "annotations": {ANNOTATION_SUSPENDED_BY_OPERATOR: "true"}},
            "spec": {"suspend": True},
            "status": {},
        }
    )
    assert mine.state == "Suspended" and mine.suspended_by_operator
    deadline = observe_job(
        {
            "metadata": {"name": "j"},
            "spec": {},
            "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]},
        }
    )
    assert (deadline.state, deadline.reason) == ("Failed", "DeadlineExceeded")


def test_invalid_spec_stalls_without_creating_anything_and_warns_once() -> None:
    body = cr(spec={"dataset": {"id": 27}, "storage": {"claimName": "data"}, "distillation": {"alpha": 7}})
    d = decide(body, {}, {}, NOW)
    assert d.create == ()
    assert d.status["phase"] == "Failed" and d.status["reason"] == "InvalidSpec"
    assert "spec.distillation.alpha" in d.status["message"]
    assert (
        cond(d.status, "Stalled")["status"] == "True" and cond(d.status, "Stalled")["reason"] == "InvalidSpec"
    )
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    again = decide(applied(body, d), {}, {}, NOW)
    assert again.events == () and again.status_patch is None
    fixed = applied(body, d)
    fixed["spec"]["distillation"]["alpha"] = 0.5
    fixed["metadata"]["generation"] = 2
    d3 = decide(fixed, {}, {}, NOW)
    assert [m["metadata"]["name"] for m in d3.create] == ["liver-preprocess"]
    assert cond(d3.status, "Stalled")["status"] == "False" and d3.status["observedGeneration"] == 2


def test_unsafe_change_after_start_is_rejected_and_the_job_continues_with_the_accepted_spec() -> None:
    body, jobs, manifest = _progress_to("distill")
    body["spec"]["distillation"] = {"alpha": 0.9}
    body["metadata"]["generation"] = 2
    jobs["distill"] = done(manifest)
    d = decide(body, jobs, {}, NOW)
    assert d.status["reason"] == "SpecChangeRejected" and "spec.distillation.alpha" in d.status["message"]
    assert cond(d.status, "Stalled")["status"] == "True"
    assert [m["metadata"]["name"] for m in d.create] == ["liver-export"]  # keeps going with the old spec
    assert d.accepted_spec is None  # unchanged
    assert "SpecChangeRejected" in [e.reason for e in d.events]


def test_safe_change_after_start_is_accepted_for_later_stages() -> None:
    body, jobs, manifest = _progress_to("distill")
    body["spec"]["resources"] = {"export": {"memory": "12Gi"}}
    jobs["distill"] = done(manifest)
    d = decide(body, jobs, {}, NOW)
    assert d.status.get("reason") is None and cond(d.status, "Stalled")["status"] == "False"
    export = d.create[0]
    assert export["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "12Gi"
    assert d.accepted_spec["resources"]["export"]["memory"] == "12Gi"  # type: ignore[index]


def test_suspend_and_resume_only_touch_jobs_the_operator_suspended() -> None:
    body, jobs, manifest = _progress_to("distill")
    jobs["distill"] = job(manifest, active=1, ready=1)
    body["spec"]["suspend"] = True
    d = decide(body, jobs, {}, NOW)
    assert d.suspend == ("liver-distill",) and d.status["phase"] == "Suspended"
    assert cond(d.status, "Suspended")["status"] == "True"
    assert [e.reason for e in d.events] == ["Suspended"]
    body = applied(body, d)
    jobs["distill"]["spec"]["suspend"] = True
    jobs["distill"]["metadata"].setdefault("annotations", {})[ANNOTATION_SUSPENDED_BY_OPERATOR] = "true"
    jobs["distill"]["status"] = {}
    body["spec"]["suspend"] = False
    d2 = decide(body, jobs, {}, NOW)
    assert d2.resume == ("liver-distill",) and d2.status["phase"] == "Running"
    assert "Resumed" in [e.reason for e in d2.events]
    queued = job(manifest)
    queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "q"
    queued["spec"]["suspend"] = True
    d3 = decide(body, {**jobs, "distill": queued}, {}, NOW)
    assert d3.resume == () and cond(d3.status, "DistillComplete")["reason"] == "Queued"


def test_no_new_stage_starts_while_suspended() -> None:
    body, jobs, manifest = _progress_to("distill")
    jobs["distill"] = done(manifest)
    body["spec"]["suspend"] = True
    d = decide(body, jobs, {}, NOW)
    assert d.create == () and d.status["phase"] == "Suspended"


def test_ttl_after_finished_deletes_when_due() -> None:
    spec = {
        "dataset": {"id": 27},
        "storage": {"claimName": "data"},
        "ttlSecondsAfterFinished": 600,
        "preprocess": {"mode": "Never"},
    }
    body = cr(spec=spec)
    jobs: dict[str, Any] = {}
    d = decide(body, jobs, {}, NOW)
    while d.create:
        body = applied(body, d)
        jobs[d.create[0]["metadata"]["labels"][k8s.LABEL_STAGE]] = done(d.create[0])
        d = decide(body, jobs, {}, NOW)
    body = applied(body, d)
    assert body["status"]["phase"] == "Succeeded" and not d.delete and d.requeue_after == 600
    later = decide(body, jobs, {}, NOW + timedelta(seconds=601))
    assert later.delete


def test_a_job_left_by_an_earlier_object_of_the_same_name_is_not_adopted() -> None:
    first = decide(cr(), {}, {}, NOW)
    stale = job(first.create[0])
    stale["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-object"
    d = decide(cr(), {"preprocess": stale}, {}, NOW)
    assert d.create == ()
    assert cond(d.status, "PreprocessComplete")["reason"] == "WaitingForOldJob"


def test_condition_transition_times_only_move_on_status_changes() -> None:
    first = decide(cr(), {}, {}, NOW)
    body = applied(cr(), first)
    jobs = {"preprocess": job(first.create[0], active=1, ready=1)}
    later = decide(body, jobs, {}, NOW + timedelta(minutes=5))
    assert (
        cond(later.status, "Ready")["lastTransitionTime"] == cond(first.status, "Ready")["lastTransitionTime"]
    )
    assert cond(later.status, "PreprocessComplete")["reason"] == "Running"


def test_operator_never_writes_progress() -> None:
    status = {"progress": {"epoch": 5, "trainLoss": -0.3}}
    d = decide(cr(status=status), {}, {}, NOW)
    assert d.status_patch is not None and "progress" not in d.status_patch["status"]


def test_refused_job_is_retried_and_the_reason_shown() -> None:
    d = decide(cr(), {}, {}, NOW, rejected={"preprocess": "admission webhook denied the request: no GPUs"})
    assert [m["metadata"]["name"] for m in d.create] == ["liver-preprocess"]  # tried again
    assert cond(d.status, "PreprocessComplete")["reason"] == "JobRejected"
    assert "admission webhook denied" in cond(d.status, "PreprocessComplete")["message"]
    # StageStarted is posted only when the retried create succeeds (the controller drops it otherwise).
    assert [e.reason for e in d.events] == ["StageStarted", "JobRejected"]
    q = decide(cr(), {}, {}, NOW, rejected={"preprocess": "exceeded quota: team-a"})
    assert cond(q.status, "PreprocessComplete")["reason"] == "QuotaExceeded"


def test_resume_of_a_kueue_job_only_hands_it_back_to_kueue() -> None:
    """Issue 12 (4): the operator never un-suspends a queued Job; it drops its own mark and Kueue decides."""
    spec = {
        "dataset": {"id": 27},
        "storage": {"claimName": "data"},
        "preprocess": {"mode": "Never"},
        "scheduling": {"queueName": "gpu"},
    }
    body, _jobs, manifest = _progress_to("distill", spec)
    assert manifest["spec"]["suspend"] is True
    suspended = job(manifest)
    suspended["metadata"].setdefault("annotations", {})[ANNOTATION_SUSPENDED_BY_OPERATOR] = "true"
    body["spec"]["suspend"] = False
    d = decide(body, {"distill": suspended}, {}, NOW)
    assert d.resume == () and d.release == ("liver-distill",)
    assert cond(d.status, "DistillComplete")["reason"] == "Queued"
    plain = copy.deepcopy(suspended)
    plain["metadata"]["labels"].pop("kueue.x-k8s.io/queue-name")
    d2 = decide(body, {"distill": plain}, {}, NOW)
    assert d2.resume == ("liver-distill",) and d2.release == ()


def test_a_job_that_cannot_be_built_stalls_naming_the_field_and_creates_nothing() -> None:
    d = decide(
        cr(), {}, {}, NOW, invalid={"preprocess": "spec.scheduling.affinity.nodeAffinity: not an object"}
    )
    assert d.create == () and d.identity == ()
    assert (
        d.status["reason"] == "JobInvalid" and "spec.scheduling.affinity.nodeAffinity" in d.status["message"]
    )
    assert (
        cond(d.status, "Stalled")["status"] == "True" and cond(d.status, "Reconciling")["status"] == "False"
    )
    assert [e.reason for e in d.events] == ["JobInvalid"]
    again = decide(
        applied(cr(), d),
        {},
        {},
        NOW,
        invalid={"preprocess": "spec.scheduling.affinity.nodeAffinity: not an object"},
    )
    assert again.events == () and again.status_patch is None


def test_event_names_are_deterministic_per_job_and_transition() -> None:
    from nnunet_distill_operator.reconcile import event_name

    first = decide(cr(), {}, {}, NOW)
    again = decide(cr(), {}, {}, NOW + timedelta(seconds=30))  # e.g. after a restart before the status write
    names = [event_name("liver", UID, e) for e in first.events]
    assert names == [event_name("liver", UID, e) for e in again.events] and names
    other_uid = [event_name("liver", "uid-2", e) for e in first.events]
    assert not set(names) & set(other_uid)  # a re-created job of the same name gets its own Events
    assert all(len(n) <= 253 for n in names)


def test_the_trainer_identity_is_created_with_the_first_job_and_not_again_while_a_job_runs_under_it() -> None:
    """Issue 13 (8): the identity comes before the first Job that uses it, so a Job running under it proves
    it exists and the next stage's Job makes no identity requests; without such a Job (a crash between the
    identity and the Job, or an earlier stage's Job removed by its TTL) it is created again (409 if there)."""
    from nnunet_distill_operator.operator_state import kept_job

    first = decide(cr(), {}, {}, NOW)
    assert [o["kind"] for o in first.identity] == ["ServiceAccount", "Role", "RoleBinding"]
    assert decide(cr(), {}, {}, NOW).identity == first.identity  # nothing created yet: again
    body = applied(cr(), first)
    finished = kept_job(done(first.create[0]))  # what the operator keeps of the Job: its pods' account stays
    assert finished["spec"]["template"] == {"spec": {"serviceAccountName": "liver-trainer"}}
    nxt = decide(body, {"preprocess": finished}, {}, NOW)
    assert [m["metadata"]["name"] for m in nxt.create] == ["liver-distill"] and nxt.identity == ()
    gone = decide(body, {}, {}, NOW)  # the preprocess Job is gone (its TTL): status says it succeeded
    assert gone.identity == first.identity
    own_account = cr(
        spec={"dataset": {"id": 27}, "storage": {"claimName": "data"}, "serviceAccountName": "me"}
    )
    assert decide(own_account, {}, {}, NOW).identity == ()
