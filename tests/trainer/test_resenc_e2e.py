"""ResEnc distillation end to end on CPU with real nnU-Net: a tiny ResEnc M teacher (session fixture)
distilled
into (a) a plain U-Net student and (b) a ResEnc student with -bs reduce, which is then continued from its
checkpoint and run by stock nnUNetv2_predict without our package importable. Same code path as the standard
command; only the flags differ."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.trainer.distill_helpers import console_script, load_checkpoint, require_ok, run_cli, stock_predict

pytestmark = pytest.mark.slow

TEACHER_PLANS = "nnUNetResEncUNetMPlans"
BUDGET = [
    "-r",
    "2",
    "--iterations_per_epoch",
    "2",
    "--val_iterations",
    "1",
    "-d_device",
    "cpu",
    "-disable_mirroring",
]
PLAIN_FOLDER = "nnUNetDistillationTrainer__nnUNetResEncUNetMPlans_r2__3d_fullres"
STANDARD_STUDENT_FOLDER = "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"
RESENC_PLANS = "nnUNetResEncUNetMPlans_r2_nnUNetResEncUNetMPlans_bsreduce"
RESENC_FOLDER = f"nnUNetDistillationTrainer__{RESENC_PLANS}__3d_fullres"


@dataclass
class ResEncRun:
    teachers: object
    plain: dict  # checkpoint of (a), fold 1
    resenc_first: dict  # checkpoint of (b) after 1 epoch
    resenc_resumed: dict  # after -c_continue -e 2
    resumed_stdout: str
    predictions: Path
    predict_stdout: str


@pytest.fixture(scope="module")
def resenc_run(resenc_teachers, tmp_path_factory) -> ResEncRun:
    ds = resenc_teachers.dataset
    tmp = tmp_path_factory.mktemp("resenc_distill")
    log = tmp / "commands.log"
    exe = console_script("nnUNetv2_resenc_distillation_train")
    # (a) plain student (-spl defaults to nnUNetPlans) on fold 1
    require_ok(
        run_cli([exe, "-d", "901", "-f", "1", "-tpl", TEACHER_PLANS, "-e", "1", *BUDGET], ds.env, log), log
    )
    plain = load_checkpoint(ds.results_dataset / PLAIN_FOLDER / "fold_1" / "checkpoint_final.pth")
    # (b) ResEnc student with halved residual blocks, then continued
    resenc_args = [
        "-d",
        "901",
        "-f",
        "0",
        "-tpl",
        TEACHER_PLANS,
        "-spl",
        TEACHER_PLANS,
        "-bs",
        "reduce",
        *BUDGET,
    ]
    require_ok(run_cli([exe, *resenc_args, "-e", "1"], ds.env, log), log)
    final = ds.results_dataset / RESENC_FOLDER / "fold_0" / "checkpoint_final.pth"
    first = load_checkpoint(final)
    resumed = require_ok(run_cli([exe, *resenc_args, "-e", "2", "-c_continue"], ds.env, log), log)
    out = tmp / "predictions"
    pred = stock_predict(
        tmp,
        ds.env,
        log,
        ds.raw_dataset / "imagesTs",
        out,
        ds.dataset_id,
        "nnUNetDistillationTrainer",
        RESENC_PLANS,
        0,
    )
    return ResEncRun(resenc_teachers, plain, first, load_checkpoint(final), resumed.stdout, out, pred.stdout)


def _arch(plans: dict) -> dict:
    return plans["configurations"]["3d_fullres"]["architecture"]


def test_plain_student_from_resenc_teacher(resenc_run):
    ds = resenc_run.teachers.dataset
    plans = json.loads((ds.results_dataset / PLAIN_FOLDER / "plans.json").read_text())
    # a plain student of ResEnc teachers is named for its teachers: it never shares the folder (or the
    # plans file) of a plain student of nnUNetPlans teachers, nnUNetPlans_r2
    assert plans["plans_name"] == "nnUNetResEncUNetMPlans_r2" and PLAIN_FOLDER != STANDARD_STUDENT_FOLDER
    assert plans["distillation"]["teacher_plans"] == TEACHER_PLANS
    arch = _arch(plans)
    assert arch["network_class_name"].endswith("PlainConvUNet")
    base = _arch(ds.plans("nnUNetPlans"))["arch_kwargs"]["features_per_stage"]
    assert arch["arch_kwargs"]["features_per_stage"] == [max(f // 2, 8) for f in base]
    d = resenc_run.plain["distillation"]
    assert (
        d["teacher_plans"] == TEACHER_PLANS
        and d["variant"] == "resenc"
        and d["student_base_plans"] == "nnUNetPlans"
    )
    assert resenc_run.plain["trainer_name"] == "nnUNetTrainer"
    summary = json.loads(
        (
            ds.results_dataset / PLAIN_FOLDER / "fold_1" / "validation" / "distillation_summary.json"
        ).read_text()
    )
    # The only teacher (fold 0) trained on fold 1's validation cases: the summary says so, and the figures it
    # reports as retention come from the held-out test set, which no model trained on.
    assert summary["validation"]["teacher_folds_trained_on_these_cases"] == [0]
    assert summary["evaluation"] == "test_set" and summary["teacher_ensemble"]["folds"] == [0]
    # A plain student cannot inherit a ResEnc teacher's weights: it starts from nnU-Net's initialisation.
    assert d["student_init"] == "teacher" and d["init_teacher_fold"] is None


def test_resenc_student_with_reduced_blocks(resenc_run):
    ds = resenc_run.teachers.dataset
    plans = json.loads((ds.results_dataset / RESENC_FOLDER / "plans.json").read_text())
    arch, teacher = _arch(plans), _arch(ds.plans(TEACHER_PLANS))
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    t_blocks = teacher["arch_kwargs"]["n_blocks_per_stage"]
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == [max(n // 2, 1) for n in t_blocks]
    assert arch["arch_kwargs"]["features_per_stage"] == [
        max(f // 2, 8) for f in teacher["arch_kwargs"]["features_per_stage"]
    ]
    d = resenc_run.resenc_first["distillation"]
    assert d["block_strategy"] == "reduce" and d["student_plans"] == RESENC_PLANS
    assert d["student_parameters"] < 0.26 * d["teacher_parameters"]


def test_resenc_student_continues_from_its_checkpoint(resenc_run):
    assert resenc_run.resenc_first["current_epoch"] == 1
    assert resenc_run.resenc_resumed["current_epoch"] == 2
    assert "resuming from" in resenc_run.resumed_stdout
    assert len(resenc_run.resenc_resumed["logging"]["train_kd_losses"]) == 2


def test_stock_predict_runs_the_resenc_student(resenc_run):
    assert "STOCK_PREDICT_OK" in resenc_run.predict_stdout
    assert len(list(resenc_run.predictions.glob("*.nii.gz"))) == 4
