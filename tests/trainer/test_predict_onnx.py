"""export -> verify -> package -> predict on the held-out cases; the ONNX predictor matches stock
nnUNetv2_predict."""

from __future__ import annotations

import json
import shutil
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
    _stock_predict(student, env, "nnUNetPlans_r2", stock)
    return {"root": root, "package": package, "static": static, "stock": stock}


def _stock_predict(student, env: dict[str, str], plans_identifier: str, out: Path) -> None:
    """Stock `nnUNetv2_predict` on the student's training folder: what every ONNX run must match."""
    done = support.run_cli(
        [
            support.console("nnUNetv2_predict"),
            "-i",
            str(student.dataset.raw_dataset / "imagesTs"),
            "-o",
            str(out),
            "-d",
            "901",
            "-c",
            "3d_fullres",
            "-tr",
            "nnUNetDistillationTrainer",
            "-p",
            plans_identifier,
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
    # both accumulate in nnU-Net's fp16 arrays, so a voxel may differ by the rounding those arrays allow;
    # on average the two are the same to well below that
    difference = np.abs(ours - theirs)
    largest = max(np.abs(ours).max(), np.abs(theirs).max())
    bound = np.broadcast_to(_fp16_accumulation_bound(stock, data, largest), difference.shape)
    worst = np.unravel_index(np.argmax(difference / bound), difference.shape)
    assert (difference <= bound).all(), (worst, difference[worst], bound[worst])
    assert difference.mean() < 1e-3
    assert (ours.argmax(0) == theirs.argmax(0)).mean() > 0.999


def _fp16_accumulation_bound(predictor, data, largest_logit: float):
    """Per voxel, how far two runs of nnU-Net's sliding window may drift apart when their networks agree to
    float32 rounding.

    nnU-Net sums Gaussian-weighted window logits and the weights in fp16 arrays, then divides. Each of the
    n windows over a voxel may round its addition one fp16 step differently (2**-10 relative, and 2**-24
    absolute where the sum is subnormal), and so may the division. At image borders only a window's corner
    covers a voxel, the weight sum W is tiny, and the absolute term divided by W dominates: a fixed
    tolerance failed CI there (0.20 at a border voxel) although both predictors were right. Windows may
    predict beyond the averaged maximum, hence the factor 2 on L.
    """
    import numpy as np
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    gaussian = compute_gaussian(
        patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")
    )
    weight = np.zeros(padded.shape[1:])
    windows = np.zeros(padded.shape[1:])
    for slicer in predictor._internal_get_sliding_window_slicers(padded.shape[1:]):
        weight[slicer[1:]] += gaussian.double().numpy()
        windows[slicer[1:]] += 1
    weight, windows = weight[revert[1:]], windows[revert[1:]]
    ulp, tiniest = 2.0**-10, 2.0**-24
    return (windows + 2) * ulp * 2 * largest_logit + 2 * windows * tiniest / weight + 1e-4 * largest_logit


def test_tampered_or_missing_model_is_refused(student, pipeline, tmp_path):
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


SMALL_PATCH_PLANS = "nnUNetSmallPatchPlans"


def _small_patch_student(student, results: Path) -> Path:
    """A second student beside the first in one results folder: the same weights under student plans of
    their own (`nnUNetSmallPatchPlans_r2`) with a 32³ patch, as a student distilled from other teacher plans
    would have. Its graph takes other shapes than the first's, so the wrong metadata cannot go unnoticed."""
    model_dir = (
        results
        / student.dataset.dataset_name
        / f"nnUNetDistillationTrainer__{SMALL_PATCH_PLANS}_r2__3d_fullres"
    )
    shutil.copytree(student.model_dir, model_dir, ignore=shutil.ignore_patterns("validation*", "*.png"))
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["plans_name"] = f"{SMALL_PATCH_PLANS}_r2"
    plans["configurations"]["3d_fullres"]["patch_size"] = [32, 32, 32]
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    return model_dir


def test_exports_of_two_students_in_one_folder_predict_with_their_own_metadata(student, pipeline, tmp_path):
    """Issue 11: every export into one folder shared one `nnunet_inference.json`, so predicting with the
    first export read the second's metadata and failed. Each graph now has its own, and both predict what
    stock nnU-Net predicts with their training folders."""
    results = tmp_path / "results"
    student.copy_to(results)
    _small_patch_student(student, results)
    env = {**student.env, "nnUNet_results": str(results)}
    out = tmp_path / "exports"
    for plans, name in (("nnUNetPlans", "p48"), (SMALL_PATCH_PLANS, "p32")):
        done = support.run_cli(
            [support.console("nnUNetv2_distillation_export_onnx"), "-d", "901", "-r", "2", "-p", plans]
            + ["-o", str(out / f"{name}.onnx")],
            env,
        )
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "p32.nnunet_inference.json",
        "p32.onnx",
        "p48.nnunet_inference.json",
        "p48.onnx",
    ]
    for name, patch, plans in (("p48", 48, "nnUNetPlans_r2"), ("p32", 32, f"{SMALL_PATCH_PLANS}_r2")):
        meta = json.loads((out / f"{name}.nnunet_inference.json").read_text())
        assert meta["patch_size"] == [patch] * 3 and meta["student"]["plans_identifier"] == plans
        assert meta["io"]["input_shape"] == [1, 1, patch, patch, patch]

    done = _predict(student, out / "p48.onnx", tmp_path / "p48")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_segmentations(pipeline["stock"], tmp_path / "p48")
    done = _predict(student, out / "p32.onnx", tmp_path / "p32")
    assert done.returncode == 0, done.stderr[-3000:]
    stock_small = tmp_path / "stock_p32"
    _stock_predict(student, env, f"{SMALL_PATCH_PLANS}_r2", stock_small)
    _assert_same_segmentations(stock_small, tmp_path / "p32")
    assert (
        json.loads((tmp_path / "p32" / "plans.json").read_text())["plans_name"] == f"{SMALL_PATCH_PLANS}_r2"
    )
