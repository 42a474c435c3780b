"""The DistillationJob API: pydantic models are the single source of the CRD schema and of validation.

Everything a user can write in `spec` is declared here once. The CRD's openAPIV3Schema is generated from
these models (`crd.py`), and the operator validates every object with the same models, so the checks the
API server cannot express (cross-field rules, folds that do not exist) still end in a clear message that
names the field instead of a crashing pod.

Defaults follow the original FastnnUNet CLI (alpha 0.3, temperature 3.0, reduction factor 2, 1000 epochs).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# The names the trainer shares: one definition, in the contract (`X as X`: re-exported as api.X).
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

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
STAGE_NAMES = ("preprocess", "teachers", "distill", "export", "gate", "publish")
DEFAULT_STANDARD_TEACHER_PLANS = DEFAULT_PLANS

# Mount points inside trainer pods; the trainer image sets the same nnUNet_* defaults.
MOUNT_RAW = "/data/nnUNet_raw"
MOUNT_PREPROCESSED = "/data/nnUNet_preprocessed"
MOUNT_RESULTS = "/data/nnUNet_results"

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_.-]*$"  # nnU-Net plans / trainer / planner class names
# A *positive* Kubernetes quantity: no sign, and not zero (a zero or negative CPU, memory or /dev/shm size
# is never what a training pod needs; the API server would accept some of them and the pod would fail).
QUANTITY = r"^(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]+))?$"
QUANTITY_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}
# Label keys (qualified names: optional DNS-subdomain prefix and '/', then a name) and label values.
LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$"
LABEL_VALUE = rf"^({LABEL_NAME})?$"
# Object-storage destinations the publish stage understands; buckets need a name, file:// an absolute path.
# No query string or fragment: signed URLs and SAS tokens are credentials and belong in the Secret.
OUTPUT_URI = r"^((s3|gs|az)://[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9](/[^\s?#]*)?|file:///[^\s?#]*)$"
# Bucket / container naming rules per scheme, stated (never the offending value, which may be a secret typed
# into the wrong field) when a name breaks them.
BUCKET_RULES: dict[str, tuple[str, str]] = {
    "s3": (
        r"^(?!xn--)(?!.*-s3alias$)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        (
            "an S3 bucket name has 3-63 characters: lower-case letters, digits, '.' and '-', starting and ending "
            "with a letter or digit, and is not an IP address"
        ),
    ),
    "gs": (
        (
            r"^(?!goog)(?!.*google)(?!\d+\.\d+\.\d+\.\d+$)(?=.{3,222}$)[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?"
            r"(\.[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?)*$"
        ),
        (
            "a GCS bucket name has 3-63 characters (222 with dots, at most 63 between dots): lower-case letters, "
            "digits, '-', '_' and '.', starting and ending with a letter or digit, not starting with 'goog', not "
            "containing 'google', and not an IP address"
        ),
    ),
    "az": (
        r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
        (
            "an Azure container name has 3-63 characters: lower-case letters, digits and single '-', starting "
            "and ending with a letter or digit"
        ),
    ),
}
SUB_PATH = r"^[^/\s](.*[^/\s])?$"


def _quantity(value: Any) -> Any:
    """Kubernetes quantities may be written as YAML numbers (`cpu: 4`); keep them as strings."""
    if isinstance(value, bool):  # pydantic reports ValueErrors (not TypeErrors) as validation errors
        raise ValueError("must be a Kubernetes quantity such as 4, 500m or 16Gi, not a boolean")  # noqa: TRY004
    if isinstance(value, (int, float)):
        value = str(value)
    if isinstance(value, str) and not re.match(QUANTITY, value):
        raise ValueError(
            f"{value!r} is not a positive Kubernetes quantity (examples: 4, 500m, 16Gi; no sign, not zero)"
        )
    return value


def quantity_value(quantity: str) -> float:
    """A (valid) quantity as a number: '16Gi' -> 17179869184.0, '500m' -> 0.5."""
    m = re.match(r"^([0-9.]+)([eE][+-]?[0-9]+)?([A-Za-z]*)$", quantity)
    if m is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    number = float(m.group(1) + (m.group(2) or ""))
    return number * QUANTITY_SUFFIXES.get(m.group(3), 1)


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
        }
    ),
]


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes convention), snake_case in Python; unknown fields and
    JSON-type mismatches ("yes" for a boolean) are errors, as for the API server."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)


# --------------------------------------------------------------------------------------------- spec


class DatasetSpec(_Model):
    """The nnU-Net dataset the teachers were (or will be) trained on."""

    id: int = Field(
        ge=1,
        le=999,
        description="nnU-Net dataset ID: the XXX of DatasetXXX_Name in nnUNet_raw, "
        "nnUNet_preprocessed and nnUNet_results.",
    )


class VolumeSpec(_Model):
    """One PersistentVolumeClaim (and optional sub-path) holding an nnU-Net folder."""

    claim_name: str = Field(
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="Name of an existing PersistentVolumeClaim in the job's namespace.",
    )
    sub_path: str | None = Field(
        None,
        max_length=1024,
        pattern=SUB_PATH,
        description="Relative path inside the claim (no leading '/'); the claim's root when omitted.",
    )
    read_only: bool = Field(False, description="Mount read-only (only sensible for nnUNet_raw).")

    @field_validator("sub_path")
    @classmethod
    def _no_parent(cls, v: str | None) -> str | None:
        if v is not None and ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v


class StorageSpec(_Model):
    """Where nnUNet_raw, nnUNet_preprocessed and nnUNet_results live: one PVC with sub-paths, or one per folder.

    Pods mount them at /data/nnUNet_raw, /data/nnUNet_preprocessed and /data/nnUNet_results.
    """

    claim_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="One existing PersistentVolumeClaim holding all three folders "
        "under the sub-paths nnUNet_raw, nnUNet_preprocessed and "
        "nnUNet_results. Per-folder entries below override it.",
    )
    raw: VolumeSpec | None = Field(None, description="nnUNet_raw (needed only to preprocess).")
    preprocessed: VolumeSpec | None = Field(None, description="nnUNet_preprocessed.")
    results: VolumeSpec | None = Field(
        None, description="nnUNet_results: teachers, the student and the exported model are written here."
    )

    def volume(self, folder: Literal["raw", "preprocessed", "results"]) -> VolumeSpec | None:
        """The claim for one folder: its own entry, else the shared claim with the conventional sub-path."""
        own = getattr(self, folder)
        if own is not None:
            return own
        if self.claim_name is not None:
            return VolumeSpec(claim_name=self.claim_name, sub_path=f"nnUNet_{folder}")
        return None


class PreprocessSpec(_Model):
    """nnU-Net planning and preprocessing (nnUNetv2_plan_and_preprocess)."""

    mode: Literal["IfMissing", "Always", "Never"] = Field(
        "IfMissing",
        description="IfMissing: run only when the preprocessed data and plans are not on the volume; "
        "Always: run every time; Never: expect them to exist.",
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Worker processes for fingerprinting and "
        "preprocessing (-npfp/-np); default: the "
        "preprocess stage's CPU request, else 4.",
    )
    verify_dataset_integrity: bool = Field(True, description="Pass --verify_dataset_integrity.")
    planner: str | None = Field(
        None,
        pattern=IDENTIFIER,
        max_length=128,
        description="Extra experiment planner for ResEnc plans (nnUNetv2_plan_experiment "
        "-pl); derived from the teacher plans (nnUNetResEncUNetLPlans -> "
        "nnUNetPlannerResEncL) when omitted.",
    )


class TeacherTrainingSpec(_Model):
    """Budget for teacher folds the operator trains itself (teachers.train)."""

    epochs: int | None = Field(None, ge=1, le=100000, description="Epochs per fold (nnU-Net default 1000).")
    iterations_per_epoch: int | None = Field(
        None, ge=1, le=100000, description="Training iterations per epoch (nnU-Net default 250)."
    )
    val_iterations: int | None = Field(
        None, ge=1, le=100000, description="Validation iterations per epoch (nnU-Net default 50)."
    )


class TeachersSpec(_Model):
    """The nnU-Net teacher ensemble (cross-validation folds) whose soft labels the student learns from."""

    plans: str | None = Field(
        None,
        pattern=IDENTIFIER,
        max_length=128,
        description="Teacher plans identifier; default nnUNetPlans, or "
        "nnUNetResEncUNetLPlans for a resenc student.",
    )
    trainer: str = Field(
        "nnUNetTrainer",
        pattern=IDENTIFIER,
        max_length=128,
        description="Trainer class the teachers were trained with.",
    )
    folds: list[Annotated[int, Field(ge=0, le=99)]] | None = Field(
        None,
        min_length=1,
        max_length=100,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Teacher folds to ensemble; all trained folds are detected when omitted "
        "(all numFolds folds when train is true).",
    )
    num_folds: int = Field(
        5,
        ge=1,
        le=100,
        description="Folds in the dataset's cross-validation split "
        "(splits_final.json); nnU-Net's default is 5.",
    )
    folder: str | None = Field(
        None,
        max_length=4096,
        pattern=r"^/[^\s]*$",
        description="Absolute path of a custom teacher model folder inside the pod "
        "(e.g. under /data/nnUNet_results); built from trainer, plans and "
        "configuration when omitted.",
    )
    train: bool = Field(
        False,
        description="Train the teacher folds that are missing (one GPU each, in parallel) before distilling.",
    )
    training: TeacherTrainingSpec = Field(
        default_factory=TeacherTrainingSpec, description="Budget for teacher folds trained by the operator."
    )

    @field_validator("folds")
    @classmethod
    def _unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"folds must be unique, got {v}")
        return v


class StudentSpec(_Model):
    """The student network: the teacher's topology with fewer channels."""

    architecture: Literal["standard", "resenc"] = Field(
        "standard",
        description="standard: plain U-Net teachers (nnUNetv2_distillation_train); resenc: Residual "
        "Encoder teachers (nnUNetv2_resenc_distillation_train).",
    )
    reduction_factor: int = Field(
        2,
        ge=1,
        le=32,
        description="Divide every stage's feature channels by this "
        "factor (2 is about 1/4 of the parameters).",
    )
    plans: str | None = Field(
        None,
        pattern=IDENTIFIER,
        max_length=128,
        description="Student base plans (resenc only, -spl); default nnUNetPlans.",
    )
    block_strategy: Literal["reduce", "keep", "increase", "adaptive"] = Field(
        "keep", description="How residual blocks per stage change for a resenc student (-bs)."
    )


class DistillationSpec(_Model):
    """Knowledge-distillation hyper-parameters and budget."""

    alpha: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Weight of the soft-label (KD) loss; 1 - alpha weighs the hard-label loss.",
    )
    temperature: float = Field(
        3.0, gt=0.0, le=100.0, description="Softmax temperature of the soft labels (> 0; higher is smoother)."
    )
    epochs: int = Field(1000, ge=1, le=100000, description="Student training epochs.")
    iterations_per_epoch: int | None = Field(
        None, ge=1, le=100000, description="Training iterations per epoch (nnU-Net default 250)."
    )
    val_iterations: int | None = Field(
        None, ge=1, le=100000, description="Validation iterations per epoch (nnU-Net default 50)."
    )
    use_da5: bool = Field(
        False,
        alias="useDA5",
        description="Use the stronger DA5 data augmentation (recommended below ~100 training cases).",
    )
    fold: int = Field(0, ge=0, le=99, description="Cross-validation fold the student is trained on.")
    rotate_folds: bool = Field(False, description="Rotate the student's training fold periodically.")
    rotate_frequency: int | None = Field(
        None,
        ge=1,
        le=100000,
        description="Epochs between fold rotations (default 400 standard, 5 resenc); requires rotateFolds.",
    )
    disable_mirroring: bool = Field(
        False, description="Disable mirroring test-time augmentation in validation."
    )
    kd_mode: Literal["pixel", "channel", "both"] = Field(
        "both",
        description="KD term: pixel (KL of the class distributions per voxel), channel (channel-wise KD: "
        "per class, KL of where the class is, so small structures weigh as much as large "
        "ones) or both (their sum).",
    )
    student_init: Literal["teacher", "random"] = Field(
        "teacher",
        description="teacher: start the student from a teacher's weights cut to its width (the "
        "leading channels of every layer); random: nnU-Net's initialisation.",
    )
    teacher_view: Literal["augmented", "clean"] = Field(
        "augmented",
        description="What the teachers label: the student's augmented patch, or the patch before the "
        "intensity-only augmentations (clean).",
    )
    test_cases: (
        list[Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]]
        | None
    ) = Field(
        None,
        min_length=1,
        max_length=10000,
        description="Held-out case identifiers for the final evaluation (default: every labelled "
        "case of imagesTs); a case of imagesTr is refused if any model trained on it.",
    )

    @field_validator("test_cases")
    @classmethod
    def _distinct_cases(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a case twice")
        return v


class ExportSpec(_Model):
    """ONNX export and the serving package (Triton repository, nnunet_inference.json, model card)."""

    model_name: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Model name in the serving package; the DistillationJob's name when omitted.",
    )
    dynamic_shape: bool = Field(False, description="Dynamic input shape (-da; resenc: dynamic batch, -b 0).")
    input_shape: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None,
        min_length=4,
        max_length=5,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="Fixed input shape b c x y z (2d: b c x y) (-is; standard only).",
    )
    nnunet_format: bool = Field(
        False, alias="nnUNetFormat", description="Single-channel, fixed-size export (-nn; standard only)."
    )
    simplify: bool = Field(False, description="Simplify the ONNX graph (-sim).")
    tensorrt_compatible: bool = Field(
        False, alias="tensorRTCompatible", description="TensorRT-parsable graph with a static shape (-fix)."
    )
    batch_size: int | None = Field(
        None, ge=0, le=1024, description="Export batch size, 0 = dynamic (-b; resenc only)."
    )


class QualityGateSpec(_Model):
    """The quality gate between export and publish: a student that keeps too little of its teacher ensemble's
    held-out Dice is not published.

    Retention is the student's mean Dice / the teacher ensemble's, on cases none of them trained on (the dataset's
    labelled test set imagesTs + labelsTs, else the student's validation cases against only the teacher folds that
    never saw them). Without such a baseline there is no retention, and the gate fails.
    """

    min_retention: float = Field(
        0.97,
        gt=0.0,
        le=1.5,
        description="Least mean Dice retention (student / teacher ensemble, mean over "
        "labels) the student must keep; in (0, 1.5].",
    )
    min_label_retention: float = Field(
        0.90,
        gt=0.0,
        le=1.5,
        description="Least Dice retention of every single label (the worst label "
        "is named when it falls short); in (0, 1.5].",
    )
    enforce: bool = Field(
        True,
        description="true: a failing student is not published and the job ends Failed "
        "(reason QualityGateFailed), keeping the student and its export on "
        "the results volume; false: the verdict is reported (QualityGate "
        "condition, status.metrics) but the job goes on and publishes.",
    )


class SecretRef(_Model):
    """A Secret in the job's namespace."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="Secret name.")


class OutputSpec(_Model):
    """Where the verified model package is published."""

    uri: str = Field(
        max_length=2048,
        pattern=OUTPUT_URI,
        description="s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///PATH.",
    )
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with the storage credentials, exposed to the "
        "publish pod only (S3: keys AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, optional AWS_REGION, "
        "AWS_ENDPOINT_URL).",
    )

    @field_validator("uri", mode="before")
    @classmethod
    def _bucket_rules(cls, v: Any) -> Any:
        # The messages state the rule and never the value: a credential pasted into the wrong field must not
        # be echoed into status, Events and logs.
        if not isinstance(v, str):
            return v
        if "?" in v or "#" in v:
            raise ValueError(
                "must not contain a query string or fragment: signed URLs and SAS tokens are "
                "credentials; put them in the Secret named by spec.output.secretRef"
            )
        scheme, sep, rest = v.partition("://")
        rule = BUCKET_RULES.get(scheme)
        if sep and rule is not None:
            bucket = rest.split("/", 1)[0]
            if not re.match(rule[0], bucket):
                raise ValueError(f"the bucket name breaks the naming rules: {rule[1]}")
        return v


class StageResourcesSpec(_Model):
    """Resources of one stage's pods; omitted values use the stage's defaults."""

    gpus: int | None = Field(None, ge=0, le=16, description="GPUs per pod (nvidia.com/gpu limit).")
    cpu: Quantity | None = Field(None, description="CPU request and limit, e.g. 8 or 7500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit, e.g. 32Gi.")
    data_loader_workers: int | None = Field(
        None,
        ge=0,
        le=128,
        description="nnU-Net data-augmentation worker processes (nnUNet_n_proc_DA); default: CPUs - 1.",
    )


class ResourcesSpec(_Model):
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


class Toleration(_Model):
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


class SchedulingSpec(_Model):
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


class PodSecuritySpec(_Model):
    """User and group the trainer runs as (always non-root, no privilege escalation)."""

    run_as_user: int = Field(1000, ge=1, le=2147483647, description="UID of the trainer process (non-zero).")
    run_as_group: int = Field(1000, ge=0, le=2147483647, description="GID of the trainer process.")
    fs_group: int | None = Field(
        1000, ge=0, le=2147483647, description="fsGroup, so the volumes are writable by the trainer."
    )


class LocalObjectReference(_Model):
    """A reference to an object in the same namespace."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="Object name.")


class DistillationJobSpec(_Model):
    """Distill an nnU-Net teacher ensemble into one small student, export it to ONNX and publish it."""

    dataset: DatasetSpec = Field(description="The nnU-Net dataset.")
    configuration: Literal["2d", "3d_fullres", "3d_lowres"] = Field(
        "3d_fullres", description="nnU-Net configuration."
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
        description="ttlSecondsAfterFinished of each stage Job: Kubernetes deletes a finished stage Job and its "
        "pods this long after it finished (default 7 days; at least 10 minutes, so the operator can "
        "read the results first).",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> DistillationJobSpec:
        problems: list[tuple[str, str]] = []

        def problem(field: str, message: str) -> None:
            problems.append((field, message))

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
        self._storage_rules(problem)
        self._resource_rules(problem)
        self._scheduling_rules(problem)
        if problems:
            raise SpecError(problems)
        return self

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
        from nnunet_distill_operator.plan import DEFAULT_RESOURCES  # (plan imports this module)

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
                    "subdomain prefix and '/', then 1-63 letters, digits, '-', '_' or '.', starting and ending "
                    "with a letter or digit",
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


# ------------------------------------------------------------------------------------------- status


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
        description="kstatus conditions Ready, Reconciling, Stalled (and Suspended), plus <Stage>Complete per stage "
        "and QualityGate (the gate's verdict, figures and cases).",
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
    """Validate a CR's spec (a dict as stored in Kubernetes), raising InvalidSpec with field-named problems."""
    if not isinstance(spec, dict):
        raise InvalidSpec(["spec: must be an object with at least dataset and storage"])
    try:
        return DistillationJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(format_errors(exc)) from None
    except SpecError as exc:  # pragma: no cover - pydantic wraps validator errors, kept for safety
        raise InvalidSpec(format_errors(exc)) from None


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


def spec_to_dict(spec: DistillationJobSpec) -> dict[str, Any]:
    """The spec as Kubernetes stores it (camelCase, defaults filled in)."""
    return spec.model_dump(by_alias=True, exclude_none=True, mode="json")
