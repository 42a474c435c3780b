"""Pure: a DistillationJob's phase (Pending, Running, Suspended, Succeeded, Failed) from its stages' states,
and the quality gate's condition and whether it blocks the job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_distill_operator.plan import DataPaths, Stage, export_paths
from nnunet_distill_operator.stage_states import StageState
from nnunet_distill_operator.status import (
    FAILED,
    GATE_FAILED,
    GATE_STAGE,
    PENDING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Cond,
    GateVerdict,
    gate_condition,
    gate_failure_message,
)


@dataclass(frozen=True)
class Phase:
    """The job's phase, why, and the stage the status shows as current."""

    phase: str
    reason: str
    message: str
    shown: StageState | None


def gate(
    stages: Sequence[Stage],
    states: Sequence[StageState],
    verdict: GateVerdict | None,
    prev_raw: Mapping[str, Any],
) -> tuple[Cond | None, bool]:
    """The QualityGate condition, and whether the gate blocks the job (failed, enforced)."""
    gate_stage = next((s for s in stages if s.name == GATE_STAGE), None)
    if gate_stage is None:
        return None, False
    gate_st = next(s for s in states if s.name == GATE_STAGE)
    cond = gate_condition(
        verdict,
        prev_raw.get("conditions") or [],
        description=gate_stage.description,
        stage_state=gate_st.state,
        stage_message=gate_st.message,
    )
    blocked = gate_st.state == FAILED and (cond.reason == GATE_FAILED or gate_st.reason == GATE_FAILED)
    return cond, blocked


def job_phase(
    name: str,
    prev_raw: Mapping[str, Any],
    states: Sequence[StageState],
    suspend_wanted: bool,
    gate_blocked: bool,
    verdict: GateVerdict | None,
    gate_cond: Cond | None,
) -> Phase:
    """The job's phase, reason and message, and the stage the status shows as current."""
    failed = next((s for s in states if s.state == FAILED), None)
    current = next((s for s in states if s.state != SUCCEEDED), None)
    done_count = sum(s.state == SUCCEEDED for s in states)
    if failed is not None and gate_blocked and failed.name == GATE_STAGE:
        package_dir = export_paths(DataPaths.in_pod(name))[2]
        prev_reason, prev_message = prev_raw.get("reason"), prev_raw.get("message")
        if verdict is not None:
            message = gate_failure_message(verdict.message, verdict.student, package_dir)
        elif prev_reason == GATE_FAILED and prev_message:
            message = prev_message  # the gate pod is gone; what it said stays
        else:
            why = gate_cond.message if gate_cond else "quality gate failed"
            message = gate_failure_message(why, None, package_dir)
        return Phase(FAILED, GATE_FAILED, message, failed)
    if failed is not None:
        return Phase(
            FAILED, "StageFailed", f"stage {failed.name} failed: {failed.message or failed.reason}", failed
        )
    if current is None:
        return Phase(
            SUCCEEDED, "Succeeded", f"all {len(states)} stages succeeded", states[-1] if states else None
        )
    if suspend_wanted:
        message = f"suspended at stage {current.name} ({done_count}/{len(states)} stages done)"
        return Phase(SUSPENDED, "Suspended", message, current)
    running = current.state == RUNNING or done_count > 0
    message = f"stage {current.name} ({done_count + 1}/{len(states)}): {current.message or current.state}"
    return Phase(RUNNING if running else PENDING, current.reason or current.state, message, current)
