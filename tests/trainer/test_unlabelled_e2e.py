"""`nnUNetv2_distillation_train --unlabelled_cases` end to end on real nnU-Net data and teachers: a case
that a teacher fold trains on is refused before anything is written; once out of every fold, it joins the
student's training split and the run records it in the checkpoint and the summary."""

from __future__ import annotations

import json
import os

import pytest

from tests.trainer.distill_helpers import (
    console_script,
    load_checkpoint,
    private_workspace,
    require_ok,
    run_cli,
)

pytestmark = pytest.mark.slow

STUDENT_FOLDER = "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"


def test_unlabelled_case_is_refused_in_a_teacher_fold_and_trained_on_outside_them(nnunet_teachers, tmp_path):
    ds = nnunet_teachers.dataset
    ws = private_workspace(nnunet_teachers, tmp_path / "ws")
    env = ws.env(dict(os.environ))
    log = tmp_path / "commands.log"
    splits_file = ws.preprocessed / ds.dataset_name / "splits_final.json"
    splits = json.loads(splits_file.read_text())
    case = splits[0]["val"][0]  # a fold-0 validation case: the student's split never holds it otherwise
    argv = [
        console_script("nnUNetv2_distillation_train"),
        *("-d", str(ds.dataset_id), "-f", "0", "-r", "2", "-d_device", "cpu", "-disable_mirroring"),
        *("-e", "1", "--iterations_per_epoch", "2", "--val_iterations", "1", "--unlabelled_cases", case),
    ]

    refused = run_cli(argv, env, log)
    assert refused.returncode != 0
    assert f"--unlabelled_cases names {case}, which fold 0 of {splits_file} trains or validates" in (
        refused.stderr + refused.stdout
    )
    student = ws.results / ds.dataset_name / STUDENT_FOLDER
    assert not student.exists()

    # the user takes it out of every fold (the teachers' split file) and gives it to the student unlabelled
    for split in splits:
        for part in ("train", "val"):
            split[part] = [c for c in split[part] if c != case]
    splits_file.write_text(json.dumps(splits))
    require_ok(run_cli(argv, env, log), log)
    fold = student / "fold_0"
    training_log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert (
        f"training split: {len(splits[0]['train'])} labelled cases + 1 unlabelled cases (--unlabelled_cases"
        in training_log
    )
    assert load_checkpoint(fold / "checkpoint_final.pth")["distillation"]["unlabelled_cases"] == [case]
    summary = json.loads((fold / "validation" / "distillation_summary.json").read_text())
    assert summary["distillation"]["unlabelled_cases"] == [case]
