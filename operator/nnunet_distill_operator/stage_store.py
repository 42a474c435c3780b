"""The stage Jobs and pods of each DistillationJob, by owner: the operator's own store, not kopf indexes.

Why not kopf's indexes: kopf holds every worker back until all indexes are filled, and that wait wakes
every waiting worker each time one more object is indexed, which is quadratic in the objects at a restart
(the largest single cost of a catch-up with a thousand DistillationJobs in a profile; README, "Operator at
scale"). The store keeps the indexes' promise without the wait. `on.startup` fills it with one LIST per
resource and namespace, and kopf starts watching only after its startup handlers have succeeded, so no
DistillationJob is reconciled before the Jobs it already has are known (a restart creates no duplicate
Job). From then on `on.event` keeps it current.

An object deleted between the startup LIST and kopf's own listing would linger (no DELETED event comes for
it): what the LIST put is provisional until a watch event confirms it, and the first full resync drops
what is still unconfirmed by then.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nnunet_distill_operator import k8s

GLOB_CHARS = "*?[!"
PAGE_SIZE = 500


class StageStore:
    """Stage objects (Jobs or pods) by (namespace, owning DistillationJob); thread-safe."""

    def __init__(self, keep: Callable[[Mapping[str, Any]], dict[str, Any]] = dict) -> None:
        self._keep = keep  # what of a body is kept (a Job without its pod template: `kept_job`)
        self._lock = threading.Lock()
        self._by_owner: dict[tuple[str, str], dict[str, tuple[str, dict[str, Any]]]] = {}
        self._provisional: dict[str, tuple[str, str]] = {}  # uid -> owner, from the startup LIST

    def put(self, body: Mapping[str, Any], provisional: bool = False) -> None:
        """Add or replace an object; one without our owner annotation and stage label is not a stage's."""
        owner, uid, stage = _identity(body)
        if owner is None or stage is None:
            return
        kept = self._keep(body)
        with self._lock:
            self._by_owner.setdefault(owner, {})[uid] = (stage, kept)
            if provisional:
                self._provisional[uid] = owner
            else:
                self._provisional.pop(uid, None)

    def drop(self, body: Mapping[str, Any]) -> None:
        owner, uid, _stage = _identity(body)
        if owner is not None:
            with self._lock:
                self._remove(owner, uid)

    def drop_unconfirmed(self) -> int:
        """Drop what the startup LIST put and no watch event has confirmed since; how many."""
        with self._lock:
            gone = list(self._provisional.items())
            for uid, owner in gone:
                self._remove(owner, uid)
            return len(gone)

    def by_stage(self, namespace: str, owner: str) -> dict[str, list[dict[str, Any]]]:
        """The owner's objects by stage, oldest stored first."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self._lock:
            entries = list(self._by_owner.get((namespace, owner), {}).values())
        for stage, body in entries:
            out.setdefault(stage, []).append(body)
        return out

    def _remove(self, owner: tuple[str, str], uid: str) -> None:
        objects = self._by_owner.get(owner)
        if objects is not None:
            objects.pop(uid, None)
            if not objects:
                del self._by_owner[owner]
        self._provisional.pop(uid, None)


def _identity(body: Mapping[str, Any]) -> tuple[tuple[str, str] | None, str, str | None]:
    meta = body.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    name = annotations.get(k8s.ANNOTATION_JOB_NAME)
    if not name or k8s.LABEL_JOB not in labels:
        return None, meta.get("uid", ""), None
    return (meta.get("namespace", "default"), name), meta.get("uid", ""), labels.get(k8s.LABEL_STAGE)


def has_patterns(scope: Iterable[str]) -> bool:
    """A scope with globs, exclusions or lists needs the namespaces listed (and kopf scans them)."""
    return any(ch in pattern for pattern in scope for ch in GLOB_CHARS + ",")


def matching_namespaces(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The namespaces a kopf namespace scope selects: globs, comma-separated lists, `!` to exclude."""
    parts = [p.strip() for pattern in patterns for p in pattern.split(",") if p.strip()]
    include = [p for p in parts if not p.startswith("!")]
    exclude = [p[1:] for p in parts if p.startswith("!")]
    return [
        n
        for n in names
        if (not include or any(fnmatch.fnmatchcase(n, p) for p in include))
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]


def listing_namespaces(request: Callable[..., dict[str, Any]], scope: tuple[str, ...]) -> list[str | None]:
    """Where to LIST: every namespace at once (None) for a cluster-wide operator, else each namespace of the
    scope (globs resolved against the namespaces that exist now, as kopf's own scan does)."""
    if not scope:
        return [None]
    if not has_patterns(scope):
        return list(dict.fromkeys(scope))
    names = [item["metadata"]["name"] for item in _list_all(request, "/api/v1/namespaces", None)]
    return list(matching_namespaces(scope, names))


def list_stage_objects(
    request: Callable[..., dict[str, Any]], namespaces: list[str | None], group_version: str, plural: str
) -> list[dict[str, Any]]:
    """Every labelled stage object of one resource in the scope, page by page."""
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    selector = f"{k8s.LABEL_JOB},{k8s.LABEL_STAGE}"
    out: list[dict[str, Any]] = []
    for namespace in namespaces:
        path = f"{base}/{plural}" if namespace is None else f"{base}/namespaces/{namespace}/{plural}"
        out.extend(_list_all(request, path, selector))
    return out


def _list_all(
    request: Callable[..., dict[str, Any]], path: str, selector: str | None
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        query = {"limit": str(PAGE_SIZE)}
        if selector:
            query["labelSelector"] = selector
        if token:
            query["continue"] = token
        page = request("GET", path, None, query=query)
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items
