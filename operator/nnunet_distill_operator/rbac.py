"""The Kubernetes API calls the operator and the trainer pods make, as data.

The Helm chart's Roles must grant exactly these (tests/ship compares the rendered chart with this list,
and tests/operator records the calls the running operator really makes against the test API server and
checks they are covered here). Keep a rule here for every call site in controller.py and in kopf.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnunet_distill_operator import api


@dataclass(frozen=True)
class Rule:
    group: str  # "" is the core API group
    resource: str  # "<plural>" or "<plural>/<subresource>"
    verbs: tuple[str, ...]
    namespaced: bool = True
    why: str = ""


OPERATOR_RULES: tuple[Rule, ...] = (
    Rule(
        api.GROUP,
        api.PLURAL,
        ("list", "watch", "delete"),
        why="kopf lists and watches DistillationJobs; ttlSecondsAfterFinished deletes finished ones",
    ),
    Rule(
        api.GROUP,
        f"{api.PLURAL}/status",
        ("get", "patch"),
        why="patch: phase, conditions, stages, artifacts, acceptedSpec; get+patch: held so that the operator "
        "may grant them to each job's trainer Role (Kubernetes lets it grant only what it holds)",
    ),
    Rule(
        "batch",
        "jobs",
        ("list", "watch", "create", "patch"),
        why="one Job per stage; suspend/resume patches spec.suspend",
    ),
    Rule(
        "",
        "pods",
        ("list", "watch"),
        why="pod-level causes (Unschedulable, ImagePullBackOff, OOMKilled, evictions) and termination "
        "messages",
    ),
    Rule(
        "",
        "events",
        ("create",),
        why="Kubernetes Events on transitions (deterministic names: a repeat is a 409)",
    ),
    Rule("", "serviceaccounts", ("create",), why="each job's trainer ServiceAccount"),
    Rule(
        "",
        "services",
        ("create",),
        why="the headless Service of a multi-node distill Job (torchrun rendezvous; resources.distill.nodes)",
    ),
    Rule("rbac.authorization.k8s.io", "roles", ("create",), why="each job's trainer Role"),
    Rule("rbac.authorization.k8s.io", "rolebindings", ("create",), why="each job's trainer RoleBinding"),
    Rule(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        namespaced=False,
        why="kopf discovers when the DistillationJob CRD is installed or removed (all-namespaces mode only; "
        "with listed namespaces kopf does not scan)",
    ),
)

# Calls the operator never makes itself but must hold to grant them (RBAC escalation prevention).
GRANTED_ONLY: frozenset[tuple[str, str, str]] = frozenset({(api.GROUP, f"{api.PLURAL}/status", "get")})

# Only when the operator runs with peering (not --standalone): kopf's collision avoidance between replicas.
PEERING_RULES: tuple[Rule, ...] = (
    Rule("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch"), why="namespaced peering"),
    Rule(
        "kopf.dev",
        "clusterkopfpeerings",
        ("get", "list", "watch", "patch"),
        namespaced=False,
        why="cluster-wide peering (--all-namespaces)",
    ),
)

# What each job's trainer Role allows (k8s.trainer_identity), for that one DistillationJob (resourceNames).
TRAINER_RULES: tuple[Rule, ...] = (
    Rule(
        api.GROUP,
        f"{api.PLURAL}/status",
        ("get", "patch"),
        why="trainer pods report status.progress (and read the restart count) of their own job",
    ),
)
