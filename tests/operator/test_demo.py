"""The demo's pieces that do not need training: its job, its extra stage and its final table."""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_distill_operator import api, cli, demo, plan

ROOT = Path(__file__).resolve().parents[2]


def test_examples_demo_is_the_embedded_demo_job() -> None:
    assert (ROOT / "examples" / "demo.yaml").read_text() == demo.DEMO_JOB.read_text()
    name, spec = cli.parse_job(str(demo.DEMO_JOB))
    assert name == "demo"
    assert spec.teachers.train and spec.teacher_folds == (0, 1)
    assert (spec.teachers.training.epochs, spec.teachers.training.iterations_per_epoch) == (2, 4)
    assert (spec.distillation.epochs, spec.distillation.iterations_per_epoch) == (2, 4)


def test_demo_runs_synthetic_data_first_and_skips_it_when_present(tmp_path: Path) -> None:
    _, spec = cli.parse_job(str(demo.DEMO_JOB))
    paths = demo.demo_paths(tmp_path)
    stage = demo.synthetic_stage(spec, paths)
    assert stage.argv[:4] == ("nnunet-distill", "synthetic", "-d", "990")
    assert stage.done_when_exists == (f"{paths.raw}/Dataset990_*/dataset.json",)
    stages = plan.plan(spec, name="demo", paths=paths, device="cpu")
    assert [s.name for s in stages] == ["preprocess", "teachers", "distill", "export"]


def _summary(path: Path, dice: float) -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": dice}}))


def test_table_compares_teachers_and_student_from_nnunet_outputs(tmp_path: Path) -> None:
    _, spec = cli.parse_job(str(demo.DEMO_JOB))
    paths = demo.demo_paths(tmp_path)
    results = Path(paths.results) / "Dataset990_DemoSpheres"
    _summary(results / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0" / "validation", 0.8)
    _summary(results / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_1" / "validation", 0.6)
    _summary(results / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres" / "fold_0" / "validation", 0.63)
    _, onnx, _ = plan.export_paths(paths)
    Path(onnx).parent.mkdir(parents=True)
    Path(onnx).write_bytes(b"\0" * 2_000_000)
    status = {"artifacts": {"studentParameters": 1_401_234, "teacherParameters": 5_603_177}}
    rows = {r[0]: r[1:] for r in demo.summary_rows(spec, paths, status)}
    assert rows["validation Dice (fg mean)"] == ("0.7000", "0.6300")
    assert rows["Dice retention"] == ("", "90.0%")
    assert rows["parameters"] == ("5,603,177", "1,401,234")
    assert rows["ONNX"][1].endswith("model.onnx (2.0 MB)")
    table = demo.format_table(demo.summary_rows(spec, paths, status))
    assert "teachers" in table.splitlines()[1] and "student" in table.splitlines()[1]
    # The trainer's own final metrics (termination message -> status.metrics) take precedence.
    status["metrics"] = {"finalDice": 0.65, "teacherDice": 0.7, "retention": 0.9286}
    rows = {r[0]: r[1:] for r in demo.summary_rows(spec, paths, status)}
    assert rows["validation Dice (fg mean)"] == ("0.7000", "0.6500") and rows["Dice retention"][1] == "92.9%"


def test_demo_job_is_valid_for_a_cluster_too() -> None:
    spec = api.parse_spec(cli.load_job(str(demo.DEMO_JOB))[1])
    assert spec.storage.volume("results") is not None
