"""kopf handlers: watch DistillationJobs, their Jobs and pods; apply `reconcile.decide` to each change.

Design (see reconcile.py for the logic):
- Level-triggered. Every event of a DistillationJob, one of its Jobs or one of their pods runs the same
  reconciliation of the owning DistillationJob, plus a periodic resync (TTL, missed events).
- kopf indexes hold the Jobs and pods by owner. kopf fills all indexes before any handler runs, so an
  operator that restarts mid-run sees the existing Jobs before it could create one: no duplicates.
  Job names are deterministic on top of that, so a race can only ever produce a 409, never a 2nd Job.
- One lock per DistillationJob serialises reconciliations (handlers run in kopf's thread pool).
- Single writer: only the operator writes the status fields it owns, so the result of its own last
  status patch is always the newest value of those fields; it is overlaid on (possibly stale) bodies
  from the watch stream. Likewise for Jobs it created whose ADDED event has not arrived yet.
- No finalizers: deletion cleans up through ownerReferences, and the operator being down never blocks a
  `kubectl delete`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from nnunet_distill_operator import __version__, api, k8s, metrics
from nnunet_distill_operator.distributed import rendezvous_service
from nnunet_distill_operator.reconcile import OWNED_STATUS_FIELDS, Decision, Event, decide, event_name
from nnunet_distill_operator.status import ANNOTATION_SUSPENDED_BY_OPERATOR, parse_time

log = logging.getLogger("nnunet_distill_operator")
REGISTRY = kopf.OperatorRegistry()
COMPONENT = "nnunet-distill-operator"
USER_AGENT = f"{COMPONENT}/{__version__}"


@dataclass
class OperatorConfig:
    """Process-level settings (flags/env of nnunet-distill-operator); tests replace them."""

    defaults: k8s.Defaults = field(default_factory=k8s.Defaults)
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    resync_seconds: float = 60.0
    retry_seconds: float = 1.0  # first retry after a transient failure; doubles up to retry_max_seconds
    retry_max_seconds: float = 300.0
    kubeconfig: str | None = None
    context: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        defaults = k8s.Defaults(
            image=env.get("NNUNET_DISTILL_TRAINER_IMAGE") or k8s.Defaults.image,
            image_pull_policy=env.get("NNUNET_DISTILL_TRAINER_IMAGE_PULL_POLICY") or None,
            service_account=env.get("NNUNET_DISTILL_TRAINER_SERVICE_ACCOUNT") or None,
        )
        return cls(defaults=defaults)


CONFIG = OperatorConfig.from_env()


def configure(config: OperatorConfig) -> None:
    global CONFIG
    CONFIG = config


# ------------------------------------------------------------------------------------------- clients


class Clients:
    """kubernetes client APIs on a private configuration (never the process-wide default)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None):
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            path = kubeconfig or next(
                (p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p), None
            )
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        self.api_client = client.ApiClient(cfg)
        self.api_client.user_agent = USER_AGENT  # audit logs (and the RBAC test) tell our calls apart
        self.custom = client.CustomObjectsApi(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.ApiException = client.exceptions.ApiException

    def close(self) -> None:
        self.api_client.close()


@dataclass
class State:
    """Per-run memory of the operator (kept in kopf's memo: a restarted operator starts empty)."""

    clients: Clients
    locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    locks_guard: threading.Lock = field(default_factory=threading.Lock)
    owned_status: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    created: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    rejected: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)
    # stage -> (generation, why its Job cannot be built): not retried until the spec changes.
    invalid: dict[tuple[str, str, str], dict[str, tuple[int | None, str]]] = field(default_factory=dict)
    # Transient failures (API errors, refusals that may clear): (consecutive count, when to retry, why).
    failures: dict[tuple[str, str, str], tuple[int, float, str]] = field(default_factory=dict)
    failed_generation: dict[tuple[str, str, str], int | None] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    wakeup: asyncio.Event | None = None
    deleted: set[tuple[str, str, str]] = field(default_factory=set)
    jobs_index: Any = None
    pods_index: Any = None
    djs_index: Any = None

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self.locks_guard:
            return self.locks.setdefault((namespace, name), threading.Lock())

    def failed(self, key: tuple[str, str, str], why: str, generation: int | None) -> float:
        """Record a transient failure; returns the backoff (exponential, capped) before the next attempt."""
        count = self.failures[key][0] + 1 if key in self.failures else 1
        delay = min(CONFIG.retry_seconds * 2 ** (count - 1), CONFIG.retry_max_seconds)
        self.failures[key] = (count, time.monotonic() + delay, why)
        self.failed_generation[key] = generation
        if self.loop is not None and self.wakeup is not None:  # let the resync loop plan the retry
            self.loop.call_soon_threadsafe(self.wakeup.set)
        return delay

    def succeeded(self, key: tuple[str, str, str]) -> None:
        self.failures.pop(key, None)
        self.failed_generation.pop(key, None)

    def backing_off(self, key: tuple[str, str, str], generation: int | None) -> bool:
        """A transient failure's retry is not due yet, and the spec has not changed since (a changed spec may
        be the fix, so it is tried at once); the resync loop retries when the backoff has passed."""
        failure = self.failures.get(key)
        return (
            failure is not None
            and failure[1] > time.monotonic()
            and self.failed_generation.get(key) == generation
        )


# --------------------------------------------------------------------------------------------- kopf


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> Any:
    """In-cluster service account first, else the kubeconfig ($KUBECONFIG read at call time)."""
    if CONFIG.kubeconfig:
        os.environ["KUBECONFIG"] = CONFIG.kubeconfig
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=REGISTRY)
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: logging.Logger,
    distillationjobs_idx: Any,
    stage_jobs_idx: Any,
    stage_pods_idx: Any,
    **_: Any,
) -> None:
    settings.posting.enabled = False  # Events are posted by us, with the client, from any thread
    settings.execution.max_workers = max(settings.execution.max_workers or 0, 8)
    state = State(clients=Clients(CONFIG.kubeconfig, CONFIG.context))
    state.loop, state.wakeup = asyncio.get_running_loop(), asyncio.Event()
    state.djs_index, state.jobs_index, state.pods_index = distillationjobs_idx, stage_jobs_idx, stage_pods_idx
    memo.state = state
    metrics.JOBS.clear()
    if CONFIG.metrics_port is not None:
        server, port = metrics.serve(CONFIG.metrics_port, CONFIG.metrics_addr)
        memo.metrics_server, memo.metrics_port = server, port
        logger.info("serving Prometheus metrics on %s:%s/metrics", CONFIG.metrics_addr, port)
    memo.resync_task = asyncio.create_task(_resync_forever(state), name="nnunet-distill resync")


@kopf.on.cleanup(registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        await asyncio.to_thread(metrics.stop, server)
        memo.metrics_server = None
    state = getattr(memo, "state", None)
    if state is not None:
        state.clients.close()


@kopf.on.probe(id="distillationjobs", registry=REGISTRY)
def probe_jobs(memo: kopf.Memo, **_: Any) -> int:
    state = getattr(memo, "state", None)
    return len(state.djs_index) if state is not None and state.djs_index is not None else 0


@kopf.index(api.GROUP, api.VERSION, api.PLURAL, registry=REGISTRY)
def distillationjobs_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): _plain(body)}


def _by_owning_job(
    namespace: str, annotations: Mapping[str, str], labels: Mapping[str, str], body: kopf.Body
) -> dict[Any, Any] | None:
    """Index entry keyed by the DistillationJob a stage Job/Pod belongs to (its annotation), with its stage."""
    owner = annotations.get(k8s.ANNOTATION_JOB_NAME)
    if not owner:
        return None
    return {(namespace, owner): (labels[k8s.LABEL_STAGE], _plain(body))}


@kopf.index(
    "batch",
    "v1",
    "jobs",
    labels={k8s.LABEL_JOB: kopf.PRESENT, k8s.LABEL_STAGE: kopf.PRESENT},
    registry=REGISTRY,
)
def stage_jobs_idx(
    namespace: str, annotations: Mapping[str, str], labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Any, Any] | None:
    return _by_owning_job(namespace, annotations, labels, body)


@kopf.index(
    "", "v1", "pods", labels={k8s.LABEL_JOB: kopf.PRESENT, k8s.LABEL_STAGE: kopf.PRESENT}, registry=REGISTRY
)
def stage_pods_idx(
    namespace: str, annotations: Mapping[str, str], labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Any, Any] | None:
    return _by_owning_job(namespace, annotations, labels, body)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=REGISTRY)
def on_distillationjob(
    type: str | None, body: kopf.Body, namespace: str, name: str, uid: str, memo: kopf.Memo, **_: Any
) -> None:
    state: State = memo.state
    if type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
        _forget(state, namespace, name, uid)
        return
    reconcile_one(state, _plain(body), trigger="distillationjob")


@kopf.on.event("batch", "v1", "jobs", labels={k8s.LABEL_JOB: kopf.PRESENT}, registry=REGISTRY)
def on_job(namespace: str, annotations: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    _reconcile_owner(memo.state, namespace, annotations.get(k8s.ANNOTATION_JOB_NAME), trigger="job")


@kopf.on.event("", "v1", "pods", labels={k8s.LABEL_JOB: kopf.PRESENT}, registry=REGISTRY)
def on_pod(namespace: str, annotations: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    _reconcile_owner(memo.state, namespace, annotations.get(k8s.ANNOTATION_JOB_NAME), trigger="pod")


# ------------------------------------------------------------------------------------ reconciliation


def _plain(body: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def _forget(state: State, namespace: str, name: str, uid: str) -> None:
    metrics.JOBS.forget(namespace, name)
    key = (namespace, name, uid)
    state.owned_status.pop(key, None)
    state.created.pop(key, None)
    state.rejected.pop(key, None)
    state.invalid.pop(key, None)
    state.succeeded(key)
    state.deleted.discard(key)


def _reconcile_owner(state: State, namespace: str, owner: str | None, trigger: str) -> None:
    if not owner or state.djs_index is None:
        return
    bodies = list(state.djs_index.get((namespace, owner), ()))
    if not bodies:
        return  # the owner is gone; the garbage collector deletes its Jobs
    reconcile_one(state, bodies[-1], trigger=trigger)


def _indexed(index: Any, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if index is None:
        return out
    for stage, body in index.get((namespace, name), ()):
        out.setdefault(stage, []).append(body)
    return out


def reconcile_one(state: State, body: dict[str, Any], trigger: str) -> Decision | None:
    """Reconcile one DistillationJob now (thread-safe; called from handlers and the resync loop)."""
    meta = body.get("metadata") or {}
    namespace, name, uid = meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid", "")
    key = (namespace, name, uid)
    started = time.perf_counter()
    result = "ok"
    try:
        with state.lock(namespace, name):
            if key in state.deleted:
                return None
            if trigger != "retry" and state.backing_off(key, meta.get("generation")):
                result = "backoff"
                return None
            cr = _with_own_writes(state, body, key)
            jobs = {
                stage: bodies[-1] for stage, bodies in _indexed(state.jobs_index, namespace, name).items()
            }
            pending = state.created.get(key, {})
            for stage in list(pending):
                if stage in jobs:
                    del pending[stage]  # the watch stream has caught up
                else:
                    jobs[stage] = pending[stage]  # created by us, ADDED event not seen yet
            pods = _indexed(state.pods_index, namespace, name)
            now = datetime.now(UTC)
            generation = meta.get("generation")
            invalid = {
                stage: why for stage, (gen, why) in state.invalid.get(key, {}).items() if gen == generation
            }

            def decide_now() -> Decision:
                return decide(
                    cr, jobs, pods, now, CONFIG.defaults, rejected=state.rejected.get(key), invalid=invalid
                )

            decision = decide_now()
            try:
                _apply(state, cr, decision, key)
            except JobInvalid as exc:
                # The Job cannot be built from this spec (the kubernetes client's schema or the API server's
                # validation refused it): Stalled with the spec field named, no retry until the spec changes.
                state.invalid.setdefault(key, {})[exc.stage] = (generation, exc.message)
                invalid[exc.stage] = exc.message
                decision = decide_now()
                _apply(state, cr, _without_creations(decision), key)
                state.succeeded(key)
                result = "invalid"
                return decision
            except JobRejected as exc:
                # Quota, admission webhooks, PodSecurity: say so in status and retry with backoff (the Job
                # name is deterministic, so a retry can never make a second Job).
                state.rejected.setdefault(key, {})[exc.stage] = exc.message
                decision = decide_now()
                _apply(state, cr, _without_creations(decision), key)
                delay = state.failed(key, exc.message, generation)
                log.info(
                    "Job for stage %s of %s/%s refused; retrying in %.1fs", exc.stage, namespace, name, delay
                )
                result = "rejected"
                return decision
            state.succeeded(key)
            if (
                decision.create
                or decision.status_patch
                or decision.suspend
                or decision.resume
                or decision.release
            ):
                result = "changed"
            return decision
    except Exception as exc:  # API errors, timeouts: retried with backoff, never dropped
        result = "error"
        metrics.RECONCILE_ERRORS.labels(trigger).inc()
        delay = state.failed(key, f"{type(exc).__name__}: {exc}", meta.get("generation"))
        log.exception("reconciling DistillationJob %s/%s failed; retrying in %.1fs", namespace, name, delay)
        return None
    finally:
        metrics.RECONCILE_TOTAL.labels(trigger, result).inc()
        metrics.RECONCILE_DURATION.labels(trigger).observe(time.perf_counter() - started)


def _without_creations(decision: Decision) -> Decision:
    """The decision minus the Job it could not create (and the StageStarted Event that would report it)."""
    return dataclasses.replace(
        decision,
        create=(),
        identity=(),
        events=tuple(e for e in decision.events if e.reason != "StageStarted"),
    )


def _with_own_writes(state: State, body: dict[str, Any], key: tuple[str, str, str]) -> dict[str, Any]:
    cr = copy.deepcopy(body)
    owned = state.owned_status.get(key)
    if owned is not None:
        status = cr.setdefault("status", {}) or {}
        for f in OWNED_STATUS_FIELDS:
            if f in owned:
                status[f] = copy.deepcopy(owned[f])
            else:
                status.pop(f, None)
        cr["status"] = status
    return cr


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


def _create_rendezvous_service(state: State, namespace: str, job: dict[str, Any]) -> None:
    """A multi-node Job's headless Service, before the Job (409: it exists, e.g. from an earlier pass)."""
    service = rendezvous_service(job)
    if service is None:
        return
    try:
        state.clients.core.create_namespaced_service(namespace, service)
    except state.clients.ApiException as exc:
        if exc.status != 409:
            raise


def _apply(state: State, cr: dict[str, Any], decision: Decision, key: tuple[str, str, str]) -> None:
    """Perform a Decision's side effects, in an order that is safe to interrupt at any point."""
    c = state.clients
    namespace, name, _uid = key
    # 1. The accepted spec first, into status (which users cannot write): if we crash after creating a Job,
    #    the restarted operator knows which spec that Job was created from.
    status_patch = decision.status_patch
    if decision.accepted_spec is not None:
        if not _patch_status(state, key, {"status": {"acceptedSpec": decision.accepted_spec}}):
            return
        if status_patch is not None:
            rest = {k: v for k, v in status_patch["status"].items() if k != "acceptedSpec"}
            status_patch = {"status": rest} if rest else None
    # 2. The pods' identity before the Job that uses it (409: it exists already, e.g. from an earlier stage).
    for obj in decision.identity:
        create = {
            "ServiceAccount": c.core.create_namespaced_service_account,
            "Role": c.rbac.create_namespaced_role,
            "RoleBinding": c.rbac.create_namespaced_role_binding,
        }[obj["kind"]]
        try:
            create(namespace, obj)
        except c.ApiException as exc:
            if exc.status != 409:
                raise
    for manifest in decision.create:
        stage = manifest["metadata"]["labels"][k8s.LABEL_STAGE]
        _create_rendezvous_service(state, namespace, manifest)
        try:
            created = c.batch.create_namespaced_job(namespace, manifest)
        except c.ApiException as exc:
            if exc.status == 422:
                raise JobInvalid(stage, k8s.status_causes(_api_body(exc), stage)) from None
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429):
                raise JobRejected(stage, _api_message(exc)) from None
            if exc.status != 409:
                raise
            log.info(
                "Job %s already exists (created concurrently); adopting it", manifest["metadata"]["name"]
            )
            created_body = manifest
        except (ValueError, TypeError) as exc:  # the client's models refused the body (pydantic)
            raise JobInvalid(stage, k8s.build_error_fields(exc, stage)) from None
        else:
            created_body = c.api_client.sanitize_for_serialization(created)
            metrics.JOBS_CREATED.labels(stage).inc()
            if stage == decision.stages[0].name if decision.stages else False:
                created_at = parse_time((cr.get("metadata") or {}).get("creationTimestamp"))
                if created_at is not None:
                    metrics.START_LATENCY.observe(max(0.0, (datetime.now(UTC) - created_at).total_seconds()))
        state.created.setdefault(key, {})[stage] = created_body
        state.rejected.get(key, {}).pop(stage, None)
    for job in decision.suspend:
        c.batch.patch_namespaced_job(
            job,
            namespace,
            {
                "spec": {"suspend": True},
                "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_OPERATOR: "true"}},
            },
            _content_type="application/merge-patch+json",
        )
    for job in decision.release:  # back to Kueue: only our mark goes, spec.suspend stays as it is
        c.batch.patch_namespaced_job(
            job,
            namespace,
            {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_OPERATOR: None}}},
            _content_type="application/merge-patch+json",
        )
    for job in decision.resume:
        c.batch.patch_namespaced_job(
            job,
            namespace,
            {
                "spec": {"suspend": False},
                "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY_OPERATOR: None}},
            },
            _content_type="application/merge-patch+json",
        )
    # 3. Events before the status that records the transition: if we die in between, the next pass derives
    #    the same transition again and re-posts under the same (deterministic) name: never lost, never twice.
    for event in decision.events:
        _post_event(state, cr, event)
    if status_patch is not None:
        if not _patch_status(state, key, status_patch):
            return
    elif key not in state.owned_status:
        state.owned_status[key] = {
            f: copy.deepcopy(v) for f, v in (cr.get("status") or {}).items() if f in OWNED_STATUS_FIELDS
        }
    for stage, result_, seconds in decision.finished_stages:
        metrics.STAGE_DURATION.labels(stage, result_).observe(seconds)
    merged_status = {**(cr.get("status") or {}), **decision.status}
    metrics.JOBS.update(namespace, name, merged_status)
    if decision.delete:
        log.info("deleting DistillationJob %s/%s: ttlSecondsAfterFinished has passed", namespace, name)
        try:
            c.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, propagation_policy="Background"
            )
        except c.ApiException as exc:
            if exc.status != 404:
                raise
        state.deleted.add(key)
        metrics.JOBS.forget(namespace, name)


def _patch_status(state: State, key: tuple[str, str, str], patch: dict[str, Any]) -> bool:
    """Merge-patch the status subresource and remember what we wrote; False when the object is gone."""
    c = state.clients
    namespace, name, _uid = key
    try:
        result = c.custom.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            name,
            patch,
            _content_type="application/merge-patch+json",
        )
    except c.ApiException as exc:
        if exc.status == 404:
            state.deleted.add(key)
            return False
        raise
    written = (result or {}).get("status") or {}
    state.owned_status[key] = {f: copy.deepcopy(written[f]) for f in OWNED_STATUS_FIELDS if f in written}
    return True


def _post_event(state: State, cr: Mapping[str, Any], event: Event) -> None:
    """A core/v1 Event on the DistillationJob, named after the job's uid and the transition (reconcile.event_name).
    A 409 means it was posted before (by us before a restart); any other failure is raised, so the status
    that records the transition is not written either and the whole pass is retried with backoff."""
    meta = cr.get("metadata") or {}
    type_, reason, message = event.type, event.reason, event.message
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
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("POD_NAME", COMPONENT),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    (log.warning if type_ == "Warning" else log.info)(
        "%s/%s: %s: %s", meta.get("namespace"), meta.get("name"), reason, message
    )
    try:
        state.clients.core.create_namespaced_event(meta.get("namespace"), body)
    except state.clients.ApiException as exc:
        if exc.status != 409:
            raise


async def _resync_forever(state: State) -> None:
    """A periodic level-triggered pass over every DistillationJob (TTL expiry, missed watch events), and the
    retries, with exponential backoff, of reconciliations that failed (API errors, refused Jobs).

    This is deliberately not a kopf timer or daemon: kopf puts a finalizer on every object that has one, and
    a finalizer would keep a DistillationJob from being deleted while the operator is down (a stuck object).
    """
    loop = asyncio.get_running_loop()
    assert state.wakeup is not None
    next_full = time.monotonic() + CONFIG.resync_seconds
    while True:
        state.wakeup.clear()
        now = time.monotonic()
        full = now >= next_full
        if full:
            next_full = now + CONFIG.resync_seconds
        due = {(ns, n) for (ns, n, _uid), (_c, at, _w) in list(state.failures.items()) if at <= now}
        for key in list(state.failures):
            if (key[0], key[1]) in due and not list((state.djs_index or {}).get((key[0], key[1]), ())):
                state.failures.pop(key, None)  # gone meanwhile
        for key in list(state.djs_index or ()):
            if not (full or key in due):
                continue
            items = list(state.djs_index.get(key, ()))
            if items:
                await loop.run_in_executor(
                    None, reconcile_one, state, items[-1], "resync" if full else "retry"
                )
        wake_at = min([next_full] + [at for (_c, at, _w) in list(state.failures.values())])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.wakeup.wait(), max(0.0, wake_at - time.monotonic()))


def operator_settings(namespaces: list[str]) -> kopf.OperatorSettings:
    """kopf settings for a watch scope. Exact namespace names need no namespace scanning, hence no
    cluster-wide list/watch permission on namespaces (only globs like `ml-*` do)."""
    settings = kopf.OperatorSettings()
    if namespaces and not any(ch in ns for ns in namespaces for ch in "*?[!"):
        settings.scanning.disabled = True
    return settings


def run(
    *,
    namespaces: list[str],
    all_namespaces: bool,
    standalone: bool | None,
    peering_name: str | None,
    liveness_endpoint: str | None,
    config: OperatorConfig,
) -> None:
    """Run the operator until SIGTERM (nnunet-distill-operator)."""
    configure(config)
    kopf.run(
        registry=REGISTRY,
        settings=operator_settings(namespaces),
        clusterwide=all_namespaces,
        namespaces=namespaces,
        standalone=standalone,
        peering_name=peering_name,
        liveness_endpoint=liveness_endpoint,
    )


__all__ = ["CONFIG", "REGISTRY", "OperatorConfig", "configure", "reconcile_one", "run"]
