"""Honest student-vs-ensemble figures: held-out Dice per label, retention, and which cases and models made
them.

The only figure worth reporting as *retention* compares student and teacher ensemble on cases that none of
them trained on:

1. **A held-out test set** (the default whenever there is one): nnU-Net's own convention, ``imagesTs`` with
   labels in ``labelsTs`` beside them in ``$nnUNet_raw/<Dataset>``, or the cases named by ``--test_cases``.
   Both models go through nnU-Net's own predictor from the raw images (preprocessing, sliding window, Gaussian
   weighting, the same mirroring decision) and nnU-Net's own metric code (``compute_metrics_on_folder``). A
   ``--test_cases`` entry that lives in ``imagesTr`` is accepted only when ``splits_final.json`` proves that
   neither the student nor any teacher fold trained on it.
2. **No test set:** the student's validation cases, scored against an ensemble of only the teacher folds whose
   training split excludes them. In nnU-Net's 5-fold CV that is at most the student's own fold, so with
   ``-tf`` lacking it there is no honest teacher figure at all and no retention is reported.

An ensemble that includes folds trained on the scored cases is optimistic, and a ratio against it flatters
nobody in particular: it is simply not a measurement of retention, so it is never written as one. Every figure
records the case identifiers, the teacher folds and the checkpoint that produced it. The result goes to
``<student fold>/validation/distillation_summary.json``; the quality gate, the operator's status, Prometheus
and the model card read it from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_distill import contract
from nnunet_distill.gate import result_metrics  # noqa: F401 - status.metrics: one definition, in gate

#: Where the summary goes, beside nnU-Net's summary.json.
SUMMARY_NAME = contract.SUMMARY_NAME
SCHEMA_VERSION = contract.SUMMARY_SCHEMA_VERSION

TEST_SET = contract.SUMMARY_TEST_SET
VALIDATION_UNSEEN = contract.SUMMARY_VALIDATION_UNSEEN
NO_HONEST_BASELINE = contract.SUMMARY_NO_HONEST_BASELINE


class EvaluationError(ValueError):
    """The held-out evaluation cannot be done honestly as asked; the message names the flag or file to fix."""


@dataclass(frozen=True)
class HeldOutCase:
    identifier: str
    images: tuple[str, ...]
    label: str
    source: str  # "imagesTs" or "imagesTr"


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def folds_that_trained_on(
    splits: Sequence[dict], teacher_folds: Iterable[int], cases: Iterable[str]
) -> list[int]:
    """Teacher folds whose training split (in splits_final.json) contains any of ``cases``."""
    cases = set(cases)
    out = []
    for f in teacher_folds:
        if f >= len(splits) or cases & set(splits[f]["train"]):
            out.append(f)  # a fold outside the split file: we cannot prove it did not see them
    return out


def label_names(dataset_json: dict, keys: Iterable[str]) -> dict[str, str]:
    """summary.json keys ('1', '(1, 2)') -> label/region names from dataset.json."""
    by_key = {}
    for name, value in dataset_json.get("labels", {}).items():
        key = str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
        by_key[key] = name
    return {k: by_key.get(k, k) for k in keys}


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def dice_by_label(summary: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, float | None]:
    """nnU-Net summary.json -> {label name: mean Dice over cases}."""
    return {names.get(k, k): _finite((v or {}).get("Dice")) for k, v in (summary.get("mean") or {}).items()}


def mean_dice(dice: Mapping[str, float | None]) -> float | None:
    values = [v for v in dice.values() if v is not None]
    return sum(values) / len(values) if values and len(values) == len(dice) else None


def retention(
    student: Mapping[str, float | None], teacher: Mapping[str, float | None]
) -> dict[str, Any] | None:
    """Student / ensemble Dice: the mean over labels, per label, and the worst label. None if not computable.

    A label the ensemble itself never finds (Dice 0) has no ratio; it is listed in ``undefined`` and left out
    of the worst-label search, but still counts in both means. A missing student or teacher figure means no
    ratio.
    """
    if not teacher or any(student.get(k) is None or v is None for k, v in teacher.items()):
        return None
    s_mean, t_mean = mean_dice({k: student[k] for k in teacher}), mean_dice(teacher)
    if s_mean is None or not t_mean:
        return None
    per_label = {k: student[k] / t for k, t in teacher.items() if t > 0}
    undefined = [k for k, t in teacher.items() if not t > 0]
    worst = min(per_label, key=per_label.get) if per_label else None
    return {
        "mean": s_mean / t_mean,
        "per_label": per_label,
        "worst_label": worst,
        "worst": per_label[worst] if worst is not None else None,
        "undefined": undefined,
    }


def find_test_cases(
    raw_dataset: Path, dataset_json: Mapping[str, Any], requested: Sequence[str] | None = None
) -> list[HeldOutCase]:
    """Labelled held-out cases in nnU-Net's raw layout; ``requested`` may also name cases of imagesTr.

    Without ``requested``: every ``imagesTs`` case that has its label in ``labelsTs`` (unlabelled test images
    are ignored: they cannot be scored). With it: each identifier must exist, with its label, in
    imagesTs/labelsTs or imagesTr/labelsTr, or the error names what is missing.
    """
    ending = dataset_json.get("file_ending", ".nii.gz")
    channels = sorted(
        int(c) for c in (dataset_json.get("channel_names") or dataset_json.get("modality") or {"0": 0})
    )

    def case(identifier: str, split: str) -> HeldOutCase | None:
        images = tuple(
            str(raw_dataset / f"images{split}" / f"{identifier}_{c:04d}{ending}") for c in channels
        )
        label = raw_dataset / f"labels{split}" / f"{identifier}{ending}"
        if label.is_file() and all(Path(i).is_file() for i in images):
            return HeldOutCase(identifier, images, str(label), f"images{split}")
        return None

    if requested is None:
        folder = raw_dataset / "imagesTs"
        if not folder.is_dir():
            return []
        ids = sorted(
            {
                p.name[: -len(ending) - 5]
                for p in folder.iterdir()
                if p.name.endswith(ending) and len(p.name) > len(ending) + 5
            }
        )
        return [c for c in (case(i, "Ts") for i in ids) if c is not None]
    found = []
    for identifier in requested:
        c = case(identifier, "Ts") or case(identifier, "Tr")
        if c is None:
            raise EvaluationError(
                f"--test_cases: {identifier} has no image + label pair in {raw_dataset}/imagesTs+labelsTs or "
                f"imagesTr+labelsTr (expected {identifier}_0000{ending} and {identifier}{ending})"
            )
        found.append(c)
    return found


def check_unseen(
    cases: Sequence[HeldOutCase],
    splits: Sequence[dict],
    teacher_folds: Sequence[int],
    student_fold: int,
    student_training: Iterable[str],
) -> None:
    """Refuse imagesTr test cases that the student or a teacher fold trained on: they would flatter both."""
    training = [c.identifier for c in cases if c.source == "imagesTr"]
    if not training:
        return
    seen_by_student = sorted(set(training) & set(student_training))
    if seen_by_student:
        raise EvaluationError(
            f"--test_cases: the student (fold {student_fold}) trains on {', '.join(seen_by_student)}; "
            "a held-out case must be one no model trained on (use imagesTs cases)"
        )
    leaky = folds_that_trained_on(splits, teacher_folds, training)
    if leaky:
        raise EvaluationError(
            f"--test_cases: teacher fold(s) {leaky} trained on some of {', '.join(training)}; a "
            "held-out case must be one no teacher trained on (use imagesTs cases)"
        )


def label_rows(
    student: Mapping[str, float | None], teacher: Mapping[str, float | None], ret: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    per = (ret or {}).get("per_label") or {}
    return [
        {
            "name": name,
            "student_dice": student.get(name),
            "teacher_dice": teacher.get(name),
            "retention": per.get(name),
        }
        for name in teacher
    ]
