"""Pure: the Kubernetes Events a decision posts, derived from transitions only (the last status against the
new one), so that deciding twice over the same state posts nothing new."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_distill_operator import api
from nnunet_distill_operator.stage_states import NO_JOB_REASONS, StageState
from nnunet_distill_operator.status import (
    GATE_CONDITION,
    GATE_FAILED,
    GATE_NOT_ENFORCED,
    GATE_PASSED,
    GATE_STAGE,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL,
    Cond,
    format_duration,
    parse_time,
)

# Stage reasons worth a Warning Event when a stage that has not finished enters them.
WARNING_REASONS = frozenset(
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


def redact_uri(uri: str) -> str:
    """A URI fit for status, Events and logs: no query string or fragment (signed URLs, SAS tokens) and no
    user:password@ part."""
    uri = re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", uri)
    for sep in ("?", "#"):
        if sep in uri:
            uri = uri.split(sep, 1)[0] + f"{sep}<redacted>"
    return uri


def stage_events(
    states: Sequence[StageState],
    before: Mapping[str, api.StageStatus],
    created_now: set[str],
    gate_blocked: bool,
    generation: int | None,
) -> tuple[list[Event], list[tuple[str, str, float]]]:
    """Events of stage transitions, and the stages that finished in this pass (stage, state, seconds)."""
    events: list[Event] = []
    finished: list[tuple[str, str, float]] = []
    for s in states:
        prev = before.get(s.name)
        # A stage's Job exists (created now, or seen although the last status did not know it yet).
        had_job = prev is not None and prev.reason not in NO_JOB_REASONS
        if s.name in created_now or (s.view is not None and not had_job):
            message = f"created Job {s.job_name} for stage {s.name}"
            events.append(Event("Normal", "StageStarted", message, f"{s.name}:Started"))
        prev_state = prev.state if prev else None
        prev_reason = prev.reason if prev else None
        if s.state in TERMINAL and prev_state != s.state:
            start, end = parse_time(s.start_time), parse_time(s.completion_time)
            seconds = (end - start).total_seconds() if start and end else 0.0
            finished.append((s.name, s.state, seconds))
            if s.state == SUCCEEDED:
                took = f" in {format_duration(seconds)}" if seconds else ""
                events.append(
                    Event(
                        "Normal", "StageSucceeded", f"stage {s.name} succeeded{took}", f"{s.name}:Succeeded"
                    )
                )
            elif not (s.name == GATE_STAGE and gate_blocked):  # a blocking gate has its own event
                message = f"stage {s.name}: {s.message or s.reason}"
                events.append(Event("Warning", "StageFailed", message, f"{s.name}:Failed"))
        elif s.state not in TERMINAL and s.reason != prev_reason and s.reason in WARNING_REASONS:
            events.append(
                Event("Warning", s.reason, s.message or s.reason, f"{s.name}:{s.reason}:{generation}")
            )
    return events, finished


def gate_events(
    gate_cond: Cond | None, previous_conditions: Sequence[Mapping[str, Any]], blocked: bool, message: str
) -> list[Event]:
    """The quality gate's verdict, once per change of verdict."""
    if gate_cond is None:
        return []
    before = next((c for c in previous_conditions if c.get("type") == GATE_CONDITION), {})
    if gate_cond.reason == before.get("reason"):
        return []
    if gate_cond.reason == GATE_PASSED:
        return [Event("Normal", GATE_PASSED, gate_cond.message, f"gate:{GATE_PASSED}")]
    if gate_cond.reason == GATE_NOT_ENFORCED:
        why = gate_cond.message + "; publishing anyway (spec.qualityGate.enforce is false)"
        return [Event("Warning", GATE_NOT_ENFORCED, why, f"gate:{GATE_NOT_ENFORCED}")]
    if gate_cond.reason == GATE_FAILED:
        why = message if blocked else gate_cond.message
        return [Event("Warning", GATE_FAILED, why, f"gate:{GATE_FAILED}")]
    return []


def phase_events(
    before: str | None,
    phase: str,
    message: str,
    published: str | None,
    current_stage: str | None,
    generation: int | None,
) -> list[Event]:
    """Succeeded (with where the model went), Suspended and Resumed."""
    if before == phase:
        return []
    if phase == SUCCEEDED:
        where = f"; model published to {redact_uri(published)}" if published else ""
        return [Event("Normal", "Succeeded", f"DistillationJob succeeded{where}", "job:Succeeded")]
    if phase == SUSPENDED:
        return [Event("Normal", "Suspended", message, f"job:Suspended:{generation}")]
    if before == SUSPENDED:
        return [
            Event("Normal", "Resumed", f"resumed at stage {current_stage or ''}", f"job:Resumed:{generation}")
        ]
    return []
