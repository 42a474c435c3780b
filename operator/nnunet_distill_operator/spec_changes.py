"""Which spec a DistillationJob runs: its current spec, or, once its first Job exists, the accepted one.

Spec changes after the first Job exists: fields that only shape Jobs not created yet (resources,
scheduling, image, output, suspend, deadlines) are accepted; fields that define the model (dataset,
teachers, student, distillation, ...) would mix two models into one and are rejected with a Stalled
condition naming them, while the job continues with the spec it started with: `status.acceptedSpec`,
written by the operator through the status subresource before the first Job exists. Users with edit rights
cannot write status, so neither an edit nor an operator restart changes what a running job produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nnunet_distill_operator import api

# Top-level spec fields that may change while the job runs: they affect only Jobs created afterwards
# (or, for suspend, the running Job). Everything else defines the model being produced.
SAFE_FIELDS = frozenset(
    {
        "suspend",
        "resources",
        "scheduling",
        "image",
        "imagePullPolicy",
        "imagePullSecrets",
        "serviceAccountName",
        "security",
        "backoffLimit",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
        "jobTTLSecondsAfterFinished",
        "output",
        "qualityGate",
    }
)


def _leaf_diffs(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _leaf_diffs(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [path]


def unsafe_changes(accepted: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Field paths (spec.x.y) that changed between two normalized specs and may not change after start."""
    out = []
    for key in sorted(set(accepted) | set(current)):
        if key in SAFE_FIELDS:
            continue
        out += _leaf_diffs(accepted.get(key), current.get(key), f"spec.{key}")
    return out


def _effective_spec(current: Mapping[str, Any], accepted: Mapping[str, Any]) -> dict[str, Any]:
    """The accepted spec with the safe fields taken from the current one."""
    merged = {k: v for k, v in accepted.items() if k not in SAFE_FIELDS}
    merged.update({k: v for k, v in current.items() if k in SAFE_FIELDS})
    return merged


@dataclass(frozen=True)
class SpecChoice:
    """The spec to run (None: nothing can run) and, when the job is Stalled, (reason, message)."""

    effective: api.DistillationJobSpec | None
    stalled: tuple[str, str] | None


def choose_spec(spec: Any, accepted_raw: Any, started: bool) -> SpecChoice:
    """The current spec when valid and (before the start) unconstrained; after the start, the accepted spec
    with the current safe fields, Stalled when an unsafe field changed or the current spec is invalid."""
    try:
        current: api.DistillationJobSpec | None = api.parse_spec(spec)
        problems: list[str] = []
    except api.InvalidSpec as exc:
        current, problems = None, exc.problems
    accepted: api.DistillationJobSpec | None = None
    if started and isinstance(accepted_raw, dict):
        try:
            accepted = api.parse_spec(accepted_raw)
        except api.InvalidSpec:
            accepted = None
    if current is None:
        return SpecChoice(accepted if started else None, ("InvalidSpec", "; ".join(problems)))
    if started and accepted is not None:
        acc, cur = api.spec_to_dict(accepted), api.spec_to_dict(current)
        changed = unsafe_changes(acc, cur)
        if changed:
            why = (
                f"{', '.join(changed)} changed after the job started; a running job cannot change what "
                "model it produces: revert the change, or create a new DistillationJob"
            )
            effective = api.DistillationJobSpec.model_validate(_effective_spec(cur, acc))
            return SpecChoice(effective, ("SpecChangeRejected", why))
    return SpecChoice(current, None)
