"""2d and 3d_fullres students of one dataset at the same r coexist (issue 11, item 1).

Both students use one student plans file, `nnUNetPlans_r2.json`, that reduces every configuration, so the
second run neither refuses ("already exists with different plans") nor changes the first student's plans.
Each is trained by the real console script, exported to ONNX, and run by stock `nnUNetv2_predict` without
our package importable. The students live in their own nnUNet_results (the session's teacher folders are
linked into it) and their own copy of nnUNet_preprocessed, where the 2d data is made: so this module never
meets the students of other modules, and the session's dataset stays without 2d data (a train-teacher test
relies on that).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import TEACHER_BUDGET, TEACHER_PLANS, TEACHER_TRAINER, nnunet, python_module
from tests.trainer.distill_helpers import console_script, require_ok, run_cli, stock_predict

pytestmark = pytest.mark.slow

CONFIGURATIONS = ("2d", "3d_fullres")
BUDGET = ["-e", "1", "--iterations_per_epoch", "2", "--val_iterations", "1"]
STUDENT_PLANS = "nnUNetPlans_r2"


@dataclass
class Coexisting:
    dataset: object
    results: Path  # this module's nnUNet_results/<Dataset>
    preprocessed: Path  # this module's nnUNet_preprocessed/<Dataset>
    plans_after_first: dict  # nnUNetPlans_r2.json after the first (2d) student
    predictions: dict  # configuration -> folder of stock predictions
    exported: dict  # configuration -> model.onnx


def _folder(configuration: str) -> str:
    return f"nnUNetDistillationTrainer__{STUDENT_PLANS}__{configuration}"


@pytest.fixture(scope="module")
def coexisting(nnunet_teachers, tmp_path_factory) -> Coexisting:
    ds = nnunet_teachers.dataset
    tmp = tmp_path_factory.mktemp("configurations")
    log = tmp / "commands.log"
    results = tmp / "results" / ds.dataset_name
    results.mkdir(parents=True)
    preprocessed = tmp / "preprocessed" / ds.dataset_name
    shutil.copytree(ds.preprocessed_dataset, preprocessed, symlinks=True)
    env = {**ds.env, "nnUNet_results": str(results.parent), "nnUNet_preprocessed": str(preprocessed.parent)}
    # 2d data and one stock 2d teacher fold next to the session's 3d_fullres teachers
    preprocess_2d = nnunet("nnUNetv2_preprocess", "-d", str(ds.dataset_id), "-c", "2d", "-np", "1")
    require_ok(run_cli(preprocess_2d, {**env, "nnUNet_n_proc_DA": "1"}, log), log)
    (results / nnunet_teachers.folder.name).symlink_to(nnunet_teachers.folder)
    teacher_2d = python_module(
        "nnunet_distill.cli.train_teacher",
        *("-d", str(ds.dataset_id), "-c", "2d", "-f", "0", "-tr", TEACHER_TRAINER, "-p", TEACHER_PLANS),
        *TEACHER_BUDGET,
        *("-device", "cpu"),
    )
    require_ok(run_cli(teacher_2d, env, log), log)

    train = console_script("nnUNetv2_distillation_train")
    export = console_script("nnUNetv2_distillation_export_onnx")
    plans_path = preprocessed / f"{STUDENT_PLANS}.json"
    first_plans: dict = {}
    predictions, exported = {}, {}
    for configuration in CONFIGURATIONS:
        common = ["-d", str(ds.dataset_id), "-c", configuration, "-f", "0", "-r", "2"]
        require_ok(
            run_cli(
                [train, *common, "-tf", "0", "-d_device", "cpu", "-disable_mirroring", *BUDGET], env, log
            ),
            log,
        )
        if not first_plans:
            first_plans = json.loads(plans_path.read_text())
        require_ok(run_cli([export, *common], env, log), log)
        exported[configuration] = results / _folder(configuration) / "fold_0" / "model.onnx"
        out = tmp / f"predictions_{configuration}"
        stock_predict(
            tmp,
            env,
            log,
            ds.raw_dataset / "imagesTs",
            out,
            ds.dataset_id,
            "nnUNetDistillationTrainer",
            STUDENT_PLANS,
            0,
            configuration=configuration,
        )
        predictions[configuration] = out
    return Coexisting(ds, results, preprocessed, first_plans, predictions, exported)


def test_both_students_share_one_plans_file_that_reduces_every_configuration(coexisting):
    ds = coexisting.dataset
    teacher = ds.plans(TEACHER_PLANS)
    on_disk = json.loads((coexisting.preprocessed / f"{STUDENT_PLANS}.json").read_text())
    # the session's dataset was left as it was: no 2d data made there
    assert not (ds.preprocessed_dataset / f"{TEACHER_PLANS}_2d").exists()
    assert on_disk == coexisting.plans_after_first  # the second student left the first one's plans alone
    for configuration in CONFIGURATIONS:
        folder = coexisting.results / _folder(configuration)
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file(), configuration
        assert json.loads((folder / "plans.json").read_text()) == on_disk
        t_kw = teacher["configurations"][configuration]["architecture"]["arch_kwargs"]
        s_kw = on_disk["configurations"][configuration]["architecture"]["arch_kwargs"]
        assert s_kw["features_per_stage"] == [max(f // 2, 8) for f in t_kw["features_per_stage"]]


def test_both_students_export_and_run_in_stock_predict(coexisting):
    ds = coexisting.dataset
    images = sorted((ds.raw_dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert coexisting.exported["2d"] != coexisting.exported["3d_fullres"]
    for configuration in CONFIGURATIONS:
        assert coexisting.exported[configuration].is_file(), configuration
        segs = sorted(coexisting.predictions[configuration].glob("*.nii.gz"))
        assert [s.name for s in segs] == [i.name.replace("_0000.nii.gz", ".nii.gz") for i in images]
        for img, seg in zip(images, segs, strict=True):
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
            assert arr.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(img))).shape
            assert set(np.unique(arr)) <= {0, 1, 2, 3}
