"""export -> verify -> package -> predict on the held-out cases; the ONNX predictor matches stock
nnUNetv2_predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer import onnx_support as support

pytestmark = pytest.mark.slow
LABELS = (1, 2, 3)


@pytest.fixture(scope="module")
def student(nnunet_dataset, nnunet_teachers, tmp_path_factory) -> support.Student:
    return support.distilled_student(nnunet_dataset, nnunet_teachers, tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline(student, tmp_path_factory) -> dict[str, Path]:
    """The operator's stages as commands: export (-da, and a static file) -> package; then stock
    prediction."""
    root = tmp_path_factory.mktemp("predict")
    env = student.env
    dynamic, static = root / "export" / "student.onnx", root / "static" / "student.onnx"
    for argv in (["-da", "-o", str(dynamic)], ["-o", str(static)]):
        done = support.run_cli(
            [support.console("nnUNetv2_distillation_export_onnx"), "-d", "901", "-f", "0", "-r", "2", *argv],
            env,
        )
        assert done.returncode == 0, done.stderr
        assert "verified on" in done.stdout
    package = root / "package"
    done = support.run_cli(
        support.python_module("nnunet_distill.cli.package", "--onnx", str(dynamic), "-o", str(package)), env
    )
    assert done.returncode == 0, done.stderr
    stock = root / "stock"
    done = support.run_cli(
        [
            support.console("nnUNetv2_predict"),
            "-i",
            str(student.dataset.raw_dataset / "imagesTs"),
            "-o",
            str(stock),
            "-d",
            "901",
            "-c",
            "3d_fullres",
            "-tr",
            "nnUNetDistillationTrainer",
            "-p",
            "nnUNetPlans_r2",
            "-f",
            "0",
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
            "--disable_progress_bar",
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "package": package, "static": static, "stock": stock}


def _predict(student, model: Path, out: Path, *extra: str):
    return support.run_cli(
        [
            support.console("nnUNetv2_distillation_predict"),
            "-i",
            str(student.dataset.raw_dataset / "imagesTs"),
            "-o",
            str(out),
            "-m",
            str(model),
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
            "--disable_progress_bar",
            *extra,
        ],
        # only the package travels: no nnUNet_* folders are needed to predict
        {k: v for k, v in student.env.items() if not k.startswith("nnUNet_r") and k != "nnUNet_preprocessed"},
    )


def _assert_same_segmentations(reference: Path, candidate: Path) -> None:
    cases = sorted(p.name for p in reference.glob("*.nii.gz"))
    assert cases and cases == sorted(p.name for p in candidate.glob("*.nii.gz"))
    for case in cases:
        ref, got = support.read_segmentation(reference / case), support.read_segmentation(candidate / case)
        assert ref.shape == got.shape
        dice = support.dice_per_label(ref, got, LABELS)
        assert min(dice.values()) >= 0.999, (case, dice)
        assert (ref > 0).any()  # the comparison is not between two empty segmentations


def test_onnx_package_predicts_what_stock_nnunet_predicts(student, pipeline, tmp_path):
    out = tmp_path / "onnx"
    done = _predict(student, pipeline["package"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_segmentations(pipeline["stock"], out)
    # the output folder carries the plans/dataset.json reconstructed from the package, as nnU-Net writes them
    assert json.loads((out / "plans.json").read_text())["plans_name"] == "nnUNetPlans_r2"


def test_static_batch_graph_gives_the_same_segmentations(student, pipeline, tmp_path):
    """A fixed-shape file (no package, no batched mirroring) through the same predictor."""
    out = tmp_path / "onnx_static"
    done = _predict(student, pipeline["static"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_segmentations(pipeline["stock"], out)


def test_predictor_matches_in_process_on_logits(student, pipeline):
    """Sliding-window logits of the ONNX predictor equal stock nnU-Net's (in process, one preprocessed
    case)."""
    import numpy as np
    import torch
    from nnunet_distill.predict import OnnxRuntimePredictor
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    onnx_predictor = OnnxRuntimePredictor(device=torch.device("cpu"), allow_tqdm=False)
    onnx_predictor.initialize_from_package(pipeline["package"])
    stock = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(student.model_dir), (0,))
    image = min((student.dataset.raw_dataset / "imagesTs").glob("*_0000.nii.gz"))
    preprocessor = stock.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case(
        [str(image)], None, stock.plans_manager, stock.configuration_manager, stock.dataset_json
    )
    data = torch.from_numpy(data)
    ours = onnx_predictor.predict_logits_from_preprocessed_data(data).float().numpy()
    theirs = stock.predict_logits_from_preprocessed_data(data).float().numpy()
    assert ours.shape == theirs.shape
    # nnU-Net's sliding window accumulates Gaussian-weighted logits in fp16, so single voxels differ by a few
    # fp16 steps of the accumulator; on average the two are the same to well below that
    assert np.abs(ours - theirs).max() < 0.1
    assert np.abs(ours - theirs).mean() < 1e-3
    assert (ours.argmax(0) == theirs.argmax(0)).mean() > 0.999


def test_tampered_or_missing_model_is_refused(student, pipeline, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pipeline["package"], broken)
    model = next(broken.glob("*/1/model.onnx"))
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    done = _predict(student, broken, tmp_path / "out")
    assert done.returncode == 1 and "does not match the sha256" in done.stderr
    assert "Traceback" not in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _predict(student, empty, tmp_path / "out")
    assert done.returncode == 1 and "expected exactly one model" in done.stderr
