"""The DistillationJob API: defaults, and invalid specs rejected with a message naming the field.

Every invalid spec is checked against the operator's validation (pydantic: what sets Stalled/InvalidSpec),
and those marked `schema` also against the generated CRD schema as the API server applies it with strict
field validation (so `kubectl apply` already refuses them).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from nnunet_distill_operator import api, crd

BASE: dict[str, Any] = {"dataset": {"id": 27}, "storage": {"claimName": "nnunet-data"}}
RESENC = {"student": {"architecture": "resenc"}}


def _set(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set spec[a][b][c] for path 'a.b.c' (creating objects); value DELETE removes the key."""
    spec = copy.deepcopy(spec)
    node = spec
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return spec


DELETE = object()

# (case id, field path the message must name, spec, rejected by the CRD schema too?)
INVALID: list[tuple[str, str, dict[str, Any], bool]] = [
    ("alpha-above-1", "spec.distillation.alpha", _set(BASE, "distillation.alpha", 1.5), True),
    ("alpha-negative", "spec.distillation.alpha", _set(BASE, "distillation.alpha", -0.1), True),
    ("alpha-string", "spec.distillation.alpha", _set(BASE, "distillation.alpha", "high"), True),
    ("temperature-zero", "spec.distillation.temperature", _set(BASE, "distillation.temperature", 0), True),
    ("temperature-negative", "spec.distillation.temperature", _set(BASE, "distillation.temperature", -1.0), True),
    ("reduction-zero", "spec.student.reductionFactor", _set(BASE, "student.reductionFactor", 0), True),
    ("reduction-float", "spec.student.reductionFactor", _set(BASE, "student.reductionFactor", 2.5), True),
    ("epochs-zero", "spec.distillation.epochs", _set(BASE, "distillation.epochs", 0), True),
    ("iterations-zero", "spec.distillation.iterationsPerEpoch", _set(BASE, "distillation.iterationsPerEpoch", 0),
     True),
    ("dataset-id-zero", "spec.dataset.id", _set(BASE, "dataset.id", 0), True),
    ("dataset-id-too-big", "spec.dataset.id", _set(BASE, "dataset.id", 1000), True),
    ("dataset-id-string", "spec.dataset.id", _set(BASE, "dataset.id", "liver"), True),
    ("dataset-missing", "dataset", _set(BASE, "dataset", DELETE), True),
    ("storage-missing", "storage", _set(BASE, "storage", DELETE), True),
    ("configuration-unknown", "spec.configuration", _set(BASE, "configuration", "3d_highres"), True),
    ("teacher-fold-negative", "spec.teachers.folds[0]", _set(BASE, "teachers.folds", [-1]), True),
    ("teacher-fold-duplicate", "spec.teachers.folds", _set(BASE, "teachers.folds", [0, 0]), False),
    ("teacher-fold-missing", "spec.teachers.folds[1]", _set(BASE, "teachers.folds", [0, 7]), False),
    ("teacher-folds-empty", "spec.teachers.folds", _set(BASE, "teachers.folds", []), True),
    ("student-fold-missing", "spec.distillation.fold", _set(BASE, "distillation.fold", 5), False),
    ("student-fold-negative", "spec.distillation.fold", _set(BASE, "distillation.fold", -1), True),
    ("num-folds-zero", "spec.teachers.numFolds", _set(BASE, "teachers.numFolds", 0), True),
    ("unknown-top-level", "spec.alpah", _set(BASE, "alpah", 0.3), True),
    ("unknown-nested", "spec.distillation.temprature", _set(BASE, "distillation.temprature", 3.0), True),
    ("storage-empty", "spec.storage.results", _set(BASE, "storage", {}), False),
    ("claim-name-invalid", "spec.storage.claimName", _set(BASE, "storage.claimName", "Bad_Name"), True),
    ("results-claim-missing", "spec.storage.results.claimName",
     _set(BASE, "storage.results", {"subPath": "results"}), True),
    ("sub-path-absolute", "spec.storage.results.subPath",
     _set(BASE, "storage.results", {"claimName": "r", "subPath": "/abs"}), True),
    ("sub-path-parent", "spec.storage.results.subPath",
     _set(BASE, "storage.results", {"claimName": "r", "subPath": "a/../b"}), False),
    ("preprocess-mode-unknown", "spec.preprocess.mode", _set(BASE, "preprocess.mode", "Sometimes"), True),
    ("raw-claim-missing", "spec.storage.raw",
     _set(BASE, "storage", {"preprocessed": {"claimName": "p"}, "results": {"claimName": "r"}}), False),
    ("output-uri-http", "spec.output.uri", _set(BASE, "output", {"uri": "http://bucket/model"}), True),
    ("output-uri-no-bucket", "spec.output.uri", _set(BASE, "output", {"uri": "s3://"}), True),
    ("output-uri-bad-bucket", "spec.output.uri", _set(BASE, "output", {"uri": "s3://Bad_Bucket/m"}), False),
    ("output-uri-relative-file", "spec.output.uri", _set(BASE, "output", {"uri": "file://models"}), True),
    ("output-uri-missing", "spec.output.uri", _set(BASE, "output", {"secretRef": {"name": "s3"}}), True),
    ("output-secret-empty", "spec.output.secretRef.name",
     _set(BASE, "output", {"uri": "s3://models/x", "secretRef": {"name": ""}}), True),
    ("architecture-unknown", "spec.student.architecture", _set(BASE, "student.architecture", "unet"), True),
    ("block-strategy-unknown", "spec.student.blockStrategy", _set(BASE, "student.blockStrategy", "shrink"), True),
    ("student-plans-standard", "spec.student.plans", _set(BASE, "student.plans", "nnUNetPlans"), False),
    ("block-strategy-standard", "spec.student.blockStrategy", _set(BASE, "student.blockStrategy", "adaptive"),
     False),
    ("input-shape-short", "spec.export.inputShape", _set(BASE, "export.inputShape", [1, 1, 64]), True),
    ("input-shape-3d-needs-5", "spec.export.inputShape", _set(BASE, "export.inputShape", [1, 1, 64, 64]), False),
    ("batch-size-standard", "spec.export.batchSize", _set(BASE, "export.batchSize", 1), False),
    ("nnunet-format-resenc", "spec.export.nnUNetFormat",
     _set(_set(BASE, "student", RESENC["student"]), "export.nnUNetFormat", True), False),
    ("tensorrt-dynamic", "spec.export.tensorRTCompatible",
     _set(_set(BASE, "export.tensorRTCompatible", True), "export.dynamicShape", True), False),
    ("teacher-folder-and-train", "spec.teachers.folder",
     _set(BASE, "teachers", {"train": True, "folder": "/data/nnUNet_results/T"}), False),
    ("rotate-frequency-alone", "spec.distillation.rotateFrequency",
     _set(BASE, "distillation.rotateFrequency", 5), False),
    ("gpus-negative", "spec.resources.distill.gpus", _set(BASE, "resources.distill", {"gpus": -1}), True),
    ("memory-not-quantity", "spec.resources.distill.memory", _set(BASE, "resources.distill", {"memory": "lots"}),
     True),
    ("export-gpu", "spec.resources.export", _set(BASE, "resources.export", {"gpus": 1}), False),
    ("shm-not-quantity", "spec.resources.sharedMemory", _set(BASE, "resources.sharedMemory", "8 GB"), True),
    ("toleration-operator", "spec.scheduling.tolerations[0].operator",
     _set(BASE, "scheduling.tolerations", [{"key": "gpu", "operator": "Maybe"}]), True),
    ("queue-name-invalid", "spec.scheduling.queueName", _set(BASE, "scheduling.queueName", "Queue!"), True),
    ("pull-policy-unknown", "spec.imagePullPolicy", _set(BASE, "imagePullPolicy", "Sometimes"), True),
    ("backoff-negative", "spec.backoffLimit", _set(BASE, "backoffLimit", -1), True),
    ("deadline-zero", "spec.activeDeadlineSeconds", _set(BASE, "activeDeadlineSeconds", 0), True),
    ("ttl-negative", "spec.ttlSecondsAfterFinished", _set(BASE, "ttlSecondsAfterFinished", -5), True),
    ("run-as-root", "spec.security.runAsUser", _set(BASE, "security.runAsUser", 0), True),
    ("teacher-folder-relative", "spec.teachers.folder", _set(BASE, "teachers.folder", "results/teacher"), True),
    ("teacher-trainer-invalid", "spec.teachers.trainer", _set(BASE, "teachers.trainer", "bad name!"), True),
    ("suspend-string", "spec.suspend", _set(BASE, "suspend", "yes"), True),
    ("image-with-space", "spec.image", _set(BASE, "image", "my image:1"), True),
]


def test_enough_invalid_cases() -> None:
    assert len(INVALID) >= 40
    assert len({case for case, *_ in INVALID}) == len(INVALID)


@pytest.mark.parametrize("case,field,spec,schema", INVALID, ids=[c[0] for c in INVALID])
def test_operator_rejects_naming_the_field(case: str, field: str, spec: dict[str, Any], schema: bool) -> None:
    with pytest.raises(api.InvalidSpec) as info:
        api.parse_spec(spec)
    assert any(field in problem for problem in info.value.problems), info.value.problems


@pytest.mark.parametrize("case,field,spec,schema", [c for c in INVALID if c[3]],
                         ids=[c[0] for c in INVALID if c[3]])
def test_crd_schema_rejects_naming_the_field(case: str, field: str, spec: dict[str, Any], schema: bool) -> None:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"}, "spec": spec}
    errors = crd.validate_object(obj)
    assert errors, f"{case}: the CRD schema accepted it"
    name = field.removeprefix("spec.").split(".")[-1].split("[")[0]
    assert any(name in e for e in errors), errors


def test_schema_accepts_the_valid_base_and_the_operator_fills_seed_defaults() -> None:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"}, "spec": BASE}
    assert crd.validate_object(obj) == []
    spec = api.parse_spec(BASE)
    assert (spec.distillation.alpha, spec.distillation.temperature, spec.student.reduction_factor,
            spec.distillation.epochs) == (0.3, 3.0, 2, 1000)
    assert spec.teacher_plans == "nnUNetPlans"
    assert spec.teacher_folds is None  # detected by the trainer


def test_quantities_accept_numbers_and_strings() -> None:
    spec = api.parse_spec(_set(BASE, "resources.distill", {"cpu": 4, "memory": "16Gi"}))
    assert spec.resources.distill.cpu == "4"
    assert spec.resources.distill.memory == "16Gi"


def test_resenc_defaults_follow_the_seed() -> None:
    spec = api.parse_spec(_set(BASE, "student", {"architecture": "resenc"}))
    assert spec.teacher_plans == "nnUNetResEncUNetLPlans"
    assert spec.student_base_plans == "nnUNetPlans"
    assert spec.planner == "nnUNetPlannerResEncL"


def test_training_teachers_means_all_folds_unless_listed() -> None:
    assert api.parse_spec(_set(BASE, "teachers.train", True)).teacher_folds == (0, 1, 2, 3, 4)
    spec = api.parse_spec(_set(_set(BASE, "teachers.train", True), "teachers.folds", [3, 1]))
    assert spec.teacher_folds == (3, 1)


def test_shared_claim_gives_conventional_sub_paths() -> None:
    spec = api.parse_spec(_set(BASE, "storage.raw", {"claimName": "raw-data", "readOnly": True}))
    raw = spec.storage.volume("raw")
    results = spec.storage.volume("results")
    assert raw is not None and (raw.claim_name, raw.sub_path, raw.read_only) == ("raw-data", None, True)
    assert results is not None and (results.claim_name, results.sub_path) == ("nnunet-data", "nnUNet_results")


def test_several_problems_are_all_reported() -> None:
    with pytest.raises(api.InvalidSpec) as info:
        api.parse_spec(_set(_set(BASE, "distillation.alpha", 2), "student.reductionFactor", 0))
    text = str(info.value)
    assert "spec.distillation.alpha" in text and "spec.student.reductionFactor" in text


def test_status_parsing_tolerates_unknown_and_malformed_fields() -> None:
    status = api.parse_status({"phase": "Running", "progress": {"epoch": 3, "futureField": 1},
                               "stages": "not-a-map"})
    assert status.phase == "Running"
    assert status.progress is not None and status.progress.epoch == 3
    assert status.stages == {}
