"""Both export CLIs on a real distilled student: verification, shapes, TensorRT graphs, metadata, clear
errors."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from nnunet_distill.cli import export as cli
from onnx import numpy_helper

from tests.trainer import onnx_support as support

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student(nnunet_dataset, nnunet_teachers, tmp_path_factory) -> support.Student:
    return support.distilled_student(nnunet_dataset, nnunet_teachers, tmp_path_factory)


@pytest.fixture()
def env(student, monkeypatch):
    for key, value in student.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    return student.env


@pytest.fixture(scope="module")
def torch_student(student):
    """The student as stock nnU-Net's predictor rebuilds it (independent of the exporter's own loading)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(student.model_dir), (support.STUDENT_FOLD,))
    return predictor.network.eval()


def _dims(value_info) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


def _props(model) -> dict:
    return {p.key: json.loads(p.value) for p in model.metadata_props}


def _run(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _torch(network, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return network(torch.from_numpy(x)).numpy()


def test_default_export_is_static_verified_and_self_describing(student, env, tmp_path, capsys, torch_student):
    out = tmp_path / "student.onnx"
    assert (
        cli.main_standard(["-d", str(student.dataset.dataset_id), "-f", "0", "-r", "2", "-v", "-o", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    # -v prints both numbers for every input, including a real preprocessed patch of the dataset
    assert "max|Δlogit|=" in printed and "segmentation agreement=" in printed
    assert "verify preprocessed:case_" in printed and "verify random#0" in printed

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    plans = json.loads((student.model_dir / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert _dims(model.graph.input[0]) == [1, 1, *cfg["patch_size"]]
    assert _dims(model.graph.output[0]) == [1, 4, *cfg["patch_size"]]

    meta = _props(model)
    assert json.loads((tmp_path / "student.nnunet_inference.json").read_text()) == meta
    assert meta["configuration"] == "3d_fullres" and meta["patch_size"] == cfg["patch_size"]
    assert meta["spacing"] == cfg["spacing"] and meta["normalization_schemes"] == cfg["normalization_schemes"]
    assert meta["transpose_forward"] == plans["transpose_forward"]
    assert meta["intensity_properties"] == plans["foreground_intensity_properties_per_channel"]
    assert meta["labels"] == {"background": 0, "bright": 1, "dark": 2, "small": 3}
    assert meta["channel_names"] == {"0": "CT"} and meta["mirror_axes"] == [0, 1, 2]
    assert meta["tile_step_size"] == 0.5
    d = meta["distillation"]
    assert (d["reduction_factor"], d["alpha"], d["temperature"]) == (2, support.ALPHA, support.TEMPERATURE)
    assert d["teacher_folds"] == list(student.teachers.folds) and d["student_plans"] == "nnUNetPlans_r2"
    fingerprint = student.model_dir / "dataset_fingerprint.json"
    assert meta["dataset_fingerprint_sha256"] == hashlib.sha256(fingerprint.read_bytes()).hexdigest()
    for package in ("torch", "nnunetv2", "onnx", "onnxruntime", "nnunet-distill"):
        assert meta["versions"][package] == importlib_metadata.version(package)
    assert meta["io"]["input_name"] == "input" and meta["io"]["output_name"] == "output"
    # the metrics come from the trainer's distillation_summary.json
    summary = json.loads((student.fold_dir / "validation" / "distillation_summary.json").read_text())
    assert meta["metrics"]["student_dice"] == summary["student"]["mean_dice"]
    assert meta["metrics"]["teacher_ensemble_dice"] == summary["teacher_ensemble"]["mean_dice"]
    assert (
        meta["metrics"]["evaluation"] == "test_set" and meta["metrics"]["case_ids"] == summary["cases"]["ids"]
    )
    assert meta["verification"]["real_patch_case"].startswith("case_")
    assert meta["verification"]["max_abs_diff"] < 1e-3

    # independent check: the file computes what stock nnU-Net's rebuilt student computes
    x = np.random.default_rng(7).standard_normal((1, 1, *cfg["patch_size"]), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _torch(torch_student, x), atol=1e-3, rtol=1e-3)


def test_dynamic_axes_graph_accepts_other_batch_and_spatial_sizes(student, env, tmp_path, torch_student):
    out = tmp_path / "dyn.onnx"
    assert (
        cli.main_standard(
            ["-d", student.dataset.dataset_name, "-f", "0", "-r", "2", "-da", "-sim", "-o", str(out)]
        )
        == 0
    )
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert _dims(model.graph.input[0]) == ["batch", 1, "x", "y", "z"]
    meta = _props(model)
    assert meta["io"]["dynamic_batch"] and meta["io"]["dynamic_spatial"] and meta["io"]["simplified"]
    assert meta["io"]["spatial_multiple_of"] == [8, 8, 8]
    assert len(meta["verification"]["inputs"]) == 4  # example, other batch, other size, real patch
    x = np.random.default_rng(3).standard_normal((2, 1, 64, 40, 56), dtype=np.float32)
    np.testing.assert_allclose(_run(out, x), _torch(torch_student, x), atol=1e-3, rtol=1e-3)


def test_nnunet_format_and_custom_shape(student, env, tmp_path):
    nn_out, is_out = tmp_path / "nn.onnx", tmp_path / "is.onnx"
    assert cli.main_standard(["-d", "901", "-r", "2", "-nn", "-o", str(nn_out)]) == 0
    assert _dims(onnx.load(str(nn_out)).graph.input[0]) == ["batch", 1, 48, 48, 48]
    assert (
        cli.main_standard(["-d", "901", "-r", "2", "-is", "2", "1", "32", "64", "48", "-o", str(is_out)]) == 0
    )
    model = onnx.load(str(is_out))
    assert _dims(model.graph.input[0]) == [2, 1, 32, 64, 48]
    assert _dims(model.graph.output[0]) == [2, 4, 32, 64, 48]


def test_resenc_cli_trt_graph_is_static_with_checkpoint_norm_weights(student, env, tmp_path):
    import torch
    from nnunet_distill.trt_graph import CONTROL_FLOW_OPS, TENSORRT_OPS, tensorrt_problems

    # the student was derived from plain nnUNetPlans (-spl default), as nnUNetv2_resenc_distillation_train
    # does, by nnUNetPlans teachers: -tpl names them, and with them the student's plans name
    assert (
        cli.main_resenc(
            ["-d", "901", "-f", "0", "-r", "2", "-tpl", "nnUNetPlans", "-fix", "-sim", "-o", str(tmp_path)]
        )
        == 0
    )
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert json.loads((tmp_path / "model.nnunet_inference.json").read_text()) == _props(model)
    for value in (*model.graph.input, *model.graph.output):
        assert all(isinstance(d, int) and d > 0 for d in _dims(value)), _dims(value)
    ops = {n.op_type for n in model.graph.node}
    assert ops <= TENSORRT_OPS and not ops & CONTROL_FLOW_OPS
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 17
    assert tensorrt_problems(model) == []

    state = torch.load(student.fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)[
        "network_weights"
    ]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    affine_layers = sum(1 for k in state if k.startswith("encoder.") and k.endswith(".norm.weight")) + sum(
        1 for k in state if k.startswith("decoder.stages.") and k.endswith(".norm.weight")
    )
    assert len(norms) == affine_layers > 0
    for node in norms:
        for name in node.input[1:3]:
            assert name in inits, f"{node.name}: {name} is not an initializer"
            key = name.removesuffix("__folded")
            np.testing.assert_array_equal(inits[name], state[key].numpy())  # the trained values, never zeros
    meta = _props(model)
    assert meta["io"]["tensorrt_ready"] and meta["verification"]["tensorrt"][
        "instance_norm_matched_to_checkpoint"
    ] == len(norms)


def test_resenc_cli_dynamic_batch_by_default(student, env, tmp_path):
    args = ["-d", "901", "-r", "2", "-tpl", "nnUNetPlans"]
    assert cli.main_resenc([*args, "-o", str(tmp_path)]) == 0
    assert _dims(onnx.load(str(tmp_path / "model.onnx")).graph.input[0]) == ["batch", 1, 48, 48, 48]
    assert cli.main_resenc([*args, "-b", "3", "-o", str(tmp_path / "b3")]) == 0
    assert _dims(onnx.load(str(tmp_path / "b3" / "model.onnx")).graph.input[0]) == [3, 1, 48, 48, 48]


def test_resenc_teacher_plans_flag_is_checked_against_the_student(student, env, tmp_path, capsys):
    """-p/-tpl names the teachers the student was distilled from, and they are part of the student's plans
    name: other teachers name another student (here none), never this one. (A folder of the right name whose
    checkpoint records other teachers is refused too: test_export_units.)"""
    args = ["-d", "901", "-r", "2", "-o", str(tmp_path)]
    for flags in (["-p", "nnUNetResEncUNetLPlans"], []):  # without the flag: the training CLI's default
        assert cli.main_resenc([*args, *flags]) == 1
        err = _error_line(capsys)
        assert "nnUNetResEncUNetLPlans_r2" in err and f"{support.STUDENT_FOLDER} (fold_0" in err, err
    assert list(tmp_path.iterdir()) == []
    assert cli.main_resenc([*args, "-tpl", "nnUNetPlans"]) == 0
    assert _props(onnx.load(str(tmp_path / "model.onnx")))["distillation"]["teacher_plans"] == "nnUNetPlans"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_student_lists_what_exists(student, env, tmp_path, capsys):
    assert cli.main_standard(["-d", "901", "-f", "0", "-r", "4", "-o", str(tmp_path / "x.onnx")]) == 1
    err = _error_line(capsys)
    assert "nnUNetPlans_r4" in err and f"{support.STUDENT_FOLDER} (fold_0: checkpoint_final.pth" in err
    assert cli.main_standard(["-d", "901", "-f", "3", "-r", "2", "-da5", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "nnUNetDistillationTrainerDA5" in _error_line(capsys)
    assert cli.main_standard(["-d", "907", "-r", "2"]) == 1
    assert "Dataset901_Synth" in _error_line(capsys)
    assert not (tmp_path / "x.onnx").exists()


def test_corrupted_or_missing_checkpoint_is_a_clear_error(student, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    fold_dir = student.copy_to(results)
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(student.dataset.preprocessed))
    checkpoint = fold_dir / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])  # a truncated upload
    assert cli.main_standard(["-d", "901", "-r", "2", "-o", str(tmp_path / "m.onnx")]) == 1
    err = _error_line(capsys)
    assert "checkpoint unreadable (corrupted or truncated?)" in err and str(checkpoint) in err

    checkpoint.unlink()  # missing: say which checkpoints the fold does have
    assert cli.main_standard(["-d", "901", "-r", "2", "-o", str(tmp_path / "m.onnx")]) == 1
    assert "fold_0: checkpoint_best.pth" in _error_line(capsys)
    assert (
        cli.main_standard(
            ["-d", "901", "-r", "2", "-chk", "checkpoint_best.pth", "-o", str(tmp_path / "m.onnx")]
        )
        == 0
    )
    capsys.readouterr()

    import torch  # weights of another network: strict loading refuses them

    best = torch.load(fold_dir / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    best["network_weights"] = {
        k: v for k, v in best["network_weights"].items() if "decoder.seg_layers" not in k
    }
    torch.save(best, fold_dir / "checkpoint_final.pth")
    assert cli.main_standard(["-d", "901", "-r", "2", "-o", str(tmp_path / "m2.onnx")]) == 1
    assert "does not fit the network" in _error_line(capsys)
    assert not (tmp_path / "m2.onnx").exists()


def test_a_graph_that_disagrees_with_torch_fails_the_export(student, env, tmp_path, monkeypatch, capsys):
    """The verification gate is real: a wrong graph exits non-zero and writes nothing."""
    from nnunet_distill import export as exporter

    real_export = exporter.export_graph

    def broken_export(*args, **kwargs):
        model = real_export(*args, **kwargs)
        conv = next(t for t in model.graph.initializer if t.name.endswith("seg_layers.2.weight"))
        conv.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv) * 1.5, conv.name))
        return model

    monkeypatch.setattr(exporter, "export_graph", broken_export)
    out = tmp_path / "bad.onnx"
    assert cli.main_standard(["-d", "901", "-r", "2", "-o", str(out)]) == 1
    err = _error_line(capsys)
    assert "differs from the torch student" in err and "max|Δlogit|" in err
    assert list(tmp_path.iterdir()) == []  # neither the graph nor its metadata


def test_usage_errors_exit_2(capsys):
    for argv in (
        ["-d", "1", "-r", "2", "-nn", "-da"],
        ["-d", "1", "-r", "2", "-fix", "-da"],
        ["-d", "1", "-r", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main_standard(argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main_resenc(["-d", "1", "-r", "2", "-b", "-1"])
    assert "-b must be >= 0" in capsys.readouterr().err


def test_parsers_accept_every_seed_flag():
    std = cli.build_parser_standard().parse_args(
        [
            "-d",
            "1",
            "-f",
            "0",
            "-r",
            "2",
            "-o",
            "x.onnx",
            "-v",
            "-da",
            "-is",
            "1",
            "1",
            "64",
            "64",
            "64",
            "-da5",
            "-sim",
            "-c",
            "3d_fullres",
            "-p",
            "nnUNetPlans",
            "--trt",
        ]
    )
    assert std.dynamic_axes and std.input_shape == [1, 1, 64, 64, 64] and std.use_da5 and std.simplify
    assert cli.build_parser_standard().parse_args(["-d", "1", "-r", "2", "-nn"]).nnunet_format
    res = cli.build_parser_resenc().parse_args(
        [
            "-d",
            "1",
            "-f",
            "0",
            "-r",
            "2",
            "-o",
            "dir",
            "-v",
            "-spl",
            "nnUNetResEncUNetMPlans",
            "-b",
            "1",
            "-fix",
            "-p",
            "nnUNetResEncUNetLPlans",
            "-da5",
            "-sim",
            "-bs",
            "adaptive",
        ]
    )
    assert (
        res.trt and res.batch_size == 1 and res.block_strategy == "adaptive" and res.output_dir == Path("dir")
    )
    request = cli.request_resenc(res, cli.build_parser_resenc())
    # the teacher plans (-p) are part of the student's name: a student of L teachers with an M base
    assert (
        request.plans_identifier == "nnUNetResEncUNetLPlans_r2_nnUNetResEncUNetMPlans_bsadaptive"
        and request.use_da5
    )
    assert request.teacher_plans == "nnUNetResEncUNetLPlans" and not request.dynamic_batch
