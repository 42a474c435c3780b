"""The pure parts of the held-out evaluation: which cases are honest, retention, and the status figures."""

from __future__ import annotations

import pytest
from nnunet_distill.evaluation import (
    NO_HONEST_BASELINE,
    EvaluationError,
    check_unseen,
    dice_by_label,
    find_test_cases,
    folds_that_trained_on,
    label_rows,
    result_metrics,
    retention,
)

DATASET_JSON = {
    "channel_names": {"0": "CT", "1": "MR"},
    "file_ending": ".nii.gz",
    "labels": {"background": 0, "organ": 1, "lesion": 2},
}
SPLITS = [
    {"train": ["a", "b", "c"], "val": ["d"]},
    {"train": ["b", "c", "d"], "val": ["a"]},
    {"train": ["a", "c", "d"], "val": ["b"]},
]


def _case(root, split, name, channels=2, label=True):
    for c in range(channels):
        (root / f"images{split}" / f"{name}_{c:04d}.nii.gz").write_bytes(b"x")
    if label:
        (root / f"labels{split}" / f"{name}.nii.gz").write_bytes(b"x")


@pytest.fixture()
def raw(tmp_path):
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp_path / sub).mkdir()
    for name in ("a", "b", "c", "d"):
        _case(tmp_path, "Tr", name)
    _case(tmp_path, "Ts", "t1")
    _case(tmp_path, "Ts", "t0")
    _case(tmp_path, "Ts", "unlabelled", label=False)
    _case(tmp_path, "Ts", "one_channel", channels=1)
    return tmp_path


def test_default_test_set_is_every_labelled_imagesTs_case_with_all_channels(raw):
    cases = find_test_cases(raw, DATASET_JSON)
    assert [c.identifier for c in cases] == ["t0", "t1"]
    assert cases[0].images == (
        str(raw / "imagesTs" / "t0_0000.nii.gz"),
        str(raw / "imagesTs" / "t0_0001.nii.gz"),
    )
    assert cases[0].label == str(raw / "labelsTs" / "t0.nii.gz") and cases[0].source == "imagesTs"


def test_requested_cases_come_from_imagesTs_or_imagesTr_and_missing_ones_are_named(raw):
    cases = find_test_cases(raw, DATASET_JSON, ["t1", "d"])
    assert [(c.identifier, c.source) for c in cases] == [("t1", "imagesTs"), ("d", "imagesTr")]
    with pytest.raises(EvaluationError, match="--test_cases: unlabelled has no image \\+ label pair"):
        find_test_cases(raw, DATASET_JSON, ["unlabelled"])
    assert find_test_cases(raw / "nowhere", DATASET_JSON) == []


def test_training_cases_are_refused_when_the_student_or_a_teacher_trained_on_them(raw):
    d = find_test_cases(raw, DATASET_JSON, ["d"])
    with pytest.raises(EvaluationError, match="the student \\(fold 0\\) trains on d"):
        check_unseen(d, SPLITS, [0], 0, ["d"])
    with pytest.raises(EvaluationError, match=r"teacher fold\(s\) \[1, 2\] trained on"):
        check_unseen(d, SPLITS, [0, 1, 2], 0, SPLITS[0]["train"])
    check_unseen(d, SPLITS, [0], 0, SPLITS[0]["train"])  # only fold 0 (which held d out): honest
    assert folds_that_trained_on(SPLITS, [0, 1, 7], ["d"]) == [1, 7]  # a fold outside the split file counts


def test_retention_mean_per_label_and_worst():
    student = {"organ": 0.95, "lesion": 0.72}
    teacher = {"organ": 0.96, "lesion": 0.90}
    r = retention(student, teacher)
    assert r["mean"] == pytest.approx((0.95 + 0.72) / (0.96 + 0.90))
    assert r["per_label"] == pytest.approx({"organ": 0.95 / 0.96, "lesion": 0.8})
    assert (r["worst_label"], r["worst"]) == ("lesion", pytest.approx(0.8))
    assert r["undefined"] == []
    assert retention({"organ": 0.9, "lesion": None}, teacher) is None  # a missing figure: no ratio at all
    zero = retention(student, {"organ": 0.96, "lesion": 0.0})  # the ensemble never finds the lesion
    assert zero["undefined"] == ["lesion"] and zero["per_label"] == pytest.approx({"organ": 0.95 / 0.96})
    assert zero["worst_label"] == "organ" and zero["mean"] == pytest.approx((0.95 + 0.72) / 0.96)
    rows = label_rows(student, teacher, r)
    assert rows[1] == {
        "name": "lesion",
        "student_dice": 0.72,
        "teacher_dice": 0.90,
        "retention": pytest.approx(0.8),
    }


def test_dice_by_label_uses_names_and_drops_nan():
    summary = {"mean": {"1": {"Dice": 0.9}, "2": {"Dice": float("nan")}}}
    assert dice_by_label(summary, {"1": "organ", "2": "lesion"}) == {"organ": 0.9, "lesion": None}


def test_status_metrics_say_which_cases_and_folds_and_never_carry_a_missing_retention():
    summary = {
        "evaluation": "test_set",
        "cases": {"count": 6, "source": "imagesTs"},
        "student": {"mean_dice": 0.9},
        "teacher_ensemble": {"mean_dice": 0.92, "folds": [0, 1, 2]},
        "retention": {"mean": 0.978, "worst": 0.95, "worst_label": "lesion"},
    }
    assert result_metrics(summary) == {
        "finalDice": 0.9,
        "teacherDice": 0.92,
        "retention": 0.978,
        "worstLabelRetention": 0.95,
        "worstLabel": "lesion",
        "evaluatedOn": "test_set: 6 cases (imagesTs)",
        "teacherFolds": [0, 1, 2],
    }
    none = {
        "evaluation": NO_HONEST_BASELINE,
        "cases": {"count": 3},
        "student": {"mean_dice": 0.8},
        "teacher_ensemble": None,
        "retention": None,
    }
    assert result_metrics(none) == {"finalDice": 0.8}
