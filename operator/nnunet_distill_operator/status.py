"""Pure: what a stage's Job and pods say about the stage, and kstatus conditions from stage states.

Kubernetes reports a stuck training job in many places — Job conditions, pod phases, scheduler
conditions, container waiting reasons, termination states. Users should not have to look there: these
functions fold all of it into one state, reason and message per stage, and into the kstatus conditions
(Ready / Reconciling / Stalled) that kubectl, Argo CD and Flux understand.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nnunet_distill.contract import (  # shared with the trainer: one definition, in the contract
    EXIT_CODE_GATE_FAILED as EXIT_CODE_GATE_FAILED,
    GATE_FAILED,
    GATE_NOT_ENFORCED,
    GATE_PASSED,
    KUEUE_QUEUE_LABEL,
)

PENDING, RUNNING, SUSPENDED, SUCCEEDED, FAILED = "Pending", "Running", "Suspended", "Succeeded", "Failed"
TERMINAL = (SUCCEEDED, FAILED)
ANNOTATION_SUSPENDED_BY_OPERATOR = "distillation.nnunet.io/suspended-by-operator"


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def condition_type(stage: str) -> str:
    """preprocess -> PreprocessComplete: one condition per stage."""
    return f"{stage[:1].upper()}{stage[1:]}Complete"


@dataclass(frozen=True)
class JobView:
    """One stage Job as the operator sees it."""

    name: str
    state: str
    reason: str | None = None
    message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    suspended_by_operator: bool = False
    queued: bool = False


def observe_job(job: Mapping[str, Any]) -> JobView:
    """A stage Job's state: Complete, Failed, suspended (by us, or queued for Kueue), running, or starting."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    name = meta.get("name", "")
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    by_operator = (meta.get("annotations") or {}).get(ANNOTATION_SUSPENDED_BY_OPERATOR) == "true"
    queued = KUEUE_QUEUE_LABEL in (meta.get("labels") or {})
    start = status.get("startTime")

    def view(state: str, reason: str, message: str | None, completion: str | None = None) -> JobView:
        return JobView(name, state, reason, message, start, completion, by_operator, queued)

    if "Complete" in true:
        done = status.get("completionTime") or true["Complete"].get("lastTransitionTime")
        return view(SUCCEEDED, "Succeeded", None, done)
    for kind in ("Failed", "FailureTarget"):
        if kind in true:
            c = true[kind]
            return view(FAILED, c.get("reason") or "Failed", c.get("message"), c.get("lastTransitionTime"))
    if (job.get("spec") or {}).get("suspend"):
        if queued and not by_operator:
            queue = (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
            return view(PENDING, "Queued", f"waiting for Kueue to admit the Job (queue {queue})")
        return view(SUSPENDED, "Suspended", None)
    return _running_or_starting(view, name, job.get("spec") or {}, status)


def _running_or_starting(
    view: Callable[[str, str, str | None], JobView],
    name: str,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
) -> JobView:
    completions = spec.get("completions") or 1
    active = status.get("active") or 0
    ready = status.get("ready")
    succeeded = status.get("succeeded") or 0
    progress = f" ({succeeded}/{completions} pods done)" if completions > 1 else ""
    if active and (ready is None or ready > 0):
        return view(RUNNING, "Running", f"Job {name} is running{progress}")
    if active:
        return view(PENDING, "PodsStarting", f"pods of Job {name} are starting{progress}")
    return view(PENDING, "JobCreated", f"Job {name} has no running pod yet{progress}")


# ---------------------------------------------------------------------------------- termination summary


def parse_summary(message: str | None) -> dict[str, Any]:
    """The JSON summary a trainer stage writes as its termination message ({} for anything else)."""
    if not message:
        return {}
    try:
        doc = json.loads(message)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def pod_summary(pod: Mapping[str, Any], container: str = "main") -> dict[str, Any]:
    """Hook for issue 6: the main container's termination-message summary of a finished pod."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        if cs.get("name") == container:
            term = (cs.get("state") or {}).get("terminated") or {}
            return parse_summary(term.get("message"))
    return {}


ARTIFACT_KEYS = (
    "uri",
    "sha256",
    "sizeBytes",
    "version",
    "modelPath",
    "studentParameters",
    "teacherParameters",
    "onnx",
    "package",
)
# status.metrics keys (nnunet_distill.evaluation.result_metrics) and the JSON type each must have.
NUMBER_METRICS = ("finalDice", "teacherDice", "retention", "worstLabelRetention")
TEXT_METRICS = ("worstLabel", "evaluatedOn")
LIST_METRICS = ("teacherFolds",)
METRIC_KEYS = NUMBER_METRICS + TEXT_METRICS + LIST_METRICS


def _metric(key: str, value: Any) -> bool:
    """Whether a termination message's metric value has the type status.metrics declares for it."""
    if key in NUMBER_METRICS:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in TEXT_METRICS:
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def results_from_summaries(summaries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(status.artifacts, status.metrics) merged from the stages' summaries, later stages winning."""
    artifacts: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for summary in summaries:
        a = summary.get("artifacts")
        if isinstance(a, Mapping):
            artifacts.update({k: a[k] for k in ARTIFACT_KEYS if a.get(k) is not None})
        m = summary.get("metrics")
        if isinstance(m, Mapping):
            metrics.update({k: m[k] for k in METRIC_KEYS if _metric(k, m.get(k))})
    return artifacts, metrics


# ------------------------------------------------------------------------------------------ quality gate

GATE_STAGE = "gate"
GATE_CONDITION = "QualityGate"
GATE_NOT_EVALUATED = "NotEvaluated"
GATE_VERDICT_UNAVAILABLE = "VerdictUnavailable"
GATE_VERDICTS = (GATE_PASSED, GATE_FAILED, GATE_NOT_ENFORCED)
# GATE_PASSED/FAILED/NOT_ENFORCED and EXIT_CODE_GATE_FAILED (`nnunet-distill gate` failing an enforced gate)
# come from nnunet_distill.contract.


@dataclass(frozen=True)
class GateVerdict:
    """The gate stage's verdict, from its termination message (`gate` object)."""

    passed: bool
    enforced: bool
    message: str
    student: str | None = None

    @property
    def reason(self) -> str:
        if self.passed:
            return GATE_PASSED
        return GATE_FAILED if self.enforced else GATE_NOT_ENFORCED


def gate_verdict(summary: Mapping[str, Any]) -> GateVerdict | None:
    """The verdict in a gate pod's termination message; None when it carries none (e.g. the gate crashed)."""
    gate = summary.get("gate")
    if (
        summary.get("stage") != GATE_STAGE
        or not isinstance(gate, Mapping)
        or not isinstance(gate.get("passed"), bool)
    ):
        return None
    passed = gate["passed"]
    enforced = gate.get("enforced") is not False
    message = gate.get("message") if isinstance(gate.get("message"), str) else ""
    if not message:
        message = "quality gate passed" if passed else "quality gate failed"
    student = gate.get("student") if isinstance(gate.get("student"), str) else None
    return GateVerdict(passed, enforced, message, student)


def newest_gate_summary(pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], GateVerdict] | None:
    """(termination message, verdict) of the newest finished gate pod that reached a verdict."""
    ordered = sorted(
        pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True
    )
    for pod in ordered:
        if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            continue
        summary = pod_summary(pod)
        verdict = gate_verdict(summary)
        if verdict is not None:
            return summary, verdict
    return None


def gate_failure_message(verdict_message: str, student: str | None, export: str) -> str:
    """The job's message when an enforced gate blocks publishing: the verdict, and what was kept where."""
    where = (
        f"the student ({student}) and its export ({export})"
        if student
        else f"the student and its export ({export})"
    )
    return f"{verdict_message}; not published: {where} stay on the results volume for inspection"


def gate_condition(
    verdict: GateVerdict | None,
    previous: Sequence[Mapping[str, Any]],
    *,
    description: str,
    stage_state: str | None = None,
    stage_message: str | None = None,
) -> Cond:
    """The QualityGate condition: True/QualityGatePassed, False/QualityGateFailed or QualityGateNotEnforced
    with the verdict's figures and cases, or Unknown/NotEvaluated before the gate reached a verdict.

    Without a verdict in view (the gate pod is gone), an earlier verdict in `previous` stands.
    """
    if verdict is not None:
        return Cond(GATE_CONDITION, verdict.passed, verdict.reason, verdict.message)
    before = next((c for c in previous if c.get("type") == GATE_CONDITION), None)
    if before is not None and before.get("reason") in GATE_VERDICTS:
        return Cond(
            GATE_CONDITION, before.get("status") == "True", before["reason"], before.get("message") or ""
        )
    if stage_state == FAILED:
        return Cond(
            GATE_CONDITION,
            None,
            GATE_NOT_EVALUATED,
            "the gate stage failed before reaching a verdict: "
            f"{stage_message or 'see the GateComplete condition'}",
        )
    if stage_state == SUCCEEDED:
        return Cond(
            GATE_CONDITION,
            None,
            GATE_VERDICT_UNAVAILABLE,
            "the gate stage succeeded (passed, or "
            "qualityGate.enforce is false) but its pod's verdict could not be read",
        )
    return Cond(GATE_CONDITION, None, GATE_NOT_EVALUATED, f"not evaluated yet; {description}")


# ------------------------------------------------------------------------------------------ conditions


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], desired: Sequence[Cond], now: datetime, generation: int | None
) -> list[dict[str, Any]]:
    """metav1.Conditions: lastTransitionTime moves only when a condition's status changes."""
    before = {c.get("type"): c for c in previous}
    out = []
    for cond in desired:
        status = "Unknown" if cond.status is None else "True" if cond.status else "False"
        old = before.get(cond.type)
        changed = old is None or old.get("status") != status
        item: dict[str, Any] = {
            "type": cond.type,
            "status": status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": rfc3339(now) if changed else old.get("lastTransitionTime") or rfc3339(now),
        }
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out


def kstatus_conditions(
    phase: str, reason: str, message: str, stalled: tuple[str, str] | None, suspended: bool
) -> list[Cond]:
    """Ready / Reconciling / Stalled / Suspended for a phase (kstatus: abnormal-true Reconciling, Stalled)."""
    done = phase == "Succeeded"
    failed = phase == "Failed"
    conds = [Cond("Ready", done, "Succeeded" if done else reason, "the model is ready" if done else message)]
    progressing = phase in ("Pending", "Running") and stalled is None
    conds.append(
        Cond("Reconciling", progressing, reason if progressing else phase, message if progressing else "")
    )
    if failed or stalled is not None:
        s_reason, s_message = stalled if stalled is not None else (reason, message)
        conds.append(Cond("Stalled", True, s_reason, s_message))
    else:
        conds.append(Cond("Stalled", False, phase, ""))
    conds.append(
        Cond(
            "Suspended",
            suspended,
            "Suspended" if suspended else "NotSuspended",
            "spec.suspend is true" if suspended else "",
        )
    )
    return conds


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
