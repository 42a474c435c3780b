"""Pure: each planned stage's state, from its Job, its pods and what the last status said about it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_distill_operator import api, k8s
from nnunet_distill_operator.plan import Stage
from nnunet_distill_operator.pod_issues import PodIssue, pod_issue
from nnunet_distill_operator.status import (
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobView,
    observe_job,
)

NOT_STARTED = "NotStarted"
# Stage reasons that mean the stage has no Job (yet): refused, invalid, or an old Job in the way.
NO_JOB_REASONS = frozenset(
    {None, "JobInvalid", "JobRejected", "QuotaExceeded", "WaitingForOldJob", NOT_STARTED}
)


@dataclass
class StageState:
    """One stage while a decision is being made (mutable: later steps refine reason and message)."""

    name: str
    job_name: str
    state: str
    reason: str | None = None
    message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    view: JobView | None = None

    def as_status(self) -> dict[str, Any]:
        return {
            "jobName": self.job_name,
            "state": PENDING if self.state == NOT_STARTED else self.state,
            "reason": self.reason,
            "message": self.message,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
        }


def owned_by(job: Mapping[str, Any], uid: str) -> bool:
    refs = (job.get("metadata") or {}).get("ownerReferences") or ()
    return any(r.get("uid") == uid for r in refs)


def issue_for(stage: str, pods: Sequence[Mapping[str, Any]], failed: bool) -> PodIssue | None:
    """A pending pod's problem; for a failed stage, the newest failed pod's problem."""
    ordered = sorted(
        pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True
    )
    if any((p.get("status") or {}).get("phase") == "Running" for p in ordered) and not failed:
        return None
    for pod in ordered:
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Pending" or (failed and phase == "Failed") or (failed and phase is None):
            issue = pod_issue(pod, stage)
            if issue is not None:
                return issue
    return None


def _from_own_job(
    st: StageState, job: Mapping[str, Any], before: api.StageStatus | None, pods: Sequence[Mapping[str, Any]]
) -> None:
    """The stage as its own Job and pods show it."""
    view = observe_job(job)
    st.view = view
    st.state, st.reason, st.message = view.state, view.reason, view.message
    st.start_time = view.start_time or (before.start_time if before else None)
    st.completion_time = view.completion_time
    if view.state not in TERMINAL:
        issue = issue_for(st.name, pods, failed=False)
        if issue is not None:
            st.reason, st.message = issue.reason, issue.message
    elif view.state == FAILED:
        issue = issue_for(st.name, pods, failed=True)
        detail = (
            f"Job {st.job_name} failed ({view.reason}" + (f": {view.message}" if view.message else "") + ")"
        )
        st.message = f"{detail}; {issue.reason}: {issue.message}" if issue else detail
        if issue is not None and view.reason in ("BackoffLimitExceeded", "PodFailurePolicy"):
            st.reason = issue.reason
        elif issue is None and before is not None and before.state == FAILED and before.message:
            # The failed pod is gone (deleted, garbage-collected): what it said still explains the failure.
            st.reason, st.message = before.reason, before.message


def observe_stages(
    stages: Sequence[Stage],
    name: str,
    own_jobs: Mapping[str, Mapping[str, Any]],
    foreign_jobs: Mapping[str, Mapping[str, Any]],
    before: Mapping[str, api.StageStatus],
    pods: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[StageState]:
    """Each stage from its own Job; else what the last status said of a finished stage; else waiting for an
    old Job of the same name (an earlier DistillationJob's) to be garbage-collected; else not started."""
    states: list[StageState] = []
    for stage in stages:
        jname = k8s.job_name(name, stage.name)
        prev = before.get(stage.name)
        st = StageState(stage.name, jname, NOT_STARTED)
        if stage.name in own_jobs:
            _from_own_job(st, own_jobs[stage.name], prev, pods.get(stage.name, ()))
        elif prev is not None and prev.state in TERMINAL:
            st.state, st.reason, st.message = prev.state, prev.reason, prev.message
            st.start_time, st.completion_time = prev.start_time, prev.completion_time
        elif stage.name in foreign_jobs:
            st.state, st.reason = PENDING, "WaitingForOldJob"
            st.message = (
                f"Job {jname} belongs to an earlier DistillationJob of the same name; waiting for "
                "the garbage collector to delete it"
            )
        states.append(st)
    return states


def await_verified_publish(
    states: Sequence[StageState], artifacts: Mapping[str, Any], previous: Mapping[str, Any]
) -> None:
    """The job succeeds only with a verified model: a succeeded publish Job counts once its pod's termination
    message (or an earlier pass) has delivered the published URI and SHA-256; until then (pod events can lag
    behind the Job's) the stage stays Running."""
    for st in states:
        if (
            st.name == "publish"
            and st.state == SUCCEEDED
            and not (
                (artifacts.get("uri") and artifacts.get("sha256"))
                or (previous.get("uri") and previous.get("sha256"))
            )
        ):
            st.state, st.reason = RUNNING, "AwaitingPublishResult"
            st.message = (
                f"Job {st.job_name} succeeded; waiting for its pod's result (the verified URI and "
                "SHA-256 of the published model)"
            )
            st.completion_time = None
