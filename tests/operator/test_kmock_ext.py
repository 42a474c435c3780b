"""The emulator's keyed lookup of one object (kmock_ext.ApiServerLikeEmulator): the same answers as kmock's
scan, for what the operator and the tests address by name: one name in two namespaces, cluster-scoped
objects, names that do not exist, and deletion. And its short request log (`request_log_limit`): concurrent
requests and a long-lived watch are each still served by the right reaction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch

from tests.operator.harness import declare_resources, wait_for, write_kubeconfig


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


async def test_a_one_request_log_serves_concurrent_requests_and_a_watch(
    kmock: Any, core: client.CoreV1Api
) -> None:
    """With `request_log_limit` 1, kmock matches each request against the newest request and itself only (not
    against the watch and the requests still in flight, as before): every request still gets its own answer,
    the watch opened first still streams every creation, and the log stays at its limit."""
    kmock.request_log_limit = 1
    seen: list[str] = []
    stream = watch.Watch()

    stopping = False

    def watch_a() -> None:
        try:
            for event in stream.stream(core.list_namespaced_config_map, "a", timeout_seconds=30):
                seen.append(event["object"].metadata.name)
        except urllib3.exceptions.ProtocolError:
            if not stopping:  # the test server closing the stream at teardown is not a failure
                raise

    watcher = asyncio.create_task(asyncio.to_thread(watch_a))
    try:
        for probe in range(100):  # the watch is open once it streams a creation made after it
            await asyncio.to_thread(
                core.create_namespaced_config_map, "a", {"metadata": {"name": f"p-{probe}"}}
            )
            if await asyncio.to_thread(lambda: any(name.startswith("p-") for name in seen)):
                break
            await asyncio.sleep(0.1)
        assert any(name.startswith("p-") for name in seen), "the watch never streamed a creation"
        names = [f"cm-{i}" for i in range(40)]

        def create_and_read(name: str) -> str:
            core.create_namespaced_config_map("a", {"metadata": {"name": name}, "data": {"me": name}})
            return str(core.read_namespaced_config_map(name, "a").data["me"])

        answers = await asyncio.gather(*(asyncio.to_thread(create_and_read, n) for n in names))
        assert answers == names
        await wait_for(lambda: set(names) <= set(seen), timeout=10, what="every creation on the watch")
        assert len(list(kmock)) <= 1
    finally:
        stopping = True
        stream.stop()
        await asyncio.to_thread(core.create_namespaced_config_map, "a", {"metadata": {"name": "last"}})
        await asyncio.wait_for(watcher, 30)
