"""Fixtures: the kmock API server (emulator subclass), a kubeconfig for it, clients, the running operator."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nnunet_distill_operator import controller, k8s

from tests.operator.harness import Clients, OperatorRunner, declare_resources, write_kubeconfig

MINIMAL_SPEC: dict[str, Any] = {
    "dataset": {"id": 27},
    "storage": {"claimName": "nnunet-data"},
}


def dj(name: str = "liver", spec: dict[str, Any] | None = None, namespace: str = "default",
       **spec_changes: Any) -> dict[str, Any]:
    body_spec = copy.deepcopy(spec if spec is not None else MINIMAL_SPEC)
    body_spec.update(spec_changes)
    return {"apiVersion": "distillation.nnunet.io/v1alpha1", "kind": "DistillationJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": body_spec}


@pytest.fixture()
def kubeconfig(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    declare_resources(kmock)
    path = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


@pytest.fixture()
def clients(kubeconfig: Path) -> Iterator[Clients]:
    c = Clients(kubeconfig)
    yield c
    c.close()


@pytest.fixture()
def operator_config(kubeconfig: Path) -> controller.OperatorConfig:
    return controller.OperatorConfig(
        defaults=k8s.Defaults(image="registry.example/nnunet-distill-trainer:test"),
        metrics_port=0, metrics_addr="127.0.0.1", resync_seconds=3600, kubeconfig=str(kubeconfig))


@pytest.fixture()
async def operator(operator_config: controller.OperatorConfig) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner(operator_config)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()
