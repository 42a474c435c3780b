"""Pure: why a stage's pod is stuck or failed, in the user's terms (the field to change, the Secret to
create).

Kubernetes reports a stuck pod in many places: scheduler conditions, container waiting reasons,
termination states, evictions and disruptions. `pod_issue` folds them into one reason and message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nnunet_distill_operator.status import parse_summary

# Waiting reasons that mean "this pod will not start by itself".
_WAITING_PROBLEMS = {
    "ImagePullBackOff": "the trainer image cannot be pulled; check spec.image and spec.imagePullSecrets",
    "ErrImagePull": "the trainer image cannot be pulled; check spec.image and spec.imagePullSecrets",
    "InvalidImageName": "spec.image is not a valid image reference",
    "CreateContainerConfigError": "the container cannot be configured (a missing Secret or key in "
    "spec.output.secretRef?)",
    "CreateContainerError": "the container cannot be created",
    "CrashLoopBackOff": "the container keeps crashing",
}
_REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")  # metav1.Condition reasons are CamelCase


@dataclass(frozen=True)
class PodIssue:
    """Why a stage's pod is not running or failed, in the user's terms."""

    reason: str
    message: str
    pod: str


def _memory_limit(pod: Mapping[str, Any], container: str) -> str | None:
    for c in (pod.get("spec") or {}).get("containers", []) + (pod.get("spec") or {}).get(
        "initContainers", []
    ):
        if c.get("name") == container:
            return ((c.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def _container_statuses(status: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    yield from status.get("initContainerStatuses") or ()
    yield from status.get("containerStatuses") or ()


def pod_issue(pod: Mapping[str, Any], stage: str | None = None) -> PodIssue | None:
    """The first thing a user must know about a pod that is stuck or failed; None when it is fine."""
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "")
    phase = status.get("phase")
    return (
        _stopped_by_cluster(status, name)
        or _out_of_memory(pod, status, name, f"spec.resources.{stage}" if stage else "spec.resources")
        or (_pending_issue(status, name) if phase == "Pending" else None)
        or (_failed_issue(status, name) if phase == "Failed" else None)
    )


def _stopped_by_cluster(status: Mapping[str, Any], name: str) -> PodIssue | None:
    """Evicted (node pressure), or stopped by a disruption (preemption, drain)."""
    if status.get("reason") == "Evicted":
        return PodIssue(
            "Evicted", f"pod {name} was evicted: {status.get('message') or 'node pressure'}", name
        )
    for cond in status.get("conditions") or ():
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            reason = cond.get("reason") or "Disrupted"
            label = "Preempted" if "Preemption" in reason else "Disrupted"
            return PodIssue(
                label,
                f"pod {name} was stopped by the cluster ({reason}): {cond.get('message') or ''}".rstrip(": "),
                name,
            )
    return None


def _out_of_memory(
    pod: Mapping[str, Any], status: Mapping[str, Any], name: str, where: str
) -> PodIssue | None:
    for cs in _container_statuses(status):
        for state_key in ("state", "lastState"):
            term = (cs.get(state_key) or {}).get("terminated") or {}
            if term.get("reason") == "OOMKilled":
                limit = _memory_limit(pod, cs.get("name", ""))
                return PodIssue(
                    "OOMKilled",
                    f"container {cs.get('name')} of pod {name} ran out of memory"
                    + (f" (limit {limit})" if limit else "")
                    + f"; raise {where}.memory",
                    name,
                )
    return None


def _pending_issue(status: Mapping[str, Any], name: str) -> PodIssue | None:
    """Unschedulable, a missing Secret or key, an image that cannot be pulled, a crash loop."""
    for cond in status.get("conditions") or ():
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return PodIssue("Unschedulable", cond.get("message") or f"pod {name} cannot be scheduled", name)
    for cs in _container_statuses(status):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        secret = (
            _missing_secret(waiting.get("message") or "") if reason == "CreateContainerConfigError" else None
        )
        if secret is not None:
            return PodIssue(secret[0], secret[1], name)
        if reason in _WAITING_PROBLEMS:
            detail = waiting.get("message") or ""
            return PodIssue(reason, f"{_WAITING_PROBLEMS[reason]}: {detail}".rstrip(": "), name)
    return None


def _failed_issue(status: Mapping[str, Any], name: str) -> PodIssue | None:
    """A container that exited non-zero: the stage's own error (from its termination message) or its last
    lines."""
    for cs in _container_statuses(status):
        term = (cs.get("state") or {}).get("terminated") or {}
        code = term.get("exitCode")
        if code not in (None, 0):
            summary = parse_summary(term.get("message"))
            err = summary.get("error") if isinstance(summary.get("error"), dict) else {}
            if err.get("message"):
                text = f"{err.get('reason') or 'Error'}: {err['message']}"
            else:
                text = _last_lines(term.get("message"))
            # The stage's own reason (InvalidCredentials, BucketNotFound, TeacherUnavailable ...) is what a
            # user acts on, so it becomes the condition's reason when it is a valid one.
            reason = err.get("reason")
            reason = reason if isinstance(reason, str) and _REASON.fullmatch(reason) else "Error"
            return PodIssue(
                reason,
                f"container {cs.get('name')} of pod {name} exited with code {code}"
                + (f": {text}" if text else ""),
                name,
            )
    return None


def _missing_secret(kubelet_message: str) -> tuple[str, str] | None:
    """(reason, message) when the kubelet could not find the credentials Secret or one of its keys. The
    kubelet names the Secret and the key, never a value."""
    m = re.search(r'secret "([^"]+)" not found', kubelet_message)
    if m:
        why = (
            f"spec.output.secretRef.name: Secret {m.group(1)!r} does not exist in the job's namespace; "
            "create it with the storage credentials (see the README's credentials section)"
        )
        return ("SecretMissing", why)
    m = re.search(r"couldn't find key (\S+) in Secret (\S+)", kubelet_message)
    if m:
        why = (
            f"spec.output.secretRef: Secret {m.group(2).split('/')[-1]!r} has no key {m.group(1)}, which "
            "publishing to this URI scheme requires"
        )
        return ("SecretKeyMissing", why)
    return None


def _last_lines(text: str | None, n: int = 3, limit: int = 400) -> str:
    if not text:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    out = " | ".join(lines[-n:])
    return out[-limit:]
