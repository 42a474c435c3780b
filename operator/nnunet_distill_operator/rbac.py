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
    group: str          # "" is the core API group
    resource: str       # "<plural>" or "<plural>/<subresource>"
    verbs: tuple[str, ...]
    namespaced: bool = True
    why: str = ""


OPERATOR_RULES: tuple[Rule, ...] = (
    Rule(api.GROUP, api.PLURAL, ("get", "list", "watch", "patch", "delete"),
         why="kopf watches DistillationJobs; the accepted-spec annotation is patched; ttlSecondsAfterFinished "
             "deletes finished ones"),
    Rule(api.GROUP, f"{api.PLURAL}/status", ("get", "patch"), why="phase, conditions, stages, artifacts"),
    Rule("batch", "jobs", ("get", "list", "watch", "create", "patch"),
         why="one Job per stage; suspend/resume patches spec.suspend"),
    Rule("", "pods", ("get", "list", "watch"),
         why="pod-level causes (Unschedulable, ImagePullBackOff, OOMKilled, evictions) and termination messages"),
    Rule("", "events", ("create",), why="Kubernetes Events on stage transitions"),
    Rule("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), namespaced=False,
         why="kopf discovers when the DistillationJob CRD is installed or removed"),
)

# Only when the operator runs with peering (not --standalone): kopf's collision avoidance between replicas.
PEERING_RULES: tuple[Rule, ...] = (
    Rule("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch"), why="namespaced peering"),
    Rule("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch"), namespaced=False,
         why="cluster-wide peering (--all-namespaces)"),
)

TRAINER_RULES: tuple[Rule, ...] = (
    Rule(api.GROUP, f"{api.PLURAL}/status", ("get", "patch"),
         why="trainer pods report status.progress (and read the restart count) of their own job"),
)


def as_policy_rules(rules: tuple[Rule, ...]) -> list[dict[str, list[str]]]:
    """rbac.authorization.k8s.io/v1 PolicyRules, one per (group, resource)."""
    return [{"apiGroups": [r.group], "resources": [r.resource], "verbs": list(r.verbs)} for r in rules]
