"""The DistillationJob API: pydantic models are the single source of the CRD schema and of validation.

Everything a user can write in `spec` is declared here once. The CRD's openAPIV3Schema is generated from
these models (`crd.py`), and the operator validates every object with the same models, so the checks the
API server cannot express (cross-field rules, folds that do not exist) still end in a clear message that
names the field instead of a crashing pod.

Defaults follow the original FastnnUNet CLI (alpha 0.3, temperature 3.0, reduction factor 2, 1000 epochs).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from nnunet_distill_operator.spec_formats import (  # noqa: F401 - quantity_value: part of the API
    DNS1123_SUBDOMAIN,
    LABEL_KEY,
    LABEL_VALUE,
    SpecModel,
    quantity_value,
)
from nnunet_distill_operator.spec_sections import (  # noqa: F401 - the spec's sections, defined there
    DatasetSpec,
    DistillationSpec,
    ExportSpec,
    OutputSpec,
    PreprocessSpec,
    QualityGateSpec,
    SecretRef,
    StorageSpec,
    StudentSpec,
    TeachersSpec,
    TeacherTrainingSpec,
    VolumeSpec,
)
from nnunet_distill_operator.spec_pods import (  # noqa: F401 - the spec's pod sections, defined there
    LocalObjectReference,
    PodSecuritySpec,
    ResourcesSpec,
    SchedulingSpec,
    StageResourcesSpec,
    Toleration,
)
from nnunet_distill_operator.status_model import (  # noqa: F401 - the API's status types, defined there
    Artifacts,
    Condition,
    DistillationJobStatus,
    Metrics,
    Progress,
    StageStatus,
    parse_status,
)

# The names the trainer shares: one definition, in the contract (`X as X`: re-exported as api.X).
from nnunet_distill import contract
from nnunet_distill.contract import (
    API_VERSION as API_VERSION,
    DEFAULT_PLANS,
    DEFAULT_RESENC_STUDENT_PLANS,
    DEFAULT_RESENC_TEACHER_PLANS,
    GROUP as GROUP,
    KIND as KIND,
    PLURAL as PLURAL,
    RESENC_PLANNERS,
    VERSION as VERSION,
)

SINGULAR = "distillationjob"
SHORT_NAMES = ("dj", "distill")
CATEGORIES = ("nnunet",)

DEFAULT_STANDARD_TEACHER_PLANS = DEFAULT_PLANS

# Mount points inside trainer pods; the trainer image sets the same nnUNet_* defaults.
MOUNT_RAW = "/data/nnUNet_raw"
MOUNT_PREPROCESSED = "/data/nnUNet_preprocessed"
MOUNT_RESULTS = "/data/nnUNet_results"


class DistillationJobSpec(SpecModel):
    """Distill an nnU-Net teacher ensemble into one small student, export it to ONNX and publish it."""

    dataset: DatasetSpec = Field(description="The nnU-Net dataset.")
    configuration: Literal["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"] = Field(
        "3d_fullres",
        description="nnU-Net configuration. 3d_cascade_fullres runs nnU-Net's cascade in order: the "
        "3d_lowres teachers (when trained) and students on every fold, then the cascade's.",
    )
    storage: StorageSpec = Field(
        description="Volumes holding nnUNet_raw, nnUNet_preprocessed and nnUNet_results."
    )
    preprocess: PreprocessSpec = Field(
        default_factory=PreprocessSpec, description="Planning and preprocessing."
    )
    teachers: TeachersSpec = Field(default_factory=TeachersSpec, description="The teacher ensemble.")
    student: StudentSpec = Field(default_factory=StudentSpec, description="The student network.")
    distillation: DistillationSpec = Field(
        default_factory=DistillationSpec, description="Distillation hyper-parameters."
    )
    export: ExportSpec = Field(default_factory=ExportSpec, description="ONNX export and packaging.")
    quality_gate: QualityGateSpec = Field(
        default_factory=QualityGateSpec,
        description="Held-out Dice retention the student must keep to be "
        "published (on by default: minRetention 0.97, "
        "minLabelRetention 0.90, enforce true).",
    )
    output: OutputSpec | None = Field(
        None, description="Publish destination; without it the package stays on the results volume."
    )
    image: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^[^\s]+$",
        description="Trainer image; the operator's default (--trainer-image) when omitted.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy of the stage pods."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the trainer image."
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="Service account of the stage pods; it needs only "
        "get/patch on distillationjobs/status. The operator's "
        "default when omitted.",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Per-stage resources.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Placement and queueing.")
    security: PodSecuritySpec = Field(default_factory=PodSecuritySpec, description="Pod user and group.")
    suspend: bool = Field(
        False,
        description="Suspend the running stage (its pods are deleted; training "
        "resumes from the last checkpoint) and start no new stage.",
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="Pod failures each stage Job tolerates (evictions and preemptions do not count).",
    )
    active_deadline_seconds: int | None = Field(None, ge=1, description="Deadline of each stage Job.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the DistillationJob (and its Jobs) this long after it finished."
    )
    job_ttl_seconds_after_finished: int = Field(
        604800,
        ge=600,
        le=31536000,
        alias="jobTTLSecondsAfterFinished",
        description="ttlSecondsAfterFinished of each stage Job: Kubernetes deletes a finished stage Job and "
        "its pods this long after it finished (default 7 days; at least 10 minutes, so the operator can "
        "read the results first).",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> DistillationJobSpec:
        problems: list[tuple[str, str]] = []

        def problem(field: str, message: str) -> None:
            problems.append((field, message))

        self._volume_rules(problem)
        self._fold_rules(problem)
        self._architecture_rules(problem)
        self._export_rules(problem)
        self._storage_rules(problem)
        self._resource_rules(problem)
        self._scheduling_rules(problem)
        self._cascade_rules(problem)
        self._unlabelled_rules(problem)
        if problems:
            raise SpecError(problems)
        return self

    def _volume_rules(self, problem: Any) -> None:
        storage = self.storage
        for folder in ("preprocessed", "results"):
            if storage.volume(folder) is None:  # type: ignore[arg-type]
                problem(
                    f"storage.{folder}",
                    f"no PersistentVolumeClaim for nnUNet_{folder}: set "
                    f"storage.claimName (one claim with sub-paths) or storage.{folder}.claimName",
                )
        if self.preprocess.mode != "Never" and storage.volume("raw") is None:
            problem(
                "storage.raw",
                "no PersistentVolumeClaim for nnUNet_raw, which preprocessing reads: "
                "set storage.claimName or storage.raw.claimName, or preprocess.mode: Never",
            )

    def _fold_rules(self, problem: Any) -> None:
        n = self.teachers.num_folds
        for i, fold in enumerate(self.teachers.folds or ()):
            if fold >= n:
                problem(
                    f"teachers.folds[{i}]",
                    f"fold {fold} does not exist: the cross-validation has "
                    f"folds 0..{n - 1} (teachers.numFolds={n})",
                )
        if self.distillation.fold >= n:
            problem(
                "distillation.fold",
                f"fold {self.distillation.fold} does not exist: the "
                f"cross-validation has folds 0..{n - 1} (teachers.numFolds={n})",
            )
        if self.teachers.train and self.teachers.folder is not None:
            problem(
                "teachers.folder",
                "cannot be combined with teachers.train: trained folds are written to "
                "nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>; drop one of them",
            )
        if self.distillation.rotate_frequency is not None and not self.distillation.rotate_folds:
            problem("distillation.rotateFrequency", "only applies with distillation.rotateFolds: true")

    def _cascade_rules(self, problem: Any) -> None:
        """A cascade finds its lowres stage beside it in nnUNet_results (nnU-Net's own lookup, by trainer and
        plans name), so its teachers cannot come from elsewhere, and the clean teacher view has no
        previous-stage channels."""
        if self.configuration != "3d_cascade_fullres":
            return
        if self.teachers.folder:
            problem(
                "teachers.folder",
                "is not supported with configuration 3d_cascade_fullres: the cascade teachers and their "
                "3d_lowres folds are found under nnUNet_results by teachers.trainer and teachers.plans; "
                "drop teachers.folder",
            )
        if self.distillation.teacher_view == "clean":
            problem("distillation.teacherView", "clean does not support 3d_cascade_fullres: use augmented")

    def _unlabelled_rules(self, problem: Any) -> None:
        """Cases without labels teach the student only through KD, and a held-out case is never trained on."""
        d = self.distillation
        if contract.needs_kd(d.unlabelled_cases, d.alpha):
            problem(
                "distillation.unlabelledCases",
                "needs KD: with alpha 0 the student learns nothing from a case without labels (set "
                "distillation.alpha > 0 or drop unlabelledCases)",
            )
        if both := contract.held_out(d.unlabelled_cases, d.test_cases):
            problem("distillation.unlabelledCases", f"also in testCases: {', '.join(both)}")
        if why := contract.labelled_share_problem(d.labelled_share, d.unlabelled_cases):
            problem("distillation.labelledShare", why)

    def _architecture_rules(self, problem: Any) -> None:
        resenc = self.student.architecture == "resenc"
        if not resenc:
            if self.student.plans is not None:
                problem(
                    "student.plans",
                    "applies to architecture resenc only; a standard student "
                    "derives its plans from teachers.plans",
                )
            if self.student.block_strategy != "keep":
                problem("student.blockStrategy", "applies to architecture resenc only")
            if self.export.batch_size is not None:
                problem(
                    "export.batchSize",
                    "applies to architecture resenc only; use export.dynamicShape or export.inputShape",
                )
        else:
            if self.export.input_shape is not None:
                problem(
                    "export.inputShape",
                    "applies to architecture standard only; use export.batchSize for resenc",
                )
            if self.export.nnunet_format:
                problem("export.nnUNetFormat", "applies to architecture standard only")

    def _export_rules(self, problem: Any) -> None:
        if self.export.tensorrt_compatible and (self.export.dynamic_shape or self.export.nnunet_format):
            problem(
                "export.tensorRTCompatible",
                "TensorRT needs a static shape: drop export.dynamicShape "
                "and export.nnUNetFormat (export.inputShape chooses the static shape)",
            )
        if self.export.nnunet_format and (self.export.dynamic_shape or self.export.input_shape is not None):
            problem(
                "export.nnUNetFormat",
                "fixes the shape to the patch size; it cannot be combined "
                "with export.dynamicShape or export.inputShape",
            )
        if self.export.input_shape is not None:
            want = 4 if self.configuration == "2d" else 5
            if len(self.export.input_shape) != want:
                problem(
                    "export.inputShape",
                    f"configuration {self.configuration} needs {want} numbers "
                    f"({'b c x y' if want == 4 else 'b c x y z'}), got {len(self.export.input_shape)}",
                )
            if self.export.dynamic_shape:
                problem("export.inputShape", "contradicts export.dynamicShape: true; set one of them")

    def _storage_rules(self, problem: Any) -> None:
        if self.storage.results is not None and self.storage.results.read_only:
            problem(
                "storage.results.readOnly",
                "nnUNet_results must be writable: every stage writes its "
                "models, exports and checkpoints there",
            )
        if (
            self.storage.preprocessed is not None
            and self.storage.preprocessed.read_only
            and self.preprocess.mode == "Always"
        ):
            problem(
                "storage.preprocessed.readOnly",
                "preprocess.mode Always writes nnUNet_preprocessed; mount "
                "it writable or use preprocess.mode Never",
            )
        if (
            self.storage.preprocessed is not None
            and self.storage.preprocessed.read_only
            and self.teachers.train
        ):
            problem(
                "storage.preprocessed.readOnly",
                "teachers.train writes the cross-validation split "
                "(splits_final.json) into nnUNet_preprocessed; mount it writable",
            )

    def _resource_rules(self, problem: Any) -> None:
        """/dev/shm is a memory-backed volume: it counts against the pod's memory limit. The training stages,
        whose data loaders pass batches through it (teachers, distill), need a limit above its size."""
        from nnunet_distill_operator.distributed import spec_problems
        from nnunet_distill_operator.plan import DEFAULT_RESOURCES  # (plan imports this module)

        for field, message in spec_problems(self.resources):
            problem(field, message)
        shm = quantity_value(self.resources.shared_memory)
        for stage in ("teachers", "distill"):
            own = getattr(self.resources, stage).memory
            memory = own if own is not None else DEFAULT_RESOURCES[stage][2]
            if quantity_value(memory) <= shm:
                field = f"resources.{stage}.memory" if own is not None else "resources.sharedMemory"
                problem(
                    field,
                    f"the {stage} stage's memory limit ({memory}) must be larger than "
                    f"resources.sharedMemory ({self.resources.shared_memory}): /dev/shm is memory-backed "
                    "and counts against the limit",
                )

    def _scheduling_rules(self, problem: Any) -> None:
        sched = self.scheduling
        for key, value in sched.node_selector.items():
            if not re.match(LABEL_KEY, key) or len(key) > 317:
                problem(
                    "scheduling.nodeSelector",
                    f"key {key!r} is not a valid label key: an optional DNS "
                    "subdomain prefix and '/', then 1-63 letters, digits, '-', '_' or '.', starting and "
                    "ending with a letter or digit",
                )
            elif not re.match(LABEL_VALUE, value):
                problem(
                    f"scheduling.nodeSelector[{key}]",
                    "is not a valid label value: at most 63 letters, "
                    "digits, '-', '_' or '.', starting and ending with a letter or digit",
                )
        for i, tol in enumerate(sched.tolerations):
            where = f"scheduling.tolerations[{i}]"
            if tol.operator == "Exists" and tol.value:
                problem(
                    f"{where}.value", "must be empty when operator is Exists (Exists matches every value)"
                )
            if not tol.key and tol.operator != "Exists":
                problem(f"{where}.operator", "must be Exists when key is empty (that tolerates every taint)")
            if tol.toleration_seconds is not None and tol.effect != "NoExecute":
                problem(f"{where}.tolerationSeconds", "applies only to effect NoExecute")
            if tol.value and not re.match(LABEL_VALUE, tol.value):
                problem(
                    f"{where}.value",
                    "is not a valid label value: at most 63 letters, digits, '-', '_' or "
                    "'.', starting and ending with a letter or digit",
                )
        if sched.affinity is not None:
            for field, message in kubernetes_errors("V1Affinity", sched.affinity):
                problem(f"scheduling.affinity{field}", message)

    # ---- derived values used by the planner (pure, so kept next to the fields they derive from)

    @property
    def teacher_plans(self) -> str:
        if self.teachers.plans:
            return self.teachers.plans
        return (
            DEFAULT_RESENC_TEACHER_PLANS
            if self.student.architecture == "resenc"
            else DEFAULT_STANDARD_TEACHER_PLANS
        )

    @property
    def student_base_plans(self) -> str:
        """Plans the student's own plans are derived from (naming.student_plans_identifier's base)."""
        if self.student.architecture == "resenc":
            return self.student.plans or DEFAULT_RESENC_STUDENT_PLANS
        return self.teacher_plans

    @property
    def planner(self) -> str | None:
        """Extra ResEnc experiment planner to run after the default plan_and_preprocess, if any."""
        if self.preprocess.planner:
            return self.preprocess.planner
        return RESENC_PLANNERS.get(self.teacher_plans) or RESENC_PLANNERS.get(self.student_base_plans)

    @property
    def teacher_folds(self) -> tuple[int, ...] | None:
        """Explicit teacher folds; all folds when the operator trains them; None = detected by the trainer."""
        if self.teachers.folds is not None:
            return tuple(self.teachers.folds)
        if self.teachers.train:
            return tuple(range(self.teachers.num_folds))
        return None


class SpecError(ValueError):
    """Cross-field problems, each tied to the field (path relative to spec) that has to change."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"spec.{f}: {m}" for f, m in problems))


def kubernetes_errors(model: str, value: Any) -> list[tuple[str, str]]:
    """(".path.in.value", message) for each way `value` breaks the Kubernetes type `model` (V1Affinity, ...),
    checked with the kubernetes client's own models (generated from the Kubernetes OpenAPI schema, the same
    schema the CRD embeds for the API server). Without the client installed nothing is checked here."""
    try:
        from kubernetes import client
    except ImportError:  # pragma: no cover - the operator always has it; `run --local` may not
        return []
    try:
        getattr(client, model).model_validate(value)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            out.append((path, msg))
        return out
    return []


# ----------------------------------------------------------------------------------------- parsing


def format_errors(exc: ValidationError | SpecError) -> list[str]:
    """One line per problem, each starting with the full field path (spec.distillation.alpha: ...)."""
    if isinstance(exc, SpecError):
        return [f"spec.{field}: {msg}" for field, msg in exc.problems]
    lines: list[str] = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        if isinstance(ctx.get("error"), SpecError):
            lines.extend(format_errors(ctx["error"]))
            continue
        path = "spec"
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `kubectl explain distillationjob.spec`)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{path}: {msg}")
    return lines


class InvalidSpec(ValueError):
    """The spec cannot be run; `problems` name each field to fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_spec(spec: Any) -> DistillationJobSpec:
    """Validate a CR's spec (a dict as stored in Kubernetes), raising InvalidSpec with field-named
    problems."""
    if not isinstance(spec, dict):
        raise InvalidSpec(["spec: must be an object with at least dataset and storage"])
    try:
        return DistillationJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(format_errors(exc)) from None
    except SpecError as exc:  # pragma: no cover - pydantic wraps validator errors, kept for safety
        raise InvalidSpec(format_errors(exc)) from None


def spec_to_dict(spec: DistillationJobSpec) -> dict[str, Any]:
    """The spec as Kubernetes stores it (camelCase, defaults filled in)."""
    return spec.model_dump(by_alias=True, exclude_none=True, mode="json")
