"""`nnunet-distill package`: Triton repository, nnunet_inference.json, model card and SHA256SUMS of a real
export."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import yaml
from nnunet_distill.cli import export as export_cli
from nnunet_distill.cli import package as cli
from nnunet_distill.package import PackageError, build_package, hf_license, triton_config

from tests.trainer import onnx_support as support


@pytest.fixture(scope="module")
def student(nnunet_dataset, nnunet_teachers, tmp_path_factory) -> support.Student:
    return support.distilled_student(nnunet_dataset, nnunet_teachers, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> Path:
    """A dynamic-batch (-nn) export of the student, made once for this module."""
    out = tmp_path_factory.mktemp("package_export") / "student.onnx"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in student.env.items():
            if key.startswith("nnUNet"):
                mp.setenv(key, value)
        assert export_cli.main_standard(["-d", "901", "-r", "2", "-nn", "-o", str(out)]) == 0
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_package_layout_checksums_and_determinism(student, exported, tmp_path, capsys):
    out = tmp_path / "pkg"
    assert cli.main(["--onnx", str(exported), "-o", str(out), "--name", "liver_student"]) == 0
    assert sorted(_tree(out)) == [
        "README.md",
        "SHA256SUMS",
        "liver_student/1/model.onnx",
        "liver_student/config.pbtxt",
        "nnunet_inference.json",
    ]
    assert (out / "liver_student/1/model.onnx").read_bytes() == exported.read_bytes()

    # SHA256SUMS lists every other file and the real sha256sum tool accepts it
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in sums) == sorted(set(_tree(out)) - {"SHA256SUMS"})
    check = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    (out / "README.md").write_text("tampered\n")
    assert (
        subprocess.run(
            ["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, capture_output=True, check=False
        ).returncode
        != 0
    )

    # rebuilding over an earlier package replaces it, and the same ONNX gives byte-identical packages
    assert cli.main(["--onnx", str(exported), "-o", str(out), "--name", "liver_student"]) == 0
    assert cli.main(["--onnx", str(exported), "-o", str(tmp_path / "again"), "--name", "liver_student"]) == 0
    assert _tree(out) == _tree(tmp_path / "again")
    assert "wrote package" in capsys.readouterr().out

    # the sidecar is the model's own metadata plus the package record
    sidecar = json.loads((out / "nnunet_inference.json").read_text())
    embedded = {p.key: json.loads(p.value) for p in onnx.load(str(exported)).metadata_props}
    package_record = sidecar.pop("package")
    assert sidecar == embedded
    assert package_record["model_file"] == "liver_student/1/model.onnx"


@pytest.mark.slow
def test_triton_config_matches_the_graph(exported, tmp_path):
    out = build_package(exported, tmp_path / "pkg")
    name = json.loads((out / "nnunet_inference.json").read_text())["model_name"]
    assert name == "Dataset901_Synth__nnUNetPlans_r2__3d_fullres__fold0"
    config = (out / name / "config.pbtxt").read_text()
    model = onnx.load(str(exported))
    in_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:]
    assert f'name: "{name}"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 8" in config and "dynamic_batching {" in config  # -nn: batch is dynamic
    assert f"dims: [ {', '.join(map(str, in_dims))} ]" in config
    assert f"dims: [ {', '.join(map(str, out_dims))} ]" in config


@pytest.mark.slow
def test_model_card_reports_student_and_teacher_dice(student, exported, tmp_path):
    out = build_package(exported, tmp_path / "pkg", name="m", license_text="CC-BY-SA 4.0")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "cc-by-sa-4.0" and header["pipeline_tag"] == "image-segmentation"
    assert {"nnunet", "knowledge-distillation", "onnx", "medical-imaging"} <= set(header["tags"])
    summary = json.loads((student.fold_dir / "validation" / "distillation_summary.json").read_text())
    metrics = {m["name"].split(" mean")[0]: m for m in header["model-index"][0]["results"][0]["metrics"]}
    assert metrics["Student"]["value"] == round(summary["student"]["mean_dice"], 4)
    assert metrics["Teacher ensemble"]["value"] == round(summary["teacher_ensemble"]["mean_dice"], 4)
    cases = summary["cases"]["count"]
    assert all(
        m["type"] == "dice" and m["verified"] is False and f"(test_set, {cases} cases)" in m["name"]
        for m in metrics.values()
    )
    # the card says which cases and which teacher folds produced the figures, label by label
    assert f"Cases: {cases} (imagesTs; evaluation `test_set`)" in text
    assert "teacher ensemble: folds " + ", ".join(map(str, summary["teacher_ensemble"]["folds"])) in text
    for row in summary["per_label"]:
        assert f"| {row['name']} | {row['student_dice']:.4f} |" in text
    assert "| reduction factor r | 2 |" in text and "| KD weight α / temperature T | 0.3 / 3.0 |" in text


def test_package_errors_name_the_fix(tmp_path, capsys):
    assert cli.main(["--onnx", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "p")]) == 1
    assert "export the student first" in capsys.readouterr().err
    plain = tmp_path / "plain.onnx"  # an ONNX file without our metadata
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(plain))
    assert cli.main(["--onnx", str(plain), "-o", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "no nnunet-distill metadata" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_package_refuses_to_overwrite_foreign_directories(exported, tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(PackageError, match="not an earlier package"):
        build_package(exported, foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(PackageError, match="--name"):
        build_package(exported, tmp_path / "p", name="../escape")
    shutil.rmtree(foreign)


def test_triton_config_static_batch_and_dynamic_spatial():
    static = {
        "io": {
            "input_name": "input",
            "output_name": "output",
            "input_shape": [1, 2, 32, 64, 64],
            "output_shape": [1, 3, 32, 64, 64],
            "dynamic_batch": False,
        }
    }
    text = triton_config(static, "s")
    assert (
        "max_batch_size: 0" in text
        and "dims: [ 1, 2, 32, 64, 64 ]" in text
        and "dynamic_batching" not in text
    )
    dynamic = {
        "io": {
            "input_name": "input",
            "output_name": "output",
            "input_shape": ["batch", 1, "x", "y", "z"],
            "output_shape": ["batch", 4, "x", "y", "z"],
            "dynamic_batch": True,
        }
    }
    text = triton_config(dynamic, "d", max_batch_size=4)
    assert (
        "max_batch_size: 4" in text
        and "dims: [ 1, -1, -1, -1 ]" in text
        and "dims: [ 4, -1, -1, -1 ]" in text
    )
    assert "preferred_batch_size: [ 4 ]" in text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("CC-BY-SA 4.0", ("cc-by-sa-4.0", None)),
        ("cc by 4.0", ("cc-by-4.0", None)),
        ("Apache 2.0", ("apache-2.0", None)),
        ("MIT", ("mit", None)),
        ("see https://example.org/terms", ("other", "see https://example.org/terms")),
    ],
)
def test_dataset_licences_map_to_hugging_face_ids(text, expected):
    assert hf_license(text) == expected
    assert hf_license(None)[0] == "other"


@pytest.mark.slow
def test_package_reports_to_the_distillation_job(student, exported, tmp_path, monkeypatch):
    """The package command ends the export stage: its termination message carries model and Dice."""
    message = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(message))
    assert cli.main(["--onnx", str(exported), "-o", str(tmp_path / "pkg"), "--name", "m"]) == 0
    report = json.loads(message.read_text())
    summary = json.loads((student.fold_dir / "validation" / "distillation_summary.json").read_text())
    assert report["stage"] == "export" and report["ok"] is True
    assert report["artifacts"]["modelPath"] == str(tmp_path / "pkg" / "m" / "1" / "model.onnx")
    assert report["metrics"]["finalDice"] == summary["student"]["mean_dice"]
    assert report["metrics"]["teacherDice"] == summary["teacher_ensemble"]["mean_dice"]
    assert report["artifacts"]["studentParameters"] > 0

    assert cli.main(["--onnx", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "p2")]) == 1
    failed = json.loads(message.read_text())
    assert failed["ok"] is False and failed["error"]["reason"] == "PackageFailed"
