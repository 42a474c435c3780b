"""The emulator's keyed lookup of one object (kmock_ext.ApiServerLikeEmulator): the same answers as kmock's
scan, for what the operator and the tests address by name: one name in two namespaces, cluster-scoped
objects, names that do not exist, and deletion."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.operator.harness import declare_resources, write_kubeconfig


@pytest.fixture()
def core(kmock: Any, tmp_path: Path) -> client.CoreV1Api:
    declare_resources(kmock)
    cfg = client.Configuration()
    path = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    return client.CoreV1Api(client.ApiClient(cfg))


def _status(call: Any) -> int:
    with pytest.raises(client.exceptions.ApiException) as info:
        call()
    return int(info.value.status)


async def test_one_name_in_two_namespaces_and_cluster_scoped(core: client.CoreV1Api) -> None:
    def scenario() -> None:
        for ns, label in (("a", "in-a"), ("b", "in-b")):
            core.create_namespaced_config_map(ns, {"metadata": {"name": "same"}, "data": {"where": label}})
        assert core.read_namespaced_config_map("same", "a").data == {"where": "in-a"}
        assert core.read_namespaced_config_map("same", "b").data == {"where": "in-b"}
        assert _status(lambda: core.read_namespaced_config_map("same", "c")) == 404
        assert _status(lambda: core.read_namespaced_config_map("other", "a")) == 404
        assert _status(lambda: core.create_namespaced_config_map("a", {"metadata": {"name": "same"}})) == 409

        core.patch_namespaced_config_map("same", "b", {"data": {"where": "patched"}})
        assert core.read_namespaced_config_map("same", "a").data == {"where": "in-a"}
        assert core.read_namespaced_config_map("same", "b").data == {"where": "patched"}

        core.delete_namespaced_config_map("same", "a")
        assert _status(lambda: core.read_namespaced_config_map("same", "a")) == 404
        assert core.read_namespaced_config_map("same", "b").data == {"where": "patched"}
        core.create_namespaced_config_map("a", {"metadata": {"name": "same"}, "data": {"where": "again"}})
        assert core.read_namespaced_config_map("same", "a").data == {"where": "again"}

        # Cluster-scoped: stored without a namespace, found by name alone.
        core.create_node({"metadata": {"name": "gpu-node-1"}})
        assert core.read_node("gpu-node-1").metadata.name == "gpu-node-1"
        assert _status(lambda: core.read_node("gpu-node-2")) == 404
        names = {i.metadata.namespace for i in core.list_config_map_for_all_namespaces().items}
        assert names == {"a", "b"}  # a list without a namespace still spans all of them

    await asyncio.to_thread(scenario)
