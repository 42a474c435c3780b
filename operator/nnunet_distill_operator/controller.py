"""kopf handlers: watch DistillationJobs, their Jobs and pods; apply `reconcile.decide` to each change.

Design (see reconcile.py for the logic, effects.py for the side effects):
- Level-triggered. Every event of a DistillationJob, one of its Jobs or one of their pods runs the same
  reconciliation of the owning DistillationJob, plus a periodic resync (TTL, missed events).
- The operator's own stores hold the Jobs and pods by owner (`stage_store.py`), filled by one LIST each at
  startup, before kopf watches anything, so an operator that restarts mid-run sees the existing Jobs before
  it could create one: no duplicates. Job names are deterministic on top of that, so a race can only ever
  produce a 409, never a 2nd Job. They are not kopf indexes because of kopf's index-readiness wait: every
  object that arrives while indexes fill waits on one condition that is notified whenever an object is
  indexed, so the wake-ups grow with (waiting objects) x (indexed objects), seconds of CPU at a restart with
  a thousand DistillationJobs.
- The DistillationJobs are `State.djs`, filled by their own event handler (`on_distillationjob`). A Job's
  event whose owner has not been seen yet reconciles nothing: the owner's own event, which follows, does.
- One lock per DistillationJob serialises reconciliations (handlers run in kopf's thread pool).
- Single writer: only the operator writes the status fields it owns, so the result of its own last
  status patch is always the newest value of those fields; it is overlaid on (possibly stale) bodies
  from the watch stream. Likewise for Jobs it created whose ADDED event has not arrived yet.
- No finalizers: deletion cleans up through ownerReferences, and the operator being down never blocks a
  `kubectl delete`.

What is kopf's and what is ours:
- kopf: watching, the thread pool, login, liveness probe, settings (`startup`; its diff base stores
  and builds nothing, `WatchOnlyDiffBase`, as no handler here detects changes), startup/cleanup.
- Ours, because kopf's does not fit:
  - retries with backoff (`State.failed`): kopf retries (`kopf.TemporaryError`, backoff) only change
    handlers (on.create/update/resume), which persist their progress in annotations on every object;
    `on.event` handlers, the level-triggered kind this operator needs for Jobs and pods as much as for
    DistillationJobs, are never retried by kopf (their errors are ignored);
  - the resync loop: kopf timers and daemons put a finalizer on every object that has one, and a
    finalizer keeps a DistillationJob from being deleted while the operator is down;
  - Events (`effects.post_event`): deterministic names, posted before the status that records them;
  - the per-DistillationJob lock (`State.lock`): kopf serialises handlers per watched object, and the
    Job's and pod's handlers reconcile their owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from nnunet_distill_operator import api, k8s, metrics
from nnunet_distill_operator.effects import JobInvalid, JobRejected, apply_decision
from nnunet_distill_operator.operator_state import Clients, Key, State, WatchOnlyDiffBase
from nnunet_distill_operator.reconcile import OWNED_STATUS_FIELDS, Decision, decide
from nnunet_distill_operator.stage_store import (
    StageStore,
    has_patterns,
    list_stage_objects,
    listing_namespaces,
)

log = logging.getLogger("nnunet_distill_operator")
REGISTRY = kopf.OperatorRegistry()


@dataclass
class OperatorConfig:
    """Process-level settings (flags/env of nnunet-distill-operator); tests replace them."""

    defaults: k8s.Defaults = field(default_factory=k8s.Defaults)
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    resync_seconds: float = 60.0
    retry_seconds: float = 1.0  # first retry after a transient failure; doubles up to retry_max_seconds
    retry_max_seconds: float = 300.0
    # What kopf watches: namespaces or kopf's patterns; empty for every namespace (the startup LIST needs it).
    watch_namespaces: tuple[str, ...] = ()
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
    **_: Any,
) -> None:
    settings.posting.enabled = False  # Events are posted by us (effects.post_event: deterministic names)
    settings.persistence.diffbase_storage = WatchOnlyDiffBase()
    settings.execution.max_workers = max(settings.execution.max_workers or 0, 8)
    state = State(
        clients=Clients(CONFIG.kubeconfig, CONFIG.context),
        retry_seconds=CONFIG.retry_seconds,
        retry_max_seconds=CONFIG.retry_max_seconds,
    )
    state.loop, state.wakeup = asyncio.get_running_loop(), asyncio.Event()
    memo.state = state
    listed = await asyncio.to_thread(_fill_stage_stores, state, CONFIG.watch_namespaces)
    logger.info("listed %d stage Jobs and %d stage pods before watching", *listed)
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
    return len(state.djs) if state is not None else 0


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=REGISTRY)
def on_distillationjob(
    type: str | None, body: kopf.Body, namespace: str, name: str, uid: str, memo: kopf.Memo, **_: Any
) -> None:
    state: State = memo.state
    if type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
        _forget(state, namespace, name, uid)
        return
    # kopf serialises the handlers of one object: this event's body is the newest one its Jobs' handlers see.
    plain = state.djs[(namespace, name)] = _plain(body)
    reconcile_one(state, plain, trigger="distillationjob")


@kopf.on.event("batch", "v1", "jobs", labels={k8s.LABEL_JOB: kopf.PRESENT}, registry=REGISTRY)
def on_job(
    type: str | None,
    body: kopf.Body,
    namespace: str,
    annotations: Mapping[str, str],
    memo: kopf.Memo,
    **_: Any,
) -> None:
    _store(memo.state.stage_jobs, type, body)
    _reconcile_owner(memo.state, namespace, annotations.get(k8s.ANNOTATION_JOB_NAME), trigger="job")


@kopf.on.event("", "v1", "pods", labels={k8s.LABEL_JOB: kopf.PRESENT}, registry=REGISTRY)
def on_pod(
    type: str | None,
    body: kopf.Body,
    namespace: str,
    annotations: Mapping[str, str],
    memo: kopf.Memo,
    **_: Any,
) -> None:
    _store(memo.state.stage_pods, type, body)
    _reconcile_owner(memo.state, namespace, annotations.get(k8s.ANNOTATION_JOB_NAME), trigger="pod")


def _store(store: StageStore, type: str | None, body: kopf.Body) -> None:
    if type == "DELETED":
        store.drop(body)
    else:
        store.put(_plain(body))


def _fill_stage_stores(state: State, scope: tuple[str, ...]) -> tuple[int, int]:
    """The startup LIST (stage_store.py says why); the numbers of Jobs and pods listed."""
    namespaces = listing_namespaces(state.clients.request, scope)
    jobs = list_stage_objects(state.clients.request, namespaces, "batch/v1", "jobs")
    pods = list_stage_objects(state.clients.request, namespaces, "v1", "pods")
    for job in jobs:
        state.stage_jobs.put(job, provisional=True)
    for pod in pods:
        state.stage_pods.put(pod, provisional=True)
    return len(jobs), len(pods)


# ------------------------------------------------------------------------------------ reconciliation


def _plain(body: Any) -> dict[str, Any]:
    """A watched body as a plain dict, sharing the event's own nested dicts: kopf decodes every watch event
    into new dicts and never changes them, and nothing here changes a body either (`decide` never mutates its
    input). A deep copy of each event was 7 % of the operator's CPU in a profile of the burst."""
    return dict(body)


def _forget(state: State, namespace: str, name: str, uid: str) -> None:
    """Drop the DistillationJob under its lock: a reconcile in flight (a Job's event, the resync loop) ends
    first, and a later one finds it gone (`_is_current`), so neither brings back its metrics series."""
    with state.lock(namespace, name):
        known = state.djs.get((namespace, name))
        if known is not None and (known.get("metadata") or {}).get("uid", "") in ("", uid):
            del state.djs[(namespace, name)]
        state.forget((namespace, name, uid))
        metrics.JOBS.forget(namespace, name)


def _is_current(state: State, key: Key) -> bool:
    """The body being reconciled is the DistillationJob the operator knows now: not deleted (by us or
    anyone), and not an older object of the same name (the resync loop may hold a body from before)."""
    known = state.djs.get((key[0], key[1]))
    return (
        key not in state.deleted
        and known is not None
        and (known.get("metadata") or {}).get("uid", "") == key[2]
    )


def _reconcile_owner(state: State, namespace: str, owner: str | None, trigger: str) -> None:
    body = state.djs.get((namespace, owner)) if owner else None
    if body is None:
        return  # the owner is gone (the garbage collector deletes its Jobs), or its first event is to come
    reconcile_one(state, body, trigger=trigger)


def reconcile_one(state: State, body: dict[str, Any], trigger: str) -> Decision | None:
    """Reconcile one DistillationJob now (thread-safe; called from handlers and the resync loop)."""
    meta = body.get("metadata") or {}
    key: Key = (meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid", ""))
    started = time.perf_counter()
    result = "ok"
    try:
        with state.lock(key[0], key[1]):
            if not _is_current(state, key):
                result = "gone"
                return None
            if trigger != "retry" and state.backing_off(key, meta.get("generation")):
                result = "backoff"
                return None
            result, decision = _reconcile_locked(state, body, key, trigger)
            return decision
    except Exception as exc:  # API errors, timeouts: retried with backoff, never dropped
        result = "error"
        state.settled.pop(key, None)  # the next event decides again
        metrics.RECONCILE_ERRORS.labels(trigger).inc()
        delay = state.failed(key, f"{type(exc).__name__}: {exc}", meta.get("generation"))
        log.exception("reconciling DistillationJob %s/%s failed; retrying in %.1fs", key[0], key[1], delay)
        return None
    finally:
        metrics.RECONCILE_TOTAL.labels(trigger, result).inc()
        metrics.RECONCILE_DURATION.labels(trigger).observe(time.perf_counter() - started)


def _observed_jobs(state: State, key: Key) -> dict[str, dict[str, Any]]:
    """The stage Jobs in the store, plus those we created whose ADDED event has not arrived yet."""
    namespace, name, _uid = key
    jobs = {stage: bodies[-1] for stage, bodies in state.stage_jobs.by_stage(namespace, name).items()}
    pending = state.created.get(key, {})
    for stage in list(pending):
        if stage in jobs:
            del pending[stage]  # the watch stream has caught up
        else:
            jobs[stage] = pending[stage]
    return jobs


def _reconcile_locked(
    state: State, body: dict[str, Any], key: Key, trigger: str
) -> tuple[str, Decision | None]:
    """Decide and apply (holding the DistillationJob's lock); (metrics result, decision)."""
    cr = _with_own_writes(state, body, key)
    jobs = _observed_jobs(state, key)
    pods = state.stage_pods.by_stage(key[0], key[1])
    now = datetime.now(UTC)
    generation = (body.get("metadata") or {}).get("generation")
    invalid = {stage: why for stage, (gen, why) in state.invalid.get(key, {}).items() if gen == generation}
    inputs = _fingerprint(cr, jobs, pods, invalid, state.rejected.get(key))
    if trigger in EVENT_TRIGGERS and state.settled.get(key) == inputs:
        return "ok", None  # the same inputs as a pass that had nothing to do: the echo of our own writes

    def decide_now() -> Decision:
        return decide(cr, jobs, pods, now, CONFIG.defaults, rejected=state.rejected.get(key), invalid=invalid)

    decision = decide_now()
    try:
        apply_decision(state, cr, decision, key)
    except JobInvalid as exc:
        # The Job cannot be built from this spec (the kubernetes client's schema or the API server's
        # validation refused it): Stalled with the spec field named, no retry until the spec changes.
        state.invalid.setdefault(key, {})[exc.stage] = (generation, exc.message)
        invalid[exc.stage] = exc.message
        decision = decide_now()
        apply_decision(state, cr, _without_creations(decision), key)
        state.succeeded(key)
        return "invalid", decision
    except JobRejected as exc:
        # Quota, admission webhooks, PodSecurity: say so in status and retry with backoff (the Job
        # name is deterministic, so a retry can never make a second Job).
        state.rejected.setdefault(key, {})[exc.stage] = exc.message
        decision = decide_now()
        apply_decision(state, cr, _without_creations(decision), key)
        delay = state.failed(key, exc.message, generation)
        log.info("Job for stage %s of %s/%s refused; retrying in %.1fs", exc.stage, key[0], key[1], delay)
        return "rejected", decision
    state.succeeded(key)
    changed = (
        decision.create or decision.status_patch or decision.suspend or decision.resume or decision.release
    )
    if _nothing_to_do(decision):
        state.settled[key] = inputs
    else:
        state.settled.pop(key, None)
    return ("changed" if changed else "ok"), decision


# Triggers whose reconciliation is skipped when its inputs are those of a pass that had nothing to do. Under
# a burst most events are the echoes of the operator's own writes (its status patches, the Jobs it created):
# deciding them again only delays the DistillationJobs that wait for their first Job. The periodic resync
# and the retries always decide (a decision also depends on the time: ttlSecondsAfterFinished).
EVENT_TRIGGERS = frozenset({"distillationjob", "job", "pod"})


def _nothing_to_do(decision: Decision) -> bool:
    return not (
        decision.create
        or decision.identity
        or decision.suspend
        or decision.resume
        or decision.release
        or decision.status_patch
        or decision.accepted_spec
        or decision.events
        or decision.delete
    )


def _version(obj: Mapping[str, Any]) -> Any:
    meta = obj.get("metadata") or {}
    rv = meta.get("resourceVersion")
    return (meta.get("uid"), rv) if rv else obj  # a body without a version (an adopted 409) counts whole


def _fingerprint(
    cr: Mapping[str, Any],
    jobs: Mapping[str, Mapping[str, Any]],
    pods: Mapping[str, list[dict[str, Any]]],
    invalid: Mapping[str, str],
    rejected: Mapping[str, str] | None,
) -> bytes:
    """A digest of everything `decide` reads, except the time: the DistillationJob without its
    resourceVersion (its status is already overlaid with the operator's own writes), and the versions of its
    Jobs and pods. A digest, not the text: one is remembered per settled DistillationJob."""
    meta = {
        k: v for k, v in (cr.get("metadata") or {}).items() if k not in ("resourceVersion", "managedFields")
    }
    text = json.dumps(
        [
            meta,
            cr.get("spec"),
            cr.get("status"),
            {stage: _version(job) for stage, job in jobs.items()},
            {stage: [_version(p) for p in stage_pods] for stage, stage_pods in pods.items()},
            invalid,
            rejected,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _without_creations(decision: Decision) -> Decision:
    """The decision minus the Job it could not create (and the StageStarted Event that would report it)."""
    return dataclasses.replace(
        decision,
        create=(),
        identity=(),
        events=tuple(e for e in decision.events if e.reason != "StageStarted"),
    )


def _with_own_writes(state: State, body: dict[str, Any], key: Key) -> dict[str, Any]:
    """The body with the operator-owned status fields it last wrote. Shallow: `decide` never mutates its
    input, and neither the watched body nor `owned_status` is changed in place.

    Once the watch stream has caught up (the body holds exactly what was written), the remembered write is
    re-pointed at the body's own values: the same content, held once instead of twice per job."""
    cr = dict(body)
    owned = state.owned_status.get(key)
    if owned is not None:
        watched = cr.get("status") or {}
        caught_up = {f: v for f, v in watched.items() if f in OWNED_STATUS_FIELDS}
        if caught_up == owned:
            state.owned_status[key] = caught_up
            return cr
        status = {f: v for f, v in watched.items() if f not in OWNED_STATUS_FIELDS}
        status.update(owned)
        cr["status"] = status
    return cr


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
            state.stage_jobs.drop_unconfirmed()  # only the first pass finds any (stage_store.py)
            state.stage_pods.drop_unconfirmed()
        due = {(ns, n) for (ns, n, _uid), (_c, at, _w) in list(state.failures.items()) if at <= now}
        for key in list(state.failures):
            if (key[0], key[1]) in due and (key[0], key[1]) not in state.djs:
                state.failures.pop(key, None)  # gone meanwhile
        for key in list(state.djs):
            if not (full or key in due):
                continue
            body = state.djs.get(key)
            if body is not None:
                await loop.run_in_executor(None, reconcile_one, state, body, "resync" if full else "retry")
        wake_at = min([next_full] + [at for (_c, at, _w) in list(state.failures.values())])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.wakeup.wait(), max(0.0, wake_at - time.monotonic()))


def operator_settings(namespaces: list[str]) -> kopf.OperatorSettings:
    """kopf settings for a watch scope. Exact namespace names need no namespace scanning, hence no
    cluster-wide list/watch permission on namespaces (only globs like `ml-*` do)."""
    settings = kopf.OperatorSettings()
    if namespaces and not has_patterns(namespaces):
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
    configure(dataclasses.replace(config, watch_namespaces=() if all_namespaces else tuple(namespaces)))
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
