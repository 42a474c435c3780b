"""A Decision's side effects against the API server, in an order that is safe to interrupt at any point.

1. The accepted spec first, into status (which users cannot write): if the operator dies after creating a
   Job, the restarted operator knows which spec that Job was created from.
2. The pods' identity (ServiceAccount, Role, RoleBinding), then the Job that uses it.
3. Events before the status that records the transition: if the operator dies in between, the next pass
   derives the same transition again and re-posts under the same (deterministic) name: never lost, never
   twice.
4. The status, remembered as the operator's own write (see `State.owned_status`).

Requests and responses are plain JSON (`Clients.request`): the operator needs the stored body, not the
client's models, and the model round trips were a large share of its CPU under load. For a stage Job the typed
method validated the manifest into the client's `V1Job` and serialised it back (1.3 ms per Job; the operator's
CPU per DistillationJob in `bench operator` went from 16.7 to 15.6 ms one at a time, and 12.2 to 11.9 ms in a
burst, 4 runs each). What those models checked is checked before: the spec's pass-through sections (affinity,
tolerations) with the same models when the spec is validated (`api.kubernetes_errors`), the Job is built from
that validated spec (`k8s.job_for`), and the API server's 422 names any field it refuses (`JobInvalid`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nnunet_distill_operator import api, k8s, metrics
from nnunet_distill_operator.distributed import rendezvous_service
from nnunet_distill_operator.job_errors import status_causes
from nnunet_distill_operator.operator_state import COMPONENT, Key, State, kept_job
from nnunet_distill_operator.reconcile import OWNED_STATUS_FIELDS, Decision, Event, event_name
from nnunet_distill_operator.status import ANNOTATION_SUSPENDED_BY_OPERATOR, parse_time

log = logging.getLogger("nnunet_distill_operator")
MERGE_PATCH = "application/merge-patch+json"


class JobInvalid(Exception):
    """A stage's Job cannot be built or is refused as invalid (422): the message names the spec field."""

    def __init__(self, stage: str, problems: list[tuple[str, str]]):
        self.stage = stage
        self.message = "; ".join(f"{field}: {why}" for field, why in problems)
        super().__init__(self.message)


class JobRejected(Exception):
    """The API server refused to create a stage's Job (4xx other than 409)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage, self.message = stage, message


def _api_body(exc: Any) -> dict[str, Any]:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return body if isinstance(body, dict) else {}


def _api_message(exc: Any) -> str:
    """The human part of a Kubernetes Status error body."""
    return str(_api_body(exc).get("message") or exc.reason or f"HTTP {exc.status}")


def apply_decision(state: State, cr: dict[str, Any], decision: Decision, key: Key) -> None:
    """Perform a Decision's side effects (see the module's docstring for the order and why)."""
    namespace, name, _uid = key
    status_patch = decision.status_patch
    if decision.accepted_spec is not None:
        if not patch_status(state, key, {"status": {"acceptedSpec": decision.accepted_spec}}):
            return
        if status_patch is not None:
            rest = {k: v for k, v in status_patch["status"].items() if k != "acceptedSpec"}
            status_patch = {"status": rest} if rest else None
    _create_identity(state, namespace, decision.identity)
    for manifest in decision.create:
        _create_job(state, cr, decision, key, manifest)
    _patch_jobs(state, namespace, decision)
    for event in decision.events:
        post_event(state, cr, event)
    if status_patch is not None:
        if not patch_status(state, key, status_patch):
            return
    elif key not in state.owned_status:
        state.owned_status[key] = {
            f: v for f, v in (cr.get("status") or {}).items() if f in OWNED_STATUS_FIELDS
        }
    for stage, result, seconds in decision.finished_stages:
        metrics.STAGE_DURATION.labels(stage, result).observe(seconds)
    metrics.JOBS.update(namespace, name, {**(cr.get("status") or {}), **decision.status})
    if decision.delete:
        _delete(state, key)


def _create_identity(state: State, namespace: str, identity: tuple[dict[str, Any], ...]) -> None:
    """The pods' identity before the Job that uses it (409: it exists already, e.g. from an earlier stage)."""
    c = state.clients
    for obj in identity:
        collection = {
            "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts",
            "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
            "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        }[obj["kind"]]
        try:
            c.request("POST", collection, obj)
        except c.ApiException as exc:
            if exc.status != 409:
                raise


def _create_rendezvous_service(state: State, namespace: str, job: dict[str, Any]) -> None:
    """A multi-node Job's headless Service, before the Job (409: it exists, e.g. from an earlier pass)."""
    service = rendezvous_service(job)
    if service is None:
        return
    try:
        state.clients.request("POST", f"/api/v1/namespaces/{namespace}/services", service)
    except state.clients.ApiException as exc:
        if exc.status != 409:
            raise


def _create_job(
    state: State, cr: Mapping[str, Any], decision: Decision, key: Key, manifest: dict[str, Any]
) -> None:
    """Create one stage Job; a 409 adopts the existing one (its name is deterministic)."""
    c = state.clients
    namespace = key[0]
    stage = manifest["metadata"]["labels"][k8s.LABEL_STAGE]
    _create_rendezvous_service(state, namespace, manifest)
    try:
        created = c.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)
    except c.ApiException as exc:
        if exc.status == 422:
            raise JobInvalid(stage, status_causes(_api_body(exc), stage)) from None
        if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429):
            raise JobRejected(stage, _api_message(exc)) from None
        if exc.status != 409:
            raise
        log.info("Job %s already exists (created concurrently); adopting it", manifest["metadata"]["name"])
        created_body = kept_job(manifest)
    else:
        created_body = kept_job(created)
        metrics.JOBS_CREATED.labels(stage).inc()
        if decision.stages and stage == decision.stages[0].name:
            created_at = parse_time((cr.get("metadata") or {}).get("creationTimestamp"))
            if created_at is not None:
                metrics.START_LATENCY.observe(max(0.0, (datetime.now(UTC) - created_at).total_seconds()))
    state.created.setdefault(key, {})[stage] = created_body
    state.rejected.get(key, {}).pop(stage, None)


def _patch_jobs(state: State, namespace: str, decision: Decision) -> None:
    """Suspend, hand back to Kueue (only our mark goes, spec.suspend stays as it is), or resume."""
    patches = (
        (decision.suspend, {"spec": {"suspend": True}}, "true"),
        (decision.release, {}, None),
        (decision.resume, {"spec": {"suspend": False}}, None),
    )
    for jobs, spec, mark in patches:
        for job in jobs:
            body = {**spec, "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_OPERATOR: mark}}}
            path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}"
            state.clients.request("PATCH", path, body, content_type=MERGE_PATCH)


def _delete(state: State, key: Key) -> None:
    namespace, name, _uid = key
    c = state.clients
    log.info("deleting DistillationJob %s/%s: ttlSecondsAfterFinished has passed", namespace, name)
    try:
        path = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}"
        c.request(
            "DELETE", path, {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        )
    except c.ApiException as exc:
        if exc.status != 404:
            raise
    state.deleted.add(key)
    metrics.JOBS.forget(namespace, name)


def patch_status(state: State, key: Key, patch: dict[str, Any]) -> bool:
    """Merge-patch the status subresource and remember what we wrote; False when the object is gone."""
    c = state.clients
    namespace, name, _uid = key
    path = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}/{name}/status"
    try:
        result = c.request("PATCH", path, patch, content_type=MERGE_PATCH)
    except c.ApiException as exc:
        if exc.status == 404:
            state.deleted.add(key)
            return False
        raise
    written = (result or {}).get("status") or {}
    state.owned_status[key] = {f: written[f] for f in OWNED_STATUS_FIELDS if f in written}  # a fresh dict
    return True


def post_event(state: State, cr: Mapping[str, Any], event: Event) -> None:
    """A core/v1 Event on the DistillationJob, named after its uid and the transition (`event_name`).

    Not `kopf.event`: kopf names its Events at random (generateName) and posts them later from a queue,
    while the at-least-once-never-twice promise needs a deterministic name and a post that has succeeded
    before the status recording the transition is written. A 409 means it was posted before (by us before
    a restart); any other failure is raised, so the status that records the transition is not written
    either and the whole pass is retried with backoff."""
    meta = cr.get("metadata") or {}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": event_name(meta.get("name", ""), meta.get("uid", ""), event),
            "namespace": meta.get("namespace"),
        },
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "reason": event.reason,
        "message": event.message[:1024],
        "type": event.type,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("POD_NAME", COMPONENT),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    (log.warning if event.type == "Warning" else log.info)(
        "%s/%s: %s: %s", meta.get("namespace"), meta.get("name"), event.reason, event.message
    )
    try:
        state.clients.request("POST", f"/api/v1/namespaces/{meta.get('namespace')}/events", body)
    except state.clients.ApiException as exc:
        if exc.status != 409:
            raise
