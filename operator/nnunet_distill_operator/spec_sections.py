"""The sections of a DistillationJob spec that say what to compute (dataset, storage, teachers, student,
distillation, export, quality gate, output), each a pydantic model: the CRD's schema and the operator's
validation come from these same models. Where the pods run (resources, scheduling, security) is in
`spec_pods`; the spec itself, with its cross-field rules, is `api.DistillationJobSpec`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from nnunet_distill_operator.spec_formats import (
    BUCKET_RULES,
    DNS1123_SUBDOMAIN,
    IDENTIFIER,
    OUTPUT_URI,
    SUB_PATH,
    SpecModel,
)

# --------------------------------------------------------------------------------------------- spec


class DatasetSpec(SpecModel):
    """The nnU-Net dataset the teachers were (or will be) trained on."""

    id: int = Field(
        ge=1,
        le=999,
        description="nnU-Net dataset ID: the XXX of DatasetXXX_Name in nnUNet_raw, "
        "nnUNet_preprocessed and nnUNet_results.",
    )


class VolumeSpec(SpecModel):
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


class StorageSpec(SpecModel):
    """Where nnUNet_raw, nnUNet_preprocessed and nnUNet_results live: one PVC with sub-paths, or one per
    folder.

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


class PreprocessSpec(SpecModel):
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


class TeacherTrainingSpec(SpecModel):
    """Budget for teacher folds the operator trains itself (teachers.train)."""

    epochs: int | None = Field(None, ge=1, le=100000, description="Epochs per fold (nnU-Net default 1000).")
    iterations_per_epoch: int | None = Field(
        None, ge=1, le=100000, description="Training iterations per epoch (nnU-Net default 250)."
    )
    val_iterations: int | None = Field(
        None, ge=1, le=100000, description="Validation iterations per epoch (nnU-Net default 50)."
    )


class TeachersSpec(SpecModel):
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


class StudentSpec(SpecModel):
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


class DistillationSpec(SpecModel):
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
        "pixel",
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

    unlabelled_cases: list[
        Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    ] = Field(
        default_factory=list,
        max_length=100000,
        description="Training cases without annotations that the student learns from the teachers alone "
        "(KD only; needs alpha > 0): preprocessed like any training case with a placeholder label, and in "
        "no fold of splits_final.json, so no teacher trained on a placeholder.",
    )
    labelled_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="With unlabelledCases: the probability that a training sample comes from a labelled case "
        "(nnU-Net draws cases uniformly, so few labelled cases beside many unlabelled ones leave most "
        "samples without a hard loss); default: the uniform draw.",
    )

    @field_validator("test_cases", "unlabelled_cases")
    @classmethod
    def _distinct_cases(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a case twice")
        return v


class ExportSpec(SpecModel):
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


class QualityGateSpec(SpecModel):
    """The quality gate between export and publish: a student that keeps too little of its teacher ensemble's
    held-out Dice is not published.

    Retention is the student's mean Dice / the teacher ensemble's, on cases none of them trained on (the
    dataset's labelled test set imagesTs + labelsTs, else the student's validation cases against only the
    teacher folds that never saw them). Without such a baseline there is no retention, and the gate fails.
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


class SecretRef(SpecModel):
    """A Secret in the job's namespace."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN, description="Secret name.")


class OutputSpec(SpecModel):
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
