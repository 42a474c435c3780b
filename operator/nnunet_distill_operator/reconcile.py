"""Pure reconciliation: (DistillationJob, its Jobs, their pods, now) -> what to do and the new status.

The controller is level-triggered: every event (the DistillationJob changed, one of its Jobs or pods
changed, a periodic resync) calls `decide` with the whole observed state and applies the Decision. The
function never looks at *why* it was called, so running it twice, late, or after an operator restart
gives the same answer — which is what makes "no duplicate Job" and "status continues" hold.

Spec changes after the first Job exists: fields that only shape Jobs not created yet (resources,
scheduling, image, output, suspend, deadlines) are accepted; fields that define the model (dataset,
teachers, student, distillation, ...) would mix two models into one and are rejected with a Stalled
condition naming them, while the job continues with the spec it started with: `status.acceptedSpec`,
written by the operator through the status subresource before the first Job exists. Users with edit rights
cannot write status, so neither an edit nor an operator restart changes what a running job produces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nnunet_distill_operator import api, k8s
from nnunet_distill_operator.plan import DataPaths, Stage, export_paths, plan
from nnunet_distill_operator.status import (
    FAILED,
    GATE_CONDITION,
    GATE_FAILED,
    GATE_NOT_ENFORCED,
    GATE_PASSED,
    GATE_STAGE,
    PENDING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL,
    Cond,
    JobView,
    PodIssue,
    condition_type,
    format_duration,
    gate_condition,
    gate_failure_message,
    kstatus_conditions,
    merge_conditions,
    newest_gate_summary,
    observe_job,
    parse_time,
    pod_issue,
    pod_summary,
    results_from_summaries,
    rfc3339,
)

# Top-level spec fields that may change while the job runs: they affect only Jobs created afterwards
# (or, for suspend, the running Job). Everything else defines the model being produced.
SAFE_FIELDS = frozenset(
    {
        "suspend",
        "resources",
        "scheduling",
        "image",
        "imagePullPolicy",
        "imagePullSecrets",
        "serviceAccountName",
        "security",
        "backoffLimit",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
        "jobTTLSecondsAfterFinished",
        "output",
        "qualityGate",
    }
)
OWNED_STATUS_FIELDS = (
    "phase",
    "currentStage",
    "observedGeneration",
    "conditions",
    "stages",
    "startTime",
    "completionTime",
    "reason",
    "message",
    "artifacts",
    "metrics",
    "acceptedSpec",
)
NOT_STARTED = "NotStarted"
DEFAULTS = k8s.Defaults()


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: str = ""  # the transition this Event reports; with the job's uid it names the Event (event_name)


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def event_name(cr_name: str, uid: str, event: Event) -> str:
    """A deterministic Event name from the job's uid and the transition: an operator that dies after a status
    change but before its Event, or after the Event but before the status, posts it again under the same name
    (a 409 for the second copy): at least once, never twice."""
    return f"{cr_name[:200]}.{_digest(f'{uid}/{event.key or event.reason}/{event.message}', 16)}"


@dataclass(frozen=True)
class Decision:
    identity: tuple[dict[str, Any], ...] = ()  # the pods' ServiceAccount/Role/RoleBinding, before a Job
    create: tuple[dict[str, Any], ...] = ()  # Job manifests (at most one stage at a time)
    suspend: tuple[str, ...] = ()  # Job names to suspend
    resume: tuple[str, ...] = ()  # Job names to resume (only those the operator suspended)
    release: tuple[str, ...] = ()  # Kueue Jobs the operator suspended: back to Kueue, still
    # suspended (only Kueue's admission un-suspends them)
    status: dict[str, Any] = field(default_factory=dict)  # operator-owned status fields after this decision
    status_patch: dict[str, Any] | None = None  # merge patch for the status subresource; None = unchanged
    accepted_spec: dict[str, Any] | None = None  # new status.acceptedSpec, if it changes (written first)
    events: tuple[Event, ...] = ()
    finished_stages: tuple[tuple[str, str, float], ...] = ()  # (stage, Succeeded|Failed, seconds), newly
    delete: bool = False  # ttlSecondsAfterFinished has passed
    requeue_after: float | None = None  # look again after this many seconds (TTL)
    stages: tuple[Stage, ...] = ()


def _compact(value: Any) -> Any:
    """Drop None values recursively: they mean 'absent' in a merge patch and in stored objects."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def _leaf_diffs(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _leaf_diffs(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [path]


def unsafe_changes(accepted: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Field paths (spec.x.y) that changed between two normalized specs and may not change after start."""
    out = []
    for key in sorted(set(accepted) | set(current)):
        if key in SAFE_FIELDS:
            continue
        out += _leaf_diffs(accepted.get(key), current.get(key), f"spec.{key}")
    return out


def _effective_spec(current: Mapping[str, Any], accepted: Mapping[str, Any]) -> dict[str, Any]:
    """The accepted spec with the safe fields taken from the current one."""
    merged = {k: v for k, v in accepted.items() if k not in SAFE_FIELDS}
    merged.update({k: v for k, v in current.items() if k in SAFE_FIELDS})
    return merged


def _owned_by(job: Mapping[str, Any], uid: str) -> bool:
    refs = (job.get("metadata") or {}).get("ownerReferences") or ()
    return any(r.get("uid") == uid for r in refs)


@dataclass
class _StageState:
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


def _issue_for(stage: str, pods: Sequence[Mapping[str, Any]], failed: bool) -> PodIssue | None:
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


def _await_verified_publish(
    states: Sequence[_StageState], artifacts: Mapping[str, Any], previous: Mapping[str, Any]
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


def decide(
    cr: Mapping[str, Any],
    jobs: Mapping[str, Mapping[str, Any]],
    pods: Mapping[str, Sequence[Mapping[str, Any]]],
    now: datetime,
    defaults: k8s.Defaults = DEFAULTS,
    rejected: Mapping[str, str] | None = None,
    invalid: Mapping[str, str] | None = None,
) -> Decision:
    """Everything the operator should do for one DistillationJob, given what exists now.

    `rejected`: stage -> why the API server refused its Job last time (quota, admission webhook,
    PodSecurity); the Job is tried again, and the reason is shown until it is accepted.
    `invalid`: stage -> why its Job cannot be built at all from this generation of the spec (the kubernetes
    client's schema or the API server's validation refused it), naming the spec field; nothing is created and
    the job is Stalled until the spec changes.
    """
    meta = cr.get("metadata") or {}
    name, namespace, uid = meta.get("name", ""), meta.get("namespace", "default"), meta.get("uid", "")
    generation = meta.get("generation")
    prev_raw = cr.get("status") or {}
    prev = api.parse_status(prev_raw)
    prev_stages = {k: v for k, v in prev.stages.items()}

    own_jobs = {s: j for s, j in jobs.items() if _owned_by(j, uid)}
    foreign_jobs = {s: j for s, j in jobs.items() if s not in own_jobs}
    started = bool(own_jobs) or any(
        st.job_name and st.reason not in _NO_JOB_REASONS for st in prev_stages.values()
    )

    # ---- which spec to run
    problems: list[str] = []
    current: api.DistillationJobSpec | None
    try:
        current = api.parse_spec(cr.get("spec"))
    except api.InvalidSpec as exc:
        current, problems = None, exc.problems
    accepted_raw = prev_raw.get("acceptedSpec")
    accepted: api.DistillationJobSpec | None = None
    if started and isinstance(accepted_raw, dict):
        try:
            accepted = api.parse_spec(accepted_raw)
        except api.InvalidSpec:
            accepted = None
    stalled: tuple[str, str] | None = None
    effective: api.DistillationJobSpec | None = current
    if current is None:
        stalled = ("InvalidSpec", "; ".join(problems))
        effective = accepted if started else None
    elif started and accepted is not None:
        acc, cur = api.spec_to_dict(accepted), api.spec_to_dict(current)
        changed = unsafe_changes(acc, cur)
        if changed:
            why = (
                f"{', '.join(changed)} changed after the job started; a running job cannot change what "
                "model it produces: revert the change, or create a new DistillationJob"
            )
            stalled = ("SpecChangeRejected", why)
            effective = api.DistillationJobSpec.model_validate(_effective_spec(cur, acc))

    events: list[Event] = []
    prev_reason = prev_raw.get("reason")
    prev_message = prev_raw.get("message")

    if effective is None:
        # Never started and invalid: nothing to run, nothing to retry until the spec is fixed.
        message = stalled[1] if stalled else "invalid spec"
        status = {
            "phase": FAILED,
            "currentStage": None,
            "observedGeneration": generation,
            "conditions": merge_conditions(
                prev_raw.get("conditions") or [],
                kstatus_conditions(FAILED, "InvalidSpec", message, stalled, False),
                now,
                generation,
            ),
            "stages": {},
            "startTime": prev_raw.get("startTime"),
            "completionTime": None,
            "reason": "InvalidSpec",
            "message": message,
        }
        if (prev_reason, prev_message) != ("InvalidSpec", message):
            events.append(Event("Warning", "InvalidSpec", message, f"job:InvalidSpec:{generation}"))
        return Decision(status=status, status_patch=_status_patch(prev_raw, status), events=tuple(events))

    stages = plan(effective, name=name, paths=DataPaths.in_pod(name))
    suspend_wanted = effective.suspend

    # ---- observe each stage
    states: list[_StageState] = []
    for stage in stages:
        jname = k8s.job_name(name, stage.name)
        before = prev_stages.get(stage.name)
        st = _StageState(stage.name, jname, NOT_STARTED)
        if stage.name in own_jobs:
            view = observe_job(own_jobs[stage.name])
            st.view = view
            st.state, st.reason, st.message = view.state, view.reason, view.message
            st.start_time = view.start_time or (before.start_time if before else None)
            st.completion_time = view.completion_time
            if view.state not in TERMINAL:
                issue = _issue_for(stage.name, pods.get(stage.name, ()), failed=False)
                if issue is not None:
                    st.reason, st.message = issue.reason, issue.message
            elif view.state == FAILED:
                issue = _issue_for(stage.name, pods.get(stage.name, ()), failed=True)
                detail = (
                    f"Job {jname} failed ({view.reason}" + (f": {view.message}" if view.message else "") + ")"
                )
                st.message = f"{detail}; {issue.reason}: {issue.message}" if issue else detail
                if issue is not None and view.reason in ("BackoffLimitExceeded", "PodFailurePolicy"):
                    st.reason = issue.reason
                elif issue is None and before is not None and before.state == FAILED and before.message:
                    # The failed pod is gone (deleted, garbage-collected): what it said still explains the failure.
                    st.reason, st.message = before.reason, before.message
        elif before is not None and before.state in TERMINAL:
            st.state, st.reason, st.message = before.state, before.reason, before.message
            st.start_time, st.completion_time = before.start_time, before.completion_time
        elif stage.name in foreign_jobs:
            st.state, st.reason = PENDING, "WaitingForOldJob"
            st.message = (
                f"Job {jname} belongs to an earlier DistillationJob of the same name; waiting for "
                "the garbage collector to delete it"
            )
        states.append(st)

    # ---- results from the termination messages of succeeded pods
    summaries = []
    for s in stages:
        for pod in pods.get(s.name, ()):
            if (pod.get("status") or {}).get("phase") == "Succeeded":
                summaries.append(pod_summary(pod))
    # The quality gate's figures count whatever its verdict: a blocked student's figures say why.
    gate_stage = next((s for s in stages if s.name == GATE_STAGE), None)
    gate_seen = newest_gate_summary(pods.get(GATE_STAGE, ())) if gate_stage is not None else None
    verdict = gate_seen[1] if gate_seen else None
    if gate_seen:
        summaries.append({"metrics": gate_seen[0].get("metrics")})
    artifacts, metrics = results_from_summaries(summaries)
    _await_verified_publish(states, artifacts, prev_raw.get("artifacts") or {})

    # ---- what to do
    create: list[dict[str, Any]] = []
    suspend: list[str] = []
    resume: list[str] = []
    release: list[str] = []
    failed = next((s for s in states if s.state == FAILED), None)
    current_state = next((s for s in states if s.state != SUCCEEDED), None)
    owner = k8s.Owner(name, namespace, uid)
    creating = False
    if failed is None and current_state is not None:
        stage = next(s for s in stages if s.name == current_state.name)
        broken = (invalid or {}).get(stage.name)
        manifest: dict[str, Any] | None = None
        if (
            current_state.view is None
            and current_state.state == NOT_STARTED
            and not suspend_wanted
            and broken is None
        ):
            try:
                manifest = k8s.job_for(
                    stage, owner=owner, spec=effective, paths=DataPaths.in_pod(name), defaults=defaults
                )
            except Exception as exc:  # noqa: BLE001 - a spec the Job cannot be built from: Stalled, not a crash
                broken = "; ".join(f"{f}: {m}" for f, m in k8s.build_error_fields(exc, stage.name))
        if broken is not None and current_state.view is None and current_state.state == NOT_STARTED:
            current_state.state, current_state.reason = PENDING, "JobInvalid"
            current_state.message = f"cannot create Job {current_state.job_name}: {broken}"
            if stalled is None:
                stalled = ("JobInvalid", current_state.message)
        elif manifest is not None:
            create.append(manifest)
            current_state.state, current_state.reason = PENDING, "JobCreated"
            # The same words observe_job() uses for a Job without pods, so the next pass changes nothing.
            current_state.message = f"Job {current_state.job_name} has no running pod yet"
            creating = True
            refusal = (rejected or {}).get(stage.name)
            if refusal is not None:
                quota = "quota" in refusal.lower()
                current_state.reason = "QuotaExceeded" if quota else "JobRejected"
                current_state.message = f"the API server refused Job {current_state.job_name}: {refusal}"
        elif current_state.view is not None and current_state.state not in TERMINAL:
            view = current_state.view
            if suspend_wanted and current_state.state != SUSPENDED:
                suspend.append(view.name)
                current_state.state, current_state.reason = SUSPENDED, "Suspended"
                current_state.message = f"Job {view.name} suspended (spec.suspend)"
            elif (
                not suspend_wanted
                and current_state.state == SUSPENDED
                and view.suspended_by_operator
                and view.queued
            ):
                # Never un-suspend a Kueue Job: whether it may run is Kueue's admission, not ours.
                release.append(view.name)
                current_state.state, current_state.reason = PENDING, "Queued"
                current_state.message = (
                    f"waiting for Kueue to admit the Job (queue {effective.scheduling.queue_name})"
                )
            elif not suspend_wanted and current_state.state == SUSPENDED and view.suspended_by_operator:
                resume.append(view.name)
                current_state.state, current_state.reason = PENDING, "Resumed"
                current_state.message = f"Job {view.name} resumed"

    # ---- quality gate
    gate_cond = None
    gate_blocked = False
    if gate_stage is not None:
        gate_st = next(s for s in states if s.name == GATE_STAGE)
        gate_cond = gate_condition(
            verdict,
            prev_raw.get("conditions") or [],
            description=gate_stage.description,
            stage_state=gate_st.state,
            stage_message=gate_st.message,
        )
        gate_blocked = gate_st.state == FAILED and (
            gate_cond.reason == GATE_FAILED or gate_st.reason == GATE_FAILED
        )

    # ---- phase
    done_count = sum(s.state == SUCCEEDED for s in states)
    if failed is not None and gate_blocked and failed.name == GATE_STAGE:
        phase, reason = FAILED, GATE_FAILED
        package_dir = export_paths(DataPaths.in_pod(name))[2]
        if verdict is not None:
            message = gate_failure_message(verdict.message, verdict.student, package_dir)
        elif prev_reason == GATE_FAILED and prev_message:
            message = prev_message  # the gate pod is gone; what it said stays
        else:
            message = gate_failure_message(
                gate_cond.message if gate_cond else "quality gate failed", None, package_dir
            )
        shown = failed
    elif failed is not None:
        phase, reason = FAILED, "StageFailed"
        message = f"stage {failed.name} failed: {failed.message or failed.reason}"
        shown = failed
    elif current_state is None:
        phase, reason = SUCCEEDED, "Succeeded"
        message = f"all {len(states)} stages succeeded"
        shown = states[-1] if states else None
    elif suspend_wanted:
        phase, reason = SUSPENDED, "Suspended"
        message = f"suspended at stage {current_state.name} ({done_count}/{len(states)} stages done)"
        shown = current_state
    else:
        running = current_state.state == RUNNING or done_count > 0
        phase = RUNNING if running else PENDING
        reason = current_state.reason or current_state.state
        message = (
            f"stage {current_state.name} ({done_count + 1}/{len(states)}): "
            f"{current_state.message or current_state.state}"
        )
        shown = current_state

    # ---- status
    start_time = prev_raw.get("startTime")
    if start_time is None and (creating or own_jobs):
        start_time = rfc3339(now)
    completion_time = prev_raw.get("completionTime") if prev.phase == phase else None
    if phase in TERMINAL and completion_time is None:
        completion_time = rfc3339(now)

    conds = kstatus_conditions(phase, reason, message, stalled, phase == SUSPENDED)
    for s in states:
        conds.append(
            Cond(
                condition_type(s.name),
                s.state == SUCCEEDED,
                s.reason if s.state != NOT_STARTED else NOT_STARTED,
                s.message or "",
            )
        )
    if gate_cond is not None:
        conds.append(gate_cond)
    status: dict[str, Any] = {
        "phase": phase,
        "currentStage": shown.name if shown else None,
        "observedGeneration": generation,
        "conditions": merge_conditions(prev_raw.get("conditions") or [], conds, now, generation),
        "stages": {s.name: s.as_status() for s in states if s.state != NOT_STARTED or s.name in prev_stages},
        "startTime": start_time,
        "completionTime": completion_time,
        "reason": stalled[0] if stalled and phase != FAILED else (reason if phase == FAILED else None),
        "message": stalled[1] if stalled and phase != FAILED else (message if phase == FAILED else None),
    }
    if artifacts:
        status["artifacts"] = {**(prev_raw.get("artifacts") or {}), **artifacts}
    if metrics:
        status["metrics"] = {**(prev_raw.get("metrics") or {}), **metrics}

    # ---- events (from transitions only, so a repeated decision emits nothing new)
    finished: list[tuple[str, str, float]] = []
    created_now = {m["metadata"]["labels"][k8s.LABEL_STAGE] for m in create}
    for s in states:
        before = prev_stages.get(s.name)
        # A stage's Job exists (created now, or seen although the last status did not know it yet).
        had_job = before is not None and before.reason not in _NO_JOB_REASONS
        if s.name in created_now or (s.view is not None and not had_job):
            events.append(
                Event(
                    "Normal",
                    "StageStarted",
                    f"created Job {s.job_name} for stage {s.name}",
                    f"{s.name}:Started",
                )
            )
        before_state = before.state if before else None
        before_reason = before.reason if before else None
        if s.state in TERMINAL and before_state != s.state:
            start, end = parse_time(s.start_time), parse_time(s.completion_time)
            seconds = (end - start).total_seconds() if start and end else 0.0
            finished.append((s.name, s.state, seconds))
            if s.state == SUCCEEDED:
                events.append(
                    Event(
                        "Normal",
                        "StageSucceeded",
                        f"stage {s.name} succeeded" + (f" in {format_duration(seconds)}" if seconds else ""),
                        f"{s.name}:Succeeded",
                    )
                )
            elif not (s.name == GATE_STAGE and gate_blocked):  # a blocking gate has its own event below
                events.append(
                    Event(
                        "Warning",
                        "StageFailed",
                        f"stage {s.name}: {s.message or s.reason}",
                        f"{s.name}:Failed",
                    )
                )
        elif s.state not in TERMINAL and s.reason != before_reason and s.reason in _WARNING_REASONS:
            events.append(
                Event("Warning", s.reason, s.message or s.reason, f"{s.name}:{s.reason}:{generation}")
            )
    if gate_cond is not None:
        before_gate = next(
            (c for c in prev_raw.get("conditions") or [] if c.get("type") == GATE_CONDITION), {}
        )
        if gate_cond.reason != before_gate.get("reason"):
            if gate_cond.reason == GATE_PASSED:
                events.append(Event("Normal", GATE_PASSED, gate_cond.message, f"gate:{GATE_PASSED}"))
            elif gate_cond.reason == GATE_NOT_ENFORCED:
                events.append(
                    Event(
                        "Warning",
                        GATE_NOT_ENFORCED,
                        gate_cond.message + "; publishing anyway (spec.qualityGate.enforce is false)",
                        f"gate:{GATE_NOT_ENFORCED}",
                    )
                )
            elif gate_cond.reason == GATE_FAILED:
                events.append(
                    Event(
                        "Warning",
                        GATE_FAILED,
                        message if gate_blocked else gate_cond.message,
                        f"gate:{GATE_FAILED}",
                    )
                )
    if prev.phase != phase:
        if phase == SUCCEEDED:
            where = artifacts.get("uri") or (status.get("artifacts") or {}).get("uri")
            events.append(
                Event(
                    "Normal",
                    "Succeeded",
                    "DistillationJob succeeded"
                    + (f"; model published to {redact_uri(where)}" if where else ""),
                    "job:Succeeded",
                )
            )
        elif phase == SUSPENDED:
            events.append(Event("Normal", "Suspended", message, f"job:Suspended:{generation}"))
        elif prev.phase == SUSPENDED:
            events.append(
                Event(
                    "Normal",
                    "Resumed",
                    f"resumed at stage {current_state.name if current_state else ''}",
                    f"job:Resumed:{generation}",
                )
            )
    if stalled is not None and (prev_reason, prev_message) != stalled:
        events.append(Event("Warning", stalled[0], stalled[1], f"job:{stalled[0]}:{generation}"))

    # ---- accepted spec and TTL
    new_accepted = None
    if creating or started:
        new_accepted = api.spec_to_dict(effective)
        status["acceptedSpec"] = new_accepted
        if new_accepted == accepted_raw:
            new_accepted = None
    delete, requeue = False, None
    ttl = effective.ttl_seconds_after_finished
    if phase in TERMINAL and ttl is not None:
        finished_at = parse_time(completion_time) or now
        remaining = (finished_at - now).total_seconds() + ttl
        if remaining <= 0:
            delete = True
        else:
            requeue = remaining

    identity = k8s.trainer_identity(owner, effective, defaults) if create else ()
    return Decision(
        identity=identity,
        create=tuple(create),
        suspend=tuple(suspend),
        resume=tuple(resume),
        release=tuple(release),
        status=status,
        status_patch=_status_patch(prev_raw, status),
        accepted_spec=new_accepted,
        events=tuple(events),
        finished_stages=tuple(finished),
        delete=delete,
        requeue_after=requeue,
        stages=stages,
    )


_NO_JOB_REASONS = frozenset(
    {None, "JobInvalid", "JobRejected", "QuotaExceeded", "WaitingForOldJob", NOT_STARTED}
)

_WARNING_REASONS = frozenset(
    {
        "SecretMissing",
        "SecretKeyMissing",
        "JobRejected",
        "QuotaExceeded",
        "Unschedulable",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "OOMKilled",
        "Evicted",
        "Preempted",
        "Disrupted",
        "WaitingForOldJob",
    }
)


def redact_uri(uri: str) -> str:
    """A URI fit for status, Events and logs: no query string or fragment (signed URLs, SAS tokens) and no
    user:password@ part."""
    import re

    uri = re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", uri)
    for sep in ("?", "#"):
        if sep in uri:
            uri = uri.split(sep, 1)[0] + f"{sep}<redacted>"
    return uri


def _status_patch(prev: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch turning the operator-owned part of `prev` into `new`; None when nothing changes.

    Fields the pods own (status.progress) are never touched. Explicit nulls delete fields in a merge
    patch, which is how a cleared reason or a stage's cleared message disappears.
    """
    patch: dict[str, Any] = {}
    for key in OWNED_STATUS_FIELDS:
        if key not in new:
            continue
        value = new[key]
        old = prev.get(key)
        unchanged = old is None if value is None else _compact(value) == _compact(old)
        if not unchanged:
            patch[key] = value
    return {"status": patch} if patch else None


def stage_names(stages: Sequence[Stage]) -> list[str]:
    return [s.name for s in stages]
