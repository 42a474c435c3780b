"""Operator throughput: 200 DistillationJobs created at once, CR -> first Job latency (p50/p95/max).

The real operator (kopf, in-process) runs against the kmock API server (with the test emulator
subclass), which runs in a separate process, as a real API server would (sharing the operator's GIL
would measure the emulator, not the operator; on a 2-core machine each gets one core). The
latency of one DistillationJob is measured from just before its create request is sent until the API
server stores the Job the operator created for it. Measured side by side in one run:

- sequential: 10 DistillationJobs, one at a time (the latency floor of one reconciliation);
- burst: 200 DistillationJobs created concurrently (16 client threads), as a GitOps sync would.

Printed: p50/p95/max per scenario, the burst/sequential p95 ratio, and the time until all 200 had a Job
and a status. Every DistillationJob must get exactly one Job (no duplicates), or the benchmark fails.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

SEQUENTIAL = 10
BURST = 200
CLIENT_THREADS = 16


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class _ApiServerProcess:
    """The emulator in its own process, like a real API server: it does not share the operator's GIL.

    The child records (wall clock) when each Job is stored; the parent asks for the records over a pipe.
    """

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), name="kmock-api-server", daemon=True)
        self.url = ""

    def __enter__(self) -> Self:
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the kmock API server process did not start")
        self.url = self._conn.recv()
        return self

    def records(self) -> tuple[dict[str, float], list[int], int]:
        """(Job name -> stored at, create requests per Job, DistillationJobs with a status phase)."""
        self._conn.send("records")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
            self._conn.poll(10)
        finally:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()


def _serve(conn: Any) -> None:
    """Child process: serve the emulator until told to stop."""
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import logging

    import kmock

    from tests.operator.harness import DJ_RESOURCE, declare_resources

    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    emulator = _make_emulator()
    declare_resources(emulator)

    def with_status() -> int:
        res = emulator.resource(DJ_RESOURCE)
        return sum(
            1
            for (r, _, _), obj in list(emulator.objects.items())
            if r == res and not obj.deleted and (obj.raw.get("status") or {}).get("phase")
        )

    async def main() -> None:
        async with emulator, kmock.Server(emulator, host="127.0.0.1"):
            conn.send(str(emulator.url).rstrip("/"))
            loop = asyncio.get_running_loop()
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "records":
                    jobs = [n for (plural, _, _), n in emulator.creations.items() if plural == "jobs"]
                    conn.send((dict(emulator.job_created_at), jobs, with_status()))
                else:
                    conn.send("stopping")
                    return

    asyncio.run(main())


def _make_emulator() -> Any:
    from tests.operator.kmock_ext import ApiServerLikeEmulator

    class TimedEmulator(ApiServerLikeEmulator):  # type: ignore[misc]
        """Records when each Job is stored (server side, so client scheduling does not skew it)."""

        job_created_at: dict[str, float]

        async def _handle(self, request: Any) -> Any:
            response = await super()._handle(request)
            if (
                request.resource is not None
                and request.resource.plural == "jobs"
                and str(request.method).upper().endswith("POST")
                and isinstance(request.data, dict)
            ):
                self.job_created_at.setdefault(request.data.get("metadata", {}).get("name", ""), time.time())
            return response

    emulator = TimedEmulator(request_log_limit=1)
    emulator.job_created_at = {}
    return emulator


def _body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "distillation.nnunet.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "dataset": {"id": 27},
            "storage": {"claimName": "nnunet-data"},
            "preprocess": {"mode": "Never"},
        },
    }


async def _run(workdir: Path) -> dict[str, Any]:
    from nnunet_distill_operator import api, controller, k8s

    from tests.operator.harness import Clients, OperatorRunner, write_kubeconfig

    with _ApiServerProcess() as server:
        kubeconfig = write_kubeconfig(workdir / "kubeconfig", server.url)
        config = controller.OperatorConfig(
            defaults=k8s.Defaults(image="bench/trainer:1"),
            metrics_port=None,
            resync_seconds=3600,
            kubeconfig=str(kubeconfig),
        )
        runner = await OperatorRunner(config).start(timeout=60)
        clients = Clients(kubeconfig)
        pool = ThreadPoolExecutor(CLIENT_THREADS)
        loop = asyncio.get_running_loop()

        def create(name: str) -> float:
            t0 = time.time()
            clients.custom.create_namespaced_custom_object(
                api.GROUP, api.VERSION, "bench", api.PLURAL, _body(name)
            )
            return t0

        async def wait_jobs(names: list[str], timeout: float) -> dict[str, float]:
            deadline = time.monotonic() + timeout
            while True:
                created, _, _ = await loop.run_in_executor(None, server.records)
                missing = [n for n in names if k8s.job_name(n, "distill") not in created]
                if not missing:
                    return created
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(missing)} DistillationJobs got no Job within {timeout}s")
                await asyncio.sleep(0.01)

        try:
            sequential: dict[str, float] = {}
            for i in range(SEQUENTIAL):
                name = f"seq-{i}"
                sequential[name] = await loop.run_in_executor(pool, create, name)
                await wait_jobs([name], 30)

            burst_names = [f"burst-{i:03d}" for i in range(BURST)]
            t_burst = time.time()
            starts = await asyncio.gather(*(loop.run_in_executor(pool, create, n) for n in burst_names))
            burst = dict(zip(burst_names, starts, strict=True))
            created = await wait_jobs(burst_names, 300)
            t_jobs = max(created[k8s.job_name(n, "distill")] for n in burst_names) - t_burst
            deadline = time.monotonic() + 120
            while True:
                created, creations, with_status = await loop.run_in_executor(None, server.records)
                if with_status >= BURST + SEQUENTIAL or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            t_status = time.time() - t_burst
        finally:
            pool.shutdown(wait=True)
            clients.close()
            await runner.stop()
        return {
            "sequential": [created[k8s.job_name(n, "distill")] - t0 for n, t0 in sequential.items()],
            "burst": [created[k8s.job_name(n, "distill")] - t0 for n, t0 in burst.items()],
            "burst_jobs_s": t_jobs,
            "burst_status_s": t_status,
            "reconciled": with_status - SEQUENTIAL,
            "duplicate_posts": sum(creations) - len(creations),
        }


def _row(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{label:<22}{len(ms):>5}{statistics.median(ms):>10.1f}{_percentile(ms, 95):>10.1f}{max(ms):>10.1f}"
    )


def main() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # tests.operator.* (the emulator and the operator harness)
    import logging

    logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("nnunet_distill_operator").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        result = asyncio.run(_run(Path(tmp)))
    seq, burst = result["sequential"], result["burst"]
    print("CR -> first Job latency: nnunet-distill operator (kopf, in-process) against the kmock API server")
    print(f"{'scenario':<22}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    print(_row("sequential (1 at once)", seq))
    print(_row(f"burst ({BURST} at once)", burst))
    ratio = _percentile(burst, 95) / _percentile(seq, 95)
    print(f"p95 burst / p95 sequential: {ratio:.1f}x")
    print(
        f"burst: all {BURST} Jobs created after {result['burst_jobs_s']:.2f} s "
        f"({BURST / result['burst_jobs_s']:.0f} DistillationJobs/s); {result['reconciled']}/{BURST} with status "
        f"after {result['burst_status_s']:.2f} s; duplicate Job creations: {result['duplicate_posts']}"
    )
    if result["reconciled"] != BURST or result["duplicate_posts"]:
        raise RuntimeError(
            f"not every DistillationJob was reconciled exactly once: {result['reconciled']}/{BURST} "
            f"with status, {result['duplicate_posts']} duplicate Job creations"
        )
    result["p95_burst_ms"] = _percentile(burst, 95) * 1000
    result["p95_ratio"] = ratio
    return result


if __name__ == "__main__":
    main()
