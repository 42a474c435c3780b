"""Pure pre-flight checks of a distillation run: resume compatibility, checkpoint choice, teacher stride,
leakage bookkeeping and the retention table."""

from __future__ import annotations

import copy

import pytest
from nnunet_distill import distill, evaluation


def test_resume_mismatches_name_each_changed_setting():
    saved = {"alpha": 0.3, "temperature": 3.0, "reduction_factor": 2, "teacher_folds": [0, 1],
             "teacher_folder": "/r/T", "block_strategy": None, "student_plans": "nnUNetPlans_r2"}
    assert distill.resume_mismatches(saved, dict(saved, teacher_folds=[1, 0])) == []  # order does not matter
    diffs = distill.resume_mismatches(saved, dict(saved, alpha=0.5, teacher_folds=[0, 1, 2], temperature=3.0))
    assert diffs == ["alpha 0.3 (this run: -a 0.5)", "teacher_folds [0, 1] (this run: -tf [0, 1, 2])"]
    assert distill.resume_mismatches(saved, dict(saved, reduction_factor=4))[0].startswith("reduction_factor 2")
    assert "-t" in distill.resume_mismatches(saved, dict(saved, teacher_folder="/other"))[0]


def test_pick_resume_checkpoint_prefers_latest(tmp_path):
    assert distill.pick_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint_final.pth").write_bytes(b"x")
    assert distill.pick_resume_checkpoint(tmp_path).name == "checkpoint_final.pth"
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"x")  # a later run with a larger -e crashed mid-way
    assert distill.pick_resume_checkpoint(tmp_path).name == "checkpoint_latest.pth"
    (tmp_path / "checkpoint_best.pth").write_bytes(b"x")
    assert distill.pick_resume_checkpoint(tmp_path).name == "checkpoint_latest.pth"


def _plans(patch, strides, name):
    return {"plans_name": name, "configurations": {"3d_fullres": {
        "patch_size": patch, "data_identifier": "nnUNetPlans_3d_fullres",
        "architecture": {"arch_kwargs": {"strides": strides}}}}}


def test_teacher_must_accept_the_student_patch():
    teacher = _plans([64, 64, 64], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "T")
    distill.check_teacher_accepts_patch(teacher, _plans([96, 64, 32], [[1, 1, 1], [2, 2, 2]], "S"), "3d_fullres")
    with pytest.raises(distill.DistillationError, match=r"not divisible by the teacher's total stride \[16, 16, 16\]"):
        distill.check_teacher_accepts_patch(teacher, _plans([40, 48, 48], [[1, 1, 1]], "S"), "3d_fullres")
    inherited = copy.deepcopy(teacher)
    inherited["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres"}
    distill.check_teacher_accepts_patch(inherited, inherited, "3d_cascade_fullres")


def test_leakage_bookkeeping():
    splits = [{"train": ["b", "c", "d"], "val": ["a"]}, {"train": ["a", "c", "d"], "val": ["b"]},
              {"train": ["a", "b", "d"], "val": ["c"]}]
    assert evaluation.folds_that_trained_on(splits, [0, 1, 2], ["a"]) == [1, 2]
    assert evaluation.folds_that_trained_on(splits, [0], ["a"]) == []
    assert evaluation.folds_that_trained_on(splits, [0, 4], ["a"]) == [4]  # unknown fold: cannot prove it is clean


def test_retention_table_and_names():
    student = {"mean": {"1": {"Dice": 0.8}, "2": {"Dice": 0.3}, "3": {"Dice": float("nan")}},
               "foreground_mean": {"Dice": 0.55}}
    teacher = {"mean": {"1": {"Dice": 0.9}, "2": {"Dice": 0.0}, "3": {"Dice": 0.5}}, "foreground_mean": {"Dice": 0.6}}
    names = evaluation.label_names({"labels": {"background": 0, "liver": 1, "tumor": 2, "vessel": 3}}, ["1", "2", "3"])
    table = evaluation.retention_table(student, teacher, names)
    assert table["1"] == {"name": "liver", "student_dice": 0.8, "teacher_dice": 0.9, "retention": pytest.approx(0.8 / 0.9)}
    assert table["2"]["retention"] is None  # teacher Dice 0: no ratio rather than inf
    assert table["3"]["student_dice"] is None and table["3"]["retention"] is None
    fg = evaluation.foreground_row(student, teacher, unseen=teacher)
    assert fg["retention"] == pytest.approx(0.55 / 0.6) and fg["retention_vs_unseen"] == pytest.approx(0.55 / 0.6)
    regions = evaluation.label_names({"labels": {"background": 0, "whole": [1, 2], "core": [2]}}, ["(1, 2)", "(2,)"])
    assert regions == {"(1, 2)": "whole", "(2,)": "core"}
