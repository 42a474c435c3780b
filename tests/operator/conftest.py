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


def dj(
    name: str = "liver", spec: dict[str, Any] | None = None, namespace: str = "default", **spec_changes: Any
) -> dict[str, Any]:
    body_spec = copy.deepcopy(spec if spec is not None else MINIMAL_SPEC)
    body_spec.update(spec_changes)
    return {
        "apiVersion": "distillation.nnunet.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body_spec,
    }


def chart_operator_grants(values: dict[str, Any] | None = None) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the Helm chart grants the operator's ServiceAccount (cluster-wide mode by
    default), rendered with the real chart through the Helm SDK."""
    from tests.ship.conftest import CHART, NAMESPACE, RELEASE, load_all_strict

    key = repr(sorted((values or {}).items()))
    if key not in _CHART_GRANTS:
        import helm_python

        chart = helm_python.Chart.load(str(CHART))
        try:
            files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
        finally:
            chart.close()
        docs = [
            d for path, text in files.items() if not path.endswith("NOTES.txt") for d in load_all_strict(text)
        ]
        operator_sa = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
            "serviceAccountName"
        ]
        roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
        grants: set[tuple[str, str, str]] = set()
        for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
            if any(s["name"] == operator_sa for s in binding.get("subjects") or ()):
                role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
                grants |= {
                    (g, r, v)
                    for rule in role["rules"]
                    for g in rule["apiGroups"]
                    for r in rule["resources"]
                    for v in rule["verbs"]
                }
        _CHART_GRANTS[key] = grants
    return _CHART_GRANTS[key]


_CHART_GRANTS: dict[str, set[tuple[str, str, str]]] = {}


@pytest.fixture(autouse=True)
def _operator_calls_are_granted_by_the_chart(request: pytest.FixtureRequest) -> Iterator[None]:
    """Issue 12 (8): every API call the operator makes in any test must be granted by the chart's RBAC."""
    if "kmock" not in request.fixturenames:
        yield
        return
    emulator = request.getfixturevalue("kmock")
    yield
    missing = emulator.operator_calls - chart_operator_grants()
    assert not missing, f"the operator made API calls the Helm chart does not grant: {sorted(missing)}"


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
        metrics_port=0,
        metrics_addr="127.0.0.1",
        resync_seconds=3600,
        kubeconfig=str(kubeconfig),
    )


@pytest.fixture()
async def operator(operator_config: controller.OperatorConfig) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner(operator_config)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()
