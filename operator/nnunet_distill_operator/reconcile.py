"""Pure reconciliation: (DistillationJob, its Jobs, their pods, now) -> what to do and the new status.

The controller is level-triggered: every event (the DistillationJob changed, one of its Jobs or pods
changed, a periodic resync) calls `decide` with the whole observed state and applies the Decision. The
function never looks at *why* it was called, so running it twice, late, or after an operator restart
gives the same answer — which is what makes "no duplicate Job" and "status continues" hold.

`decide` is a composition of small pure steps: which spec runs (`spec_changes`), what each stage's Job and
pods say (`stage_states`), the stages' results, what to create/suspend/resume, the quality gate, the phase,
the status (built through the status model, `status_model.build_status`), the Events (`transitions`) and
the TTL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nnunet_distill_operator import api, k8s
from nnunet_distill_operator.job_errors import build_error_fields
from nnunet_distill_operator.job_phase import Phase, gate, job_phase
from nnunet_distill_operator.plan import DataPaths, Stage, plan
from nnunet_distill_operator.spec_changes import choose_spec
from nnunet_distill_operator.stage_states import (
    NO_JOB_REASONS,
    NOT_STARTED,
    StageState,
    await_verified_publish,
    observe_stages,
    owned_by,
)
from nnunet_distill_operator.status import (
    FAILED,
    GATE_STAGE,
    PENDING,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL,
    Cond,
    GateVerdict,
    condition_type,
    kstatus_conditions,
    merge_conditions,
    newest_gate_summary,
    parse_time,
    pod_summary,
    results_from_summaries,
    rfc3339,
)
from nnunet_distill_operator.status_model import build_status
from nnunet_distill_operator.transitions import Event, event_name, gate_events, phase_events, stage_events
from nnunet_distill_operator.trees import compact

__all__ = ["OWNED_STATUS_FIELDS", "Decision", "Event", "decide", "event_name"]

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
DEFAULTS = k8s.Defaults()


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


@dataclass(frozen=True)
class _Observed:
    """The DistillationJob as the last status described it (the inputs every step reads)."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    prev_raw: Mapping[str, Any]
    prev: api.DistillationJobStatus
    now: datetime

    @classmethod
    def of(cls, cr: Mapping[str, Any], now: datetime) -> _Observed:
        meta = cr.get("metadata") or {}
        prev_raw = cr.get("status") or {}
        return cls(
            meta.get("name", ""),
            meta.get("namespace", "default"),
            meta.get("uid", ""),
            meta.get("generation"),
            prev_raw,
            api.parse_status(prev_raw),
            now,
        )

    @property
    def prev_stages(self) -> dict[str, api.StageStatus]:
        return dict(self.prev.stages)


@dataclass
class _Actions:
    """What to do to the current stage's Job."""

    create: list[dict[str, Any]] = field(default_factory=list)
    suspend: list[str] = field(default_factory=list)
    resume: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    stalled: tuple[str, str] | None = None

    @property
    def creating(self) -> bool:
        return bool(self.create)


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
    obs = _Observed.of(cr, now)
    own_jobs = {s: j for s, j in jobs.items() if owned_by(j, obs.uid)}
    foreign_jobs = {s: j for s, j in jobs.items() if s not in own_jobs}
    started = bool(own_jobs) or any(
        st.job_name and st.reason not in NO_JOB_REASONS for st in obs.prev_stages.values()
    )
    choice = choose_spec(cr.get("spec"), obs.prev_raw.get("acceptedSpec"), started)
    effective = choice.effective
    if effective is None:
        return _invalid_spec_decision(obs, choice.stalled)

    stages = plan(effective, name=obs.name, paths=DataPaths.in_pod(obs.name))
    states = observe_stages(stages, obs.name, own_jobs, foreign_jobs, obs.prev_stages, pods)
    artifacts, metrics, verdict = _results(stages, pods)
    await_verified_publish(states, artifacts, obs.prev_raw.get("artifacts") or {})
    owner = k8s.Owner(obs.name, obs.namespace, obs.uid)
    actions = _act(obs, stages, states, effective, owner, defaults, rejected or {}, invalid or {})
    stalled = choice.stalled or actions.stalled
    gate_cond, gate_blocked = gate(stages, states, verdict, obs.prev_raw)
    phase = job_phase(obs.name, obs.prev_raw, states, effective.suspend, gate_blocked, verdict, gate_cond)
    accepted = api.spec_to_dict(effective) if actions.creating or started else None
    results = _result_fields(obs, artifacts, metrics, accepted)
    status = _status(obs, states, phase, stalled, gate_cond, bool(actions.create or own_jobs), results)
    events, finished = _events(obs, states, actions, phase, stalled, gate_cond, gate_blocked, status)
    delete, requeue = _ttl(phase.phase, status.get("completionTime"), effective, now)
    return Decision(
        identity=_identity(owner, effective, defaults, own_jobs) if actions.create else (),
        create=tuple(actions.create),
        suspend=tuple(actions.suspend),
        resume=tuple(actions.resume),
        release=tuple(actions.release),
        status=status,
        status_patch=_status_patch(obs.prev_raw, status),
        accepted_spec=accepted if accepted != obs.prev_raw.get("acceptedSpec") else None,
        events=tuple(events),
        finished_stages=tuple(finished),
        delete=delete,
        requeue_after=requeue,
        stages=stages,
    )


def _identity(
    owner: k8s.Owner,
    spec: api.DistillationJobSpec,
    defaults: k8s.Defaults,
    own_jobs: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, Any], ...]:
    """The trainer identity to create before a stage's Job: none when one of this DistillationJob's Jobs
    already runs under it. Effects create the identity before the Job that uses it, so such a Job proves it
    exists, and the next stage's Job costs no identity requests (three 409s each, before). Without such a
    Job (the first stage, a retry after a crash between the identity and the Job, or an earlier stage's Job
    that its own TTL removed) the identity is created again; a 409 means it is there."""
    account = k8s.identity_name(owner.name)
    if any(k8s.pod_service_account(job) == account for job in own_jobs.values()):
        return ()
    return k8s.trainer_identity(owner, spec, defaults)


def _result_fields(
    obs: _Observed, artifacts: Mapping[str, Any], metrics: Mapping[str, Any], accepted: dict[str, Any] | None
) -> dict[str, Any]:
    """status.artifacts and .metrics (this pass's on top of the last status's), and .acceptedSpec."""
    fields: dict[str, Any] = {}
    if artifacts:
        fields["artifacts"] = {**(obs.prev_raw.get("artifacts") or {}), **artifacts}
    if metrics:
        fields["metrics"] = {**(obs.prev_raw.get("metrics") or {}), **metrics}
    if accepted is not None:
        fields["accepted_spec"] = accepted
    return fields


def _events(
    obs: _Observed,
    states: Sequence[StageState],
    actions: _Actions,
    phase: Phase,
    stalled: tuple[str, str] | None,
    gate_cond: Cond | None,
    gate_blocked: bool,
    status: Mapping[str, Any],
) -> tuple[list[Event], list[tuple[str, str, float]]]:
    """The Events of this pass's transitions (stages, gate, phase, stall), and the stages that finished."""
    created_now = {m["metadata"]["labels"][k8s.LABEL_STAGE] for m in actions.create}
    events, finished = stage_events(states, obs.prev_stages, created_now, gate_blocked, obs.generation)
    events += gate_events(gate_cond, obs.prev_raw.get("conditions") or [], gate_blocked, phase.message)
    current = next((s for s in states if s.state != SUCCEEDED), None)
    published = (status.get("artifacts") or {}).get("uri")
    current_name = current.name if current else None
    events += phase_events(
        obs.prev.phase, phase.phase, phase.message, published, current_name, obs.generation
    )
    if stalled is not None and (obs.prev_raw.get("reason"), obs.prev_raw.get("message")) != stalled:
        events.append(Event("Warning", stalled[0], stalled[1], f"job:{stalled[0]}:{obs.generation}"))
    return events, finished


def _invalid_spec_decision(obs: _Observed, stalled: tuple[str, str] | None) -> Decision:
    """Never started and invalid: nothing to run, nothing to retry until the spec is fixed."""
    message = stalled[1] if stalled else "invalid spec"
    status = build_status(
        phase=FAILED,
        current_stage=None,
        observed_generation=obs.generation,
        conditions=merge_conditions(
            obs.prev_raw.get("conditions") or [],
            kstatus_conditions(FAILED, "InvalidSpec", message, stalled, False),
            obs.now,
            obs.generation,
        ),
        stages={},
        start_time=obs.prev_raw.get("startTime"),
        completion_time=None,
        reason="InvalidSpec",
        message=message,
    )
    events: tuple[Event, ...] = ()
    if (obs.prev_raw.get("reason"), obs.prev_raw.get("message")) != ("InvalidSpec", message):
        events = (Event("Warning", "InvalidSpec", message, f"job:InvalidSpec:{obs.generation}"),)
    return Decision(status=status, status_patch=_status_patch(obs.prev_raw, status), events=events)


def _results(
    stages: Sequence[Stage], pods: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[dict[str, Any], dict[str, Any], GateVerdict | None]:
    """Artifacts and metrics from the termination messages of succeeded pods, and the gate's verdict. The
    quality gate's figures count whatever its verdict: a blocked student's figures say why."""
    summaries = [
        pod_summary(pod)
        for s in stages
        for pod in pods.get(s.name, ())
        if (pod.get("status") or {}).get("phase") == "Succeeded"
    ]
    has_gate = any(s.name == GATE_STAGE for s in stages)
    gate_seen = newest_gate_summary(pods.get(GATE_STAGE, ())) if has_gate else None
    if gate_seen:
        summaries.append({"metrics": gate_seen[0].get("metrics")})
    artifacts, metrics = results_from_summaries(summaries)
    return artifacts, metrics, gate_seen[1] if gate_seen else None


def _act(
    obs: _Observed,
    stages: Sequence[Stage],
    states: Sequence[StageState],
    effective: api.DistillationJobSpec,
    owner: k8s.Owner,
    defaults: k8s.Defaults,
    rejected: Mapping[str, str],
    invalid: Mapping[str, str],
) -> _Actions:
    """Create the current stage's Job (unless a stage failed), or suspend / resume / release it."""
    actions = _Actions()
    current = next((s for s in states if s.state != SUCCEEDED), None)
    if any(s.state == FAILED for s in states) or current is None:
        return actions
    stage = next(s for s in stages if s.name == current.name)
    if current.view is None and current.state == NOT_STARTED:
        _create(actions, current, stage, obs.name, effective, owner, defaults, rejected, invalid)
    elif current.view is not None and current.state not in TERMINAL:
        _suspend_or_resume(actions, current, effective)
    return actions


def _create(
    actions: _Actions,
    current: StageState,
    stage: Stage,
    name: str,
    effective: api.DistillationJobSpec,
    owner: k8s.Owner,
    defaults: k8s.Defaults,
    rejected: Mapping[str, str],
    invalid: Mapping[str, str],
) -> None:
    """The stage's Job manifest; JobInvalid (Stalled) when it cannot be built; nothing while suspended."""
    broken = invalid.get(stage.name)
    if not effective.suspend and broken is None:
        try:
            manifest = k8s.job_for(
                stage, owner=owner, spec=effective, paths=DataPaths.in_pod(name), defaults=defaults
            )
        except Exception as exc:  # noqa: BLE001 - a spec the Job cannot be built from: Stalled, not a crash
            broken = "; ".join(f"{f}: {m}" for f, m in build_error_fields(exc, stage.name))
        else:
            actions.create.append(manifest)
            current.state, current.reason = PENDING, "JobCreated"
            # The same words observe_job() uses for a Job without pods, so the next pass changes nothing.
            current.message = f"Job {current.job_name} has no running pod yet"
            refusal = rejected.get(stage.name)
            if refusal is not None:
                current.reason = "QuotaExceeded" if "quota" in refusal.lower() else "JobRejected"
                current.message = f"the API server refused Job {current.job_name}: {refusal}"
            return
    if broken is not None:
        current.state, current.reason = PENDING, "JobInvalid"
        current.message = f"cannot create Job {current.job_name}: {broken}"
        actions.stalled = ("JobInvalid", current.message)


def _suspend_or_resume(actions: _Actions, current: StageState, effective: api.DistillationJobSpec) -> None:
    """spec.suspend on a running Job suspends it; off again, the operator's own suspension is undone."""
    view = current.view
    assert view is not None
    if effective.suspend:
        if current.state != SUSPENDED:
            actions.suspend.append(view.name)
            current.state, current.reason = SUSPENDED, "Suspended"
            current.message = f"Job {view.name} suspended (spec.suspend)"
    elif current.state == SUSPENDED and view.suspended_by_operator and view.queued:
        # Never un-suspend a Kueue Job: whether it may run is Kueue's admission, not ours.
        actions.release.append(view.name)
        current.state, current.reason = PENDING, "Queued"
        current.message = f"waiting for Kueue to admit the Job (queue {effective.scheduling.queue_name})"
    elif current.state == SUSPENDED and view.suspended_by_operator:
        actions.resume.append(view.name)
        current.state, current.reason = PENDING, "Resumed"
        current.message = f"Job {view.name} resumed"


def _status(
    obs: _Observed,
    states: Sequence[StageState],
    phase: Phase,
    stalled: tuple[str, str] | None,
    gate_cond: Cond | None,
    has_job: bool,
    results: Mapping[str, Any],
) -> dict[str, Any]:
    """The operator-owned status fields; `results`: artifacts, metrics and accepted_spec, when known."""
    start_time = obs.prev_raw.get("startTime")
    if start_time is None and has_job:
        start_time = rfc3339(obs.now)
    completion_time = obs.prev_raw.get("completionTime") if obs.prev.phase == phase.phase else None
    if phase.phase in TERMINAL and completion_time is None:
        completion_time = rfc3339(obs.now)
    conds = kstatus_conditions(phase.phase, phase.reason, phase.message, stalled, phase.phase == SUSPENDED)
    for s in states:
        reason = s.reason if s.state != NOT_STARTED else NOT_STARTED
        conds.append(Cond(condition_type(s.name), s.state == SUCCEEDED, reason, s.message or ""))
    if gate_cond is not None:
        conds.append(gate_cond)
    failed = phase.phase == FAILED
    prev_stages = obs.prev_stages
    return build_status(
        phase=phase.phase,
        current_stage=phase.shown.name if phase.shown else None,
        observed_generation=obs.generation,
        conditions=merge_conditions(obs.prev_raw.get("conditions") or [], conds, obs.now, obs.generation),
        stages={s.name: s.as_status() for s in states if s.state != NOT_STARTED or s.name in prev_stages},
        start_time=start_time,
        completion_time=completion_time,
        reason=stalled[0] if stalled and not failed else (phase.reason if failed else None),
        message=stalled[1] if stalled and not failed else (phase.message if failed else None),
        **results,
    )


def _ttl(
    phase: str, completion_time: str | None, effective: api.DistillationJobSpec, now: datetime
) -> tuple[bool, float | None]:
    """(delete now, look again in seconds): ttlSecondsAfterFinished counts from the completion time."""
    ttl = effective.ttl_seconds_after_finished
    if phase not in TERMINAL or ttl is None:
        return False, None
    remaining = ((parse_time(completion_time) or now) - now).total_seconds() + ttl
    return (True, None) if remaining <= 0 else (False, remaining)


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
        # Equal trees need no compacting (most passes change nothing; compacting both was 4 % of the CPU).
        unchanged = old is None if value is None else (value == old or compact(value) == compact(old))
        if not unchanged:
            patch[key] = value
    return {"status": patch} if patch else None
