"""A kmock KubernetesEmulator that behaves more like a real kube-apiserver (test infrastructure).

kmock stores objects and streams watch events but leaves out what an API server adds on top; the
operator depends on several of those behaviours, so they are emulated here (and only here):

- `201 Created` for creations (clients decode only the documented status codes);
- server-set metadata: uid, resourceVersion, creationTimestamp, generation, generateName;
- `metadata.generation` increments when `spec` changes through the main endpoint;
- the status subresource: `/status` writes change only `status`, main-endpoint writes never change it,
  and `status` is dropped on create;
- a `metadata.uid` in a patch body is a precondition (409 when it does not match);
- discovery that kubectl accepts (`/api/v1` groupVersion, no short names on subresources) and lists with
  `kind`/`apiVersion`;
- server-side printing: `Accept: ...;as=Table` answers with a meta.k8s.io Table built from the CRD's
  additionalPrinterColumns (what `kubectl get` shows);
- background garbage collection: deleting an owner deletes the objects whose ownerReferences name it;
- admission: an optional callable can reject requests (quota, PodSecurity, webhooks) before anything is
  stored.

It relies on kmock's private hooks (`_handle`, `_serve_*`), so kmock is pinned in pyproject.toml.
"""

from __future__ import annotations

import collections
import copy
import datetime
import itertools
import secrets
import uuid
from typing import Any, ClassVar

import attrs
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal.apps import RawHandler
from kmock._internal.k8s import KubernetesObjectConflictError
from kmock._internal.rendering import Response

_rv = itertools.count(1000)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _age(created: str | None) -> str:
    """kubectl-style short age (as the API server renders date columns in Tables)."""
    if not created:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(created)
    except ValueError:
        return "<invalid>"
    s = max(0, int((_now() - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 48:
        return f"{h}h{m % 60}m" if h < 8 else f"{h}h"
    return f"{h // 24}d"


def _jsonpath(obj: Any, path: str) -> Any:
    """Simple dotted JSONPath as used by printer columns (`.status.progress.epoch`)."""
    cur = obj
    for part in path.strip().lstrip(".").split("."):
        if not part:
            continue
        if isinstance(cur, dict):
            cur = cur.get(part)
        else:
            return None
    return cur


class _MatchOnRecentLog(RawHandler):
    """With `request_log_limit` set, the log kmock matches a request against is cut to the newest requests and
    this one, right before kmock's matching (`RawHandler._handle`, the next class in the MRO).

    kmock decides which reaction serves a request by asking each reaction's view whether it contains the
    request, and a view finds out by applying its criteria to every logged request until it meets this one
    (O(reactions x log) per request). The log used to keep every request still being served, so that one
    cut by a concurrent request before its own matching could still be found; but the long-lived watch
    streams and every request a burst has in flight stayed in it too, and their criteria checks were a third
    of the emulator's CPU in `bench operator`. kmock's matching runs without awaiting, from here until the
    reaction that serves the request is called, so no concurrent request can cut this one out in between."""

    __slots__ = ()

    async def _handle(self, request: Any) -> Any:
        limit = getattr(self, "request_log_limit", None)
        if limit is not None:
            others = [r for r in self._requests[-limit:] if r is not request]
            kept = others[len(others) - (limit - 1) :] if limit > 1 else []
            self._requests[:] = [*kept, request]
        return await super()._handle(request)


@attrs.define(kw_only=True)
class ApiServerLikeEmulator(kmock.KubernetesEmulator, _MatchOnRecentLog):
    # resource -> additionalPrinterColumns (from a CRD), used for Table responses.
    printer_columns: dict[Any, list[dict[str, Any]]] = attrs.field(factory=dict)
    # kmock matches every request against its whole request history (O(history) per request); long runs
    # (benchmarks, many objects) keep only the newest requests. None keeps all (for assertions on the log).
    request_log_limit: int | None = attrs.field(default=None)
    # Every create request (also those answered 409), by (plural, namespace, name): duplicates show here.
    creations: collections.Counter[tuple[str, str | None, str]] = attrs.field(factory=collections.Counter)
    # Admission control (webhooks, ResourceQuota, PodSecurity): a callable that may reject a request by
    # returning a KubernetesError; nothing is stored then, as in a real API server.
    admission: Any = attrs.field(default=None)
    # Every API call the operator made (its client's and kopf's user agents), as RBAC grants
    # (group, resource[/subresource], verb): tests/operator compares them with the Helm chart's rules.
    operator_calls: set[tuple[str, str, str]] = attrs.field(factory=set)

    def _has_status_subresource(self, resource: Any) -> bool:
        if resource not in self.resources:  # (indexing would auto-create an empty entry)
            return False
        return "status" in (self.resources[resource].subresources or set())

    def _by_key(self, request: Any) -> Any | None:
        """The stored object (deleted or not) at the request's exact (resource, namespace, name)."""
        key = (request.resource, request.namespace, request.name)
        try:
            return self._objects[key]  # kmock's ObjectsArray: a key lookup, no `get`
        except KeyError:
            return None

    def _stored(self, request: Any) -> dict[str, Any] | None:
        obj = self._by_key(request)
        return obj.raw if obj is not None and not obj.deleted else None

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        """kmock finds the objects a request addresses by scanning every stored object (O(objects) per
        request: at 1000 DistillationJobs the emulator, not the operator, set the pace of `bench operator`).
        An API server finds one object by its key; so does this, for a request that names one object
        (fetch, create, update, delete), with kmock's matching rules: in strict mode the namespace must be
        equal (None for cluster-scoped objects); otherwise a request without a namespace spans all of them,
        which stays a scan. Overrides kmock's private, name-mangled `__get_objs` (kmock is pinned)."""
        if request.resource is not None and request.name is not None and (strict or request.namespace):
            obj = self._by_key(request)
            return [obj] if obj is not None else []
        return super()._KubernetesEmulator__get_objs(request, strict)  # type: ignore[misc]

    async def _handle(self, request: Any) -> Any:
        self._record_operator_call(request)
        if self.admission is not None and request.resource is not None:
            rejection = self.admission(request)
            if rejection is not None:
                return await self._render_error(rejection)
        dependents_of: str | None = None
        if request.resource is not None and isinstance(request.data, (dict, list)):
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                self._on_create(request)
            elif request.action == kmock.action.UPDATE:
                self._on_update(request)
        if request.resource is not None and request.action == kmock.action.DELETE and request.name:
            stored = self._stored(request)
            if stored is not None:
                dependents_of = stored.get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if dependents_of:
            await self._collect_garbage(dependents_of)
        return response

    _VERBS: ClassVar[dict[str, str]] = {
        "list": "list",
        "watch": "watch",
        "fetch": "get",
        "create": "create",
        "update": "patch",
        "delete": "delete",
    }

    def _record_operator_call(self, request: Any) -> None:
        agent = next((v for k, v in (request.headers or {}).items() if k.lower() == "user-agent"), "")
        if not agent.startswith(("nnunet-distill-operator", "kopf")):
            return
        if request.resource is None or request.resource.plural is None or request.action is None:
            return  # discovery (/apis/<group>/<version>) is open to every authenticated client
        action = str(getattr(request.action, "value", request.action)).lower()
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        self.operator_calls.add((request.resource.group or "", resource, self._VERBS[action]))

    def _on_create(self, request: Any) -> None:
        """Server-set metadata (name from generateName, uid, creationTimestamp, resourceVersion, generation);
        a status subresource's status is not written by a create."""
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        self.creations[
            (request.resource.plural, request.namespace or meta.get("namespace"), meta["name"])
        ] += 1
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["resourceVersion"] = str(next(_rv))
        meta["generation"] = 1
        if self._has_status_subresource(request.resource):
            request.data.pop("status", None)

    def _on_update(self, request: Any) -> None:
        """A new resourceVersion; the uid precondition; status and the main resource written apart; a new
        generation when spec changes."""
        rv = str(next(_rv))
        if not isinstance(request.data, dict):  # JSON patch
            if self._has_status_subresource(request.resource):
                want_status = request.subresource == "status"
                request.data[:] = [
                    op for op in request.data if str(op.get("path", "")).startswith("/status") == want_status
                ]
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            return
        stored = self._stored(request)
        meta = request.data.get("metadata") or {}
        if stored is not None and meta.get("uid") and meta["uid"] != stored["metadata"].get("uid"):
            raise KubernetesObjectConflictError(
                message="Precondition failed: UID in precondition does not match the object"
            )
        if self._has_status_subresource(request.resource):
            if request.subresource == "status":
                for k in [k for k in request.data if k != "status"]:
                    if k != "metadata":
                        del request.data[k]
                request.data.pop("metadata", None)
            else:
                request.data.pop("status", None)
        if stored is not None and "spec" in request.data and request.subresource is None:
            merged = kmock_dicts.patch_dict(copy.deepcopy(stored), {"spec": request.data["spec"]})
            if merged.get("spec") != stored.get("spec"):
                gen = int(stored["metadata"].get("generation") or 1) + 1
                request.data.setdefault("metadata", {})["generation"] = gen
        request.data.setdefault("metadata", {})["resourceVersion"] = rv

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete (recursively) every object owned by `owner_uid`, emitting DELETED watch events."""
        async with self._lock:
            victims = []
            for (resource, namespace, name), obj in list(self._objects.items()):
                if obj.deleted:
                    continue
                refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs):
                    victims.append((resource, namespace, name))
            uids = []
            for key in victims:
                obj = self._objects[key]
                raw = obj.raw
                uids.append((raw.get("metadata") or {}).get("uid"))
                obj.delete()
                await self._buses[key[0]].put({"type": "DELETED", "object": raw})
        for uid in uids:
            if uid:
                await self._collect_garbage(uid)

    async def _serve_version(self, request: Any) -> Any:
        data = await super()._serve_version(request)
        data["groupVersion"] = data["groupVersion"].lstrip("/")  # "/v1" -> "v1" for kubectl
        for res in data.get("resources", []):
            if "/" in res["name"]:
                res["shortNames"] = []  # real servers list short names on the main resource only
                res["categories"] = []
        return data

    def _table_columns(self, resource: Any) -> list[dict[str, Any]]:
        cols = self.printer_columns.get(resource)
        if cols is None:
            cols = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        return cols

    def _table(self, request: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
        cols = self._table_columns(request.resource)
        definitions = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name must be unique within a namespace.",
            }
        ]
        definitions += [
            {
                "name": c["name"],
                "type": "string" if c.get("type") == "date" else c.get("type", "string"),
                "format": c.get("format", ""),
                "priority": c.get("priority", 0),
                "description": c.get("description", ""),
            }
            for c in cols
        ]
        rows = []
        for obj in items:
            cells: list[Any] = [obj.get("metadata", {}).get("name")]
            for c in cols:
                value = _jsonpath(obj, c["jsonPath"])
                cells.append(_age(value) if c.get("type") == "date" else value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj.get("metadata", {}),
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(next(_rv))},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    @staticmethod
    def _wants_table(request: Any) -> bool:
        accept = next((v for k, v in (request.headers or {}).items() if k.lower() == "accept"), "")
        return "as=Table" in accept

    async def _serve_list(self, request: Any) -> Any:
        data = await super()._serve_list(request)
        if self._wants_table(request):
            return self._table(request, data["items"])
        res = request.resource
        kind = (self.resources[res].kind or "" if res in self.resources else "") + "List"
        return {"apiVersion": f"{res.group}/{res.version}".lstrip("/"), "kind": kind, **data}

    async def _serve_create(self, request: Any) -> Any:
        return Response(status=201, payload=await super()._serve_create(request))  # 201 Created, as real

    async def _serve_fetch(self, request: Any) -> Any:
        data = await super()._serve_fetch(request)
        if self._wants_table(request):
            return self._table(request, [data])
        return data
