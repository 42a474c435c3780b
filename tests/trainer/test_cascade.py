"""The cascade's pure parts and checks (nnunet_distill.cascade): which lowres models feed a cascade, what is
refused before training, and that the student plans keep nnU-Net's cascade keys."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from nnunet_distill import cascade, student

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def _plans() -> dict:
    arch = {"network_class_name": PLAIN, "arch_kwargs": {"features_per_stage": [32, 64, 128]}}
    return {
        "plans_name": "nnUNetPlans",
        "configurations": {
            "3d_lowres": {"data_identifier": "nnUNetPlans_3d_lowres", "architecture": arch},
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "architecture": arch},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }


def test_student_plans_keep_nnunets_cascade_keys_and_reduce_the_lowres_stage() -> None:
    teacher = _plans()
    teacher["configurations"]["3d_lowres"]["next_stage"] = "3d_cascade_fullres"
    plans = student.derive_student_plans(teacher, "3d_cascade_fullres", 2)
    configurations = plans["configurations"]
    assert plans["plans_name"] == "nnUNetPlans_r2"
    assert configurations["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert configurations["3d_cascade_fullres"] == {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }
    assert configurations["3d_lowres"]["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64]
    assert cascade.previous_stage(plans, "3d_cascade_fullres") == "3d_lowres"
    assert cascade.previous_stage(plans, "3d_lowres") is None
    assert cascade.previous_stage(plans, "2d") is None


def test_the_previous_stage_lives_beside_the_cascade_under_the_same_trainer_and_plans(tmp_path: Path) -> None:
    folder = tmp_path / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_cascade_fullres"
    lowres = cascade.sibling_model_folder(folder, "3d_lowres")
    assert lowres == tmp_path / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_lowres"
    assert cascade.segs_folder(lowres, "3d_cascade_fullres") == lowres / "predicted_next_stage" / (
        "3d_cascade_fullres"
    )
    with pytest.raises(cascade.CascadeError, match="<trainer>__<plans>__<configuration>"):
        cascade.sibling_model_folder(tmp_path / "my_teachers", "3d_lowres")


def test_missing_cases_and_the_folds_that_validate_them() -> None:
    assert cascade.missing_cases(["a.b2nd", "b.npz", "c_seg.b2nd"], ["a", "b", "c", "d"]) == ["c", "d"]
    splits = [{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a", "b"]}]
    assert cascade.folds_validating(splits, ["c"]) == [0]
    assert cascade.folds_validating(splits, ["a", "d"]) == [0, 1]
    assert cascade.folds_validating(splits, []) == []
    present = ["fold_0/checkpoint_final.pth", "fold_1/checkpoint_latest.pth"]
    assert cascade.missing_folds(Path("x"), [0, 1, 2], present) == [1, 2]


def _lowres_student(root: Path, splits: list[dict], segmented: list[str], folds: list[int]) -> Path:
    lowres = root / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_lowres"
    segs = cascade.segs_folder(lowres, "3d_cascade_fullres")
    segs.mkdir(parents=True)
    for case in segmented:
        (segs / f"{case}.b2nd").write_bytes(b"")
    for fold in folds:
        (lowres / f"fold_{fold}").mkdir()
        (lowres / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
    return root / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_cascade_fullres"


SPLITS = [{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a", "b"]}]


def test_a_cascade_student_is_refused_until_its_lowres_folds_segmented_every_case(tmp_path: Path) -> None:
    folder = _lowres_student(tmp_path, SPLITS, ["c", "d"], [0])
    with pytest.raises(cascade.CascadeError) as err:
        cascade.check_student_previous_stage(folder, "3d_cascade_fullres", "3d_lowres", SPLITS, 0, "903")
    message = str(err.value)
    assert (
        "predicted_next_stage/3d_cascade_fullres lacks the 3d_lowres segmentations of 2 case(s) (a, b)"
        in message
    )
    assert "distill 3d_lowres on fold(s) 1 first" in message
    assert "nnUNetv2_distillation_train -d 903 -c 3d_lowres -f N" in message


def test_a_cascade_student_needs_its_own_lowres_fold_for_the_held_out_scoring(tmp_path: Path) -> None:
    folder = _lowres_student(tmp_path, SPLITS, ["a", "b", "c", "d"], [0])
    segs = cascade.check_student_previous_stage(folder, "3d_cascade_fullres", "3d_lowres", SPLITS, 0, "9")
    assert segs.name == "3d_cascade_fullres" and segs.is_dir()
    with pytest.raises(cascade.CascadeError, match=r"has no fold_1/checkpoint_final.pth.*fold\(s\) 1 first"):
        cascade.check_student_previous_stage(folder, "3d_cascade_fullres", "3d_lowres", SPLITS, 1, "9")
    with pytest.raises(cascade.CascadeError, match="splits_final.json has no fold 2"):
        cascade.check_student_previous_stage(folder, "3d_cascade_fullres", "3d_lowres", SPLITS, 2, "9")


def test_cascade_teachers_need_their_lowres_folds(tmp_path: Path) -> None:
    teachers = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
    lowres = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_lowres"
    with pytest.raises(cascade.CascadeError) as err:
        cascade.check_teacher_previous_stage(teachers, "3d_lowres", [0, 1], "903")
    assert f"{lowres} has no 3d_lowres teacher fold(s) 0, 1" in str(err.value)
    assert "nnunet-distill train-teacher -d 903 -c 3d_lowres -f N" in str(err.value)
    for fold in (0, 1):
        (lowres / f"fold_{fold}").mkdir(parents=True)
        (lowres / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
    assert cascade.check_teacher_previous_stage(teachers, "3d_lowres", [0, 1], "903") == lowres


def test_check_before_training_applies_to_cascades_only(tmp_path: Path) -> None:
    (tmp_path / "splits_final.json").write_text(json.dumps(SPLITS))
    folder = tmp_path / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_cascade_fullres"

    def run(configuration: str) -> SimpleNamespace:
        return SimpleNamespace(
            config=SimpleNamespace(configuration=configuration, fold=0),
            student_plans=_plans(),
            preprocessed_dir=tmp_path,
            dataset_name="Dataset903_Cascade",
            output_folder=folder / "fold_0",
            teacher_folder=tmp_path / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres",
            teacher_folds=[SimpleNamespace(fold=0)],
        )

    cascade.check_before_training(run("3d_fullres"))  # no previous stage: nothing to check
    with pytest.raises(cascade.CascadeError, match="nnUNetv2_distillation_train -d 903 -c 3d_lowres"):
        cascade.check_before_training(run("3d_cascade_fullres"))


def test_the_summary_names_the_models_that_made_each_previous_stage() -> None:
    record = cascade.previous_stage_record(
        "3d_lowres",
        (Path("/r/S__P_r2__3d_lowres"), [0], Path("/o/test_set/student_3d_lowres")),
        (Path("/r/T__P__3d_lowres"), (0, 1), Path("/o/test_set/teacher_ensemble_3d_lowres")),
        "how",
    )
    assert record == {
        "configuration": "3d_lowres",
        "student": {
            "model_folder": "/r/S__P_r2__3d_lowres",
            "folds": [0],
            "segmentations": "/o/test_set/student_3d_lowres",
        },
        "teacher_ensemble": {
            "model_folder": "/r/T__P__3d_lowres",
            "folds": [0, 1],
            "segmentations": "/o/test_set/teacher_ensemble_3d_lowres",
        },
        "how": "how",
    }


def test_the_previous_stage_is_appended_as_one_hot_channels_like_nnunet_does() -> None:
    data = np.zeros((1, 2, 2, 2), dtype=np.float32)
    seg_prev = np.array([[[0, 1], [2, 3]], [[3, 3], [0, 1]]], dtype=np.int16)
    stacked = cascade.with_previous_stage(data, seg_prev, [1, 2, 3])
    assert stacked.shape == (4, 2, 2, 2) and stacked.dtype == np.float32
    for channel, label in enumerate((1, 2, 3), start=1):
        assert np.array_equal(stacked[channel], (seg_prev == label).astype(np.float32))
