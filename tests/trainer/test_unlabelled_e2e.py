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
    require_ok(run_cli([*argv, "--labelled_share", "0.5"], env, log), log)
    fold = student / "fold_0"
    training_log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert (
        f"training split: {len(splits[0]['train'])} labelled cases + 1 unlabelled cases (--unlabelled_cases"
        in training_log
    )
    assert "--labelled_share 0.5: a training sample comes from a labelled case with probability 0.50" in (
        training_log
    )
    record = load_checkpoint(fold / "checkpoint_final.pth")["distillation"]
    assert record["unlabelled_cases"] == [case] and record["labelled_share"] == 0.5
    summary = json.loads((fold / "validation" / "distillation_summary.json").read_text())
    assert summary["distillation"]["unlabelled_cases"] == [case]
    assert summary["distillation"]["labelled_share"] == 0.5


def test_nnunet_loader_draws_labelled_cases_at_the_weighted_share(nnunet_dataset):
    """--labelled_share rests on nnU-Net's loader drawing uniformly from ``dataset.identifiers``: checked on
    nnU-Net's own dataset and loader, so an nnU-Net that samples otherwise fails here."""
    import numpy as np
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_distill import unlabelled
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = nnunet_dataset.preprocessed_dataset
    plans = PlansManager(load_json(str(preprocessed / "nnUNetPlans.json")))
    folder = str(preprocessed / plans.get_configuration("3d_fullres").data_identifier)
    dataset_class = infer_dataset_class(folder)
    keys = sorted(dataset_class.get_identifiers(folder))
    labelled, cases = keys[:1], keys[1:5]  # one "labelled" case beside four treated as unlabelled
    dataset = dataset_class(folder, labelled + cases)
    dataset.identifiers = unlabelled.weighted_identifiers(dataset.identifiers, cases, 0.5)
    patch = plans.get_configuration("3d_fullres").patch_size
    label_manager = plans.get_label_manager(load_json(str(preprocessed / "dataset.json")))
    loader = nnUNetDataLoader(dataset, 2, patch, patch, label_manager)
    np.random.seed(0)
    drawn = [k for _ in range(2000) for k in loader.get_indices()]
    share = sum(unlabelled.labelled_samples(drawn, cases)) / len(drawn)
    assert abs(share - 0.5) < 0.03, share  # the uniform draw would give 0.2
