"""The sections of a DistillationJob spec that say how its pods run: resources per stage, scheduling (node
selection, tolerations, Kueue), pod security and image pull secrets. Pydantic models, like `spec_sections`:
the CRD's schema and the operator's validation come from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from nnunet_distill_operator.spec_formats import (
    DNS1123_SUBDOMAIN,
    LABEL_KEY,
    Quantity,
    SpecModel,
)


class StageResourcesSpec(SpecModel):
    """Resources of one stage's pods; omitted values use the stage's defaults."""

    gpus: int | None = Field(
        None,
        ge=0,
        le=16,
        description="GPUs per pod (nvidia.com/gpu limit). distill: more than 1 runs one DDP rank per GPU "
        "under torchrun --nproc_per_node in the pod.",
    )
    nodes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="distill only: pods (nodes) of one DDP distillation, each with `gpus` GPUs and ranks. "
        "More than 1 runs one Indexed Job with this many pods started together (Kueue admits them at once) "
        "and a headless Service for torchrun's rendezvous on the index-0 pod; needs gpus >= 1. Default 1.",
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit, e.g. 8 or 7500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit, e.g. 32Gi.")
    data_loader_workers: int | None = Field(
        None,
        ge=0,
        le=128,
        description="nnU-Net data-augmentation worker processes (nnUNet_n_proc_DA); default: CPUs - 1.",
    )


class ResourcesSpec(SpecModel):
    """Per-stage resources. Defaults: teachers and distill 1 GPU, 8 CPU, 32Gi; preprocess 4 CPU, 16Gi;
    export 2 CPU, 8Gi; gate 500m CPU, 512Mi; publish 1 CPU, 2Gi."""

    gpu_resource_name: str = Field(
        "nvidia.com/gpu",
        max_length=253,
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$",
        description="Extended resource name of a GPU (e.g. nvidia.com/mig-1g.10gb).",
    )
    shared_memory: Quantity = Field(
        "8Gi",
        description="Size of the /dev/shm memory volume (nnU-Net's data "
        "loaders pass batches through shared memory).",
    )
    preprocess: StageResourcesSpec = Field(
        default_factory=StageResourcesSpec, description="Preprocess stage."
    )
    teachers: StageResourcesSpec = Field(
        default_factory=StageResourcesSpec, description="Each teacher-fold pod."
    )
    distill: StageResourcesSpec = Field(default_factory=StageResourcesSpec, description="Distillation stage.")
    export: StageResourcesSpec = Field(
        default_factory=StageResourcesSpec, description="Export and package stage (CPU only)."
    )
    gate: StageResourcesSpec = Field(
        default_factory=StageResourcesSpec, description="Quality-gate stage (CPU only; reads one JSON file)."
    )
    publish: StageResourcesSpec = Field(default_factory=StageResourcesSpec, description="Publish stage.")

    @field_validator("export", "gate", "publish")
    @classmethod
    def _cpu_only(cls, v: StageResourcesSpec) -> StageResourcesSpec:
        if v.gpus:
            raise ValueError("this stage runs on CPU only; gpus must be 0")
        return v


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(
        None,
        max_length=317,
        pattern=LABEL_KEY,
        description="Taint key (a label key); empty with Exists matches all taints.",
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; all effects when omitted."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="For NoExecute: how long the pod stays bound."
    )


class SchedulingSpec(SpecModel):
    """Where the stage pods may run and how they are queued."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods require (label keys and values)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Pod tolerations (e.g. GPU taints)."
    )
    affinity: dict[str, Any] | None = Field(
        None,
        json_schema_extra={"type": "object", "x-k8s-schema": "V1Affinity"},
        description="Pod affinity (core/v1 Affinity), validated with the Kubernetes schema.",
    )
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=DNS1123_SUBDOMAIN, description="PriorityClass of the pods."
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=DNS1123_SUBDOMAIN,
        description="Kueue LocalQueue: Jobs get the kueue.x-k8s.io/queue-name label "
        "and start suspended until Kueue admits them.",
    )


class PodSecuritySpec(SpecModel):
    """User and group the trainer runs as (always non-root, no privilege escalation)."""

    run_as_user: int = Field(1000, ge=1, le=2147483647, description="UID of the trainer process (non-zero).")
    run_as_group: int = Field(1000, ge=0, le=2147483647, description="GID of the trainer process.")
    fs_group: int | None = Field(
        1000, ge=0, le=2147483647, description="fsGroup, so the volumes are writable by the trainer."
    )


class LocalObjectReference(SpecModel):
    """A reference to an object in the same namespace."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="Object name.")
