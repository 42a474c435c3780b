"""The operator process's memory: its API clients and what it knows beyond the watch streams.

The watched objects are in `djs` and the stage stores (stage_store.py); besides them this keeps what the
watch streams cannot tell: the status fields the operator itself last wrote, the Jobs it created whose
ADDED event has not arrived yet, refusals and transient failures with their backoff. It lives in kopf's
memo, so a restarted operator starts empty and rebuilds everything from the cluster. Also here: what is
kept of a Job (`kept_job`) and what kopf keeps of each object (`WatchOnlyDiffBase`: nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from nnunet_distill_operator import __version__
from nnunet_distill_operator.stage_store import StageStore

COMPONENT = "nnunet-distill-operator"
# How often the client may re-check its token. The kubernetes client calls its refresh hook before every
# request, and the kubeconfig loader's hook re-sets the host each time, which re-reads the proxy environment:
# a large share of the operator's CPU under a burst. Both loaders refresh well ahead of expiry (the in-cluster
# one every minute, the kubeconfig one 5 minutes before `expiry`), so checking every 10 s loses nothing.
TOKEN_CHECK_SECONDS = 10.0
USER_AGENT = f"{COMPONENT}/{__version__}"
Key = tuple[str, str, str]  # (namespace, name, uid) of a DistillationJob


class Clients:
    """The kubernetes client on a private configuration (never the process-wide default)."""

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
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook = _at_most_every(TOKEN_CHECK_SECONDS, cfg.refresh_api_key_hook)
        self.api_client = client.ApiClient(cfg)
        self.api_client.user_agent = USER_AGENT  # audit logs (and the RBAC test) tell our calls apart
        # Every call goes through `request`: none of the client's typed API classes (CoreV1Api, ...) is
        # imported, and with them the models they load, 26 MiB of the operator's memory and 0.5 s of CPU
        # at every start.
        self.ApiException = client.exceptions.ApiException

    def request(
        self,
        method: str,
        path: str,
        body: Any,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One API call with a plain JSON body and a plain JSON answer; non-2xx raises ApiException.

        For bodies the operator builds itself (status patches, Events, the trainer identity, the stage
        Jobs): the typed methods would validate them into the client's models and serialize them back,
        which cost more CPU than the request itself (`effects` says what checks a Job instead). The body is
        not handed to the client either: it would walk the whole tree first (`sanitize_for_serialization`,
        for its models and datetimes, which a JSON tree has none of), 18 % of a request's CPU in a profile
        of the burst. The client still builds the URL and the authentication headers, and its own connection
        pool (TLS, proxy) sends the request.
        """
        from kubernetes.client.rest import RESTResponse

        method, url, headers, _body, _post = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"],
        )
        payload = json.dumps(body).encode() if body is not None else None
        pool = self.api_client.rest_client.pool_manager
        response = RESTResponse(
            pool.request(method, url, body=payload, headers=headers, preload_content=False)
        )
        data = response.read()
        if not 200 <= response.status <= 299:
            raise self.ApiException.from_response(http_resp=response, body=None, data=None)
        return json.loads(data) if data else {}

    def close(self) -> None:
        self.api_client.close()


class WatchOnlyDiffBase(kopf.DiffBaseStorage):
    """No essence, no last-handled state: this operator has no change-detecting handlers (on.create/update/
    field), only `on.event`, so kopf never diffs. kopf still builds each event's essence (a deep
    copy of the whole body, Jobs with their pod templates) and diffs it; under a burst that was a quarter of
    the operator's CPU for a result nothing reads. Storing nothing also keeps kopf's last-handled annotation
    off the objects, as before."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def kept_job(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator keeps of a stage Job: everything `reconcile.decide` reads (metadata, status, and the
    spec's scalars such as suspend and completions) without the pod template, most of a Job's size. The Jobs
    of a thousand DistillationJobs would otherwise keep tens of MiB of templates no decision reads. Of the
    template only the pods' ServiceAccount stays: a Job that runs under the trainer identity proves that the
    identity was created (before it), so the next stage's Job needs no identity requests."""
    spec = body.get("spec") or {}
    kept_spec = {k: v for k, v in spec.items() if k != "template"}
    account = ((spec.get("template") or {}).get("spec") or {}).get("serviceAccountName")
    if account is not None:
        kept_spec["template"] = {"spec": {"serviceAccountName": account}}
    return {"metadata": body.get("metadata") or {}, "spec": kept_spec, "status": body.get("status") or {}}


def _at_most_every(seconds: float, hook: Any) -> Any:
    """`hook(configuration)`, skipped when it last ran less than `seconds` ago."""
    last = [-float("inf")]
    guard = threading.Lock()

    def throttled(configuration: Any) -> None:
        with guard:
            now = time.monotonic()
            if now - last[0] < seconds:
                return
            last[0] = now
            hook(configuration)
            # The kubeconfig loader's hook installs a new hook of its own on every call: keep this one.
            configuration.refresh_api_key_hook = throttled

    return throttled


@dataclass
class State:
    """Per-run memory of the operator (kept in kopf's memo: a restarted operator starts empty).

    The per-object locks are ours because the handlers of a DistillationJob, of its Jobs and of its pods are
    kopf handlers of three different resources, which kopf serialises per object, not per owner: two of them
    could otherwise reconcile the same DistillationJob at once.
    """

    clients: Clients
    retry_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    locks_guard: threading.Lock = field(default_factory=threading.Lock)
    owned_status: dict[Key, dict[str, Any]] = field(default_factory=dict)
    created: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    rejected: dict[Key, dict[str, str]] = field(default_factory=dict)
    # stage -> (generation, why its Job cannot be built): not retried until the spec changes.
    invalid: dict[Key, dict[str, tuple[int | None, str]]] = field(default_factory=dict)
    # Transient failures (API errors, refusals that may clear): (consecutive count, when to retry, why).
    failures: dict[Key, tuple[int, float, str]] = field(default_factory=dict)
    failed_generation: dict[Key, int | None] = field(default_factory=dict)
    # The digest of the inputs of the last pass that had nothing to do (controller._fingerprint).
    settled: dict[Key, bytes] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    wakeup: asyncio.Event | None = None
    deleted: set[Key] = field(default_factory=set)
    # The newest body of each DistillationJob, by (namespace, name) (controller.py says why not an index).
    djs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # The stage Jobs and pods by owner (stage_store.py says why not kopf indexes).
    stage_jobs: StageStore = field(default_factory=lambda: StageStore(keep=kept_job))
    stage_pods: StageStore = field(default_factory=StageStore)

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self.locks_guard:
            return self.locks.setdefault((namespace, name), threading.Lock())

    def failed(self, key: Key, why: str, generation: int | None) -> float:
        """Record a transient failure; returns the backoff (exponential, capped) before the next attempt."""
        count = self.failures[key][0] + 1 if key in self.failures else 1
        delay = min(self.retry_seconds * 2 ** (count - 1), self.retry_max_seconds)
        self.failures[key] = (count, time.monotonic() + delay, why)
        self.failed_generation[key] = generation
        if self.loop is not None and self.wakeup is not None:  # let the resync loop plan the retry
            self.loop.call_soon_threadsafe(self.wakeup.set)
        return delay

    def succeeded(self, key: Key) -> None:
        self.failures.pop(key, None)
        self.failed_generation.pop(key, None)

    def backing_off(self, key: Key, generation: int | None) -> bool:
        """A transient failure's retry is not due yet, and the spec has not changed since (a changed spec may
        be the fix, so it is tried at once); the resync loop retries when the backoff has passed."""
        failure = self.failures.get(key)
        return (
            failure is not None
            and failure[1] > time.monotonic()
            and self.failed_generation.get(key) == generation
        )

    def forget(self, key: Key) -> None:
        """The DistillationJob is gone: drop everything remembered about it."""
        self.owned_status.pop(key, None)
        self.created.pop(key, None)
        self.rejected.pop(key, None)
        self.invalid.pop(key, None)
        self.succeeded(key)
        self.deleted.discard(key)
        self.settled.pop(key, None)
