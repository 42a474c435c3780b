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
    (
        "temperature-negative",
        "spec.distillation.temperature",
        _set(BASE, "distillation.temperature", -1.0),
        True,
    ),
    ("reduction-zero", "spec.student.reductionFactor", _set(BASE, "student.reductionFactor", 0), True),
    ("reduction-float", "spec.student.reductionFactor", _set(BASE, "student.reductionFactor", 2.5), True),
    ("epochs-zero", "spec.distillation.epochs", _set(BASE, "distillation.epochs", 0), True),
    (
        "iterations-zero",
        "spec.distillation.iterationsPerEpoch",
        _set(BASE, "distillation.iterationsPerEpoch", 0),
        True,
    ),
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
    (
        "results-claim-missing",
        "spec.storage.results.claimName",
        _set(BASE, "storage.results", {"subPath": "results"}),
        True,
    ),
    (
        "sub-path-absolute",
        "spec.storage.results.subPath",
        _set(BASE, "storage.results", {"claimName": "r", "subPath": "/abs"}),
        True,
    ),
    (
        "sub-path-parent",
        "spec.storage.results.subPath",
        _set(BASE, "storage.results", {"claimName": "r", "subPath": "a/../b"}),
        False,
    ),
    ("preprocess-mode-unknown", "spec.preprocess.mode", _set(BASE, "preprocess.mode", "Sometimes"), True),
    (
        "raw-claim-missing",
        "spec.storage.raw",
        _set(BASE, "storage", {"preprocessed": {"claimName": "p"}, "results": {"claimName": "r"}}),
        False,
    ),
    ("output-uri-http", "spec.output.uri", _set(BASE, "output", {"uri": "http://bucket/model"}), True),
    ("output-uri-no-bucket", "spec.output.uri", _set(BASE, "output", {"uri": "s3://"}), True),
    ("output-uri-bad-bucket", "spec.output.uri", _set(BASE, "output", {"uri": "s3://Bad_Bucket/m"}), False),
    ("output-uri-relative-file", "spec.output.uri", _set(BASE, "output", {"uri": "file://models"}), True),
    ("output-uri-missing", "spec.output.uri", _set(BASE, "output", {"secretRef": {"name": "s3"}}), True),
    (
        "output-secret-empty",
        "spec.output.secretRef.name",
        _set(BASE, "output", {"uri": "s3://models/x", "secretRef": {"name": ""}}),
        True,
    ),
    ("architecture-unknown", "spec.student.architecture", _set(BASE, "student.architecture", "unet"), True),
    (
        "block-strategy-unknown",
        "spec.student.blockStrategy",
        _set(BASE, "student.blockStrategy", "shrink"),
        True,
    ),
    ("student-plans-standard", "spec.student.plans", _set(BASE, "student.plans", "nnUNetPlans"), False),
    (
        "block-strategy-standard",
        "spec.student.blockStrategy",
        _set(BASE, "student.blockStrategy", "adaptive"),
        False,
    ),
    ("input-shape-short", "spec.export.inputShape", _set(BASE, "export.inputShape", [1, 1, 64]), True),
    (
        "input-shape-3d-needs-5",
        "spec.export.inputShape",
        _set(BASE, "export.inputShape", [1, 1, 64, 64]),
        False,
    ),
    ("batch-size-standard", "spec.export.batchSize", _set(BASE, "export.batchSize", 1), False),
    (
        "nnunet-format-resenc",
        "spec.export.nnUNetFormat",
        _set(_set(BASE, "student", RESENC["student"]), "export.nnUNetFormat", True),
        False,
    ),
    (
        "tensorrt-dynamic",
        "spec.export.tensorRTCompatible",
        _set(_set(BASE, "export.tensorRTCompatible", True), "export.dynamicShape", True),
        False,
    ),
    (
        "teacher-folder-and-train",
        "spec.teachers.folder",
        _set(BASE, "teachers", {"train": True, "folder": "/data/nnUNet_results/T"}),
        False,
    ),
    (
        "rotate-frequency-alone",
        "spec.distillation.rotateFrequency",
        _set(BASE, "distillation.rotateFrequency", 5),
        False,
    ),
    ("gpus-negative", "spec.resources.distill.gpus", _set(BASE, "resources.distill", {"gpus": -1}), True),
    (
        "memory-not-quantity",
        "spec.resources.distill.memory",
        _set(BASE, "resources.distill", {"memory": "lots"}),
        True,
    ),
    ("export-gpu", "spec.resources.export", _set(BASE, "resources.export", {"gpus": 1}), False),
    ("shm-not-quantity", "spec.resources.sharedMemory", _set(BASE, "resources.sharedMemory", "8 GB"), True),
    (
        "toleration-operator",
        "spec.scheduling.tolerations[0].operator",
        _set(BASE, "scheduling.tolerations", [{"key": "gpu", "operator": "Maybe"}]),
        True,
    ),
    ("queue-name-invalid", "spec.scheduling.queueName", _set(BASE, "scheduling.queueName", "Queue!"), True),
    ("pull-policy-unknown", "spec.imagePullPolicy", _set(BASE, "imagePullPolicy", "Sometimes"), True),
    ("backoff-negative", "spec.backoffLimit", _set(BASE, "backoffLimit", -1), True),
    ("deadline-zero", "spec.activeDeadlineSeconds", _set(BASE, "activeDeadlineSeconds", 0), True),
    ("ttl-negative", "spec.ttlSecondsAfterFinished", _set(BASE, "ttlSecondsAfterFinished", -5), True),
    ("run-as-root", "spec.security.runAsUser", _set(BASE, "security.runAsUser", 0), True),
    (
        "teacher-folder-relative",
        "spec.teachers.folder",
        _set(BASE, "teachers.folder", "results/teacher"),
        True,
    ),
    ("teacher-trainer-invalid", "spec.teachers.trainer", _set(BASE, "teachers.trainer", "bad name!"), True),
    ("suspend-string", "spec.suspend", _set(BASE, "suspend", "yes"), True),
    ("image-with-space", "spec.image", _set(BASE, "image", "my image:1"), True),
    # ---- issue 12: quantities are positive
    (
        "memory-negative",
        "spec.resources.distill.memory",
        _set(BASE, "resources.distill", {"memory": "-32Gi"}),
        True,
    ),
    ("shm-negative", "spec.resources.sharedMemory", _set(BASE, "resources.sharedMemory", "-1Gi"), True),
    ("cpu-zero-string", "spec.resources.distill.cpu", _set(BASE, "resources.distill", {"cpu": "0"}), True),
    ("cpu-zero-number", "spec.resources.teachers.cpu", _set(BASE, "resources.teachers", {"cpu": 0}), False),
    (
        "cpu-zero-millis",
        "spec.resources.preprocess.cpu",
        _set(BASE, "resources.preprocess", {"cpu": "0m"}),
        True,
    ),
    ("cpu-plus-sign", "spec.resources.export.cpu", _set(BASE, "resources.export", {"cpu": "+2"}), True),
    (
        "memory-zero-decimal",
        "spec.resources.publish.memory",
        _set(BASE, "resources.publish", {"memory": "0.0Gi"}),
        True,
    ),
    (
        "memory-boolean",
        "spec.resources.distill.memory",
        _set(BASE, "resources.distill", {"memory": True}),
        True,
    ),
    (
        "memory-bad-suffix",
        "spec.resources.distill.memory",
        _set(BASE, "resources.distill", {"memory": "4GB"}),
        True,
    ),
    ("shm-zero", "spec.resources.sharedMemory", _set(BASE, "resources.sharedMemory", "0"), True),
    # ---- /dev/shm counts against the memory limit of the data-loading stages
    (
        "memory-below-shm-distill",
        "spec.resources.distill.memory",
        _set(_set(BASE, "resources.distill", {"memory": "4Gi"}), "resources.sharedMemory", "8Gi"),
        False,
    ),
    (
        "memory-equal-shm-teachers",
        "spec.resources.teachers.memory",
        _set(BASE, "resources.teachers", {"memory": "8Gi"}),
        False,
    ),
    (
        "memory-below-shm-decimal",
        "spec.resources.distill.memory",
        _set(_set(BASE, "resources.distill", {"memory": "1.5Gi"}), "resources.sharedMemory", "1600Mi"),
        False,
    ),
    (
        "shm-above-default-memory",
        "spec.resources.sharedMemory",
        _set(BASE, "resources.sharedMemory", "64Gi"),
        False,
    ),
    # ---- volumes that stages write
    (
        "results-read-only",
        "spec.storage.results.readOnly",
        _set(BASE, "storage.results", {"claimName": "r", "readOnly": True}),
        False,
    ),
    (
        "preprocessed-read-only-always",
        "spec.storage.preprocessed.readOnly",
        _set(
            _set(BASE, "storage.preprocessed", {"claimName": "p", "readOnly": True}),
            "preprocess.mode",
            "Always",
        ),
        False,
    ),
    (
        "preprocessed-read-only-train",
        "spec.storage.preprocessed.readOnly",
        _set(
            _set(BASE, "storage.preprocessed", {"claimName": "p", "readOnly": True}), "teachers.train", True
        ),
        False,
    ),
    (
        "read-only-not-boolean",
        "spec.storage.raw.readOnly",
        _set(BASE, "storage.raw", {"claimName": "r", "readOnly": "yes"}),
        True,
    ),
    # ---- bucket naming rules (stated, never echoed)
    ("gs-bucket-upper-case", "spec.output.uri", _set(BASE, "output", {"uri": "gs://MyBucket/m"}), False),
    (
        "gs-bucket-goog-prefix",
        "spec.output.uri",
        _set(BASE, "output", {"uri": "gs://google-models/m"}),
        False,
    ),
    ("gs-bucket-too-short", "spec.output.uri", _set(BASE, "output", {"uri": "gs://ab/m"}), False),
    ("gs-bucket-ip", "spec.output.uri", _set(BASE, "output", {"uri": "gs://192.168.5.4/m"}), False),
    ("s3-bucket-underscore", "spec.output.uri", _set(BASE, "output", {"uri": "s3://my_bucket/m"}), False),
    (
        "s3-bucket-too-long",
        "spec.output.uri",
        _set(BASE, "output", {"uri": "s3://" + "b" * 64 + "/m"}),
        False,
    ),
    ("az-container-double-dash", "spec.output.uri", _set(BASE, "output", {"uri": "az://models--x/m"}), False),
    ("az-container-upper", "spec.output.uri", _set(BASE, "output", {"uri": "az://Models/m"}), False),
    (
        "uri-query-string",
        "spec.output.uri",
        _set(BASE, "output", {"uri": "s3://models/m?X-Amz-Signature=abc"}),
        True,
    ),
    (
        "uri-sas-token",
        "spec.output.uri",
        _set(BASE, "output", {"uri": "az://models/m?sv=2024&sig=abc"}),
        True,
    ),
    ("uri-fragment", "spec.output.uri", _set(BASE, "output", {"uri": "file:///models/m#x"}), True),
    ("uri-not-string", "spec.output.uri", _set(BASE, "output", {"uri": 42}), True),
    # ---- tolerations
    (
        "toleration-exists-with-value",
        "spec.scheduling.tolerations[0].value",
        _set(BASE, "scheduling.tolerations", [{"key": "gpu", "operator": "Exists", "value": "a100"}]),
        False,
    ),
    (
        "toleration-empty-key-equal",
        "spec.scheduling.tolerations[0].operator",
        _set(BASE, "scheduling.tolerations", [{"operator": "Equal", "value": "x"}]),
        False,
    ),
    (
        "toleration-seconds-no-execute",
        "spec.scheduling.tolerations[0].tolerationSeconds",
        _set(
            BASE,
            "scheduling.tolerations",
            [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}],
        ),
        False,
    ),
    (
        "toleration-bad-key",
        "spec.scheduling.tolerations[0].key",
        _set(BASE, "scheduling.tolerations", [{"key": "bad key!", "operator": "Exists"}]),
        True,
    ),
    (
        "toleration-bad-effect",
        "spec.scheduling.tolerations[0].effect",
        _set(BASE, "scheduling.tolerations", [{"key": "gpu", "operator": "Exists", "effect": "Sometimes"}]),
        True,
    ),
    (
        "toleration-bad-value",
        "spec.scheduling.tolerations[1].value",
        _set(
            BASE,
            "scheduling.tolerations",
            [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Equal", "value": "not valid!"}],
        ),
        False,
    ),
    (
        "toleration-unknown-field",
        "spec.scheduling.tolerations[0].operater",
        _set(BASE, "scheduling.tolerations", [{"key": "gpu", "operater": "Exists"}]),
        True,
    ),
    (
        "toleration-seconds-negative",
        "spec.scheduling.tolerations[0].tolerationSeconds",
        _set(
            BASE,
            "scheduling.tolerations",
            [{"key": "g", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -1}],
        ),
        True,
    ),
    # ---- nodeSelector
    (
        "node-selector-bad-key",
        "spec.scheduling.nodeSelector",
        _set(BASE, "scheduling.nodeSelector", {"bad key!": "x"}),
        False,
    ),
    (
        "node-selector-bad-prefix",
        "spec.scheduling.nodeSelector",
        _set(BASE, "scheduling.nodeSelector", {"Example.COM/gpu": "a100"}),
        False,
    ),
    (
        "node-selector-bad-value",
        "spec.scheduling.nodeSelector",
        _set(BASE, "scheduling.nodeSelector", {"gpu": "a100 80gb"}),
        False,
    ),
    (
        "node-selector-value-not-string",
        "spec.scheduling.nodeSelector.gpu",
        _set(BASE, "scheduling.nodeSelector", {"gpu": 3}),
        True,
    ),
    # ---- affinity, checked with the Kubernetes schema
    (
        "affinity-node-garbage",
        "spec.scheduling.affinity.nodeAffinity",
        _set(BASE, "scheduling.affinity", {"nodeAffinity": "garbage"}),
        True,
    ),
    (
        "affinity-unknown-kind",
        "spec.scheduling.affinity.nodeAfinity",
        _set(BASE, "scheduling.affinity", {"nodeAfinity": {}}),
        True,
    ),
    (
        "affinity-missing-operator",
        (
            "spec.scheduling.affinity.nodeAffinity"
            ".requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator"
        ),
        _set(
            BASE,
            "scheduling.affinity",
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu"}]}]
                    }
                }
            },
        ),
        True,
    ),
    (
        "affinity-weight-string",
        (
            "spec.scheduling.affinity.podAntiAffinity"
            ".preferredDuringSchedulingIgnoredDuringExecution[0].weight"
        ),
        _set(
            BASE,
            "scheduling.affinity",
            {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": "heavy", "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
                    ]
                }
            },
        ),
        True,
    ),
    (
        "affinity-missing-topology-key",
        (
            "spec.scheduling.affinity.podAffinity"
            ".requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey"
        ),
        _set(
            BASE,
            "scheduling.affinity",
            {
                "podAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"app": "x"}}}
                    ]
                }
            },
        ),
        True,
    ),
    (
        "affinity-not-object",
        "spec.scheduling.affinity",
        _set(BASE, "scheduling.affinity", ["nodeAffinity"]),
        True,
    ),
    # ---- stage Job settings
    (
        "job-ttl-too-short",
        "spec.jobTTLSecondsAfterFinished",
        _set(BASE, "jobTTLSecondsAfterFinished", 5),
        True,
    ),
    (
        "job-ttl-string",
        "spec.jobTTLSecondsAfterFinished",
        _set(BASE, "jobTTLSecondsAfterFinished", "1d"),
        True,
    ),
    ("backoff-too-big", "spec.backoffLimit", _set(BASE, "backoffLimit", 1000), True),
    (
        "priority-class-invalid",
        "spec.scheduling.priorityClassName",
        _set(BASE, "scheduling.priorityClassName", "High_Priority"),
        True,
    ),
    (
        "pull-secret-invalid",
        "spec.imagePullSecrets[0].name",
        _set(BASE, "imagePullSecrets", [{"name": "A B"}]),
        True,
    ),
    (
        "service-account-invalid",
        "spec.serviceAccountName",
        _set(BASE, "serviceAccountName", "Trainer SA"),
        True,
    ),
    (
        "gpu-resource-name-invalid",
        "spec.resources.gpuResourceName",
        _set(BASE, "resources.gpuResourceName", "gpu"),
        True,
    ),
    (
        "data-loader-workers-negative",
        "spec.resources.distill.dataLoaderWorkers",
        _set(BASE, "resources.distill", {"dataLoaderWorkers": -1}),
        True,
    ),
    ("run-as-group-negative", "spec.security.runAsGroup", _set(BASE, "security.runAsGroup", -1), True),
    (
        "temperature-too-high",
        "spec.distillation.temperature",
        _set(BASE, "distillation.temperature", 1000.0),
        True,
    ),
]


def test_enough_invalid_cases() -> None:
    assert len(INVALID) >= 100
    assert len({case for case, *_ in INVALID}) == len(INVALID)


@pytest.mark.parametrize("case,field,spec,schema", INVALID, ids=[c[0] for c in INVALID])
def test_operator_rejects_naming_the_field(case: str, field: str, spec: dict[str, Any], schema: bool) -> None:
    with pytest.raises(api.InvalidSpec) as info:
        api.parse_spec(spec)
    assert any(field in problem for problem in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "case,field,spec,schema", [c for c in INVALID if c[3]], ids=[c[0] for c in INVALID if c[3]]
)
def test_crd_schema_rejects_naming_the_field(
    case: str, field: str, spec: dict[str, Any], schema: bool
) -> None:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"}, "spec": spec}
    errors = crd.validate_object(obj)
    assert errors, f"{case}: the CRD schema accepted it"
    name = field.removeprefix("spec.").split(".")[-1].split("[")[0]
    assert any(name in e for e in errors), errors


def test_schema_accepts_the_valid_base_and_the_operator_fills_seed_defaults() -> None:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"}, "spec": BASE}
    assert crd.validate_object(obj) == []
    spec = api.parse_spec(BASE)
    assert (
        spec.distillation.alpha,
        spec.distillation.temperature,
        spec.student.reduction_factor,
        spec.distillation.epochs,
    ) == (0.3, 3.0, 2, 1000)
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
    status = api.parse_status(
        {"phase": "Running", "progress": {"epoch": 3, "futureField": 1}, "stages": "not-a-map"}
    )
    assert status.phase == "Running"
    assert status.progress is not None and status.progress.epoch == 3
    assert status.stages == {}


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAIOSFODNN7EXAMPLE/models",
        "gs://wJalrXUtnFEMI_K7MDENG_bPxRfiCYEXAMPLEKEY/m",
        "az://Secret--Key/m",
        "s3://models/m?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE",
        "az://models/m?sig=c2VjcmV0c2lnbmF0dXJl",
    ],
)
def test_output_errors_state_the_rule_and_never_echo_the_value(uri: str) -> None:
    """Issue 12 (5): a key pasted into the bucket name, or a signed URL, must not reach status, Events,
    logs."""
    with pytest.raises(api.InvalidSpec) as info:
        api.parse_spec(_set(BASE, "output", {"uri": uri}))
    text = str(info.value)
    assert "spec.output.uri" in text
    secretish = uri.split("://", 1)[1].split("/", 1)[0] if "?" not in uri else uri.split("?", 1)[1]
    assert secretish not in text, text
    assert ("naming rules" in text) or ("query string" in text)


def test_valid_buckets_of_every_scheme_are_accepted() -> None:
    for uri in (
        "s3://my-models.v2/liver",
        "gs://my_models-eu/liver/r2",
        "az://models-2026/liver",
        "file:///m/x",
    ):
        assert api.parse_spec(_set(BASE, "output", {"uri": uri})).output.uri == uri  # type: ignore[union-attr]


def test_toleration_fields_are_the_kubernetes_toleration_fields() -> None:
    """The spec's Toleration is the core/v1 Toleration (stricter enums), so it renders into pods unchanged."""
    from kubernetes.client import V1Toleration

    ours = set(api.Toleration.model_json_schema(by_alias=True)["properties"])
    theirs = set(V1Toleration.model_json_schema(by_alias=True)["properties"])
    assert ours == theirs


def test_the_crd_embeds_the_kubernetes_affinity_schema() -> None:
    """Issue 12 (3): as controller-gen does, so the API server refuses malformed affinity at admission."""
    schema = crd.spec_schema()["properties"]["scheduling"]["properties"]["affinity"]
    assert "x-kubernetes-preserve-unknown-fields" not in schema
    node = schema["properties"]["nodeAffinity"]["properties"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    term = node["properties"]["nodeSelectorTerms"]["items"]["properties"]["matchExpressions"]["items"]
    assert term["required"] == ["key", "operator"] and term["properties"]["values"]["type"] == "array"
    assert set(schema["properties"]) == {"nodeAffinity", "podAffinity", "podAntiAffinity"}
