"""End to end on CPU with real nnU-Net: two trained teacher folds (session fixture) ->
nnUNetv2_distillation_train
for a tiny budget -> -c_continue (refused on a changed alpha, then resumed) -> validation summary -> stock
nnUNetv2_predict runs the student on the held-out test images without our package importable.

All command runs happen once in a module fixture; the tests only inspect what they produced."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.trainer.distill_helpers import console_script, load_checkpoint, require_ok, run_cli, stock_predict

pytestmark = pytest.mark.slow

BUDGET = ["-e", "2", "--iterations_per_epoch", "2", "--val_iterations", "1"]
BASE = [
    "-d",
    "901",
    "-f",
    "0",
    "-a",
    "0.3",
    "-temp",
    "3.0",
    "-r",
    "2",
    "-d_device",
    "cpu",
    "-disable_mirroring",
]
STUDENT_FOLDER = "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"


@dataclass
class StandardRun:
    teachers: object
    folder: Path  # .../nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres
    first: dict  # checkpoint_final.pth after the first run (2 epochs)
    first_stdout: str
    again: object  # CompletedProcess of a second fresh run (no -c_continue, no --overwrite)
    again_untouched: bool
    refused: object  # CompletedProcess of the -c_continue run with a changed alpha
    refused_untouched: bool
    resumed: dict  # checkpoint_final.pth after -c_continue -e 3
    resumed_stdout: str
    predictions: Path
    predict_stdout: str
    log: Path
    no_test_set_summary: Path  # a run whose nnUNet_raw has no imagesTs

    @property
    def fold(self) -> Path:
        return self.folder / "fold_0"


@pytest.fixture(scope="module")
def standard_run(nnunet_teachers, tmp_path_factory) -> StandardRun:
    ds = nnunet_teachers.dataset
    tmp = tmp_path_factory.mktemp("standard_distill")
    log = tmp / "commands.log"
    exe = console_script("nnUNetv2_distillation_train")
    first = require_ok(run_cli([exe, *BASE, *BUDGET], ds.env, log), log)
    folder = ds.results_dataset / STUDENT_FOLDER
    final = folder / "fold_0" / "checkpoint_final.pth"
    first_ckpt = load_checkpoint(final)
    stamp = final.stat().st_mtime_ns
    # a second fresh run over this student is refused before anything is loaded or written
    again = run_cli([exe, *BASE, *BUDGET], ds.env, log)
    again_untouched = final.stat().st_mtime_ns == stamp

    changed = [a if a != "0.3" else "0.5" for a in BASE]
    refused = run_cli([exe, *changed, "-e", "3", "-c_continue"], ds.env, log)
    untouched = final.stat().st_mtime_ns == stamp

    resumed = require_ok(
        run_cli(
            [exe, *BASE, "-e", "3", "--iterations_per_epoch", "2", "--val_iterations", "1", "-c_continue"],
            ds.env,
            log,
        ),
        log,
    )
    resumed_ckpt = load_checkpoint(final)

    out = tmp / "predictions"
    pred = stock_predict(
        tmp,
        ds.env,
        log,
        ds.raw_dataset / "imagesTs",
        out,
        ds.dataset_id,
        "nnUNetDistillationTrainer",
        "nnUNetPlans_r2",
        0,
    )
    # The same distillation where the raw dataset has no test set: only unseen teacher folds may be compared.
    results = tmp / "results_no_test_set" / ds.dataset_name
    results.mkdir(parents=True)
    (results / "nnUNetTrainer__nnUNetPlans__3d_fullres").symlink_to(nnunet_teachers.folder)
    (tmp / "empty_raw").mkdir()
    env = {**ds.env, "nnUNet_raw": str(tmp / "empty_raw"), "nnUNet_results": str(results.parent)}
    require_ok(
        run_cli([exe, *BASE, "-e", "1", "--iterations_per_epoch", "1", "--val_iterations", "1"], env, log),
        log,
    )
    no_test = results / STUDENT_FOLDER / "fold_0" / "validation" / "distillation_summary.json"
    return StandardRun(
        nnunet_teachers,
        folder,
        first_ckpt,
        first.stdout,
        again,
        again_untouched,
        refused,
        untouched,
        resumed_ckpt,
        resumed.stdout,
        out,
        pred.stdout,
        log,
        no_test,
    )


def test_student_folder_is_a_normal_nnunet_model_with_its_own_plans(standard_run):
    ds = standard_run.teachers.dataset
    plans = json.loads((standard_run.folder / "plans.json").read_text())
    teacher_plans = ds.plans("nnUNetPlans")
    assert plans["plans_name"] == "nnUNetPlans_r2"
    s_arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    t_arch = teacher_plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert s_arch["features_per_stage"] == [max(f // 2, 8) for f in t_arch["features_per_stage"]]
    assert (standard_run.folder / "dataset.json").is_file()
    assert (ds.preprocessed_dataset / "nnUNetPlans_r2.json").is_file()  # where nnU-Net's -p looks
    for name in (
        "checkpoint_final.pth",
        "checkpoint_best.pth",
        "progress.png",
        "progress.json",
        "validation/summary.json",
    ):
        assert (standard_run.fold / name).is_file(), name
    assert not (standard_run.fold / "checkpoint_latest.pth").exists()  # nnU-Net removes it after final
    assert not list(standard_run.fold.glob(".*.tmp")), "no half-written checkpoint may remain"


def test_checkpoint_is_stock_loadable_and_records_the_distillation(standard_run):
    ckpt = standard_run.first
    assert ckpt["trainer_name"] == "nnUNetTrainer"  # resolvable by nnU-Net's predictor without our package
    assert ckpt["init_args"]["configuration"] == "3d_fullres" and ckpt["init_args"]["fold"] == 0
    assert ckpt["current_epoch"] == 2
    d = ckpt["distillation"]
    assert (d["alpha"], d["temperature"], d["reduction_factor"]) == (0.3, 3.0, 2)
    assert d["teacher_folds"] == [0, 1] and d["trainer_class"] == "nnUNetDistillationTrainer"
    assert Path(d["teacher_folder"]) == standard_run.teachers.folder
    assert d["student_plans"] == "nnUNetPlans_r2" and d["teacher_plans"] == "nnUNetPlans"
    assert d["da5"] is False and d["block_strategy"] is None and d["disable_mirroring"] is True
    assert 0 < d["student_parameters"] < 0.26 * d["teacher_parameters"]


def test_every_epoch_logs_kd_hard_and_total_loss(standard_run):
    logging = standard_run.resumed["logging"]
    for key in ("train_losses", "train_kd_losses", "train_hard_losses", "val_losses", "mean_fg_dice"):
        assert len(logging[key]) == 3 and all(np.isfinite(v) for v in logging[key]), key
    for total, kd, hard in zip(
        logging["train_losses"], logging["train_kd_losses"], logging["train_hard_losses"], strict=False
    ):
        assert total == pytest.approx(0.7 * hard + 0.3 * kd, rel=1e-4, abs=1e-5)
    progress = json.loads((standard_run.fold / "progress.json").read_text())
    assert progress["epoch"] == progress["totalEpochs"] == 3
    assert progress["kdLoss"] == pytest.approx(logging["train_kd_losses"][-1])
    assert progress["pseudoDice"] == pytest.approx(logging["mean_fg_dice"][-1])
    log_text = "".join(p.read_text() for p in standard_run.fold.glob("training_log_*.txt"))
    assert log_text.count("train_loss_kd") == 3 and "mirroring TTA off" in log_text


def test_a_second_fresh_run_is_refused_and_names_the_flag_that_allows_it(standard_run):
    again = standard_run.again
    assert again.returncode == 1 and standard_run.again_untouched
    assert "already holds a trained student" in again.stderr and str(standard_run.fold) in again.stderr
    assert "--overwrite" in again.stderr and "-c_continue" in again.stderr
    assert again.stderr.strip().count("\n") == 0 and "Traceback" not in again.stderr


def test_continue_refuses_changed_alpha_then_resumes(standard_run):
    refused = standard_run.refused
    assert refused.returncode == 1 and standard_run.refused_untouched
    assert "-c_continue refused" in refused.stderr and "alpha 0.3 (this run: -a 0.5)" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr
    assert "resuming from" in standard_run.resumed_stdout
    assert standard_run.resumed["current_epoch"] == 3  # 2 epochs done + 1 more, not a fresh start
    assert len(standard_run.resumed["logging"]["lrs"]) == 3


def test_summary_scores_student_and_ensemble_on_the_held_out_test_set(standard_run):
    ds = standard_run.teachers.dataset
    summary = json.loads((standard_run.fold / "validation" / "distillation_summary.json").read_text())
    assert summary["schema_version"] == 2 and summary["evaluation"] == "test_set"
    test_ids = sorted(p.name[: -len(".nii.gz")] for p in (ds.raw_dataset / "labelsTs").glob("*.nii.gz"))
    assert summary["cases"]["ids"] == test_ids and summary["cases"]["source"] == "imagesTs"
    assert summary["teacher_ensemble"]["folds"] == [0, 1]  # the folds each figure came from
    assert summary["teacher_ensemble"]["checkpoint"] == "checkpoint_final.pth"
    assert summary["cases"]["mirroring_tta"] is False  # -disable_mirroring, for both models
    for who in ("student", "teacher_ensemble"):
        scored = json.loads((Path(summary[who]["predictions"]) / "summary.json").read_text())
        assert sorted(Path(c["prediction_file"]).name for c in scored["metric_per_case"]) == [
            f"{i}.nii.gz" for i in test_ids
        ]  # nnU-Net's metric code on exactly these cases
        assert summary[who]["dice"] == {
            "bright": pytest.approx(scored["mean"]["1"]["Dice"]),
            "dark": pytest.approx(scored["mean"]["2"]["Dice"]),
            "small": pytest.approx(scored["mean"]["3"]["Dice"]),
        }
    ret = summary["retention"]
    if ret is not None:
        assert ret["mean"] == pytest.approx(
            summary["student"]["mean_dice"] / summary["teacher_ensemble"]["mean_dice"]
        )
        assert ret["worst"] == min(ret["per_label"].values())
    assert summary["inference"]["speedup"] > 0 and summary["inference"]["student_seconds"] > 0
    # nnU-Net's own validation stays available, labelled as what it is (fold 1 trained on these cases)
    splits = json.loads((ds.preprocessed_dataset / "splits_final.json").read_text())
    assert summary["validation"]["cases"] == sorted(splits[0]["val"])
    assert summary["validation"]["teacher_folds_trained_on_these_cases"] == [1]
    assert "not a retention figure" in summary["validation"]["note"]


def test_without_a_test_set_only_unseen_teacher_folds_are_compared(standard_run):
    """No imagesTs: retention against teacher fold 0 alone (fold 1 trained on the student's validation
    cases)."""
    from nnunet_distill.evaluation import VALIDATION_UNSEEN

    text = (standard_run.fold / "validation" / "distillation_summary.json").read_text()
    assert VALIDATION_UNSEEN not in text  # this run had a test set; the unseen path is covered below
    summary = json.loads(standard_run.no_test_set_summary.read_text())
    assert summary["evaluation"] == VALIDATION_UNSEEN and summary["teacher_ensemble"]["folds"] == [0]
    assert "never trained on them" in summary["note"] and "folds [1] did" in summary["note"]
    splits = json.loads(
        (standard_run.teachers.dataset.preprocessed_dataset / "splits_final.json").read_text()
    )
    assert summary["cases"]["ids"] == sorted(splits[0]["val"])


def test_stock_predict_segments_the_held_out_test_images(standard_run):
    ds = standard_run.teachers.dataset
    assert "STOCK_PREDICT_OK" in standard_run.predict_stdout
    images = sorted((ds.raw_dataset / "imagesTs").glob("*_0000.nii.gz"))
    segs = sorted(standard_run.predictions.glob("*.nii.gz"))
    assert len(images) == len(segs) == 4
    for img, seg in zip(images, segs, strict=False):
        assert seg.name == img.name.replace("_0000.nii.gz", ".nii.gz")
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        assert arr.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(img))).shape
        assert set(np.unique(arr)) <= {0, 1, 2, 3}
