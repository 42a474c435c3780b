"""`nnunet-distill train-teacher`: stock nnU-Net teacher folds, budgets, continue, Indexed Jobs, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from nnunet_distill.cli.train_teacher import build_parser, main, pick_fold
from nnunet_distill.nnunet_env import NnUNetSetupError, Workspace
from nnunet_distill.synthetic import SyntheticSpec, write_dataset


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------- parsing


def test_contract_command_line_parses():
    args = build_parser().parse_args(
        [
            "-d",
            "901",
            "-c",
            "3d_fullres",
            "-f",
            "0",
            "-tr",
            "nnUNetTrainer",
            "-p",
            "nnUNetPlans",
            "-e",
            "2",
            "--iterations_per_epoch",
            "4",
            "--val_iterations",
            "2",
            "-device",
            "cpu",
            "--c",
        ]
    )
    assert (
        args.dataset,
        args.configuration,
        args.fold,
        args.trainer,
        args.plans,
        args.epochs,
        args.iterations_per_epoch,
        args.val_iterations,
        args.device,
        args.continue_training,
    ) == ("901", "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", 2, 4, 2, "cpu", True)
    defaults = build_parser().parse_args(["-d", "901", "--folds-by-index", "0", "1", "2"])
    assert defaults.folds_by_index == [0, 1, 2] and defaults.fold is None
    assert (
        defaults.configuration,
        defaults.trainer,
        defaults.plans,
        defaults.epochs,
        defaults.device,
        defaults.continue_training,
    ) == ("3d_fullres", "nnUNetTrainer", "nnUNetPlans", None, None, False)
    assert build_parser().parse_args(["-d", "1", "-f", "all"]).fold == "all"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-d", "901"], "one of the arguments -f/--fold --folds-by-index is required"),
        (["-d", "901", "-f", "0", "--folds-by-index", "0"], "not allowed with argument"),
        (["-d", "901", "-f", "-1"], "fold must be >= 0"),
        (["-d", "901", "-f", "0", "-e", "0"], "expected a positive integer"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_folds_by_index_picks_the_indexed_jobs_fold():
    assert pick_fold(3, None, {}) == 3
    assert pick_fold(None, [0, 2, 4], {"JOB_COMPLETION_INDEX": "1"}) == 2
    with pytest.raises(NnUNetSetupError, match="needs JOB_COMPLETION_INDEX"):
        pick_fold(None, [0, 1], {})
    with pytest.raises(NnUNetSetupError, match="outside --folds-by-index 0 1"):
        pick_fold(None, [0, 1], {"JOB_COMPLETION_INDEX": "2"})
    with pytest.raises(NnUNetSetupError, match="must be an integer"):
        pick_fold(None, [0, 1], {"JOB_COMPLETION_INDEX": "one"})


# --------------------------------------------------------------------------------------------- setup errors


@pytest.fixture()
def empty_workspace(tmp_path, monkeypatch) -> Workspace:
    workspace = Workspace(tmp_path).create()
    for var, folder in (
        ("nnUNet_raw", workspace.raw),
        ("nnUNet_preprocessed", workspace.preprocessed),
        ("nnUNet_results", workspace.results),
    ):
        monkeypatch.setenv(var, str(folder))
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    return workspace


def run_main(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nnunet-distill train-teacher: error: "), err
    return err


def test_unknown_dataset(empty_workspace, capsys):
    assert "dataset 999 not found in nnUNet_raw=" in run_main(capsys, ["-d", "999", "-f", "0"])


def test_unset_nnunet_folders(monkeypatch, capsys):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    assert "none of nnUNet_raw, nnUNet_preprocessed, nnUNet_results is set" in run_main(
        capsys, ["-d", "5", "-f", "0"]
    )


def test_missing_plans_name_the_command_to_run(empty_workspace, capsys):
    write_dataset(empty_workspace.raw, SyntheticSpec(dataset_id=5, name="Raw", cases=2, test_cases=0))
    err = run_main(capsys, ["-d", "5", "-f", "0"])
    assert "plans nnUNetPlans not found" in err
    assert "run nnUNetv2_plan_and_preprocess -d 5 -c 3d_fullres --verify_dataset_integrity" in err
    err = run_main(capsys, ["-d", "Dataset005_Raw", "-f", "0", "-p", "nnUNetResEncUNetLPlans"])
    assert "run nnUNetv2_plan_experiment -d 5 -pl nnUNetPlannerResEncL" in err


def test_folds_by_index_without_an_index(empty_workspace, capsys):
    assert "needs JOB_COMPLETION_INDEX" in run_main(capsys, ["-d", "5", "--folds-by-index", "0", "1"])


def test_configuration_and_preprocessed_data_are_checked(nnunet_dataset, monkeypatch, capsys):
    for var, value in nnunet_dataset.env.items():
        if var.startswith("nnUNet_"):
            monkeypatch.setenv(var, value)
    err = run_main(capsys, ["-d", "901", "-f", "0", "-c", "3d_lowres"])
    assert "configuration (-c) '3d_lowres' is not in nnUNetPlans.json" in err
    # 2d is planned but, with `-c 3d_fullres`, never preprocessed
    err = run_main(capsys, ["-d", "901", "-f", "0", "-c", "2d"])
    assert "run nnUNetv2_preprocess -d 901 -plans_name nnUNetPlans -c 2d" in err
    assert "trainer (-tr) 'NoSuchTrainer' not found" in run_main(
        capsys, ["-d", "901", "-f", "0", "-tr", "NoSuchTrainer", "-device", "cpu"]
    )
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    expected = (
        "does not exist" if torch.cuda.is_available() else "CUDA is not available here: use -device cpu"
    )
    assert expected in run_main(capsys, ["-d", "901", "-f", "0", "-device", device])
    assert "device 'gpu0' is not valid" in run_main(capsys, ["-d", "901", "-f", "0", "-device", "gpu0"])


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "nnUNet_raw": str(tmp_path),
        "nnUNet_preprocessed": str(tmp_path),
        "nnUNet_results": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_distill.cli.train_teacher", "-d", "77", "-f", "0"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "dataset 77 not found" in proc.stderr


# --------------------------------------------------------------------------------------------- real training


@pytest.mark.slow
def test_teacher_folds_are_normal_nnunet_models(nnunet_teachers):
    assert nnunet_teachers.folder.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (nnunet_teachers.folder / name).is_file()
    for fold in nnunet_teachers.folds:
        checkpoint = load_checkpoint(nnunet_teachers.checkpoint(fold))
        assert checkpoint["trainer_name"] == "nnUNetTrainer"
        assert checkpoint["current_epoch"] == 2  # -e 2 applied
        assert len(checkpoint["logging"]["train_losses"]) == 2
        assert checkpoint["init_args"]["fold"] == fold
        summary = json.loads(
            (nnunet_teachers.folder / f"fold_{fold}" / "validation" / "summary.json").read_text()
        )
        assert summary["foreground_mean"]["Dice"] > 0.1  # it learned something in 8 steps
        assert not (nnunet_teachers.folder / f"fold_{fold}" / "checkpoint_latest.pth").exists()
        progress = json.loads((nnunet_teachers.folder / f"fold_{fold}" / "progress.json").read_text())
        assert (
            progress["epoch"] == progress["totalEpochs"] == 2
        )  # the student's progress.json, for teachers too
    # the budget shows in nnU-Net's own training log
    log = next((nnunet_teachers.folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "2 epochs x 4 iterations (2 validation iterations), device cpu" in log


@pytest.mark.slow
def test_continue_resumes_from_the_checkpoint(nnunet_teachers, tmp_path):
    """`--c` with a larger -e trains on from the saved epoch instead of starting over (on a copy of fold
    0)."""
    source = nnunet_teachers.dataset
    workspace = Workspace(tmp_path).create()
    shutil.copytree(source.preprocessed_dataset, workspace.preprocessed / source.dataset_name)
    model = workspace.results / source.dataset_name / nnunet_teachers.folder.name
    shutil.copytree(nnunet_teachers.folder, model, ignore=shutil.ignore_patterns("fold_1"))
    before = load_checkpoint(model / "fold_0" / "checkpoint_final.pth")

    argv = [
        sys.executable,
        "-m",
        "nnunet_distill.cli.train_teacher",
        "-d",
        "901",
        "-f",
        "0",
        "-e",
        "3",
        "--iterations_per_epoch",
        "2",
        "--val_iterations",
        "1",
        "-device",
        "cpu",
        "--c",
    ]
    proc = subprocess.run(argv, env=workspace.env(), check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = load_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    assert after["current_epoch"] == 3
    assert after["logging"]["train_losses"][:2] == before["logging"]["train_losses"]
    assert len(after["logging"]["train_losses"]) == 3
    assert not torch.equal(
        next(iter(after["network_weights"].values())), next(iter(before["network_weights"].values()))
    )


@pytest.mark.slow
def test_resenc_teacher_trains_from_resenc_plans(resenc_teachers):
    assert resenc_teachers.folder.name == "nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres"
    plans = json.loads((resenc_teachers.folder / "plans.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    assert architecture["network_class_name"].endswith("ResidualEncoderUNet")
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 2
    checkpoint = load_checkpoint(resenc_teachers.checkpoint(0))
    assert any(".blocks." in key for key in checkpoint["network_weights"])  # residual blocks, not plain convs
    assert (resenc_teachers.folder / "fold_0" / "validation" / "summary.json").is_file()
