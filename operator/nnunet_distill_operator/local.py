"""Local executor: run a DistillationJob's planned Stages as processes on this machine.

The same `plan.plan()` output that becomes Kubernetes Jobs runs here, command for command, with the
env a pod would get (nnUNet_* folders, JOB_COMPLETION_INDEX for indexed stages, a termination-message
file). Output is streamed with a `[stage]` prefix and kept per stage in `<workdir>/logs/`; progress is
read from the `progress.json` the trainer writes, the same figures a pod reports; the status — built by
the same builder as the DistillationJob's `.status` (`status_model.build_status`) — is written to
`<workdir>/status.yaml` and `status.json` after every change, so a run can be watched
(`watch cat status.yaml`) and inspected afterwards.

The first failing command stops the run with one clear message: which stage, which command, its exit
code, and the tail of its log. A quality gate that fails (enforced) ends the run the way it ends a
DistillationJob: Failed with reason QualityGateFailed, nothing published, the student and its export kept;
status.yaml carries the QualityGate condition and the gate's figures in `metrics`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from nnunet_distill.contract import (
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_JOB_STAGE,
    ENV_JOB_UID,
    ENV_TERMINATION_PATH,
    replacing,
)

from nnunet_distill_operator.distributed import free_port, local_node_envs
from nnunet_distill_operator.local_progress import ProgressTracker
from nnunet_distill_operator.plan import DataPaths, Stage, export_paths
from nnunet_distill_operator.status import (
    GATE_FAILED,
    GATE_STAGE,
    Cond,
    GateVerdict,
    condition_type,
    format_duration,
    gate_condition,
    gate_failure_message,
    gate_verdict,
    kstatus_conditions,
    merge_conditions,
    parse_summary,
    results_from_summaries,
    rfc3339,
)
from nnunet_distill_operator.status_model import build_status

LOG_TAIL_LINES = 20


class LocalRunError(RuntimeError):
    """A stage failed; the message says which, how, and where its log is."""

    def __init__(self, message: str, status: Mapping[str, Any]):
        super().__init__(message)
        self.status = dict(status)


# ------------------------------------------------------------------------------------------- status


@dataclass
class LocalStatus:
    """The run's status, in the same shape as a DistillationJob's .status (written after every change)."""

    name: str
    stages: list[Stage]
    path_yaml: Path
    path_json: Path
    data: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gate: GateVerdict | None = None

    def __post_init__(self) -> None:
        self.data = {"phase": "Pending", "stages": {}, "conditions": [], "startTime": rfc3339(_now())}

    def stage(self, name: str, state: str, reason: str, message: str = "", **extra: Any) -> None:
        with self.lock:
            entry = self.data["stages"].setdefault(name, {"jobName": f"local:{name}"})
            entry.update({"state": state, "reason": reason, "message": message or None, **extra})
            self.data["stages"][name] = {k: v for k, v in entry.items() if v is not None}
            self.data["currentStage"] = name
        self.write()

    def progress(self, progress: Mapping[str, Any]) -> None:
        with self.lock:
            self.data["progress"] = dict(progress)
        self.write()

    def set_gate(self, verdict: GateVerdict | None) -> None:
        with self.lock:
            self.gate = verdict

    def results(self, summaries: list[dict[str, Any]]) -> None:
        artifacts, metrics = results_from_summaries(summaries)
        with self.lock:
            if artifacts:
                self.data["artifacts"] = {**self.data.get("artifacts", {}), **artifacts}
            if metrics:
                self.data["metrics"] = {**self.data.get("metrics", {}), **metrics}

    def finish(self, phase: str, reason: str, message: str) -> None:
        with self.lock:
            self.data["phase"] = phase
            self.data["completionTime"] = rfc3339(_now())
            if phase == "Failed":
                self.data["reason"], self.data["message"] = reason, message
        self.write(reason=reason, message=message)

    def write(self, reason: str | None = None, message: str | None = None) -> None:
        with self.lock:
            phase = self.data.get("phase", "Pending")
            states = self.data["stages"]
            if phase not in ("Succeeded", "Failed"):
                phase = "Running" if states else "Pending"
                self.data["phase"] = phase
            current = self.data.get("currentStage")
            conds = kstatus_conditions(
                phase,
                reason or (states.get(current, {}).get("reason") or phase),
                message or f"stage {current}" if current else "",
                None,
                False,
            )
            for s in self.stages:
                st = states.get(s.name, {})
                conds.append(
                    Cond(
                        condition_type(s.name),
                        st.get("state") == "Succeeded",
                        st.get("reason") or "NotStarted",
                        st.get("message") or "",
                    )
                )
            gate = next((s for s in self.stages if s.name == GATE_STAGE), None)
            if gate is not None:
                st = states.get(gate.name, {})
                conds.append(
                    gate_condition(
                        self.gate,
                        self.data.get("conditions", []),
                        description=gate.description,
                        stage_state=st.get("state"),
                        stage_message=st.get("message"),
                    )
                )
            self.data["conditions"] = merge_conditions(self.data.get("conditions", []), conds, _now(), None)
            snapshot = build_status(**self.data)  # the status model's shape and types, as the operator's
        _atomic_write(self.path_json, json.dumps(snapshot, indent=2) + "\n")
        _atomic_write(self.path_yaml, yaml.safe_dump(snapshot, sort_keys=False))


def _atomic_write(path: Path, text: str) -> None:
    """Through the contract's one atomic replace: a reader (a user watching the file, the tests) may read the
    status while the run rewrites it."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def _now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------ running


def resolve_executable(name: str) -> str:
    """Console scripts live next to this interpreter even when the venv is not activated."""
    if os.sep in name:
        return name
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    raise LocalRunError(
        f"command {name!r} not found on PATH or next to {sys.executable}; install the trainer "
        "(pip install 'nnunet-distill[trainer]')",
        {},
    )


def done(patterns: Iterable[str], value: str | None = None) -> bool:
    """True when every glob (with {value} filled in) matches at least one existing path."""
    pats = [p.replace("{value}", value) if value is not None else p for p in patterns]
    return bool(pats) and all(glob.glob(p) for p in pats)


@dataclass
class LocalRunner:
    """Runs stages in order; `out` receives the prefixed output (stdout by default)."""

    name: str
    paths: DataPaths
    workdir: Path
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    out: TextIO = sys.stdout
    on_progress: Callable[[dict[str, Any]], None] | None = None
    _proc: subprocess.Popen[str] | None = None
    _peers: list[subprocess.Popen[str]] = field(default_factory=list)  # nodes 1.. of a multi-node stage

    def run(self, stages: list[Stage] | tuple[Stage, ...]) -> dict[str, Any]:
        stages = list(stages)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "termination"):
            (self.workdir / sub).mkdir(exist_ok=True)
        for d in (self.paths.raw, self.paths.preprocessed, self.paths.results, self.paths.work):
            Path(d).mkdir(parents=True, exist_ok=True)
        status = LocalStatus(self.name, stages, self.workdir / "status.yaml", self.workdir / "status.json")
        status.write()
        self._say(
            "run", f"{len(stages)} stages: {' -> '.join(s.name for s in stages)}; status: {status.path_yaml}"
        )
        started = time.monotonic()
        for number, stage in enumerate(stages, 1):
            self._run_stage(stage, number, len(stages), status)
        status.finish("Succeeded", "Succeeded", f"all {len(stages)} stages succeeded")
        self._say("run", f"succeeded in {format_duration(time.monotonic() - started)}")
        return status.data

    def _say(self, prefix: str, text: str) -> None:
        print(f"[{prefix}] {text}", file=self.out, flush=True)

    def _stage_env(self, stage: Stage) -> dict[str, str]:
        env = dict(self.env)
        env.update(self.paths.env())
        for key, value in stage.env:
            env.setdefault(key, value)  # the user's env (e.g. nnUNet_n_proc_DA=0 on a laptop) wins
        env.update(stage.required_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[ENV_JOB_STAGE] = stage.name
        for key in (ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_JOB_UID):
            env.pop(key, None)  # no cluster to report to: the trainer's reporter stays a no-op
        return env

    def _run_stage(self, stage: Stage, number: int, count: int, status: LocalStatus) -> None:
        t0 = time.monotonic()
        start_iso = rfc3339(_now())
        self._say(stage.name, f"({number}/{count}) {stage.description}")
        indices: list[tuple[int | None, str | None]] = (
            [(i, v) for i, v in enumerate(stage.index_values)] if stage.index_values else [(None, None)]
        )
        summaries: list[dict[str, Any]] = []
        ran = False
        for index, value in indices:
            label = stage.name if index is None else f"{stage.name}:{value}"
            if stage.done_when_exists and done(stage.done_when_exists, value):
                self._say(label, "outputs already present; skipping")
                continue
            ran = True
            status.stage(stage.name, "Running", "Running", f"running {label}", startTime=start_iso)
            tracker = (
                ProgressTracker(stage.name, Path(self.paths.results)) if stage.reports_progress else None
            )
            for command in stage.commands:
                summary = self._run_command(stage, command.name, command.argv, index, label, status, tracker)
                if summary:
                    summaries.append(summary)
        status.results(summaries)
        elapsed = time.monotonic() - t0
        status.stage(
            stage.name,
            "Succeeded",
            "Succeeded" if ran else "AlreadyDone",
            f"finished in {format_duration(elapsed)}" if ran else "outputs already present",
            startTime=start_iso,
            completionTime=rfc3339(_now()),
        )
        self._say(stage.name, f"done in {format_duration(elapsed)}")

    def _run_command(
        self,
        stage: Stage,
        command_name: str,
        argv: tuple[str, ...],
        index: int | None,
        label: str,
        status: LocalStatus,
        tracker: ProgressTracker | None,
    ) -> dict[str, Any]:
        env = self._stage_env(stage)
        suffix = f"-{index}" if index is not None else ""
        log_path = self.workdir / "logs" / f"{stage.name}{suffix}.log"
        term_path = self.workdir / "termination" / f"{stage.name}{suffix}-{command_name}.json"
        term_path.unlink(missing_ok=True)
        env[ENV_TERMINATION_PATH] = str(term_path)
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
        executable = resolve_executable(argv[0])
        peers = self._start_peers(stage, executable, argv, env)
        self._say(label, f"$ {shlex.join(argv)}")
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        last_poll = 0.0
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            try:
                self._proc = subprocess.Popen(
                    [executable, *argv[1:]],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                    start_new_session=True,
                )
            except OSError as exc:
                raise self._fail(
                    stage, status, f"stage {stage.name}: cannot start {argv[0]}: {exc}"
                ) from None
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                log.write(line + "\n")
                tail.append(line)
                print(f"[{label}] {line}", file=self.out, flush=True)
                if tracker is not None and time.monotonic() - last_poll >= 0.5:
                    last_poll = time.monotonic()
                    self._report_progress(tracker, status)
            code = self._proc.wait()
            self._proc = None
        code = self._wait_peers(peers, code)
        if tracker is not None:
            self._report_progress(tracker, status)
        summary = parse_summary(term_path.read_text()) if term_path.exists() else {}
        self._check_outcome(stage, command_name, argv, code, summary, log_path, tail, status)
        return summary

    def _check_outcome(
        self,
        stage: Stage,
        command_name: str,
        argv: tuple[str, ...],
        code: int,
        summary: dict[str, Any],
        log_path: Path,
        tail: deque[str],
        status: LocalStatus,
    ) -> None:
        """Record the gate's verdict; a failed command (or an enforced gate that failed) ends the run."""
        verdict = gate_verdict(summary) if stage.name == GATE_STAGE else None
        if verdict is not None:
            status.set_gate(verdict)
            status.results([{"metrics": summary.get("metrics")}])  # a blocked student's figures too
        if code != 0 and verdict is not None and verdict.reason == GATE_FAILED:
            package_dir = export_paths(self.paths)[2]
            first = gate_failure_message(verdict.message, verdict.student, package_dir)
            where = (summary.get("gate") or {}).get("summary")
            message = f"{first}\n  log: {log_path}" + (f"\n  summary: {where}" if where else "")
            raise self._fail(stage, status, message, code, reason=GATE_FAILED, job_reason=GATE_FAILED)
        if code != 0:
            err = summary.get("error") if isinstance(summary.get("error"), dict) else {}
            why = f": {err.get('reason')}: {err.get('message')}" if err.get("message") else ""
            tail_text = "\n".join(f"    {ln}" for ln in tail)
            message = (
                f"stage {stage.name} failed: `{argv[0]}` ({command_name}) exited with code {code}{why}\n"
                f"  log: {log_path}\n  last lines:\n{tail_text}"
            )
            raise self._fail(stage, status, message, code)

    def _fail(
        self,
        stage: Stage,
        status: LocalStatus,
        message: str,
        code: int | None = None,
        *,
        reason: str | None = None,
        job_reason: str = "StageFailed",
    ) -> LocalRunError:
        stage_reason = reason or ("Error" if code is not None else "StartFailed")
        status.stage(
            stage.name, "Failed", stage_reason, message.splitlines()[0], completionTime=rfc3339(_now())
        )
        status.finish("Failed", job_reason, message.splitlines()[0])
        return LocalRunError(message, status.data)

    def _report_progress(self, tracker: ProgressTracker, status: LocalStatus) -> None:
        if tracker.poll() and tracker.progress is not None:
            status.progress(tracker.progress)
            if self.on_progress is not None:
                self.on_progress(tracker.progress)

    def _start_peers(
        self, stage: Stage, executable: str, argv: tuple[str, ...], env: dict[str, str]
    ) -> list[subprocess.Popen[str]]:
        """A multi-node stage: node 0 runs in the foreground (``env`` gets its rendezvous settings),
        nodes 1.. beside it; rendezvous on 127.0.0.1. No peers for a one-node stage."""
        node_envs = local_node_envs(stage.resources.gpus, stage.resources.nodes, free_port())
        env.update(node_envs[0])
        return [
            self._start_peer(stage, executable, argv, {**env, **e}, i) for i, e in enumerate(node_envs[1:], 1)
        ]

    def _wait_peers(self, peers: list[subprocess.Popen[str]], code: int) -> int:
        """The stage's exit code over all nodes; if node 0 failed, the others are stopped (they would wait for
        it until their rendezvous times out)."""
        for peer in peers:
            if code != 0 and peer.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(peer.pid, signal.SIGTERM)
            code = code or peer.wait()
        self._peers = []
        return code

    def _start_peer(
        self, stage: Stage, executable: str, argv: tuple[str, ...], env: dict[str, str], node: int
    ) -> subprocess.Popen[str]:
        """Node ``node`` of a multi-node stage, its output in logs/<stage>-node<node>.log."""
        log_path = self.workdir / "logs" / f"{stage.name}-node{node}.log"
        env = {
            **env,
            "TERMINATION_MESSAGE_PATH": str(self.workdir / "termination" / f"{stage.name}-node{node}.json"),
        }
        with open(log_path, "a", encoding="utf-8") as log:
            proc = subprocess.Popen(
                [executable, *argv[1:]], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._peers = [*self._peers, proc]
        return proc

    def interrupt(self) -> None:
        """Stop the running command (Ctrl-C): its whole process group (and its peer nodes) get SIGTERM."""
        for proc in [self._proc, *self._peers]:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)


def local_paths(
    *,
    data_dir: str | None,
    raw: str | None,
    preprocessed: str | None,
    results: str | None,
    workdir: str,
    env: Mapping[str, str],
) -> DataPaths:
    """Folders from flags, else $nnUNet_* env, else <data-dir>/nnUNet_*; a clear error names what is
    missing."""

    def pick(flag: str | None, var: str) -> str:
        if flag:
            return str(Path(flag).resolve())
        if env.get(var):
            return str(Path(env[var]).resolve())
        if data_dir:
            return str((Path(data_dir) / var).resolve())
        raise ValueError(
            f"no folder for {var}: pass --data-dir DIR (uses DIR/{var}), "
            f"--{var.split('_', 1)[1]} DIR, or set ${var}"
        )

    return DataPaths(
        pick(raw, "nnUNet_raw"),
        pick(preprocessed, "nnUNet_preprocessed"),
        pick(results, "nnUNet_results"),
        str(Path(workdir).resolve()),
    )
