"""Pure: a refused stage Job's errors in the user's terms, naming the DistillationJob spec field to change.

The kubernetes client's models (a pydantic ValidationError) and the API server (a 422 Status with causes)
name fields of the Job, which the user never wrote; these functions map them back to the spec.
"""

from __future__ import annotations

import re
from typing import Any

# Where a field of a stage Job comes from in the DistillationJob's spec: when the kubernetes client or the API
# server refuses a Job, the message names the field the user has to change, not a Job field they never wrote.
_JOB_FIELD_SOURCES: tuple[tuple[str, str], ...] = (
    ("spec.template.spec.affinity", "spec.scheduling.affinity"),
    ("spec.template.spec.tolerations", "spec.scheduling.tolerations"),
    ("spec.template.spec.nodeSelector", "spec.scheduling.nodeSelector"),
    ("spec.template.spec.priorityClassName", "spec.scheduling.priorityClassName"),
    ("spec.template.spec.imagePullSecrets", "spec.imagePullSecrets"),
    ("spec.template.spec.serviceAccountName", "spec.serviceAccountName"),
    ("spec.template.spec.securityContext", "spec.security"),
    ("spec.template.spec.volumes", "spec.storage"),
    ("spec.activeDeadlineSeconds", "spec.activeDeadlineSeconds"),
    ("spec.backoffLimit", "spec.backoffLimit"),
    ("spec.ttlSecondsAfterFinished", "spec.jobTTLSecondsAfterFinished"),
    ("metadata.labels", "spec.scheduling.queueName"),
)
_CONTAINER_FIELD_SOURCES: tuple[tuple[str, str], ...] = (
    ("image", "spec.image"),
    ("imagePullPolicy", "spec.imagePullPolicy"),
    ("resources", "spec.resources.{stage}"),
    ("volumeMounts", "spec.storage"),
    ("securityContext", "spec.security"),
)


def spec_field_for(job_path: str, stage: str) -> str:
    """The DistillationJob spec field a stage Job's field (`spec.template.spec.affinity.nodeAffinity`) is
    built from (`spec.scheduling.affinity.nodeAffinity`); `spec` when no single field is responsible."""
    path = re.sub(r"\[(\d+)\]", r".\1", job_path).strip(".")
    if "sizeLimit" in path and path.startswith("spec.template.spec.volumes"):
        return "spec.resources.sharedMemory"
    for prefix, source in _JOB_FIELD_SOURCES:
        if path == prefix or path.startswith(prefix + "."):
            rest = path[len(prefix) :]
            if source.startswith("spec.scheduling.affinity"):
                return source + re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", rest)
            return source
    m = re.match(r"^spec\.template\.spec\.(?:initContainers|containers)\.\d+\.([A-Za-z]+)", path)
    if m:
        for prefix, source in _CONTAINER_FIELD_SOURCES:
            if m.group(1) == prefix:
                return source.format(stage=stage)
    return "spec"


def build_error_fields(exc: BaseException, stage: str) -> list[tuple[str, str]]:
    """(spec field, message) for why a stage's Job could not be built or sent (a pydantic ValidationError
    from the kubernetes client's models, or any other error while building the request)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        out = []
        try:
            items = errors()
        except Exception:  # noqa: BLE001 - not a pydantic error after all
            items = []
        for err in items:
            loc = list(err.get("loc") or ())
            while loc and not isinstance(loc[0], str):
                loc.pop(0)  # the argument position of the request body
            path = ".".join(str(p) for p in loc)
            out.append((spec_field_for(path, stage), f"{path}: {err.get('msg')}"))
        if out:
            return out
    return [("spec", f"{type(exc).__name__}: {exc}")]


def status_causes(body: dict[str, Any], stage: str) -> list[tuple[str, str]]:
    """(spec field, message) from a Kubernetes Status (422 Invalid) body's details.causes."""
    causes = ((body or {}).get("details") or {}).get("causes") or []
    out = [
        (spec_field_for(str(c.get("field") or ""), stage), f"{c.get('field')}: {c.get('message')}")
        for c in causes
        if isinstance(c, dict)
    ]
    return out or [("spec", str((body or {}).get("message") or "the API server refused the Job"))]
