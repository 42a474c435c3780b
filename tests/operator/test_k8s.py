"""Job manifests: names, GPUs, mounts, env, security, Kueue, credentials; valid for real Kubernetes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from nnunet_distill_operator import api, job_errors, k8s, plan

OWNER = k8s.Owner("liver", "ml", "0b5e5a0e-1111-2222-3333-444455556666")


def _jobs(**spec: Any) -> dict[str, dict[str, Any]]:
    body = {"dataset": {"id": 27}, "storage": {"claimName": "nnunet-data"}, **spec}
    parsed = api.parse_spec(body)
    paths = plan.DataPaths.in_pod(OWNER.name)
    stages = plan.plan(parsed, name=OWNER.name, paths=paths)
    defaults = k8s.Defaults(image="reg/trainer:1", service_account="trainer-sa")
    return {s.name: k8s.job_for(s, owner=OWNER, spec=parsed, paths=paths, defaults=defaults) for s in stages}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


FULL: dict[str, Any] = {
    "teachers": {"train": True, "folds": [0, 1, 2]},
    "output": {"uri": "s3://models/liver", "secretRef": {"name": "s3-creds"}},
    "scheduling": {
        "queueName": "gpu",
        "nodeSelector": {"gpu": "a100"},
        "priorityClassName": "high",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "imagePullSecrets": [{"name": "pull"}],
    "activeDeadlineSeconds": 3600,
}


def test_job_names_are_deterministic_bounded_and_distinct() -> None:
    assert k8s.job_name("liver", "distill") == "liver-distill"
    long_a, long_b = "a" * 80 + "x", "a" * 80 + "y"
    for name in (long_a, long_b):
        jn = k8s.job_name(name, "preprocess")
        assert len(jn) <= k8s.MAX_JOB_NAME and jn.endswith("-preprocess")
        assert jn == k8s.job_name(name, "preprocess")
    assert k8s.job_name(long_a, "distill") != k8s.job_name(long_b, "distill")
    assert len(k8s.label_value("b" * 200)) <= 63


def test_distill_job_has_gpu_mounts_env_shm_owner_and_security() -> None:
    job = _jobs(resources={"sharedMemory": "16Gi", "distill": {"gpus": 2, "memory": "40Gi", "cpu": 6}})[
        "distill"
    ]
    assert job["metadata"]["name"] == "liver-distill" and job["metadata"]["namespace"] == "ml"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "distillation.nnunet.io/v1alpha1",
        "kind": "DistillationJob",
        "name": "liver",
        "uid": OWNER.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    pod = job["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["image"] == "reg/trainer:1" and pod["serviceAccountName"] == "trainer-sa"
    assert main["resources"]["limits"] == {"cpu": "6", "memory": "40Gi", "nvidia.com/gpu": "2"}
    assert main["resources"]["requests"] == {"cpu": "6", "memory": "40Gi"}
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts["/data/nnUNet_results"]["subPath"] == "nnUNet_results"
    assert mounts["/data/nnUNet_raw"]["readOnly"] is True  # only preprocessing writes raw-side outputs
    assert "/dev/shm" in mounts and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert [
        v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    ] == ["nnunet-data"]
    env = _env(main)
    assert (
        env["nnUNet_results"] == "/data/nnUNet_results"
        and env["nnUNet_preprocessed"] == "/data/nnUNet_preprocessed"
    )
    assert env["nnUNet_n_proc_DA"] == "2" and env["DISTILLATIONJOB_STAGE"] == "distill"  # 5 for 2 ranks
    assert env["DISTILLATIONJOB_NAME"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['distillation.nnunet.io/job-name']"}
    }
    assert env["DISTILLATIONJOB_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["DISTILLATIONJOB_UID"]["fieldRef"]["fieldPath"].endswith("job-uid']")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations[k8s.ANNOTATION_JOB_NAME] == "liver" and annotations[k8s.ANNOTATION_JOB_UID] == OWNER.uid
    )
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # No guard (nothing to skip); 2 GPUs: one DDP rank each under torchrun in this pod (issue 11).
    assert main["args"][:6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    assert main["args"][main["args"].index("--no-python") + 1] == "nnUNetv2_distillation_train"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2]
    assert len(rules) == 2  # a training failure (exit 1) is retried up to backoffLimit
    assert job["spec"]["backoffLimit"] == 3 and "suspend" not in job["spec"]


def test_a_failed_quality_gate_fails_its_job_at_once() -> None:
    """The gate's "failed" (exit 3) is deterministic: retrying would judge the same student the same way."""
    gate = _jobs(output={"uri": "s3://models/liver"})["gate"]
    pod = gate["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert "initContainers" not in pod
    assert main["args"][:4] == [
        "nnunet-distill",
        "gate",
        "--summary",
        (
            "/data/nnUNet_results/Dataset027_*/nnUNetDistillationTrainer__nnUNetPlans_r2__"
            "3d_fullres/fold_0/validation/distillation_summary.json"
        ),
    ]
    rules = gate["spec"]["podFailurePolicy"]["rules"]
    assert rules[2] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]},
    }
    assert main["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    assert not any(
        "valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in main["env"]
    )  # no credentials
    kubernetes_validate.validate(gate, "1.33", strict=True)


def test_teachers_are_an_indexed_job_one_gpu_per_pod() -> None:
    job = _jobs(**FULL)["teachers"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    main = job["spec"]["template"]["spec"]["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert main["args"][:2] == ["/bin/sh", "-c"] and main["args"][3] == "nnunet-distill-guard"
    assert main["args"][4:6] == ["nnunet-distill", "train-teacher"]


def test_kueue_scheduling_and_deadline() -> None:
    for job in _jobs(**FULL).values():
        assert job["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] == "gpu"
        assert job["spec"]["suspend"] is True  # Kueue admits by un-suspending
        assert job["spec"]["activeDeadlineSeconds"] == 3600
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "high"
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["imagePullSecrets"] == [{"name": "pull"}]


def test_credentials_only_in_publish_and_only_as_secret_key_refs() -> None:
    jobs = _jobs(**FULL)
    for name, job in jobs.items():
        envs = [e for c in job["spec"]["template"]["spec"]["containers"] for e in c["env"]]
        secret_envs = [e for e in envs if "secretKeyRef" in e.get("valueFrom", {})]
        if name == "publish":
            names = {e["name"] for e in secret_envs}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"} <= names
            assert all(e["valueFrom"]["secretKeyRef"]["name"] == "s3-creds" for e in secret_envs)
            assert not any(e["name"].startswith("AWS_") and "value" in e for e in envs)
        else:
            assert secret_envs == [], name


def test_export_stage_runs_export_as_init_container_then_package() -> None:
    job = _jobs()["export"]
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["export"]
    assert pod["initContainers"][0]["args"][0] == "nnUNetv2_distillation_export_onnx"
    assert pod["containers"][0]["args"][:2] == ["nnunet-distill", "package"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_every_job_validates_against_kubernetes_schemas(version: str) -> None:
    for spec in (
        {},
        FULL,
        {
            "student": {"architecture": "resenc"},
            "storage": {
                "raw": {"claimName": "raw"},
                "preprocessed": {"claimName": "pre", "subPath": "p"},
                "results": {"claimName": "res"},
            },
            "scheduling": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}
                            ]
                        }
                    }
                }
            },
        },
    ):
        for job in _jobs(**spec).values():
            kubernetes_validate.validate(job, version, strict=True)


def _run_guard(stage: plan.Stage, argv: tuple[str, ...], index: int | None, cwd: Path) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    out = subprocess.run(
        k8s.container_command(stage, argv, guarded=True),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return out.stdout


def test_guard_skips_when_outputs_exist_and_runs_otherwise(tmp_path: Path) -> None:
    """The in-pod /bin/sh guard, executed for real: globs, AND of patterns, per-index values."""
    pre = tmp_path / "pre"
    res = tmp_path / "res"
    paths = plan.DataPaths(str(tmp_path / "raw"), str(pre), str(res), str(tmp_path / "work"))
    spec = api.parse_spec(
        {"dataset": {"id": 27}, "storage": {"claimName": "d"}, "teachers": {"train": True, "folds": [0, 3]}}
    )
    stages = {s.name: s for s in plan.plan(spec, name="j", paths=paths)}
    probe = ("echo", "RAN")
    assert _run_guard(stages["preprocess"], probe, None, tmp_path).strip() == "RAN"
    (pre / "Dataset027_Liver").mkdir(parents=True)
    (pre / "Dataset027_Liver" / "nnUNetPlans.json").write_text("{}")
    assert (
        _run_guard(stages["preprocess"], probe, None, tmp_path).strip() == "RAN"
    )  # data folder still missing
    (pre / "Dataset027_Liver" / "nnUNetPlans_3d_fullres").mkdir()
    assert "skipping" in _run_guard(stages["preprocess"], probe, None, tmp_path)
    fold3 = res / "Dataset027_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_3"
    fold3.mkdir(parents=True)
    (fold3 / "checkpoint_final.pth").write_bytes(b"x")
    assert _run_guard(stages["teachers"], probe, 0, tmp_path).strip() == "RAN"  # fold 0 not trained
    assert "skipping" in _run_guard(stages["teachers"], probe, 1, tmp_path)  # index 1 is fold 3


def test_manifests_carry_no_secret_values() -> None:
    text = json.dumps(_jobs(**FULL))
    assert "secretKeyRef" in text
    assert 'AWS_SECRET_ACCESS_KEY", "value"' not in text


def test_containers_keep_the_images_entrypoint() -> None:
    """Stage argv goes to `args`: the trainer image's ENTRYPOINT (tini) stays PID 1, so the kubelet's SIGTERM
    reaches the trainer (which checkpoints on it) and data-loader workers are reaped."""
    for job in _jobs(**FULL).values():
        pod = job["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            assert "command" not in c and c["args"], c["name"]


def test_job_fields_map_back_to_the_spec_fields_they_come_from() -> None:
    cases = {
        "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution": (
            "spec.scheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ),
        "spec.template.spec.tolerations[0].key": "spec.scheduling.tolerations",
        "spec.template.spec.nodeSelector": "spec.scheduling.nodeSelector",
        "spec.template.spec.containers[0].resources.limits.memory": "spec.resources.distill",
        "spec.template.spec.initContainers.0.image": "spec.image",
        "spec.template.spec.volumes[1].emptyDir.sizeLimit": "spec.resources.sharedMemory",
        "spec.template.spec.volumes[0].persistentVolumeClaim.claimName": "spec.storage",
        "spec.ttlSecondsAfterFinished": "spec.jobTTLSecondsAfterFinished",
        "spec.template.spec.priorityClassName": "spec.scheduling.priorityClassName",
        "spec.completions": "spec",
    }
    for job_path, spec_path in cases.items():
        assert job_errors.spec_field_for(job_path, "distill") == spec_path, job_path


def test_a_client_side_refusal_of_a_job_names_the_spec_field() -> None:
    """The kubernetes client validates bodies with its pydantic models; its error names Job fields."""
    from kubernetes.client import V1Job
    from pydantic import ValidationError

    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "x"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "main", "image": "i"}],
                    "affinity": {"nodeAffinity": "garbage"},
                }
            }
        },
    }
    with pytest.raises(ValidationError) as info:
        V1Job.model_validate(body)
    fields = job_errors.build_error_fields(info.value, "distill")
    assert fields[0][0] == "spec.scheduling.affinity.nodeAffinity", fields


def test_stage_jobs_carry_ttl_recommended_labels_and_a_uid_selector() -> None:
    """Issue 12 (7): ttlSecondsAfterFinished from the spec; app.kubernetes.io/*; a uid label for any name."""
    jobs = _jobs(jobTTLSecondsAfterFinished=3600)
    for stage, job in jobs.items():
        assert job["spec"]["ttlSecondsAfterFinished"] == 3600
        for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
            assert labels["app.kubernetes.io/instance"] == OWNER.name
            assert labels["app.kubernetes.io/part-of"] == "nnunet-distill"
            assert labels["app.kubernetes.io/component"] == stage
            assert labels["app.kubernetes.io/managed-by"] == "nnunet-distill-operator"
            assert labels["app.kubernetes.io/version"]
            assert labels[k8s.LABEL_JOB_UID] == OWNER.uid
    assert _jobs()["distill"]["spec"]["ttlSecondsAfterFinished"] == 604800  # a week by default

    long_owner = k8s.Owner("x" * 200, "ml", "0b5e2d7c-3f1a-4b8e-9c6d-1a2b3c4d5e6f")
    spec = api.parse_spec({"dataset": {"id": 27}, "storage": {"claimName": "nnunet-data"}})
    stage = plan.plan(spec, name=long_owner.name, paths=plan.DataPaths.in_pod(long_owner.name))[0]
    job = k8s.job_for(stage, owner=long_owner, spec=spec, paths=plan.DataPaths.in_pod(long_owner.name))
    labels = job["metadata"]["labels"]
    assert labels[k8s.LABEL_JOB_UID] == long_owner.uid  # -l distillation.nnunet.io/job-uid=<uid> always works
    assert all(len(v) <= 63 for v in labels.values())
    kubernetes_validate.validate(job, "1.30", strict=True)


def test_teacher_folds_retry_per_index_with_a_scaled_total_for_older_clusters() -> None:
    """Issue 12 (7): one bad fold no longer burns the others' retries (backoffLimitPerIndex, Kubernetes >=
    1.29); an older API server drops that field and keeps backoffLimit, scaled by the number of folds."""
    teachers = _jobs(teachers={"train": True, "folds": [0, 1, 2]}, backoffLimit=2)["teachers"]
    spec = teachers["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 3
    assert spec["backoffLimitPerIndex"] == 2 and spec["backoffLimit"] == 6
    kubernetes_validate.validate(teachers, "1.29", strict=True)
    single = _jobs(backoffLimit=2)["distill"]["spec"]
    assert "backoffLimitPerIndex" not in single and single["backoffLimit"] == 2
