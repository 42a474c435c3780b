"""Run the real operator in-process against the kmock emulator (shared by tests, e2e tests and the bench).

kopf runs with `spawn_tasks` + `run_tasks` (not `kopf.operator()`, which cancels the caller's tasks when
it stops), cluster-wide and standalone (kmock serves neither /api/v1/namespaces nor kopf's peering CRD).
Sync kubernetes-client calls from the test must go through `asyncio.to_thread`, or they would block the
event loop that also serves kmock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf
import yaml
from nnunet_distill_operator import api, controller, crd, k8s

DJ_RESOURCE = f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"


def declare_resources(emulator: Any) -> None:
    """Builtin resources (incl. v1/namespaces, without which kopf waits forever) and the CRD's resource."""
    emulator.resources.load_bundled()
    emulator.resources[DJ_RESOURCE] = {
        "kind": api.KIND,
        "singular": api.SINGULAR,
        "namespaced": True,
        "verbs": {"get", "list", "watch", "create", "patch", "delete"},
        "subresources": {"status"},
        "shortnames": set(api.SHORT_NAMES),
        "categories": set(api.CATEGORIES),
    }
    version = crd.build_crd()["spec"]["versions"][0]
    emulator.printer_columns[emulator.resource(DJ_RESOURCE)] = version["additionalPrinterColumns"]


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": server}}],
                "users": [{"name": "kmock", "user": {"token": "kmock-test-token"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"},
                    }
                ],
            }
        )
    )
    return path


class Clients:
    """Test-side kubernetes clients on a private configuration (the API the user and kubelet would use)."""

    def __init__(self, kubeconfig: Path):
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.api_client = client.ApiClient(cfg)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    async def create_dj(self, body: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        return await asyncio.to_thread(
            self.custom.create_namespaced_custom_object, api.GROUP, api.VERSION, namespace, api.PLURAL, body
        )

    async def patch_dj(self, name: str, patch: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        return await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object,
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            name,
            patch,
            _content_type="application/merge-patch+json",
        )

    async def delete_dj(self, name: str, namespace: str = "default") -> None:
        await asyncio.to_thread(
            self.custom.delete_namespaced_custom_object, api.GROUP, api.VERSION, namespace, api.PLURAL, name
        )

    async def patch_job_status(self, name: str, status: dict[str, Any], namespace: str = "default") -> None:
        await asyncio.to_thread(
            self.batch.patch_namespaced_job_status,
            name,
            namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    async def create_pod(self, body: dict[str, Any], namespace: str = "default") -> None:
        await asyncio.to_thread(self.core.create_namespaced_pod, namespace, body)

    async def patch_pod_status(self, name: str, status: dict[str, Any], namespace: str = "default") -> None:
        await asyncio.to_thread(
            self.core.patch_namespaced_pod_status,
            name,
            namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    def close(self) -> None:
        self.api_client.close()


def fast_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    settings = settings if settings is not None else kopf.OperatorSettings()
    settings.watching.reconnect_backoff = 0.1
    settings.watching.server_timeout = 60
    return settings


class OperatorRunner:
    """The operator's kopf tasks in this event loop: start, stop gracefully, or kill mid-flight."""

    def __init__(self, config: controller.OperatorConfig, namespaces: list[str] | None = None):
        self.config = config
        self.namespaces = namespaces or []
        self.memo = kopf.Memo()
        self.liveness_endpoint: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._ignored: set[asyncio.Task[Any]] = set()

    async def start(self, timeout: float = 15) -> OperatorRunner:
        controller.configure(dataclasses.replace(self.config, watch_namespaces=tuple(self.namespaces)))
        self.memo = kopf.Memo()
        self._stop, ready = asyncio.Event(), asyncio.Event()
        self._ignored = set(asyncio.all_tasks())
        settings = fast_settings(controller.operator_settings(self.namespaces))
        scope: dict[str, Any] = {"namespaces": self.namespaces} if self.namespaces else {"clusterwide": True}
        tasks = await kopf.spawn_tasks(
            registry=controller.REGISTRY,
            standalone=True,
            settings=settings,
            **scope,
            stop_flag=self._stop,
            ready_flag=ready,
            memo=self.memo,
            liveness_endpoint=self.liveness_endpoint,
        )
        self._task = asyncio.create_task(kopf.run_tasks(tasks, ignored=self._ignored))
        self._ignored.add(self._task)
        await asyncio.wait_for(ready.wait(), timeout)
        return self

    @property
    def metrics_port(self) -> int:
        return self.memo.metrics_port

    @property
    def state(self) -> controller.State:
        return self.memo.state

    def _protect_the_api_server(self) -> None:
        """kopf cancels every task created after it started ("hung tasks"), which in one event loop
        includes the API server's connection handlers; a real operator process could not do that."""
        self._ignored.add(asyncio.current_task())  # type: ignore[arg-type]
        for task in asyncio.all_tasks():
            coro = task.get_coro()
            code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
            filename = code.co_filename if code is not None else ""
            if "aiohttp/web_protocol" in filename or "/kmock/" in filename:
                self._ignored.add(task)

    async def stop(self, timeout: float = 15) -> None:
        """Graceful stop (SIGTERM): cleanup handlers run."""
        if self._task is None:
            return
        self._protect_the_api_server()
        assert self._stop is not None
        self._stop.set()
        await asyncio.wait_for(self._task, timeout)
        self._task = None

    async def kill(self) -> None:
        """Abrupt stop (SIGKILL-like): every task is cancelled, no cleanup handler runs; memory is lost."""
        if self._task is None:
            return
        self._protect_the_api_server()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 15)
        self._task = None
        server = getattr(self.memo, "metrics_server", None)
        if server is not None:  # the port would outlive a real killed process otherwise
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        state = getattr(self.memo, "state", None)
        if state is not None:
            state.clients.close()


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def job_key(emulator: Any, name: str, namespace: str = "default") -> tuple[Any, str, str]:
    return (emulator.resource("batch/v1/jobs"), namespace, name)


def dj_key(emulator: Any, name: str, namespace: str = "default") -> tuple[Any, str, str]:
    return (emulator.resource(DJ_RESOURCE), namespace, name)


def exists(emulator: Any, key: tuple[Any, str, str]) -> bool:
    return key in emulator.objects and not emulator.objects[key].deleted


def get(emulator: Any, key: tuple[Any, str, str]) -> dict[str, Any]:
    return emulator.objects[key].raw if exists(emulator, key) else {}


def stage_job_name(cr_name: str, stage: str) -> str:
    return k8s.job_name(cr_name, stage)


def pod_for(job: dict[str, Any], index: int = 0, suffix: str = "abcde") -> dict[str, Any]:
    """The pod the Job controller would create from a Job's template (tests play the Job controller)."""
    template = job["spec"]["template"]
    meta = template["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job['metadata']['name']}-{index}-{suffix}",
            "namespace": job["metadata"]["namespace"],
            "labels": {**meta.get("labels", {}), "job-name": job["metadata"]["name"]},
            "annotations": dict(meta.get("annotations", {})),
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job["metadata"]["name"],
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def terminated_status(
    exit_code: int, message: Any = None, *, reason: str | None = None, phase: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The status the kubelet leaves on a pod whose `main` container ended: what tests patch into the API
    server (and feed to the pure reconcile). `message` is the termination message: a dict or list is written
    as JSON, as the trainer writes it, a string as given. `phase` defaults to Succeeded for exit code 0,
    else Failed; `extra` adds other status fields (e.g. conditions)."""
    terminated: dict[str, Any] = {"exitCode": exit_code}
    if reason is not None:
        terminated["reason"] = reason
    if message is not None:
        terminated["message"] = message if isinstance(message, str) else json.dumps(message)
    return {
        "phase": phase or ("Succeeded" if exit_code == 0 else "Failed"),
        **extra,
        "containerStatuses": [
            {
                "name": "main",
                "ready": False,
                "restartCount": 0,
                "image": "x",
                "imageID": "",
                "state": {"terminated": terminated},
            }
        ],
    }


def ended_pod(name: str, exit_code: int, message: Any = None, **status: Any) -> dict[str, Any]:
    """A pod of a finished stage as the reconcile reads it: its name and :func:`terminated_status`."""
    return {"metadata": {"name": name}, "status": terminated_status(exit_code, message, **status)}
