"""Multi-GPU and multi-node distillation in the spec, the plan and the manifests: torchrun in one pod, an
Indexed Job with a headless rendezvous Service, the PET_* env, refusals that name the field; valid for real
Kubernetes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from nnunet_distill_operator import api, distributed, k8s, local, plan

OWNER = k8s.Owner("liver", "ml", "0b5e5a0e-1111-2222-3333-444455556666")


def _spec(**spec: Any) -> api.DistillationJobSpec:
    return api.parse_spec({"dataset": {"id": 27}, "storage": {"claimName": "nnunet-data"}, **spec})


def _distill(**spec: Any) -> tuple[plan.Stage, dict[str, Any]]:
    parsed = _spec(**spec)
    paths = plan.DataPaths.in_pod(OWNER.name)
    stage = next(s for s in plan.plan(parsed, name=OWNER.name, paths=paths) if s.name == "distill")
    return stage, k8s.job_for(stage, owner=OWNER, spec=parsed, paths=paths)


def _env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _refusal(**spec: Any) -> str:
    with pytest.raises(api.InvalidSpec) as err:
        _spec(**spec)
    return str(err.value)


def test_one_gpu_is_one_process_without_torchrun() -> None:
    stage, job = _distill()
    assert stage.argv[0] == "nnUNetv2_distillation_train"
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert distributed.rendezvous_service(job) is None
    assert not any(name.startswith("PET_") for name in _env(job))


def test_several_gpus_run_torchrun_standalone_in_one_pod() -> None:
    stage, job = _distill(resources={"distill": {"gpus": 4}})
    assert stage.argv[: stage.argv.index("--no-python") + 2] == (
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "4",
        "--no-python",
        "nnUNetv2_distillation_train",
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-len(stage.argv) :] == list(stage.argv)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert job["spec"]["completions"] == 1 and distributed.rendezvous_service(job) is None
    # The pod's 12 CPUs are shared by its 4 ranks: each starts a quarter of the workers.
    stage, job = _distill(resources={"distill": {"gpus": 4, "cpu": "12"}})
    assert (_env(job)["nnUNet_n_proc_DA"], _env(job)["nnUNet_def_n_proc"]) == ("2", "3")
    _, single = _distill(resources={"distill": {"gpus": 1, "cpu": "12"}})
    assert (_env(single)["nnUNet_n_proc_DA"], _env(single)["nnUNet_def_n_proc"]) == ("11", "12")


def test_several_nodes_are_one_indexed_job_started_together_with_the_kubeflow_env() -> None:
    stage, job = _distill(
        resources={"distill": {"gpus": 2, "nodes": 3}}, scheduling={"queueName": "gpu-queue"}
    )
    assert stage.argv[:7] == ("torchrun", "--nnodes", "3", "--nproc_per_node", "2", "--max_restarts", "0")
    assert distributed.trainer_argv(stage.argv)[0] == "nnUNetv2_distillation_train"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    # One Job: Kueue admits (un-suspends) all its pods at once.
    assert spec["suspend"] is True and job["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] == "gpu-queue"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "liver-distill"
    env = _env(job)
    assert env["PET_NNODES"] == "3" and env["PET_NPROC_PER_NODE"] == "2"
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["PET_MASTER_ADDR"] == "liver-distill-0.liver-distill.ml.svc"
    assert env["PET_MASTER_PORT"] == str(distributed.RENDEZVOUS_PORT)
    container = pod["containers"][0]
    assert container["ports"] == [
        {"name": "c10d", "containerPort": distributed.RENDEZVOUS_PORT, "protocol": "TCP"}
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_the_rendezvous_service_is_headless_selects_the_jobs_pods_and_shares_its_owner() -> None:
    _, job = _distill(resources={"distill": {"gpus": 1, "nodes": 2}})
    service = distributed.rendezvous_service(job)
    assert service is not None
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"] == "liver-distill"
    assert service["metadata"]["namespace"] == "ml"
    assert service["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert service["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "liver-distill"}
    assert service["spec"]["ports"][0]["port"] == distributed.RENDEZVOUS_PORT


@pytest.mark.parametrize("version", ["1.29", "1.31"])
def test_multi_node_job_and_service_validate_against_kubernetes_schemas(version: str) -> None:
    _, job = _distill(resources={"distill": {"gpus": 8, "nodes": 4}})
    service = distributed.rendezvous_service(job)
    for manifest in (job, service):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_nodes_without_gpus_are_refused_naming_the_field() -> None:
    message = _refusal(resources={"distill": {"gpus": 0, "nodes": 2}})
    assert "resources.distill.nodes" in message and "resources.distill.gpus" in message


def test_several_mig_slices_per_pod_are_refused_naming_the_field() -> None:
    message = _refusal(resources={"gpuResourceName": "nvidia.com/mig-1g.10gb", "distill": {"gpus": 2}})
    assert "resources.distill.gpus" in message and "MIG" in message
    _spec(resources={"gpuResourceName": "nvidia.com/mig-1g.10gb", "distill": {"gpus": 1, "nodes": 2}})


def test_nodes_apply_to_the_distill_stage_only() -> None:
    assert "resources.teachers.nodes" in _refusal(resources={"teachers": {"nodes": 2}})


@pytest.mark.parametrize("nodes", [0, 65])
def test_nodes_out_of_range_are_refused(nodes: int) -> None:
    assert "nodes" in _refusal(resources={"distill": {"nodes": nodes}})


def test_local_nodes_rendezvous_on_the_loopback_with_consecutive_ranks() -> None:
    envs = distributed.local_node_envs(2, 3, 12345)
    assert [e["PET_NODE_RANK"] for e in envs] == ["0", "1", "2"]
    assert {
        (e["PET_MASTER_ADDR"], e["PET_MASTER_PORT"], e["PET_NNODES"], e["PET_NPROC_PER_NODE"]) for e in envs
    } == {("127.0.0.1", "12345", "3", "2")}
    assert distributed.local_node_envs(4, 1, 12345) == [{}]


ALL_REDUCE = r"""
import json, os, pathlib
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
out = pathlib.Path(os.environ["nnUNet_results"]) / f"rank{dist.get_rank()}.json"
record = {"world": dist.get_world_size(), "sum": total.item(), "node": os.environ["GROUP_RANK"]}
out.write_text(json.dumps(record))
dist.destroy_process_group()
"""


def test_run_local_starts_every_node_of_a_multi_node_stage_on_this_machine(tmp_path: Path) -> None:
    """The local executor runs the planned torchrun line once per node, rendezvous on 127.0.0.1: a real gloo
    all-reduce over 2 nodes x 1 rank."""
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    argv = distributed.launch_argv([sys.executable, str(script)], 1, 2)
    stage = plan.Stage(
        name="distill",
        description="2 nodes",
        commands=(plan.Command("distill", argv),),
        resources=plan.StageResources(1, "1", "1Gi", 0, nodes=2),
    )
    p = plan.DataPaths(*(str(tmp_path / d) for d in ("raw", "pre", "res", "work")))
    out = io.StringIO()
    runner = local.LocalRunner(
        name="t", paths=p, workdir=Path(p.work), env={"PATH": "/usr/bin:/bin"}, out=out
    )
    status = runner.run([stage])
    assert status["phase"] == "Succeeded", out.getvalue()
    ranks = [json.loads((tmp_path / "res" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"world": 2, "sum": 3.0, "node": "0"}, {"world": 2, "sum": 3.0, "node": "1"}]
    assert (Path(p.work) / "logs" / "distill-node1.log").is_file()
