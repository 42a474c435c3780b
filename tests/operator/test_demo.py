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
    assert spec.dataset.id == 990


def test_demo_runs_synthetic_data_first_and_skips_it_when_present(tmp_path: Path) -> None:
    _, spec = cli.parse_job(str(demo.DEMO_JOB))
    paths = demo.demo_paths(tmp_path)
    stage = demo.synthetic_stage(spec, paths)
    assert stage.argv[:4] == ("nnunet-distill", "synthetic", "-d", "990")
    assert "--layout" in stage.argv and stage.argv[stage.argv.index("--layout") + 1] == "organ"
    assert stage.done_when_exists == (f"{paths.raw}/Dataset990_*/dataset.json",)
    stages = plan.plan(spec, name="demo", paths=paths, device="cpu")
    assert [s.name for s in stages] == ["preprocess", "teachers", "distill", "export", "gate"]


def _distillation_summary(paths, spec) -> Path:
    folder = (
        Path(paths.results)
        / "Dataset990_DemoOrgan"
        / plan.student_model_folder(spec)
        / f"fold_{spec.distillation.fold}"
        / "validation"
    )
    folder.mkdir(parents=True)
    path = folder / "distillation_summary.json"
    path.write_text(
        json.dumps(
            {
                "schema_version": 2,
                "evaluation": "test_set",
                "cases": {
                    "ids": ["test_0000", "test_0001"],
                    "count": 2,
                    "source": "imagesTs",
                    "mirroring_tta": True,
                },
                "student": {
                    "dice": {"organ": 0.96, "lesion": 0.88},
                    "mean_dice": 0.92,
                    "parameters": 1_401_234,
                },
                "teacher_ensemble": {
                    "folds": [0, 1],
                    "dice": {"organ": 0.97, "lesion": 0.9},
                    "mean_dice": 0.935,
                    "parameters_per_fold": 5_603_177,
                },
                "retention": {
                    "mean": 0.92 / 0.935,
                    "per_label": {"organ": 0.96 / 0.97, "lesion": 0.88 / 0.9},
                    "worst_label": "lesion",
                    "worst": 0.88 / 0.9,
                },
                "inference": {
                    "student_seconds": 2.0,
                    "teacher_ensemble_seconds": 9.0,
                    "speedup": 4.5,
                    "device": "cpu",
                },
            }
        )
    )
    return path


def test_table_shows_held_out_dice_per_label_retention_parameters_and_speedup(tmp_path: Path) -> None:
    _, spec = cli.parse_job(str(demo.DEMO_JOB))
    paths = demo.demo_paths(tmp_path)
    _, onnx, _ = plan.export_paths(paths)
    Path(onnx).parent.mkdir(parents=True)
    Path(onnx).write_bytes(b"\0" * 2_000_000)
    assert demo.summary_rows(spec, paths, {})[0][0] == "Dice mean"  # no summary yet: n/a, no crash
    _distillation_summary(paths, spec)
    rows = {r[0]: r[1:] for r in demo.summary_rows(spec, paths, {})}
    assert rows["held-out cases"][0].startswith("2 of imagesTs")
    assert rows["Dice organ"] == ("0.970", "0.960  (retention 99.0%)")
    assert rows["Dice lesion"] == ("0.900", "0.880  (retention 97.8%)")
    assert rows["Dice mean"] == ("0.935", "0.920")
    assert rows["retention (mean / worst label)"] == ("", "98.4% / lesion 97.8%")
    assert rows["parameters"] == ("5,603,177 x 2 folds", "1,401,234")
    assert rows["inference, 2 cases (cpu)"] == ("9.0 s", "2.0 s  (4.5x faster)")
    assert rows["ONNX"][1].endswith("model.onnx (2.0 MB)")
    table = demo.format_table(demo.summary_rows(spec, paths, {}))
    assert "teacher ensemble" in table.splitlines()[1] and "student" in table.splitlines()[1]


def test_demo_job_is_valid_for_a_cluster_too() -> None:
    spec = api.parse_spec(cli.load_job(str(demo.DEMO_JOB))[1])
    assert spec.storage.volume("results") is not None
