"""Pure pre-flight checks of a distillation run: resume compatibility, checkpoint choice, teacher stride,
leakage bookkeeping and label names."""

from __future__ import annotations

import copy

import pytest
from nnunet_distill import distill, evaluation


def test_resume_mismatches_name_each_changed_setting():
    saved = {
        "alpha": 0.3,
        "temperature": 3.0,
        "reduction_factor": 2,
        "teacher_folds": [0, 1],
        "teacher_folder": "/r/T",
        "block_strategy": None,
        "student_plans": "nnUNetPlans_r2",
    }
    assert distill.resume_mismatches(saved, dict(saved, teacher_folds=[1, 0])) == []  # order does not matter
    diffs = distill.resume_mismatches(saved, dict(saved, alpha=0.5, teacher_folds=[0, 1, 2], temperature=3.0))
    assert diffs == ["alpha 0.3 (this run: -a 0.5)", "teacher_folds [0, 1] (this run: -tf [0, 1, 2])"]
    assert distill.resume_mismatches(saved, dict(saved, reduction_factor=4))[0].startswith(
        "reduction_factor 2"
    )
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
    return {
        "plans_name": name,
        "configurations": {
            "3d_fullres": {
                "patch_size": patch,
                "data_identifier": "nnUNetPlans_3d_fullres",
                "architecture": {"arch_kwargs": {"strides": strides}},
            }
        },
    }


def test_teacher_must_accept_the_student_patch():
    teacher = _plans([64, 64, 64], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "T")
    distill.check_teacher_accepts_patch(
        teacher, _plans([96, 64, 32], [[1, 1, 1], [2, 2, 2]], "S"), "3d_fullres"
    )
    with pytest.raises(
        distill.DistillationError, match=r"not divisible by the teacher's total stride \[16, 16, 16\]"
    ):
        distill.check_teacher_accepts_patch(teacher, _plans([40, 48, 48], [[1, 1, 1]], "S"), "3d_fullres")
    inherited = copy.deepcopy(teacher)
    inherited["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres"}
    distill.check_teacher_accepts_patch(inherited, inherited, "3d_cascade_fullres")


def test_leakage_bookkeeping():
    splits = [
        {"train": ["b", "c", "d"], "val": ["a"]},
        {"train": ["a", "c", "d"], "val": ["b"]},
        {"train": ["a", "b", "d"], "val": ["c"]},
    ]
    assert evaluation.folds_that_trained_on(splits, [0, 1, 2], ["a"]) == [1, 2]
    assert evaluation.folds_that_trained_on(splits, [0], ["a"]) == []
    assert evaluation.folds_that_trained_on(splits, [0, 4], ["a"]) == [
        4
    ]  # unknown fold: cannot prove it is clean


def test_label_names_for_labels_and_regions():
    names = evaluation.label_names(
        {"labels": {"background": 0, "liver": 1, "tumor": 2, "vessel": 3}}, ["1", "2", "3"]
    )
    assert names == {"1": "liver", "2": "tumor", "3": "vessel"}
    regions = evaluation.label_names(
        {"labels": {"background": 0, "whole": [1, 2], "core": [2]}}, ["(1, 2)", "(2,)"]
    )
    assert regions == {"(1, 2)": "whole", "(2,)": "core"}


def test_a_fresh_run_over_an_existing_student_needs_overwrite(tmp_path):
    from nnunet_distill.config import DistillationConfig
    from nnunet_distill.distill import DistillationError, PreparedRun, resume_or_refuse

    fold = tmp_path / "nnUNetDistillationTrainer__nnUNetPlans_r2__2d" / "fold_0"

    def prepared(**flags) -> PreparedRun:
        config = DistillationConfig(dataset="901", fold=0, configuration="2d", **flags)
        return PreparedRun(config, "Dataset901_Synth", tmp_path, tmp_path, {}, {}, {}, {}, [], fold)

    logged: list[str] = []
    assert resume_or_refuse(prepared(), logged.append) is None and logged == []  # nothing there yet
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"trained")
    with pytest.raises(DistillationError, match="--overwrite") as refused:
        resume_or_refuse(prepared(), logged.append)
    assert str(fold) in str(refused.value) and "-c_continue" in str(refused.value)
    assert resume_or_refuse(prepared(overwrite=True), logged.append) is None
    assert logged and "replaced" in logged[-1]
    assert (fold / "checkpoint_final.pth").read_bytes() == b"trained"  # replaced only by the training itself
