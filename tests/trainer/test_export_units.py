"""Pure parts of the exporter: shapes, metadata, verification arithmetic, TensorRT graph checks (no
training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from nnunet_distill import contract
from nnunet_distill import metadata as md
from nnunet_distill.export import ExportError, ShapeSpec, resolve_shape, verification_shapes
from nnunet_distill.trt_graph import (
    TensorRTGraphError,
    fold_instance_norm_constants,
    instance_norm_weight_check,
    tensorrt_problems,
)
from nnunet_distill.verify import (
    Tolerance,
    VerificationError,
    compare,
    crop_or_pad,
    segmentation_agreement,
    verify,
)
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------- shapes


def test_default_shape_is_static_patch_with_model_channels():
    spec = resolve_shape(2, [48, 64, 32], [8, 8, 4])
    assert spec == ShapeSpec((1, 2, 48, 64, 32), dynamic_batch=False, dynamic_spatial=False)
    assert spec.static


def test_dynamic_axes_mean_batch_and_spatial():
    spec = resolve_shape(1, [48, 48, 48], [8, 8, 8], dynamic=True)
    assert spec.dynamic_batch and spec.dynamic_spatial and not spec.static
    # verification exercises another batch size and another spatial size (a multiple of the stride)
    assert verification_shapes(spec, [8, 8, 8]) == [
        (1, 1, 48, 48, 48),
        (2, 1, 48, 48, 48),
        (1, 1, 56, 56, 56),
    ]


def test_nnunet_format_is_dynamic_batch_only():
    spec = resolve_shape(3, [40, 40], [8, 8], dynamic_batch=True)
    assert spec.example == (1, 3, 40, 40) and spec.dynamic_batch and not spec.dynamic_spatial
    assert verification_shapes(spec, [8, 8]) == [(1, 3, 40, 40), (2, 3, 40, 40)]


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 2, 48, 48, 48), "channel count 2 does not match the model's 1"),
        ((1, 1, 50, 48, 48), "multiples of [8, 8, 8]"),
        ((1, 1, 48, 48), "needs 5 numbers"),
        ((0, 1, 48, 48, 48), "must be positive"),
    ],
)
def test_custom_shape_is_checked_against_the_network(shape, message):
    with pytest.raises(ExportError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_shape(1, [48, 48, 48], [8, 8, 8], input_shape=shape)


def test_custom_shape_is_used_as_given():
    assert resolve_shape(1, [48, 48, 48], [8, 8, 8], input_shape=(2, 1, 64, 32, 48)).example == (
        2,
        1,
        64,
        32,
        48,
    )


# ---------------------------------------------------------------- metadata


def _plans() -> dict:
    return {
        "dataset_name": "Dataset123_X",
        "plans_name": "nnUNetPlans_r2",
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [2, 0, 1],
        "transpose_backward": [1, 2, 0],
        "original_median_spacing_after_transp": [3.0, 1.0, 1.0],
        "original_median_shape_after_transp": [20, 64, 64],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 10.0, "std": 2.0, "percentile_00_5": 1.0, "percentile_99_5": 30.0}
        },
        "distillation": {"base_plans": "nnUNetPlans", "reduction_factor": 2, "block_strategy": None},
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 64, 64],
                "median_image_size_in_voxels": [20, 64, 64],
                "spacing": [3.0, 1.0, 1.0],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "architecture": {
                    "network_class_name": "x.PlainConvUNet",
                    "arch_kwargs": {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]},
                },
            },
            "3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4},
            "2d": {"patch_size": [64, 64], "spacing": [1.0, 1.0]},
        },
    }


def _dataset_json() -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumor": 2},
        "file_ending": ".nii.gz",
        "numTraining": 3,
        "licence": "CC-BY-SA 4.0",
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
    }


def _meta(**overrides) -> dict:
    args = {
        "plans": _plans(),
        "dataset_json": _dataset_json(),
        "configuration": "3d_fullres_bs4",
        "fold": 0,
        "student_folder": "Dataset123_X/nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres",
        "checkpoint_name": "checkpoint_final.pth",
        "checkpoint_trainer": "nnUNetTrainer",
        "mirror_axes": (0, 1, 2),
        "distillation": {
            "alpha": 0.3,
            "temperature": 3.0,
            "teacher_folds": [0, 1, 2, 3, 4],
            "teacher_plans": "nnUNetPlans",
            "da5": False,
            "teacher_folder": "/secret/path",
        },
        "io": {
            "input_name": "input",
            "output_name": "output",
            "input_shape": [1, 1, 16, 64, 64],
            "output_shape": [1, 3, 16, 64, 64],
            "dynamic_batch": False,
            "dynamic_spatial": False,
            "opset": 17,
            "tensorrt_ready": False,
        },
        "versions": {"torch": "2.14.1", "nnunetv2": "2.8.1"},
        "fingerprint_sha256": "ab" * 32,
        "parameters": 1234,
    }
    args.update(overrides)
    return md.build_inference_metadata(**args)


def test_metadata_carries_everything_inference_needs():
    meta = _meta()
    assert meta["configuration"] == "3d_fullres_bs4"
    assert meta["patch_size"] == [16, 64, 64] and meta["spacing"] == [3.0, 1.0, 1.0]
    assert meta["transpose_forward"] == [2, 0, 1] and meta["transpose_backward"] == [1, 2, 0]
    assert meta["normalization_schemes"] == ["CTNormalization"] and meta["use_mask_for_norm"] == [False]
    assert meta["intensity_properties"]["0"]["mean"] == 10.0
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"]["tumor"] == 2
    assert meta["mirror_axes"] == [0, 1, 2] and meta["tile_step_size"] == 0.5
    assert meta["num_input_channels"] == 1 and meta["num_segmentation_heads"] == 3 and not meta["has_regions"]
    assert meta["spatial_divisor"] == [4, 8, 8]
    # r and the block strategy come from the student plans, the KD settings from the checkpoint
    assert meta["distillation"]["reduction_factor"] == 2 and meta["distillation"]["alpha"] == 0.3
    assert meta["distillation"]["temperature"] == 3.0 and meta["distillation"]["teacher_folds"] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert "teacher_folder" not in meta["distillation"]  # a cluster path is not a model property
    assert meta["dataset_fingerprint_sha256"] == "ab" * 32 and meta["versions"]["nnunetv2"] == "2.8.1"
    # the inherited configuration is resolved into the one exported configuration, file lists are dropped
    cfg = meta["nnunet"]["plans"]["configurations"]
    assert list(cfg) == ["3d_fullres_bs4"] and cfg["3d_fullres_bs4"]["batch_size"] == 4
    assert cfg["3d_fullres_bs4"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert "training" not in meta["nnunet"]["dataset_json"]
    assert meta["model_name"] == "Dataset123_X__nnUNetPlans_r2__3d_fullres_bs4__fold0"


def test_metadata_round_trips_through_onnx_props_and_is_json():
    meta = _meta()
    props = md.to_metadata_props(meta)
    assert all(isinstance(v, str) for v in props.values())
    assert md.from_metadata_props({**props, "foreign": "not json {"}) == json.loads(md.dumps(meta))


def test_metadata_rebuilds_nnunet_managers():
    from nnunet_distill.predict import managers_from_metadata

    pm, cm, dataset_json = managers_from_metadata(_meta())
    assert (
        cm.patch_size == [16, 64, 64]
        and cm.batch_size == 4
        and cm.normalization_schemes == ["CTNormalization"]
    )
    assert pm.transpose_forward == [2, 0, 1]
    assert pm.get_label_manager(dataset_json).num_segmentation_heads == 3


def test_region_labels_are_recognised():
    ds = {
        **_dataset_json(),
        "labels": {"background": 0, "whole": [1, 2], "core": 2},
        "regions_class_order": [1, 2],
    }
    meta = _meta(dataset_json=ds)
    assert (
        meta["has_regions"] and meta["num_segmentation_heads"] == 2 and meta["regions_class_order"] == [1, 2]
    )


def test_unknown_configuration_names_the_flag():
    with pytest.raises(md.MetadataError, match="-c"):
        _meta(configuration="3d_lowres")


def test_foreign_metadata_is_rejected():
    with pytest.raises(md.MetadataError, match="nnUNetv2_distillation_export_onnx"):
        md.from_metadata_props({"format": json.dumps("something-else")})


# ---------------------------------------------------------------- one metadata file per exported graph


def _graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 16, 64, 64])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 16, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_sidecar_is_named_after_its_graph():
    assert contract.sidecar_path("/out/liver_3d.onnx") == Path("/out/liver_3d.nnunet_inference.json")
    assert contract.sidecar_path(Path("export") / contract.ONNX_FILENAME) == Path(
        "export/model.nnunet_inference.json"
    )


def test_exports_sharing_a_folder_each_keep_and_read_their_own_metadata(tmp_path):
    """Two students exported into one folder: each graph is served with its own metadata, never the
    other's (the old shared `nnunet_inference.json` made the last export describe every graph)."""
    from nnunet_distill.export import annotate_graph, write_export
    from nnunet_distill.predict import PredictorError, locate_model

    out = tmp_path / "exports"
    metas = {"a": _meta(configuration="3d_fullres"), "b": _meta(configuration="3d_fullres_bs4")}
    for name, meta in metas.items():
        model = _graph()
        annotate_graph(model, meta)
        sidecar = write_export(model, meta, out / f"{name}.onnx")
        assert sidecar == out / f"{name}.nnunet_inference.json"
        assert json.loads(sidecar.read_text()) == json.loads(md.dumps(meta))
    assert sorted(p.name for p in out.iterdir()) == [
        "a.nnunet_inference.json",
        "a.onnx",
        "b.nnunet_inference.json",
        "b.onnx",
    ]
    for name, meta in metas.items():
        onnx_file, found = locate_model(out / f"{name}.onnx")
        assert onnx_file == out / f"{name}.onnx" and found == json.loads(md.dumps(meta))
    assert locate_model(out / "a.onnx")[1]["configuration"] == "3d_fullres"
    assert locate_model(out / "b.onnx")[1]["configuration"] == "3d_fullres_bs4"

    # a folder-wide file left by older exports (here: b's) is never taken for a's metadata; without its
    # own sidecar, a's embedded metadata is used
    (out / contract.PACKAGE_SIDECAR_NAME).write_text(md.dumps(metas["b"]))
    (out / "a.nnunet_inference.json").unlink()
    assert locate_model(out / "a.onnx")[1]["model_name"] == metas["a"]["model_name"]
    with pytest.raises(PredictorError, match="expected exactly one model"):
        locate_model(out)
    (out / "b.onnx").unlink()
    assert locate_model(out)[1]["configuration"] == "3d_fullres"  # the folder's one graph, its own metadata


def test_metrics_prefer_the_distillation_summary():
    summary = {
        "schema_version": 2,
        "evaluation": "test_set",
        "note": "held-out test cases",
        "cases": {"count": 3, "source": "imagesTs", "ids": ["t0", "t1", "t2"]},
        "student": {"mean_dice": 0.81},
        "teacher_ensemble": {"mean_dice": 0.85, "folds": [0, 1, 2]},
        "retention": {"mean": 0.953, "worst_label": "liver", "worst": 0.978},
        "per_label": [{"name": "liver", "student_dice": 0.9, "teacher_dice": 0.92, "retention": 0.978}],
    }
    nnunet = {"foreground_mean": {"Dice": 0.5}, "mean": {"1": {"Dice": 0.5}}}
    m = md.metrics_from_summaries(summary, nnunet)
    assert m["source"] == "distillation_summary.json" and m["student_dice"] == 0.81
    assert m["teacher_ensemble_dice"] == 0.85 and m["num_cases"] == 3 and m["teacher_folds"] == [0, 1, 2]
    assert (m["retention"], m["worst_label"], m["evaluation"]) == (0.953, "liver", "test_set")
    assert m["per_label"]["liver"] == {"student_dice": 0.9, "teacher_ensemble_dice": 0.92, "retention": 0.978}
    dishonest = dict(summary, evaluation="none", retention=None, teacher_ensemble=None, per_label=[])
    m = md.metrics_from_summaries(dishonest, nnunet)
    assert m["retention"] is None and m["teacher_ensemble_dice"] is None  # never a leaky ratio
    fallback = md.metrics_from_summaries(None, nnunet)
    assert fallback["student_dice"] == 0.5 and fallback["teacher_ensemble_dice"] is None
    assert "student only" in fallback["source"] and fallback["retention"] is None
    assert md.metrics_from_summaries(None, None) is None


# ---------------------------------------------------------------- verification arithmetic


def test_agreement_uses_argmax_for_labels_and_threshold_for_regions():
    ref = np.zeros((1, 3, 2, 2), np.float32)
    ref[:, 1] = 1.0
    other = ref.copy()
    other[0, 2, 0, 0] = 2.0  # one voxel's argmax flips to class 2
    assert segmentation_agreement(ref, other, has_regions=False) == pytest.approx(0.75)
    # as regions only the sign of each channel counts: one of 12 channel-voxels changes sign
    assert segmentation_agreement(ref, other, has_regions=True) == pytest.approx(11 / 12)


def test_compare_gates_on_difference_and_agreement():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 3, 8, 8, 8)).astype(np.float32)
    tol = Tolerance(atol=1e-3, rtol=0.0, min_agreement=0.999)
    assert compare("a", ref, ref + 5e-4, False, tol).passed
    assert not compare("b", ref, ref + 2e-3, False, tol).passed
    with pytest.raises(VerificationError, match="shape"):
        compare("c", ref, ref[:, :2], False, tol)
    with pytest.raises(VerificationError, match="NaN"):
        bad = ref.copy()
        bad[0, 0, 0, 0, 0] = np.nan
        compare("d", ref, bad, False, tol)


def test_crop_or_pad_centres_and_zero_pads():
    image = np.arange(2 * 10 * 4 * 6, dtype=np.float32).reshape(2, 10, 4, 6)
    patch = crop_or_pad(image, (4, 8, 6), center=(9, 2, 3))
    assert patch.shape == (2, 4, 8, 6)
    np.testing.assert_array_equal(patch[:, :, 2:6, :], image[:, 6:10, :, :])  # clipped at the far edge
    assert not patch[:, :, :2].any() and not patch[:, :, 6:].any()  # padded where the image is small


def _conv_in_graph(bias_from: str, dynamic: bool = False, extra_node: onnx.NodeProto | None = None):
    """x -> Conv -> InstanceNormalization(scale, bias) -> y with bias an initializer, a Constant or
    computed."""
    c = 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n" if dynamic else 1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n" if dynamic else 1, c, 4, 4])
    w = numpy_helper.from_array(np.ones((c, 1, 1, 1), np.float32), "w")
    scale = numpy_helper.from_array(np.array([1.5, 0.5], np.float32), "norm.weight")
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv")]
    inits = [w, scale]
    bias_value = np.array([0.25, -0.75], np.float32)
    if bias_from == "initializer":
        inits.append(numpy_helper.from_array(bias_value, "norm.bias"))
    elif bias_from == "constant":
        nodes.append(
            helper.make_node(
                "Constant", [], ["norm.bias"], name="const", value=numpy_helper.from_array(bias_value)
            )
        )
    else:  # computed from the data: a ReduceMean over the input
        nodes.append(helper.make_node("ReduceMean", ["h"], ["hm"], axes=[0, 2, 3], keepdims=0, name="mean"))
        nodes.append(helper.make_node("Identity", ["hm"], ["norm.bias"], name="id"))
    nodes.append(
        helper.make_node("InstanceNormalization", ["h", "norm.weight", "norm.bias"], ["y"], name="in")
    )
    if extra_node is not None:
        nodes.append(extra_node)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tensorrt_check_accepts_a_static_graph_with_initializer_weights():
    assert tensorrt_problems(_conv_in_graph("initializer")) == []


def test_tensorrt_check_names_every_problem():
    problems = tensorrt_problems(_conv_in_graph("constant", dynamic=True))
    assert any("non-static shape" in p and "'x'" in p for p in problems)
    assert any("bias is not an initializer" in p for p in problems)
    model = _conv_in_graph("initializer", extra_node=helper.make_node("NonZero", ["x"], ["nz"], name="nz"))
    assert any("NonZero is not supported" in p for p in tensorrt_problems(model))


def test_constant_biases_are_folded_to_initializers_with_their_values():
    model, folded = fold_instance_norm_constants(_conv_in_graph("constant"))
    assert folded == 1
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    np.testing.assert_array_equal(inits[node.input[2]], [0.25, -0.75])
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    assert tensorrt_problems(model) == []
    # the weight check finds both tensors in a checkpoint of the same names and values...
    state = {
        "norm.weight": np.array([1.5, 0.5], np.float32),
        "norm.bias": np.array([0.25, -0.75], np.float32),
    }
    assert instance_norm_weight_check(model, state, 1)["instance_norm_matched_to_checkpoint"] == 1
    # ...and refuses a graph whose folded bias is not the checkpoint's (e.g. zero-filled)
    with pytest.raises(TensorRTGraphError, match="differs from the checkpoint"):
        instance_norm_weight_check(model, {**state, "norm.bias": np.zeros(2, np.float32)}, 1)


def test_data_dependent_bias_is_an_error_never_zero_filled():
    with pytest.raises(TensorRTGraphError, match="refusing to substitute"):
        fold_instance_norm_constants(_conv_in_graph("computed"))


def test_missing_checkpoint_weights_fail_the_weight_check():
    model = _conv_in_graph("initializer")
    with pytest.raises(TensorRTGraphError, match="only 0 of 1"):
        instance_norm_weight_check(model, {}, 1)


def test_verify_rejects_a_graph_that_computes_something_else():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.InstanceNorm3d(3, affine=True)
    ).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    model = torch.onnx.export(
        net,
        (x,),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["output"],
        external_data=False,
        verbose=False,
    ).model_proto
    inputs = {"r": np.random.default_rng(1).standard_normal((1, 1, 8, 8, 8), dtype=np.float32)}
    ok = verify(
        model.SerializeToString(), net, inputs, input_name="input", has_regions=False, tol=Tolerance()
    )
    assert ok[0].passed and ok[0].max_abs_diff < 1e-4
    for init in model.graph.initializer:  # perturb the norm bias in the graph only
        if init.name.endswith("1.bias"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
    with pytest.raises(VerificationError, match="differs from the torch student"):
        verify(model.SerializeToString(), net, inputs, input_name="input", has_regions=False, tol=Tolerance())


# ---------------------------------------------------------------- the ResEnc CLI's teacher plans


def test_resenc_teacher_plans_flag_selects_the_student_and_is_optional():
    from nnunet_distill.cli import export as cli

    def request(*flags: str):
        parser = cli.build_parser_resenc()
        return cli.request_resenc(parser.parse_args(["-d", "1", "-r", "2", *flags]), parser)

    # -p and -tpl are one flag (as in nnUNetv2_resenc_distillation_train); the teachers it names are part of
    # the student's plans name, so they select the student, and its checkpoint must record them
    for flag in ("-p", "-tpl"):
        req = request(flag, "nnUNetResEncUNetMPlans")
        assert req.expected_teacher_plans == req.teacher_plans == "nnUNetResEncUNetMPlans"
        assert req.plans_identifier == "nnUNetResEncUNetMPlans_r2"
        req = request(flag, "nnUNetResEncUNetMPlans", "-spl", "nnUNetResEncUNetMPlans")
        assert req.plans_identifier == "nnUNetResEncUNetMPlans_r2_nnUNetResEncUNetMPlans"
    # without it: the training CLI's default teachers find the folder, and the checkpoint is not checked
    req = request()
    assert req.expected_teacher_plans is None
    assert req.teacher_plans == "nnUNetResEncUNetLPlans"
    assert req.plans_identifier == "nnUNetResEncUNetLPlans_r2"


def test_a_student_of_other_teachers_is_refused_naming_the_flag(tmp_path):
    from nnunet_distill.export import ExportError, check_teacher_plans
    from nnunet_distill.trained_student import LoadedStudent

    student = LoadedStudent(
        network=None,
        state_dict={},
        plans=_plans(),
        dataset_json=_dataset_json(),
        configuration="3d_fullres",
        fold_dir=tmp_path / "fold_0",
        checkpoint_name="checkpoint_final.pth",
        trainer_name="nnUNetTrainer",
        mirror_axes=None,
        distillation={"teacher_plans": "nnUNetResEncUNetLPlans"},
        parameters=0,
        affine_norms=0,
    )
    check_teacher_plans(student, "nnUNetResEncUNetLPlans")
    check_teacher_plans(student, None)
    with pytest.raises(
        ExportError, match=r"from nnUNetResEncUNetLPlans teachers, not nnUNetResEncUNetMPlans"
    ):
        check_teacher_plans(student, "nnUNetResEncUNetMPlans")
    with pytest.raises(ExportError, match="-tpl nnUNetResEncUNetLPlans"):
        check_teacher_plans(student, "nnUNetResEncUNetMPlans")
    student.distillation = None  # not trained by this tool: nothing to check against
    check_teacher_plans(student, "nnUNetResEncUNetMPlans")
