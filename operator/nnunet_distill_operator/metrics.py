"""Prometheus metrics of the operator (kopf has none of its own).

Two kinds:
- controller health, named like controller-runtime's so standard dashboards transfer: reconcile counts,
  errors and durations, Jobs created, stage durations, CR-to-first-Job latency;
- per-DistillationJob gauges read from status (phase, and status.progress while it trains).

Per-job series are produced by a custom collector from the operator's current view, not by labelled
Gauges that must be remembered and removed: a finished or deleted job simply stops being yielded, so
label cardinality stays bounded by the number of unfinished jobs.

All metrics live in a private registry so tests and the KopfRunner can import this module more than
once without duplicate-series errors; `serve()` exposes it over HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nnunet_distill_operator import __version__
from nnunet_distill_operator.status import GATE_CONDITION, GATE_NOT_ENFORCED, GATE_VERDICTS, parse_time

PREFIX = "nnunet_distill"
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

OPERATOR_INFO = Info(f"{PREFIX}_operator", "nnunet-distill operator build information.", registry=REGISTRY)
OPERATOR_INFO.info({"version": __version__})

RECONCILE_TOTAL = Counter(
    f"{PREFIX}_reconcile",
    "Reconciliations of DistillationJobs by trigger and result.",
    ["trigger", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    f"{PREFIX}_reconcile_errors", "Reconciliations that raised, by trigger.", ["trigger"], registry=REGISTRY
)
RECONCILE_DURATION = Histogram(
    f"{PREFIX}_reconcile_duration_seconds",
    "Time spent in one reconciliation.",
    ["trigger"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_CREATED = Counter(
    f"{PREFIX}_stage_jobs_created", "batch/v1 Jobs created, by stage.", ["stage"], registry=REGISTRY
)
STAGE_DURATION = Histogram(
    f"{PREFIX}_stage_duration_seconds",
    "Wall time of finished stages.",
    ["stage", "result"],
    registry=REGISTRY,
    buckets=(10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200, 604800),
)
START_LATENCY = Histogram(
    f"{PREFIX}_job_start_latency_seconds",
    "From a DistillationJob's creation to the creation of its first stage Job.",
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# Stages are rare events (hours apart). A labelled counter or histogram child appears only at its first event,
# and PromQL's increase() cannot see the step from "no series" to 1, so the first finished stage after an
# operator (re)start would vanish from the dashboard's "in range" panels. Exporting every known stage at 0
# from the start makes each event a visible 0 -> 1 step. (A stage not listed here still works; only its first
# event is lost.)
KNOWN_STAGES = ("preprocess", "teachers", "distill", "export", "publish")
for _stage in KNOWN_STAGES:
    JOBS_CREATED.labels(_stage)
    for _result in ("Succeeded", "Failed"):
        STAGE_DURATION.labels(_stage, _result)

# Per-job gauges (yielded by JobsCollector): family name -> (status.progress key, help)
PROGRESS_GAUGES: dict[str, tuple[str, str]] = {
    f"{PREFIX}_epoch": ("epoch", "Epochs completed in the training stage."),
    f"{PREFIX}_total_epochs": ("totalEpochs", "Epochs planned for the training stage."),
    f"{PREFIX}_train_loss": ("trainLoss", "Training loss of the last epoch."),
    f"{PREFIX}_kd_loss": ("kdLoss", "Knowledge-distillation loss of the last epoch."),
    f"{PREFIX}_pseudo_dice": ("pseudoDice", "nnU-Net pseudo Dice of the last epoch."),
    f"{PREFIX}_eta_seconds": ("etaSeconds", "Estimated seconds until the training stage finishes."),
    f"{PREFIX}_restarts": ("restarts", "Times the training stage resumed after a pod restart."),
    f"{PREFIX}_last_checkpoint_epoch": ("lastCheckpointEpoch", "Epoch of the newest checkpoint."),
}
# Final accuracy (status.metrics), kept while the DistillationJob exists, finished or not: the accuracy
# alert reads it whether the quality gate blocked the student or not. family -> (status.metrics key, help)
RESULT_GAUGES: dict[str, tuple[str, str]] = {
    f"{PREFIX}_dice_retention": (
        "retention",
        (
            "Student's held-out Dice / the teacher ensemble's on the same cases "
            "(status.metrics; absent without an honest baseline)."
        ),
    ),
    f"{PREFIX}_final_dice": ("finalDice", "Student's final mean foreground Dice (status.metrics)."),
    f"{PREFIX}_teacher_dice": ("teacherDice", "Teacher ensemble's mean foreground Dice (status.metrics)."),
}
# The worst label's retention, labelled with the label's name (one series per job: its current worst label).
WORST_LABEL_FAMILY = f"{PREFIX}_worst_label_retention"
# The quality gate's verdict (QualityGate condition): 1 passed, 0 failed (enforced or not); absent until
# evaluated.
GATE_FAMILY = f"{PREFIX}_quality_gate_passed"
JOBS_FAMILY = f"{PREFIX}_jobs"
PROGRESS_UPDATED_FAMILY = f"{PREFIX}_progress_updated_timestamp_seconds"
PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
FINISHED = ("Succeeded", "Failed")


class JobsCollector(Collector):
    """DistillationJobs by phase, and the progress of unfinished ones, from the operator's current view."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], tuple[str, dict[str, Any], dict[str, Any]]] = {}
        self._gates: dict[tuple[str, str], tuple[bool, bool]] = {}  # (passed, enforced)

    def update(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        phase = status.get("phase") or "Pending"
        progress = dict(status.get("progress") or {})
        results = dict(status.get("metrics") or {})
        gate = next(
            (
                c
                for c in status.get("conditions") or ()
                if isinstance(c, Mapping)
                and c.get("type") == GATE_CONDITION
                and c.get("reason") in GATE_VERDICTS
            ),
            None,
        )
        with self._lock:
            self._jobs[(namespace, name)] = (phase, progress, results)
            if gate is not None:
                self._gates[(namespace, name)] = (
                    gate.get("status") == "True",
                    gate.get("reason") != GATE_NOT_ENFORCED,
                )
            else:
                self._gates.pop((namespace, name), None)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)
            self._gates.pop((namespace, name), None)

    def clear(self) -> None:
        with self._lock:
            self._jobs.clear()
            self._gates.clear()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            jobs = dict(self._jobs)
            gates = dict(self._gates)
        yield _by_phase(jobs)
        yield from _progress_families(jobs)
        yield from _result_families(jobs, gates)


def _by_phase(jobs: dict[tuple[str, str], Any]) -> GaugeMetricFamily:
    by_phase = GaugeMetricFamily(
        JOBS_FAMILY, "DistillationJobs by namespace and phase.", labels=["namespace", "phase"]
    )
    counts: dict[tuple[str, str], int] = {}
    for (namespace, _), (phase, _, _) in jobs.items():
        counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
    for namespace in sorted({ns for ns, _ in counts}):
        for phase in PHASES:
            by_phase.add_metric([namespace, phase], counts.get((namespace, phase), 0))
    return by_phase


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _progress_families(jobs: dict[tuple[str, str], Any]) -> Iterator[GaugeMetricFamily]:
    """Live training progress of the jobs that have not finished (finished jobs drop out: bounded
    cardinality)."""
    families = {
        family: GaugeMetricFamily(family, help_, labels=["namespace", "name", "stage"])
        for family, (_, help_) in PROGRESS_GAUGES.items()
    }
    updated = GaugeMetricFamily(
        PROGRESS_UPDATED_FAMILY,
        "When the training pod last reported progress (Unix time).",
        labels=["namespace", "name", "stage"],
    )
    for (namespace, name), (phase, progress, _final) in sorted(jobs.items()):
        if phase in FINISHED or not progress:
            continue
        labels = [namespace, name, str(progress.get("stage") or "")]
        for family, (key, _) in PROGRESS_GAUGES.items():
            value = _number(progress.get(key))
            if value is not None:
                families[family].add_metric(labels, value)
        when = parse_time(progress.get("updatedAt"))
        if when is not None:
            updated.add_metric(labels, when.timestamp())
    yield from families.values()
    yield updated


def _result_families(
    jobs: dict[tuple[str, str], Any], gates: dict[tuple[str, str], tuple[bool, bool]]
) -> Iterator[GaugeMetricFamily]:
    """The student's final figures and the quality gate's verdict."""
    results = {
        family: GaugeMetricFamily(family, help_, labels=["namespace", "name"])
        for family, (_, help_) in RESULT_GAUGES.items()
    }
    worst = GaugeMetricFamily(
        WORST_LABEL_FAMILY,
        "Dice retention of the student's worst label on held-out "
        "cases (status.metrics.worstLabelRetention; label: status.metrics.worstLabel).",
        labels=["namespace", "name", "label"],
    )
    gate = GaugeMetricFamily(
        GATE_FAMILY,
        "Quality gate verdict (QualityGate condition): 1 passed, 0 failed; "
        "enforced=false when spec.qualityGate.enforce is false.",
        labels=["namespace", "name", "enforced"],
    )
    for (namespace, name), (_phase, _progress, final) in sorted(jobs.items()):
        for family, (key, _) in RESULT_GAUGES.items():
            value = _number(final.get(key))
            if value is not None:
                results[family].add_metric([namespace, name], value)
        value = _number(final.get("worstLabelRetention"))
        if value is not None:
            worst.add_metric([namespace, name, str(final.get("worstLabel") or "")], value)
        if (namespace, name) in gates:
            passed, enforced = gates[(namespace, name)]
            gate.add_metric([namespace, name, "true" if enforced else "false"], 1.0 if passed else 0.0)
    yield from results.values()
    yield worst
    yield gate


JOBS = JobsCollector()
REGISTRY.register(JOBS)

# Every metric family this operator exports, as queried in PromQL (counters with their _total suffix,
# histograms by base name: add _bucket/_sum/_count). The dashboard and alert tests check against it.
METRIC_NAMES: tuple[str, ...] = (
    f"{PREFIX}_operator_info",
    f"{PREFIX}_reconcile_total",
    f"{PREFIX}_reconcile_errors_total",
    f"{PREFIX}_reconcile_duration_seconds",
    f"{PREFIX}_stage_jobs_created_total",
    f"{PREFIX}_stage_duration_seconds",
    f"{PREFIX}_job_start_latency_seconds",
    JOBS_FAMILY,
    *PROGRESS_GAUGES,
    PROGRESS_UPDATED_FAMILY,
    *RESULT_GAUGES,
    WORST_LABEL_FAMILY,
    GATE_FAMILY,
)
HISTOGRAMS = (
    f"{PREFIX}_reconcile_duration_seconds",
    f"{PREFIX}_stage_duration_seconds",
    f"{PREFIX}_job_start_latency_seconds",
)


def sample_names() -> frozenset[str]:
    """Every series name a scrape can contain (histograms expanded), for PromQL checks."""
    names = set(METRIC_NAMES)
    for h in HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return frozenset(names)


def serve(port: int, addr: str = "0.0.0.0") -> tuple[Any, int]:
    """Start the /metrics HTTP server in a thread; returns (server, bound port) — port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server, server.server_port


def stop(server: Any) -> None:
    server.shutdown()
    server.server_close()
