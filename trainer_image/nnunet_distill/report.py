"""Tell the cluster how a stage is going: live `status.progress` patches (the final word is `termination.py`).

Training runs for hours inside a pod; the DistillationJob is where people (and `kubectl get`) look. The
reporter patches `status.progress` through the status subresource, so its service account needs nothing
but `patch` (and `get`, for the restart counter) on `distillationjobs/status` in its own namespace.

Two promises shape the code:
- reporting never hurts training: every API failure is caught, logged once per kind (status code, never
  a token or body), and training goes on; the kubernetes client is imported only when a patch is sent,
  so this module imports without a cluster or the client installed;
- reporting never floods the API server: at most one patch per epoch and per `min_interval_s`, plus a
  heartbeat every `heartbeat_s` when epochs are long, so a stuck pod shows up as a stale `updatedAt`.

Hooks for the trainer (nnU-Net's 0-based `current_epoch` in its own `on_epoch_end`):

    reporter = ProgressReporter.from_env(total_epochs=trainer.num_epochs, stage="distill")
    reporter.start_heartbeat()                  # background thread; or call reporter.heartbeat() yourself
    reporter.mark_restart()                     # once, when resuming from a checkpoint
    reporter.on_epoch_end(epoch, train_loss=..., kd_loss=..., pseudo_dice=...)
    reporter.on_checkpoint(epoch)               # after checkpoint_latest/final is safely on disk
    reporter.close()                            # final flush + stop the heartbeat

Without the downward-API env (`DISTILLATIONJOB_NAME`, `DISTILLATIONJOB_NAMESPACE`) every call is a no-op.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from nnunet_distill import contract

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = contract.GROUP, contract.VERSION, contract.PLURAL

ENV_NAME = contract.ENV_JOB_NAME
ENV_NAMESPACE = contract.ENV_JOB_NAMESPACE
ENV_UID = contract.ENV_JOB_UID
ENV_STAGE = contract.ENV_JOB_STAGE  # optional: the stage name the operator gave this Job
ENV_INTERVAL = contract.ENV_PROGRESS_INTERVAL
ENV_HEARTBEAT = contract.ENV_PROGRESS_HEARTBEAT

DEFAULT_INTERVAL_S = 30.0
DEFAULT_HEARTBEAT_S = 180.0
REQUEST_TIMEOUT = (5, 10)  # (connect, read) seconds: a slow API server must not stall training for long
ETA_WINDOW = 5  # epochs averaged for the ETA


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _rfc3339(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class JobRef:
    """The DistillationJob this pod works for (from the downward API)."""

    name: str
    namespace: str
    uid: str | None = None


def job_from_env(env: Mapping[str, str] = os.environ) -> JobRef | None:
    name, namespace = env.get(ENV_NAME, "").strip(), env.get(ENV_NAMESPACE, "").strip()
    if not name or not namespace:
        return None
    return JobRef(name, namespace, env.get(ENV_UID, "").strip() or None)


def eta_seconds(durations: list[float], completed: int, total: int | None) -> int | None:
    """Remaining seconds from the mean of the last few epoch durations; None when it cannot be known."""
    if total is None or not durations:
        return None
    recent = durations[-ETA_WINDOW:]
    return max(0, round(sum(recent) / len(recent) * max(0, total - completed)))


def _finite(x: Any) -> float | None:
    """JSON has no NaN/inf (nnU-Net's pseudo Dice is NaN for classes never predicted); drop them."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def progress_patch(progress: Mapping[str, Any], uid: str | None = None) -> dict[str, Any]:
    """The merge-patch body. None values are left out (in a merge patch they would delete the field).

    With a uid the patch only applies to that very object: the API server rejects a patch whose
    metadata.uid differs, so a pod of a deleted-and-recreated job cannot write into its successor.
    """
    body: dict[str, Any] = {"status": {"progress": {k: v for k, v in progress.items() if v is not None}}}
    if uid:
        body["metadata"] = {"uid": uid}
    return body


def _error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        return f"HTTP {status}"
    return type(exc).__name__


class ProgressReporter:
    """Rate-limited, failure-proof `status.progress` patches for one DistillationJob.

    `api` is anything with kubernetes' `CustomObjectsApi.patch_namespaced_custom_object_status` /
    `get_namespaced_custom_object_status`; by default it is built lazily from the in-cluster config,
    falling back to `$KUBECONFIG` (local runs, tests).
    """

    def __init__(
        self,
        job: JobRef | None,
        *,
        total_epochs: int | None = None,
        stage: str | None = None,
        min_interval_s: float = DEFAULT_INTERVAL_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        api: Any = None,
        env: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], _dt.datetime] = _utcnow,
    ):
        if min_interval_s < 0 or heartbeat_s <= 0:
            raise ValueError("min_interval_s must be >= 0 and heartbeat_s > 0")
        self.job = job
        self.total_epochs = total_epochs
        self.stage = stage
        self.min_interval_s = float(min_interval_s)
        self.heartbeat_s = float(max(heartbeat_s, min_interval_s))
        self._api = api
        self._env = env
        self._clock = clock
        self._now = now
        self._state_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._durations: list[float] = []
        self._epoch_mark = clock()  # when the current epoch (or the reporter) started
        self._completed: int | None = None
        self._last_sent_epoch: int | None = None
        self._last_attempt: float | None = None
        self._eta_at_mark: int | None = None
        self._dirty = True
        self._restarts: int | None = None
        self._seen_errors: set[str] = set()
        self._disabled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.patches_sent = 0  # successful patches, for logs and tests
        self.failures = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **kwargs: Any) -> ProgressReporter:
        """A reporter for the job named by the downward-API env; inactive (all no-ops) without it."""
        kwargs.setdefault("stage", env.get(ENV_STAGE) or None)
        for key, param in ((ENV_INTERVAL, "min_interval_s"), (ENV_HEARTBEAT, "heartbeat_s")):
            if env.get(key) and param not in kwargs:
                try:
                    kwargs[param] = float(env[key])
                except ValueError:
                    log.warning("ignoring %s=%r: not a number of seconds", key, env[key])
        return cls(job_from_env(env), env=env, **kwargs)

    @property
    def active(self) -> bool:
        return self.job is not None and not self._disabled

    # ----------------------------------------------------------------------------------- trainer hooks

    def on_epoch_end(
        self,
        epoch: int,
        *,
        train_loss: float | None = None,
        kd_loss: float | None = None,
        pseudo_dice: float | None = None,
        epoch_seconds: float | None = None,
        total_epochs: int | None = None,
    ) -> bool:
        """Record the end of 0-based epoch `epoch`; status shows `epoch + 1` (epochs completed).

        Sends a patch when this epoch has not been sent yet and `min_interval_s` has passed since the
        last one; otherwise the values wait for the next epoch, the heartbeat or `flush()`.
        Returns whether a patch was sent.
        """
        if self.job is None:
            return False
        t = self._clock()
        with self._state_lock:
            completed = int(epoch) + 1
            if completed != self._completed:
                self._durations.append(
                    float(epoch_seconds) if epoch_seconds is not None else t - self._epoch_mark
                )
            self._epoch_mark = t
            self._completed = completed
            if total_epochs is not None:
                self.total_epochs = int(total_epochs)
            self._values.update(
                trainLoss=_finite(train_loss), kdLoss=_finite(kd_loss), pseudoDice=_finite(pseudo_dice)
            )
            self._eta_at_mark = eta_seconds(self._durations, completed, self.total_epochs)
            self._dirty = True
            due = completed != self._last_sent_epoch and self._interval_passed(t, self.min_interval_s)
        return self._send() if due else False

    def on_checkpoint(self, epoch: int) -> None:
        """A checkpoint of 0-based epoch `epoch` is on disk; shown as `lastCheckpointEpoch = epoch + 1`."""
        with self._state_lock:
            self._values["lastCheckpointEpoch"] = int(epoch) + 1
            self._dirty = True

    def mark_restart(self) -> int | None:
        """Count one more restart: this pod resumed from a checkpoint. Reads the count so far from status."""
        if not self.active:
            return None
        previous = 0
        api = self._client()
        if api is not None:
            try:
                obj = api.get_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.job.namespace,
                    PLURAL,
                    self.job.name,
                    _request_timeout=REQUEST_TIMEOUT,
                )
                previous = int(((obj or {}).get("status") or {}).get("progress", {}).get("restarts") or 0)
            except Exception as exc:  # noqa: BLE001 - never into training
                self._log_failure(exc, "read the restart count")
        with self._state_lock:
            self._restarts = previous + 1
            self._dirty = True
            return self._restarts

    def heartbeat(self) -> bool:
        """Call often (a thread does it after `start_heartbeat`); sends only when due.

        Due when unsent values have waited `min_interval_s`, or nothing at all was sent for `heartbeat_s`
        (so `updatedAt` keeps moving during long epochs and `etaSeconds` counts down).
        """
        if not self.active:
            return False
        t = self._clock()
        with self._state_lock:
            due = (self._dirty and self._interval_passed(t, self.min_interval_s)) or self._interval_passed(
                t, self.heartbeat_s
            )
        return self._send() if due else False

    def flush(self) -> bool:
        """Send the current state now, whatever the rate limit (end of training, stage change)."""
        return self._send() if self.active else False

    def start_heartbeat(self, every_s: float | None = None) -> None:
        if not self.active or self._thread is not None:
            return
        period = every_s if every_s is not None else max(1.0, min(self.min_interval_s, self.heartbeat_s) / 2)
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(period):
                self.heartbeat()

        self._thread = threading.Thread(target=loop, name="progress-heartbeat", daemon=True)
        self._thread.start()

    def close(self, *, final_flush: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        if final_flush and self.active and self._dirty:
            self._send()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- internals

    def _interval_passed(self, t: float, interval: float) -> bool:
        return self._last_attempt is None or t - self._last_attempt >= interval

    def snapshot(self) -> dict[str, Any]:
        """The `status.progress` fields as they would be sent now (camelCase, as in the CRD)."""
        t = self._clock()
        with self._state_lock:
            eta = self._eta_at_mark
            if eta is not None:
                eta = max(0, round(eta - (t - self._epoch_mark)))
            return {
                "epoch": self._completed,
                "totalEpochs": self.total_epochs,
                **self._values,
                "etaSeconds": eta,
                "restarts": self._restarts,
                "stage": self.stage,
                "updatedAt": _rfc3339(self._now()),
            }

    def _client(self) -> Any:
        if self._api is None:
            try:
                self._api = _default_api(self._env)
            except Exception as exc:  # noqa: BLE001 - no cluster config: report nothing, train on
                self._log_failure(exc, "load a Kubernetes client configuration")
                self._disabled = True
                return None
        return self._api

    def _send(self) -> bool:
        if not self._send_lock.acquire(blocking=False):
            return False  # another thread is sending; the state stays dirty for the next chance
        try:
            api = self._client()
            if api is None:
                return False
            progress = self.snapshot()
            with self._state_lock:
                self._last_attempt = self._clock()
                sent_epoch = self._completed
                self._dirty = False
            try:
                api.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.job.namespace,
                    PLURAL,
                    self.job.name,
                    progress_patch(progress, self.job.uid),
                    _content_type="application/merge-patch+json",
                    _request_timeout=REQUEST_TIMEOUT,
                )
            except Exception as exc:  # noqa: BLE001 - never into training
                with self._state_lock:
                    self._dirty = True
                self.failures += 1
                self._log_failure(exc, "patch status.progress")
                return False
            with self._state_lock:
                self._last_sent_epoch = sent_epoch
            self.patches_sent += 1
            return True
        finally:
            self._send_lock.release()

    def _log_failure(self, exc: BaseException, what: str) -> None:
        kind = _error_kind(exc)
        ref = f"{self.job.namespace}/{self.job.name}" if self.job else "?"
        if kind not in self._seen_errors:
            self._seen_errors.add(kind)
            hint = ""
            if kind == "HTTP 403":
                hint = " (the pod's service account needs get/patch on distillationjobs/status)"
            elif kind == "HTTP 404":
                hint = " (the DistillationJob is gone)"
            elif kind in ("HTTP 409", "HTTP 422"):
                hint = " (the DistillationJob was replaced: uid mismatch)"
            log.warning("could not %s of DistillationJob %s: %s%s; training continues", what, ref, kind, hint)
        else:
            log.debug("could not %s of DistillationJob %s: %s", what, ref, kind)


def _default_api(env: Mapping[str, str]) -> Any:
    """CustomObjectsApi on a private client configuration (never the process-wide default)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        paths = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
        config_file = next((p for p in paths if Path(p).is_file()), None)
        config.load_kube_config(config_file=config_file, client_configuration=cfg)
    return client.CustomObjectsApi(client.ApiClient(cfg))


__all__ = [
    "GROUP",
    "PLURAL",
    "VERSION",
    "JobRef",
    "ProgressReporter",
    "eta_seconds",
    "job_from_env",
    "progress_patch",
]
