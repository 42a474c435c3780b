"""Operator at scale: the `nnunet-distill-operator` process as shipped against the kmock API server.

Both run as separate processes, as in a cluster (sharing a GIL would measure the emulator, not the
operator): the operator is started with its console entry point's `operator_main` (default flags: resync
every 60 s, INFO logs, metrics and liveness servers on), the emulator (`ApiServerLikeEmulator`) in a
child process that records, server side, when each Job is stored. The latency of one DistillationJob is
measured from just before its create request is sent until the API server stores its first Job.

Scenarios (each on a fresh API server and a fresh operator):
- sequential: SEQUENTIAL DistillationJobs, one at a time (the latency floor of one reconciliation);
- burst 200: 200 DistillationJobs created at once (16 client threads), as a GitOps sync would;
- burst 1000: 1000 at once; then the operator's RSS; then the operator is stopped, every first-stage Job
  is marked Complete while it is down, and a new operator process is started: catch-up is the time from
  its start until every DistillationJob has its next stage's Job.

Printed: p50/p95/max per scenario (>= 200 samples each, pooled over `--repeat N` runs) with the goal
beside it, each figure's run-to-run spread (min/median/max over runs), the burst/sequential p95 ratio, the
CPU share (CPU seconds / wall seconds) of the operator and of the emulator during each scenario, so a reader
can tell the operator's cost from the emulator's, and the machine's load (`uptime`) before and after. While
waiting, the client asks the server only for the Jobs still missing (a poll that copied every record every
10 ms cost the server more than the operator's own requests, and grew with the number of jobs). Every
DistillationJob must get exactly one Job (no duplicates), or the benchmark fails.

`--profile DIR` runs the operator under yappi (CPU clock, all threads) and writes its top functions there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.machine import describe as describe_machine

ROOT = Path(__file__).resolve().parents[1]
SEQUENTIAL = 200
CLIENT_THREADS = 16
GOALS = {"p95_200": 1.0, "p95_1000": 5.0, "rss_1000_mib": 150.0, "catch_up_1000": 5.0}
SPEC = {"dataset": {"id": 27}, "storage": {"claimName": "nnunet-data"}, "preprocess": {"mode": "Never"}}
FIRST, NEXT = "distill", "export"  # the stages plan() makes from SPEC, in order
COMPLETE = {
    "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-03-01T11:30:00Z"}],
    "succeeded": 1,
    "startTime": "2026-03-01T11:00:00Z",
    "completionTime": "2026-03-01T11:30:00Z",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServerProcess:
    """The emulator in its own process, like a real API server: it does not share the operator's GIL."""

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

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def job_times(self, names: list[str]) -> dict[str, float]:
        """Job name -> when the server stored it, for those of `names` stored so far (one small answer:
        the poll must not cost the server more than the operator's own requests do)."""
        self._conn.send(("jobs", names))
        return self._conn.recv()

    def with_status(self) -> int:
        """DistillationJobs whose status has a phase."""
        self._conn.send(("status", None))
        return self._conn.recv()

    def requests(self) -> dict[tuple[str, str, str], int]:
        """(who, verb, resource) -> requests served since the last call (the counter starts again)."""
        self._conn.send(("requests", None))
        return self._conn.recv()

    def duplicate_posts(self) -> int:
        """Job create requests beyond the first per Job (409s included): 0 unless a Job was made twice."""
        self._conn.send(("duplicates", None))
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send(("stop", None))
            self._conn.poll(10)
        finally:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()


def _serve(conn: Any) -> None:
    """Child process: serve the emulator until told to stop."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
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
                command, arg = await loop.run_in_executor(None, conn.recv)
                if command == "jobs":
                    stored = emulator.job_created_at
                    conn.send({n: stored[n] for n in arg if n in stored})
                elif command == "status":
                    conn.send(with_status())
                elif command == "requests":
                    conn.send(dict(emulator.requests))
                    emulator.requests.clear()
                elif command == "duplicates":
                    jobs = [n for (plural, _, _), n in emulator.creations.items() if plural == "jobs"]
                    conn.send(sum(jobs) - len(jobs))
                else:
                    conn.send("stopping")
                    return

    asyncio.run(main())


def _make_emulator() -> Any:
    from tests.operator.kmock_ext import ApiServerLikeEmulator

    class TimedEmulator(ApiServerLikeEmulator):  # type: ignore[misc]
        """Records when each Job is stored (server side, so client scheduling does not skew it)."""

        job_created_at: dict[str, float]
        requests: collections.Counter[tuple[str, str, str]]

        async def _handle(self, request: Any) -> Any:
            self.requests[_request_kind(request)] += 1
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
    emulator.requests = collections.Counter()
    return emulator


def _request_kind(request: Any) -> tuple[str, str, str]:
    """(who, verb, resource[/subresource]) of one request: who is the operator (its client or kopf) or the
    bench's own client (playing the users, the Job controller)."""
    agent = next((v for k, v in (request.headers or {}).items() if k.lower() == "user-agent"), "")
    who = "operator" if agent.startswith(("nnunet-distill-operator", "kopf")) else "bench"
    resource = request.resource
    if resource is None or resource.plural is None:
        return who, str(request.method).upper().rsplit(".", 1)[-1], "(discovery)"
    action = str(getattr(request.action, "value", request.action)).lower()
    return who, action, resource.plural + (f"/{request.subresource}" if request.subresource else "")


_PROFILED = """
import sys, yappi
from nnunet_distill_operator.cli import operator_main
yappi.set_clock_type("cpu")
yappi.start(builtins=False)
try:
    operator_main(sys.argv[2:])
finally:
    yappi.stop()
    stats = yappi.get_func_stats()
    stats.save(sys.argv[1] + ".pstat", type="pstat")
    with open(sys.argv[1] + ".txt", "w") as out:
        stats.sort("ttot").print_all(out=out, columns={0: ("name", 90), 1: ("ncall", 10), 3: ("ttot", 8)})
"""


class OperatorProcess:
    """`nnunet-distill-operator --all-namespaces` with its default settings, in its own process."""

    def __init__(self, kubeconfig: Path, log: Path, profile: Path | None = None) -> None:
        self.kubeconfig, self.log, self.profile = kubeconfig, log, profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Self:
        flags = [
            "--all-namespaces",
            "--standalone",  # kmock has no kopf peering CRD
            f"--kubeconfig={self.kubeconfig}",
            f"--metrics-port={_free_port()}",
            f"--liveness-port={_free_port()}",
            "--trainer-image=bench/trainer:1",
        ]
        if self.profile is not None:
            argv = [sys.executable, "-c", _PROFILED, str(self.profile), *flags]
        else:
            code = "import sys; from nnunet_distill_operator.cli import operator_main; operator_main()"
            argv = [sys.executable, "-c", code, *flags]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.started_at = time.time()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class Usage:
    """CPU seconds per wall second of the operator and the emulator over one scenario."""

    pids: dict[str, int]
    wall0: float = field(default_factory=time.monotonic)
    cpu0: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cpu0 = {k: _cpu_seconds(p) for k, p in self.pids.items()}

    def shares(self) -> dict[str, float]:
        """CPU seconds per wall second of each process, and (key `<name>_s`) its CPU seconds."""
        wall = time.monotonic() - self.wall0
        used = {k: _cpu_seconds(p) - self.cpu0[k] for k, p in self.pids.items()}
        return {**{k: v / wall for k, v in used.items()}, **{f"{k}_s": v for k, v in used.items()}}


class Bench:
    """One API server, one operator process, and a client that plays the user and the Job controller."""

    def __init__(self, server: ApiServerProcess, workdir: Path, profile: Path | None) -> None:
        from tests.operator.harness import Clients, write_kubeconfig

        self.server = server
        self.kubeconfig = write_kubeconfig(workdir / "kubeconfig", server.url)
        self.log = workdir / "operator.log"
        self.profile = profile
        self.clients = Clients(self.kubeconfig)
        self.pool = ThreadPoolExecutor(CLIENT_THREADS)
        self.operator = OperatorProcess(self.kubeconfig, self.log, profile)

    def close(self) -> None:
        self.operator.stop()
        self.pool.shutdown(wait=True)
        self.clients.close()

    def create(self, namespace: str, name: str) -> float:
        from nnunet_distill_operator import api

        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": SPEC,
        }
        t0 = time.time()
        self.clients.custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body
        )
        return t0

    def wait_jobs(self, names: list[str], stage: str, timeout: float) -> dict[str, float]:
        """DistillationJob name -> when its `stage` Job was stored. Polls for the missing ones only."""
        from nnunet_distill_operator import k8s

        deadline = time.monotonic() + timeout
        wanted = {k8s.job_name(n, stage): n for n in names}
        stored: dict[str, float] = {}
        while True:
            missing = [j for j in wanted if j not in stored]
            stored.update(self.server.job_times(missing))
            if len(stored) == len(wanted):
                return {wanted[j]: at for j, at in stored.items()}
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(wanted) - len(stored)} DistillationJobs got no {stage} Job within {timeout}s"
                )
            time.sleep(0.01)

    def wait_status(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.server.with_status() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} DistillationJobs got a status within {timeout}s")
            time.sleep(0.25)

    def burst(self, namespace: str, n: int) -> list[float]:
        """n DistillationJobs created at once; their CR -> Job latencies (seconds)."""

        names = [f"b-{i:04d}" for i in range(n)]
        starts = list(self.pool.map(lambda name: self.create(namespace, name), names))
        created = self.wait_jobs(names, FIRST, 600)
        return [created[name] - t0 for name, t0 in zip(names, starts, strict=True)]

    def sequential(self, n: int) -> list[float]:

        out = []
        for i in range(n):
            name = f"s-{i:04d}"
            t0 = self.create("seq", name)
            out.append(self.wait_jobs([name], FIRST, 30)[name] - t0)
        return out

    def complete_first_stage(self, namespace: str, n: int) -> None:
        """Play the Job controller: every first-stage Job succeeded."""
        from nnunet_distill_operator import k8s

        def complete(i: int) -> None:
            self.clients.batch.patch_namespaced_job_status(
                k8s.job_name(f"b-{i:04d}", FIRST),
                namespace,
                {"status": COMPLETE},
                _content_type="application/merge-patch+json",
            )

        list(self.pool.map(complete, range(n)))


def _usage(bench: Bench) -> Usage:
    """The operator, the emulator, and this process (the client playing the users and the Job controller)."""
    return Usage({"operator": bench.operator.pid, "emulator": bench.server.pid, "client": os.getpid()})


def _requests_until_quiet(bench: Bench, quiet: float = 1.0) -> dict[tuple[str, str, str], int]:
    """The requests served since the counter was last read, once the operator has sent none for `quiet`
    seconds (its Events and status patches follow each Job; the next resync is 60 s away)."""
    total: collections.Counter[tuple[str, str, str]] = collections.Counter()
    while True:
        time.sleep(quiet)
        new = bench.server.requests()
        total.update(new)
        if not any(who == "operator" and verb not in ("watch", "list") for (who, verb, _r) in new):
            return dict(total)


def _scenario_small(bench: Bench, out: dict[str, Any]) -> None:
    bench.operator.start()
    bench.create("warmup", "w")
    bench.wait_jobs(["w"], FIRST, 120)
    usage = _usage(bench)
    out["sequential"] = bench.sequential(SEQUENTIAL)
    out["sequential_cpu"] = usage.shares()
    bench.server.requests()  # start counting
    usage = _usage(bench)
    out["burst_200"] = bench.burst("b200", 200)
    out["burst_200_cpu"] = usage.shares()
    bench.wait_status(1 + SEQUENTIAL + 200, 300)
    out["burst_200_requests"] = _requests_until_quiet(bench)


def _scenario_large(bench: Bench, out: dict[str, Any], n: int) -> None:
    bench.operator.start()
    bench.create("warmup", "w")
    bench.wait_jobs(["w"], FIRST, 120)
    bench.server.requests()
    usage = _usage(bench)
    out[f"burst_{n}"] = bench.burst(f"b{n}", n)
    out[f"burst_{n}_cpu"] = usage.shares()
    bench.wait_status(1 + n, 600)
    out[f"burst_{n}_requests"] = _requests_until_quiet(bench)
    out[f"rss_{n}_mib"] = _rss_mib(bench.operator.pid)
    bench.operator.stop()
    bench.complete_first_stage(f"b{n}", n)
    bench.server.requests()
    bench.operator.start()
    usage = _usage(bench)
    bench.wait_jobs([f"b-{i:04d}" for i in range(n)], NEXT, 600)
    out[f"catch_up_{n}"] = time.time() - bench.operator.started_at
    out[f"catch_up_{n}_cpu"] = usage.shares()
    out[f"catch_up_{n}_requests"] = _requests_until_quiet(bench)


def _run(scenario: str, workdir: Path, profile: Path | None, n: int, keep: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with ApiServerProcess() as server:
        bench = Bench(server, workdir, profile)
        try:
            if scenario == "small":
                _scenario_small(bench, out)
            else:
                _scenario_large(bench, out, n)
            bench.operator.stop()
            out["duplicate_posts"] = server.duplicate_posts()
        finally:
            bench.close()
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(bench.log, keep / f"operator-{scenario}.log")
    return out


def _spread(values: list[float]) -> str:
    """min / median / max over runs, and the range as a share of the median (the run-to-run noise)."""
    if len(values) < 2:
        return f"{values[0]:.1f} (1 run: no spread; --repeat N)" if values else "-"
    mid = statistics.median(values)
    rel = (max(values) - min(values)) / mid * 100 if mid else float("nan")
    return (
        f"runs min/median/max {min(values):.1f} / {mid:.1f} / {max(values):.1f} (range {rel:.0f}% of median)"
    )


def _row(label: str, runs: list[list[float]], goal: float | None) -> list[str]:
    """Pooled p50/p95/max over every run's samples, then the spread of each run's p95."""
    ms = [v * 1000 for run in runs for v in run]
    target = f"< {goal * 1000:.0f}" if goal else "-"
    p95 = percentile(ms, 95)
    verdict = "" if goal is None else ("ok" if p95 < goal * 1000 else "MISSED")
    return [
        f"{label:<24}{len(ms):>6}{statistics.median(ms):>10.1f}{p95:>10.1f}{max(ms):>10.1f}"
        f"{target:>12}  {verdict}",
        f"{'':<24}p95 per run: {_spread([percentile([v * 1000 for v in run], 95) for run in runs])}",
    ]


def _requests_table(key: str, counts: dict[tuple[str, str, str], int], jobs: int) -> list[str]:
    """Requests per DistillationJob by who sent them, verb and resource (the last run's)."""
    per_job = sum(c for (who, _v, _r), c in counts.items() if who == "operator") / jobs
    lines = [f"requests during {key} (last run), per DistillationJob; operator total {per_job:.2f}/job:"]
    for (who, verb, resource), count in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
        lines.append(f"  {who:<9}{verb:<8}{resource:<32}{count:>7}{count / jobs:>8.2f}/job")
    return lines


def _cpu(shares: list[dict[str, float]], jobs: int) -> str:
    """Means over runs: each process's CPU share and its CPU per DistillationJob."""

    def share(name: str) -> str:
        per_job = statistics.mean(s[f"{name}_s"] for s in shares) / jobs * 1000
        return f"{name} {statistics.mean(s[name] for s in shares):.2f} CPU ({per_job:.1f} ms/job)"

    return ", ".join(share(name) for name in ("operator", "emulator", "client"))


def report(runs: list[dict[str, Any]], n: int, load: tuple[str, str]) -> list[str]:
    """The table: pooled latencies with their run-to-run spread, CPU shares, RSS and catch-up."""
    lines = [
        "CR -> first Job latency: nnunet-distill-operator process (resync 60 s, INFO logs) vs kmock",
        f"machine: {describe_machine()}; runs: {len(runs)}; load before: {load[0]}",
        f"emulator: {_emulator_settings()}",
        f"{'scenario':<24}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'goal p95':>12}",
    ]

    def each(key: str) -> list[Any]:
        return [r[key] for r in runs if key in r]

    rows = (
        ("sequential", "sequential (1 at once)", None),
        ("burst_200", "burst (200 at once)", GOALS["p95_200"]),
        (f"burst_{n}", f"burst ({n} at once)", GOALS["p95_1000"]),
    )
    for key, label, goal in rows:
        if each(key) and not (key == "burst_200" and goal == GOALS["p95_1000"]):  # --jobs 200: shown once
            lines += _row(label, each(key), goal)
    pairs = [(r["burst_200"], r["sequential"]) for r in runs if "sequential" in r]
    if pairs:
        ratios = [percentile(b, 95) / percentile(q, 95) for b, q in pairs]
        lines.append(f"burst 200 / sequential p95 ratio: {_spread(ratios)}")
    for key, count in dict.fromkeys((("burst_200", 200), (f"burst_{n}", n), (f"catch_up_{n}", n))):
        if each(f"{key}_requests"):
            lines += _requests_table(key, each(f"{key}_requests")[-1], count)
    lines.append("CPU share during each scenario (CPU seconds per wall second; 2 cores = 2.00):")
    jobs = {"sequential": SEQUENTIAL, "burst_200": 200, f"burst_{n}": n, f"catch_up_{n}": n}
    for key, count in jobs.items():
        if each(f"{key}_cpu"):
            lines.append(f"  {key:<16} {_cpu(each(f'{key}_cpu'), count)}")
    if each(f"rss_{n}_mib"):
        rss = [r for r, _peak in each(f"rss_{n}_mib")]
        peak = max(p for _r, p in each(f"rss_{n}_mib"))
        ok = "ok" if statistics.median(rss) < GOALS["rss_1000_mib"] else "MISSED"
        lines.append(
            f"operator RSS with {n} jobs: median {statistics.median(rss):.0f} MiB (peak {peak:.0f}); "
            f"goal < 150 MiB  {ok}; {_spread(rss)}"
        )
    if each(f"catch_up_{n}"):
        t = statistics.median(each(f"catch_up_{n}"))
        ok = "ok" if t < GOALS["catch_up_1000"] else "MISSED"
        lines.append(
            f"catch-up after a restart with {n} jobs (process start -> every next-stage Job): median "
            f"{t:.2f} s; goal < 5 s  {ok}; {_spread(each(f'catch_up_{n}'))}"
        )
    lines.append(f"duplicate Job creations: {sum(r['duplicate_posts'] for r in runs)}")
    lines.append(f"load after: {load[1]}")
    return lines


def _emulator_settings() -> str:
    """What the emulator ran with (its settings are part of every figure)."""
    from importlib.metadata import version

    return (
        f"kmock {version('kmock')} (ApiServerLikeEmulator), aiohttp {version('aiohttp')}, one process and "
        "thread, asyncio's default event loop (kmock offers no other), aiohttp access log off (WARNING), "
        "request log kept to 1 entry (a request is matched against it and itself, not against the watches "
        "and requests in flight); a request that names one object finds it by key (kmock itself scans "
        "every stored object, which made the emulator the bottleneck), lists and watches still scan"
    )


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=("small", "large", "all"), default="all")
    p.add_argument("--jobs", type=int, default=1000, help="DistillationJobs in the large scenario")
    p.add_argument("--repeat", type=int, default=1, help="runs of each scenario (for the run-to-run spread)")
    p.add_argument("--profile", type=Path, help="directory for yappi profiles of the operator")
    p.add_argument("--keep-logs", type=Path, help="directory to copy the operator's logs to")
    args = p.parse_args(argv if argv is not None else [])  # `python -m bench` calls main() without flags
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests.operator.* (the emulator and the harness)
    load_before = _uptime()
    scenarios = ["small", "large"] if args.scenario == "all" else [args.scenario]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        for i in range(args.repeat):
            result: dict[str, Any] = {"duplicate_posts": 0}
            for scenario in scenarios:
                workdir = Path(tmp) / f"{scenario}-{i}"
                workdir.mkdir()
                profile = None
                if args.profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profile = args.profile / f"{scenario}-{i}"
                out = _run(scenario, workdir, profile, args.jobs, args.keep_logs)
                result["duplicate_posts"] += out.pop("duplicate_posts")
                result.update(out)
            runs.append(result)
    print("\n".join(report(runs, args.jobs, (load_before, _uptime()))))
    duplicates = sum(r["duplicate_posts"] for r in runs)
    if duplicates:
        raise RuntimeError(f"{duplicates} duplicate Job creations")
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
