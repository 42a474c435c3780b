"""A tiny nnU-Net cascade distilled end to end (issue 11, item 1): 3d_lowres, then 3d_cascade_fullres.

The dataset (Dataset903_Cascade, 6 training + 2 test cases of 48^3) is planned by nnU-Net's own planner with
`-gpu_memory_target 0.04`: the 3d_fullres patch (24x24x20) is then under nnU-Net's `lowres_creation_threshold`
(25 % of the median image), so the plans get 3d_lowres (36^3 at 1.34 mm) with `next_stage` and
3d_cascade_fullres with `previous_stage`, as a large CT dataset's would. nnU-Net's cascade needs the lowres
segmentation of every case a cascade fold trains or validates on, which its final validation writes fold by
fold; a 2-fold splits_final.json (nnU-Net reads whatever folds the file holds) makes that 2 lowres folds
instead of 5. Everything runs through the real console scripts; the student cascade is then run by stock
`nnUNetv2_predict` (lowres, then cascade with `-prev_stage_predictions`) without our package importable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk

from tests.conftest import _new_dataset, nnunet, python_module
from tests.trainer.distill_helpers import console_script, load_checkpoint, run_cli, stock_predict

pytestmark = pytest.mark.slow

DATASET_ID = 903
BUDGET = ["-e", "1", "--iterations_per_epoch", "2", "--val_iterations", "1"]
LOWRES, CASCADE = "3d_lowres", "3d_cascade_fullres"
STUDENT_PLANS = "nnUNetPlans_r2"


def _student(configuration: str) -> str:
    return f"nnUNetDistillationTrainer__{STUDENT_PLANS}__{configuration}"


def _teacher(configuration: str) -> str:
    return f"nnUNetTrainer__nnUNetPlans__{configuration}"


@dataclass
class Cascade:
    dataset: object
    log: Path
    refused: object  # the cascade student's run before its lowres fold 1 existed
    predictions: dict  # configuration -> stock nnUNetv2_predict output folder
    onnx_file: Path


def _ok(proc, log: Path):
    assert proc.returncode == 0, (
        f"{proc.args[0]} failed ({proc.returncode}); see {log}:\n{proc.stderr[-3000:]}"
    )
    return proc


def _distill(ds, env, log, configuration: str, fold: int, teacher_folds: list[str]):
    argv = [console_script("nnUNetv2_distillation_train"), "-d", str(DATASET_ID), "-c", configuration]
    argv += ["-f", str(fold), "-tf", *teacher_folds, "-r", "2", "-d_device", "cpu", "-disable_mirroring"]
    return run_cli([*argv, *BUDGET], env, log)


def _teacher_fold(ds, configuration: str, fold: int) -> None:
    argv = ["-d", str(DATASET_ID), "-c", configuration, "-f", str(fold), "-tr", "nnUNetTrainer"]
    ds.run(
        python_module(
            "nnunet_distill.cli.train_teacher", *argv, "-p", "nnUNetPlans", *BUDGET, "-device", "cpu"
        )
    )


@pytest.fixture(scope="module")
def cascade(tmp_path_factory) -> Cascade:
    ds = _new_dataset(tmp_path_factory, DATASET_ID, "Cascade", "--cases", "6", "--test-cases", "2")
    plan = ["-d", str(DATASET_ID), "-c", LOWRES, "3d_fullres", "-gpu_memory_target", "0.04"]
    ds.run(nnunet("nnUNetv2_plan_and_preprocess", *plan, "-npfp", "1", "-np", "1", "1"), planning=True)
    cases = sorted(
        p.name[: -len(".b2nd")]
        for p in (ds.preprocessed_dataset / "nnUNetPlans_3d_fullres").glob("*.b2nd")
        if not p.name.endswith("_seg.b2nd")
    )
    assert len(cases) == 6
    splits = [{"train": cases[:3], "val": cases[3:]}, {"train": cases[3:], "val": cases[:3]}]
    (ds.preprocessed_dataset / "splits_final.json").write_text(json.dumps(splits))
    for fold in (0, 1):
        _teacher_fold(ds, LOWRES, fold)
    _teacher_fold(ds, CASCADE, 0)

    env, log = ds.env, ds.root / "cascade.log"
    _ok(_distill(ds, env, log, LOWRES, 0, ["0", "1"]), log)
    refused = _distill(ds, env, log, CASCADE, 0, ["0"])  # lowres fold 1 (cases[:3]) is still missing
    _ok(_distill(ds, env, log, LOWRES, 1, ["0", "1"]), log)
    _ok(_distill(ds, env, log, CASCADE, 0, ["0"]), log)

    predictions = {}
    images = ds.raw_dataset / "imagesTs"
    for configuration, extra in ((LOWRES, ()), (CASCADE, ("-prev_stage_predictions", None))):
        out = ds.root / f"stock_{configuration}"
        extra = tuple(str(predictions[LOWRES]) if e is None else e for e in extra)
        stock_predict(
            ds.root,
            env,
            log,
            images,
            out,
            DATASET_ID,
            "nnUNetDistillationTrainer",
            STUDENT_PLANS,
            0,
            configuration=configuration,
            extra=extra,
        )
        predictions[configuration] = out
    export = [console_script("nnUNetv2_distillation_export_onnx"), "-d", str(DATASET_ID), "-c", CASCADE]
    _ok(run_cli([*export, "-f", "0", "-r", "2"], env, log), log)
    onnx_file = ds.results_dataset / _student(CASCADE) / "fold_0" / "model.onnx"
    return Cascade(ds, log, refused, predictions, onnx_file)


def test_student_plans_keep_the_cascade_and_the_lowres_stage_feeds_it(cascade):
    ds = cascade.dataset
    teacher = ds.plans("nnUNetPlans")["configurations"]
    assert teacher[LOWRES]["next_stage"] == CASCADE  # nnU-Net's planner made a cascade
    student = ds.plans(STUDENT_PLANS)["configurations"]
    assert student[LOWRES]["next_stage"] == CASCADE
    assert student[CASCADE] == {"inherits_from": "3d_fullres", "previous_stage": LOWRES}
    t_kw, s_kw = (c[LOWRES]["architecture"]["arch_kwargs"] for c in (teacher, student))
    assert s_kw["features_per_stage"] == [max(f // 2, 8) for f in t_kw["features_per_stage"]]
    # the two lowres students' final validations wrote every case's segmentation for the cascade
    segs = ds.results_dataset / _student(LOWRES) / "predicted_next_stage" / CASCADE
    splits = json.loads((ds.preprocessed_dataset / "splits_final.json").read_text())
    assert {p.name.split(".")[0] for p in segs.iterdir()} >= set(splits[0]["train"] + splits[0]["val"])


def test_cascade_student_before_its_lowres_folds_is_refused(cascade):
    proc = cascade.refused
    assert proc.returncode != 0
    assert "fold(s) 1" in proc.stderr and "predicted_next_stage" in proc.stderr, proc.stderr[-2000:]
    assert "nnUNetv2_distillation_train" in proc.stderr and "-c 3d_lowres" in proc.stderr


def test_cascade_student_and_teachers_see_image_plus_one_hot_previous_stage(cascade):
    ds = cascade.dataset
    channels = 1 + len(ds.dataset_json()["labels"]) - 1  # CT + one channel per foreground label
    for folder in (_student(CASCADE), _teacher(CASCADE)):
        weights = load_checkpoint(ds.results_dataset / folder / "fold_0" / "checkpoint_final.pth")[
            "network_weights"
        ]
        first_conv = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 5)
        assert first_conv.shape[1] == channels, folder
    model = onnx.load(str(cascade.onnx_file))
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == channels


def test_held_out_summary_records_which_lowres_models_fed_each_cascade(cascade):
    ds = cascade.dataset
    summary = json.loads(
        (
            ds.results_dataset / _student(CASCADE) / "fold_0" / "validation" / "distillation_summary.json"
        ).read_text()
    )
    assert summary["evaluation"] == "test_set"
    previous = summary["previous_stage"]
    assert previous["configuration"] == LOWRES
    assert previous["student"]["model_folder"] == str(ds.results_dataset / _student(LOWRES))
    assert previous["student"]["folds"] == [0]
    assert previous["teacher_ensemble"]["model_folder"] == str(ds.results_dataset / _teacher(LOWRES))
    assert previous["teacher_ensemble"]["folds"] == [0]
    for who in ("student", "teacher_ensemble"):
        segs = sorted(Path(previous[who]["segmentations"]).glob("*.nii.gz"))
        assert [s.name for s in segs] == [f"{c}.nii.gz" for c in summary["cases"]["ids"]], who
        assert summary[who]["mean_dice"] is not None, who


def test_stock_predict_runs_the_student_cascade(cascade):
    ds = cascade.dataset
    images = sorted((ds.raw_dataset / "imagesTs").glob("*_0000.nii.gz"))
    for configuration in (LOWRES, CASCADE):
        segs = sorted(cascade.predictions[configuration].glob("*.nii.gz"))
        assert [s.name for s in segs] == [i.name.replace("_0000.nii.gz", ".nii.gz") for i in images]
        for img, seg in zip(images, segs, strict=True):
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
            assert arr.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(img))).shape
            assert set(np.unique(arr)) <= set(range(len(ds.dataset_json()["labels"])))
