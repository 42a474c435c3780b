"""The DistillationJob's `.status`: its pydantic model (the CRD's status schema) and the one builder of it.

The operator (`reconcile.decide`, cluster) and the local executor (`local.LocalStatus`, status.yaml) both
build the status they write through `build_status`, so both have the same shape and types, checked by the
model that also generates the CRD's status schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel


class Condition(BaseModel):
    """A kstatus / metav1.Condition."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    type: str = Field(description="Ready, Reconciling, Stalled, Suspended, QualityGate, or <Stage>Complete.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, description="CamelCase reason of the last transition.")
    message: str | None = Field(None, description="Human-readable details.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation this condition reflects.")


class StageStatus(BaseModel):
    """One stage's Job and state."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    job_name: str | None = Field(None, description="Name of the stage's batch/v1 Job.")
    state: Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"] = Field(
        "Pending", description="Pending, Running, Suspended, Succeeded or Failed."
    )
    reason: str | None = Field(
        None, description="Why the stage is in this state (e.g. Unschedulable, OOMKilled)."
    )
    message: str | None = Field(None, description="Details, e.g. the scheduler's message.")
    start_time: str | None = Field(None, description="When the stage's Job started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the stage finished (RFC 3339).")


class Progress(BaseModel):
    """Live training progress, patched by the training pods (status.progress)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    stage: str | None = Field(None, description="Stage reporting this progress (teachers or distill).")
    epoch: int | None = Field(None, description="Epochs completed.")
    total_epochs: int | None = Field(None, description="Epochs planned.")
    train_loss: float | None = Field(None, description="Training loss of the last epoch.")
    kd_loss: float | None = Field(
        None, description="Knowledge-distillation (soft-label) loss of the last epoch."
    )
    pseudo_dice: float | None = Field(
        None, description="nnU-Net's pseudo Dice (mean over foreground labels)."
    )
    eta_seconds: int | None = Field(None, description="Estimated seconds until the stage finishes.")
    updated_at: str | None = Field(None, description="When the pod last reported (RFC 3339).")
    last_checkpoint_epoch: int | None = Field(
        None, description="Epoch of the newest checkpoint on the volume."
    )
    restarts: int | None = Field(None, description="Times the stage resumed after its pod was restarted.")


class Artifacts(BaseModel):
    """The published model (from the stages' termination messages)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    uri: str | None = Field(None, description="Where the verified package was published (the version's URI).")
    sha256: str | None = Field(None, description="SHA-256 of the published model (the ONNX file).")
    size_bytes: int | None = Field(None, description="Size of the published package in bytes.")
    version: str | None = Field(None, description="Published version (a prefix under output.uri).")
    model_path: str | None = Field(
        None, description="The student's nnU-Net model folder on the results volume."
    )
    student_parameters: int | None = Field(None, description="Parameters of the student network.")
    teacher_parameters: int | None = Field(None, description="Parameters of one teacher network.")
    onnx: str | None = Field(None, description="Path of the exported ONNX file on the results volume.")
    package: str | None = Field(None, description="Path of the serving package on the results volume.")


class Metrics(BaseModel):
    """Final accuracy of the student against its teacher ensemble, on held-out cases (see evaluatedOn)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    final_dice: float | None = Field(
        None, description="Student's mean foreground Dice on the cases of evaluatedOn."
    )
    teacher_dice: float | None = Field(
        None, description="Teacher ensemble's (teacherFolds) mean foreground Dice on the same cases."
    )
    retention: float | None = Field(
        None,
        description="finalDice / teacherDice on cases neither trained on; "
        "absent when there is no honest baseline.",
    )
    worst_label_retention: float | None = Field(None, description="The lowest per-label Dice retention.")
    worst_label: str | None = Field(None, description="The label with the lowest Dice retention.")
    evaluated_on: str | None = Field(
        None, description="Which cases the figures come from, e.g. 'test_set: 6 cases (imagesTs)'."
    )
    teacher_folds: list[int] | None = Field(
        None,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="Teacher folds of the ensemble the student is compared with.",
    )


class DistillationJobStatus(BaseModel):
    """Observed state, written by the operator (and status.progress by the training pods)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    phase: Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"] | None = Field(
        None, description="Pending, Running, Suspended, Succeeded or Failed."
    )
    current_stage: str | None = Field(None, description="The stage running now (or the last one).")
    observed_generation: int | None = Field(None, description="metadata.generation the status reflects.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="kstatus conditions Ready, Reconciling, Stalled (and Suspended), plus <Stage>Complete "
        "per stage and QualityGate (the gate's verdict, figures and cases).",
    )
    stages: dict[str, StageStatus] = Field(default_factory=dict, description="Stage name -> Job and state.")
    progress: Progress | None = Field(None, description="Live training progress.")
    artifacts: Artifacts | None = Field(None, description="The exported and published model.")
    metrics: Metrics | None = Field(None, description="Final accuracy of the student.")
    start_time: str | None = Field(None, description="When the first stage started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job succeeded or failed (RFC 3339).")
    reason: str | None = Field(None, description="Why the job failed or stalled.")
    message: str | None = Field(None, description="Details of reason, naming the field or stage to fix.")
    accepted_spec: dict[str, Any] | None = Field(
        None,
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        description="The spec the running job was started with (defaults filled in), written by the operator "
        "before the first stage Job is created. Fields that define the model are taken from here, "
        "never from a later edit of spec; users cannot write status.",
    )


def parse_status(status: Any) -> DistillationJobStatus:
    """Read a status written by anyone (old operator versions, trainer pods); tolerant of unknown fields."""
    if not isinstance(status, dict):
        return DistillationJobStatus()
    try:
        return DistillationJobStatus.model_validate(status)
    except ValidationError:
        # A malformed field must not block reconciliation: keep what parses, drop the rest.
        clean: dict[str, Any] = {}
        for key, value in status.items():
            try:
                DistillationJobStatus.model_validate({key: value})
            except ValidationError:
                continue
            clean[key] = value
        return DistillationJobStatus.model_validate(clean)


def build_status(**fields: Any) -> dict[str, Any]:
    """A status (camelCase, as stored) from its fields (snake_case or camelCase), validated by the model.

    Only the fields given appear, and a field given as None stays, as an explicit null: in a merge patch that
    deletes the field (a cleared reason, a stage's cleared message), which is how the operator clears it.
    """
    return DistillationJobStatus.model_validate(fields).model_dump(
        by_alias=True, exclude_unset=True, mode="json"
    )
