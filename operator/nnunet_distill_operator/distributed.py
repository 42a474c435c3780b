"""Pure: the distill stage on several GPUs and nodes, as torchrun in a pod and an Indexed Job.

``resources.distill.gpus: N`` (N > 1) runs one pod with ``torchrun --standalone --nproc_per_node N``.
``resources.distill.nodes: M`` (M > 1) runs one Indexed Job with M completions and parallelism M (one Job, so
Kueue admits all its pods together) and a headless Service whose DNS names the pods
(``<job>-<index>.<service>``). Each pod runs ``torchrun --nnodes M --nproc_per_node N``; its node rank is its
``JOB_COMPLETION_INDEX`` and the index-0 pod hosts the rendezvous (torch's c10d TCPStore). The values reach
torchrun through the env names Kubeflow Trainer uses (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``), which torchrun reads for its flags.

Locally (``nnunet-distill run --local``) the same command runs once per node on this machine with the
rendezvous on 127.0.0.1 (:func:`local_node_envs`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from nnunet_distill_operator.trees import copy_tree

TORCHRUN = "torchrun"
RENDEZVOUS_PORT = 29500
PORT_NAME = "c10d"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
ENV_NNODES = "PET_NNODES"
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
ENV_NODE_RANK = "PET_NODE_RANK"
ENV_MASTER_ADDR = "PET_MASTER_ADDR"
ENV_MASTER_PORT = "PET_MASTER_PORT"
#: Fields of the DistillationJob spec, for messages.
FIELD_GPUS = "resources.distill.gpus"
FIELD_NODES = "resources.distill.nodes"


def processes_per_node(gpus: int) -> int:
    """One rank per GPU; a CPU-only pod runs one rank."""
    return max(1, gpus)


def is_distributed(gpus: int, nodes: int) -> bool:
    return nodes > 1 or gpus > 1


def launch_argv(argv: tuple[str, ...] | list[str], gpus: int, nodes: int) -> tuple[str, ...]:
    """The trainer command under torchrun, or unchanged when one process does the work.

    One node: ``--standalone`` (a rendezvous on localhost, a free port). Several nodes: node rank and
    rendezvous address come from ``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT``, set per pod
    (:func:`with_rendezvous`) or per local process (:func:`local_node_envs`).
    """
    if not is_distributed(gpus, nodes):
        return tuple(argv)
    nproc = str(processes_per_node(gpus))
    if nodes == 1:
        head = [TORCHRUN, "--standalone", "--nnodes", "1", "--nproc_per_node", nproc]
    else:
        head = [TORCHRUN, "--nnodes", str(nodes), "--nproc_per_node", nproc, "--max_restarts", "0"]
    return (*head, "--no-python", *argv)


#: Per-process worker counts in a stage's env, split between the ranks of a pod (they share its CPUs).
PER_PROCESS_WORKERS = ("nnUNet_n_proc_DA", "nnUNet_def_n_proc")


def per_rank_env(env: tuple[tuple[str, str], ...], gpus: int) -> tuple[tuple[str, str], ...]:
    """A pod's nnU-Net worker counts divided between its ranks (each rank starts its own workers)."""
    n = processes_per_node(gpus)
    return tuple(
        (k, str(max(1, int(v) // n))) if k in PER_PROCESS_WORKERS and v.isdigit() else (k, v) for k, v in env
    )


def trainer_argv(argv: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The trainer's own command inside a torchrun command line (what ``--no-python`` executes)."""
    if not argv or argv[0] != TORCHRUN:
        return tuple(argv)
    return tuple(argv[list(argv).index("--no-python") + 1 :])


def spec_problems(resources: Any) -> list[tuple[str, str]]:
    """(field, message) for GPU/node combinations that cannot form a process group (``spec.resources``)."""
    problems: list[tuple[str, str]] = []
    for stage in ("preprocess", "teachers", "export", "gate", "publish"):
        if getattr(resources, stage).nodes not in (None, 1):
            problems.append(
                (
                    f"resources.{stage}.nodes",
                    f"applies to {FIELD_NODES} only: the {stage} stage runs in one pod",
                )
            )
    distill = resources.distill
    gpus = distill.gpus if distill.gpus is not None else 1
    nodes = distill.nodes or 1
    if nodes > 1 and gpus < 1:
        problems.append(
            (
                FIELD_NODES,
                f"{nodes} nodes need GPUs: set {FIELD_GPUS} to at least 1 (a CPU distillation runs on one "
                "node), or drop nodes",
            )
        )
    if gpus > 1 and "/mig-" in resources.gpu_resource_name:
        problems.append(
            (
                FIELD_GPUS,
                f"{gpus} GPUs of {resources.gpu_resource_name}: a process sees one MIG slice, so torchrun "
                f"cannot give each rank its own; use {FIELD_GPUS}: 1 with {FIELD_NODES}, or whole GPUs "
                "(resources.gpuResourceName: nvidia.com/gpu)",
            )
        )
    return problems


def service_name(job_name: str) -> str:
    """The headless Service of a multi-node Job: the pods' subdomain, so its name is the Job's."""
    return job_name


def master_address(job_name: str, namespace: str) -> str:
    """DNS name of the index-0 pod: ``<job>-0.<service>.<namespace>.svc`` (Indexed Job hostname)."""
    return f"{job_name}-0.{service_name(job_name)}.{namespace}.svc"


def with_rendezvous(job: dict[str, Any], gpus: int, nodes: int) -> dict[str, Any]:
    """A stage Job made multi-node (Indexed, M pods at once, subdomain, the PET_* env), as a copy; a
    single-node Job as it is."""
    if nodes <= 1:
        return job
    out: dict[str, Any] = copy_tree(job)
    name = out["metadata"]["name"]
    namespace = out["metadata"]["namespace"]
    spec = out["spec"]
    spec["completionMode"] = "Indexed"
    spec["completions"] = nodes
    spec["parallelism"] = nodes
    pod = spec["template"]["spec"]
    pod["subdomain"] = service_name(name)
    env = [
        {"name": ENV_NNODES, "value": str(nodes)},
        {"name": ENV_NPROC_PER_NODE, "value": str(processes_per_node(gpus))},
        {
            "name": ENV_NODE_RANK,
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": ENV_MASTER_ADDR, "value": master_address(name, namespace)},
        {"name": ENV_MASTER_PORT, "value": str(RENDEZVOUS_PORT)},
    ]
    for container in pod["containers"]:
        container["env"] = [*container.get("env", []), *env]
        container["ports"] = [{"name": PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    return out


def rendezvous_service(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The headless Service a multi-node Job's pods resolve each other by (None for other Jobs).

    Created before the Job, with the Job's owner (the DistillationJob), so a restarted operator never leaves a
    Job without its Service and deleting the DistillationJob deletes both. ``publishNotReadyAddresses``: the
    pods have no readiness probe; their DNS records must exist as soon as they run.
    """
    pod = job["spec"]["template"]["spec"]
    subdomain = pod.get("subdomain")
    if not subdomain:
        return None
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": subdomain,
            "namespace": meta["namespace"],
            "labels": dict(meta.get("labels") or {}),
            "annotations": dict(meta.get("annotations") or {}),
            "ownerReferences": copy_tree(list(meta.get("ownerReferences") or [])),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_NAME_LABEL: meta["name"]},
            "ports": [{"name": PORT_NAME, "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def local_node_envs(gpus: int, nodes: int, port: int) -> list[dict[str, str]]:
    """Per local "node" process: the PET_* env of an Indexed Job pod, with the rendezvous on 127.0.0.1."""
    if nodes <= 1:
        return [{}]
    return [
        {
            ENV_NNODES: str(nodes),
            ENV_NPROC_PER_NODE: str(processes_per_node(gpus)),
            ENV_NODE_RANK: str(rank),
            ENV_MASTER_ADDR: "127.0.0.1",
            ENV_MASTER_PORT: str(port),
        }
        for rank in range(nodes)
    ]
