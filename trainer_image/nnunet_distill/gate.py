"""The quality gate, pure: is a distilled student good enough to publish?

The input is the distill stage's ``distillation_summary.json`` (schema 2, written by ``evaluation.py``): the
student's and the teacher ensemble's Dice on cases neither trained on, and their ratio, *retention* (mean over
labels, per label, and the worst label). The gate passes when

- there is an honest retention at all (``retention`` is null when there is no labelled test set and every
teacher
  fold trained on the student's validation cases: a leaky ratio is never retention, so it cannot pass a gate),
- ``retention.mean >= min_retention``, and
- every label's retention ``>= min_label_retention`` (the worst label is named when it is not).

A label the teacher ensemble itself never finds (Dice 0) has no ratio (``retention.undefined``): it cannot
fail the per-label check, and the verdict names it so nobody mistakes silence for a pass on that label.

Nothing here reads files, prints or exits: ``nnunet_distill.cli.gate`` does that. Standard library only, so
the gate needs neither torch nor nnU-Net.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nnunet_distill import contract

SCHEMA_VERSION = contract.SUMMARY_SCHEMA_VERSION  # the summary layout this gate reads
TEST_SET = contract.SUMMARY_TEST_SET
VALIDATION_UNSEEN = contract.SUMMARY_VALIDATION_UNSEEN
NO_HONEST_BASELINE = contract.SUMMARY_NO_HONEST_BASELINE
EVALUATIONS = (TEST_SET, VALIDATION_UNSEEN, NO_HONEST_BASELINE)

DEFAULT_MIN_RETENTION = 0.97
DEFAULT_MIN_LABEL_RETENTION = 0.90
MAX_THRESHOLD = 1.5  # a student may beat its teachers, but a threshold above 1.5 is a typo

# Condition / termination-message reasons (CamelCase, as metav1.Condition wants them).
PASSED = contract.GATE_PASSED
FAILED = contract.GATE_FAILED
NOT_ENFORCED = contract.GATE_NOT_ENFORCED

# Exit code of `nnunet-distill gate` for an enforced failure: deterministic, so the operator's Job fails at
# once (podFailurePolicy FailJob) instead of retrying. The operator reads the same contract constant.
EXIT_GATE_FAILED = contract.EXIT_CODE_GATE_FAILED

MAX_LISTED_LABELS = (
    8  # labels named in messages and the termination message (the full table is in the summary)
)


class SummaryError(ValueError):
    """The summary cannot be judged (missing, ambiguous, unreadable, another layout); `reason` is
    CamelCase."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Thresholds:
    min_retention: float = DEFAULT_MIN_RETENTION
    min_label_retention: float = DEFAULT_MIN_LABEL_RETENTION
    enforce: bool = True

    def problems(self) -> list[str]:
        out = []
        for flag, value in (
            ("--min-retention", self.min_retention),
            ("--min-label-retention", self.min_label_retention),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_THRESHOLD):
                out.append(f"{flag} must be in (0, {MAX_THRESHOLD}], got {value}")
        return out


@dataclass(frozen=True)
class Verdict:
    """What the gate decided, and every figure it decided on (with the cases and teacher folds behind
    them)."""

    passed: bool
    thresholds: Thresholds
    failures: tuple[str, ...]
    evaluation: str
    cases: Mapping[str, Any]
    teacher_folds: tuple[int, ...] | None
    retention: float | None
    worst_label: str | None
    worst_label_retention: float | None
    labels_below: tuple[tuple[str, float], ...]
    final_dice: float | None
    teacher_dice: float | None
    note: str | None = None
    student: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    undefined: tuple[str, ...] = ()  # labels without a ratio: the teacher ensemble's Dice is 0 there

    @property
    def enforced(self) -> bool:
        return self.thresholds.enforce

    @property
    def reason(self) -> str:
        if self.passed:
            return PASSED
        return FAILED if self.enforced else NOT_ENFORCED

    @property
    def blocks(self) -> bool:
        """The student must not be published."""
        return not self.passed and self.enforced

    @property
    def evaluated_on(self) -> str:
        return evaluated_on(self.evaluation, self.cases)

    @property
    def message(self) -> str:
        """One line: the verdict, the figures against the thresholds, and where the figures come from."""
        t = self.thresholds
        if self.passed:
            head = (
                f"quality gate passed: retention {_f(self.retention)} >= {_f(t.min_retention)}, worst label "
                f"{self.worst_label} {_f(self.worst_label_retention)} >= {_f(t.min_label_retention)}"
            )
        else:
            verdict = (
                "quality gate failed"
                if self.enforced
                else "quality gate failed (not enforced: enforce is false)"
            )
            head = f"{verdict}: {'; '.join(self.failures)}"
            if self.retention is None:  # nothing was compared: still say what would have been asked
                head += (
                    f" (thresholds: retention >= {_f(t.min_retention)}, every label >= "
                    f"{_f(t.min_label_retention)})"
                )
            else:  # the checks that held, so the message always shows both thresholds
                held = []
                if self.retention >= t.min_retention:
                    held.append(f"retention {_f(self.retention)} >= {_f(t.min_retention)}")
                if (
                    self.worst_label_retention is not None
                    and self.worst_label_retention >= t.min_label_retention
                ):
                    held.append(
                        f"worst label {self.worst_label} {_f(self.worst_label_retention)} >= "
                        f"{_f(t.min_label_retention)}"
                    )
                if held:
                    head += f" (passed: {', '.join(held)})"
        dice = ""
        if self.final_dice is not None or self.teacher_dice is not None:
            dice = f"; student mean Dice {_f(self.final_dice)} vs teacher ensemble {_f(self.teacher_dice)}"
        undefined = ""
        if self.undefined and self.retention is not None:
            undefined = (
                f"; no retention for {', '.join(self.undefined[:MAX_LISTED_LABELS])} (the teacher "
                "ensemble's Dice is 0 there)"
            )
        return f"{head}{dice}{undefined}; {self.source}"

    @property
    def source(self) -> str:
        """Which cases and which teacher folds the figures come from."""
        folds = " ".join(map(str, self.teacher_folds)) if self.teacher_folds else "none"
        mirroring = self.cases.get("mirroring_tta")
        tta = "" if mirroring is None else f", mirroring TTA {'on' if mirroring else 'off'}"
        return f"evaluated on {self.evaluated_on}{tta}, teacher folds {folds}"

    def as_dict(self) -> dict[str, Any]:
        """The termination message's `gate` object (camelCase, compact)."""
        t = self.thresholds
        out: dict[str, Any] = {
            "passed": self.passed,
            "enforced": self.enforced,
            "reason": self.reason,
            "message": self.message,
            "thresholds": {"minRetention": t.min_retention, "minLabelRetention": t.min_label_retention},
            "retention": self.retention,
            "worstLabel": self.worst_label,
            "worstLabelRetention": self.worst_label_retention,
            "labelsBelow": {name: ratio for name, ratio in self.labels_below[:MAX_LISTED_LABELS]},
            "labelsWithoutRetention": list(self.undefined[:MAX_LISTED_LABELS]) or None,
            "evaluation": self.evaluation,
            "cases": {
                "count": self.cases.get("count"),
                "source": self.cases.get("source"),
                "mirroringTTA": self.cases.get("mirroring_tta"),
            },
            "teacherFolds": list(self.teacher_folds) if self.teacher_folds is not None else None,
            "student": self.student,
        }
        return {k: v for k, v in out.items() if v is not None}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def evaluated_on(evaluation: str, cases: Mapping[str, Any]) -> str:
    """`test_set: 6 cases (imagesTs)`: the same words as evaluation.result_metrics' evaluatedOn."""
    return f"{evaluation}: {cases.get('count')} cases ({cases.get('source')})"


def result_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """status.metrics from a distillation summary: the one definition, shared by the distill stage
    (evaluation.result_metrics re-exports it) and the torch-free gate."""
    ret = summary.get("retention") or {}
    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    cases = summary.get("cases") or {}
    metrics = {
        "finalDice": student.get("mean_dice"),
        "teacherDice": teacher.get("mean_dice"),
        "retention": ret.get("mean"),
        "worstLabelRetention": ret.get("worst"),
        "worstLabel": ret.get("worst_label"),
        "evaluatedOn": (
            evaluated_on(summary.get("evaluation"), cases)  # type: ignore[arg-type]
            if summary.get("evaluation") != NO_HONEST_BASELINE
            else None
        ),
        "teacherFolds": teacher.get("folds"),
    }
    return {k: v for k, v in metrics.items() if v is not None}


def _check(summary: Any) -> None:
    """Reject what is not a schema-2 distillation summary, naming what is wrong."""
    if not isinstance(summary, Mapping):
        raise SummaryError("InvalidSummary", "the summary is not a JSON object")
    version = summary.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SummaryError(
            "InvalidSummary",
            f"schema_version is {version!r}, this gate reads {SCHEMA_VERSION}: "
            "the distill stage and the gate come from different trainer versions",
        )
    evaluation = summary.get("evaluation")
    if evaluation not in EVALUATIONS:
        raise SummaryError(
            "InvalidSummary", f"evaluation is {evaluation!r}, expected one of {', '.join(EVALUATIONS)}"
        )
    for key in ("cases", "student"):
        if not isinstance(summary.get(key), Mapping):
            raise SummaryError("InvalidSummary", f"'{key}' is missing or not an object")
    ret = summary.get("retention")
    if ret is None:
        return
    if evaluation == NO_HONEST_BASELINE:
        raise SummaryError(
            "InvalidSummary",
            "the summary reports a retention without an honest baseline "
            "(evaluation 'none'); a leaky ratio is not retention",
        )
    per_label = ret.get("per_label") if isinstance(ret, Mapping) else None
    if (
        not isinstance(ret, Mapping)
        or _number(ret.get("mean")) is None
        or not isinstance(per_label, Mapping)
        or any(_number(v) is None for v in per_label.values())
        or (per_label and (_number(ret.get("worst")) is None or not isinstance(ret.get("worst_label"), str)))
        or not isinstance(ret.get("undefined", []), list)
    ):
        raise SummaryError(
            "InvalidSummary",
            "'retention' must hold a finite mean, per_label ratios and (with any "
            "ratio) a finite worst and its worst_label",
        )


def _no_retention_failure(summary: Mapping[str, Any], fold: Any) -> str:
    if summary.get("evaluation") == NO_HONEST_BASELINE:
        return (
            "no honest baseline: the dataset has no labelled test set and every teacher fold trained on the "
            f"student's validation cases, so no retention can be measured; add imagesTs + labelsTs to the "
            f"dataset (or name held-out test cases), or include the student's fold {fold} in the teacher "
            "folds"
        )
    teacher = (summary.get("teacher_ensemble") or {}).get("dice") or {}
    student = (summary.get("student") or {}).get("dice") or {}
    missing = sorted(
        name for name, d in teacher.items() if _number(d) is None or _number(student.get(name)) is None
    )
    zero = sorted(name for name, d in teacher.items() if name not in missing and not _number(d) > 0)
    why = []
    if missing:
        why.append(f"no Dice for {', '.join(missing[:MAX_LISTED_LABELS])}")
    if zero:
        why.append(f"the teacher ensemble's Dice is 0 for {', '.join(zero[:MAX_LISTED_LABELS])}")
    detail = f" ({'; '.join(why)})" if why else ""
    return f"no retention could be computed from the {summary.get('evaluation')} figures{detail}"


def _teacher_folds(teacher: Mapping[str, Any]) -> tuple[int, ...] | None:
    folds_raw = teacher.get("folds")
    if isinstance(folds_raw, Sequence) and not isinstance(folds_raw, str):
        return tuple(int(f) for f in folds_raw)
    return None


@dataclass(frozen=True)
class _Retention:
    """What the summary's `retention` block says against the thresholds (None fields: no figure)."""

    failures: tuple[str, ...] = ()
    labels_below: tuple[tuple[str, float], ...] = ()
    mean: float | None = None
    worst: float | None = None
    worst_label: str | None = None
    undefined: tuple[str, ...] = ()


def _judge_retention(ret: Mapping[str, Any], thresholds: Thresholds) -> _Retention:
    """Mean and worst-label retention against the thresholds, each miss one failure line."""
    failures: list[str] = []
    worst: float | None = None
    worst_label: str | None = None
    mean = float(ret["mean"])
    labels_below = sorted(
        (
            (str(k), float(v))
            for k, v in ret["per_label"].items()
            if float(v) < thresholds.min_label_retention
        ),
        key=lambda kv: kv[1],
    )
    if mean < thresholds.min_retention:
        failures.append(f"retention {_f(mean)} < {_f(thresholds.min_retention)}")
    if not ret["per_label"]:
        failures.append("no label has a retention (the teacher ensemble's Dice is 0 for every label)")
    else:
        worst, worst_label = float(ret["worst"]), str(ret["worst_label"])
    if worst is not None and worst < thresholds.min_label_retention:
        named = ", ".join(f"{n} {_f(v)}" for n, v in labels_below[:MAX_LISTED_LABELS])
        more = f" (labels below: {named})" if len(labels_below) > 1 else ""
        failures.append(
            f"worst label {worst_label} retention {_f(worst)} < {_f(thresholds.min_label_retention)}" + more
        )
    return _Retention(
        failures=tuple(failures),
        labels_below=tuple(labels_below),
        mean=mean,
        worst=worst,
        worst_label=worst_label,
        undefined=tuple(str(x) for x in ret.get("undefined") or ()),
    )


def evaluate(summary: Any, thresholds: Thresholds) -> Verdict:
    """The gate's verdict on a distillation summary. Raises SummaryError when the summary cannot be judged."""
    _check(summary)
    problems = thresholds.problems()
    if problems:
        raise ValueError("; ".join(problems))
    cases = summary["cases"]
    student = summary["student"]
    teacher = summary.get("teacher_ensemble") if isinstance(summary.get("teacher_ensemble"), Mapping) else {}
    ret = summary.get("retention")
    if ret is None:
        judged = _Retention(failures=(_no_retention_failure(summary, student.get("fold")),))
    else:
        judged = _judge_retention(ret, thresholds)
    failures = judged.failures
    model_folder = student.get("model_folder")
    return Verdict(
        passed=not failures,
        thresholds=thresholds,
        failures=failures,
        evaluation=summary["evaluation"],
        cases=dict(cases),
        teacher_folds=_teacher_folds(teacher),
        retention=judged.mean,
        worst_label=judged.worst_label,
        worst_label_retention=judged.worst,
        labels_below=judged.labels_below,
        final_dice=_number(student.get("mean_dice")),
        teacher_dice=_number(teacher.get("mean_dice")),
        note=summary.get("note") if isinstance(summary.get("note"), str) else None,
        student=(f"{model_folder}/fold_{student.get('fold')}" if model_folder else None),
        metrics=result_metrics(summary),
        undefined=judged.undefined,
    )


def termination_message(verdict: Verdict, summary_path: str) -> dict[str, Any]:
    """The gate stage's termination message: `stage`, `ok`, `gate`, `metrics` (+ `error` when it blocks)."""
    gate = {**verdict.as_dict(), "summary": summary_path}
    out: dict[str, Any] = {
        "stage": "gate",
        "ok": verdict.passed,
        "gate": gate,
        "metrics": dict(verdict.metrics),
    }
    if verdict.blocks:
        out["error"] = {"reason": FAILED, "message": verdict.message}
    return out


__all__ = [
    "DEFAULT_MIN_LABEL_RETENTION",
    "DEFAULT_MIN_RETENTION",
    "EXIT_GATE_FAILED",
    "FAILED",
    "NOT_ENFORCED",
    "PASSED",
    "SummaryError",
    "Thresholds",
    "Verdict",
    "evaluate",
    "result_metrics",
    "termination_message",
]
