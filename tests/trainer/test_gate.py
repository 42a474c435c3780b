"""The quality gate: the pure verdict on a distillation summary (nnunet_distill.gate) and the
`nnunet-distill gate` stage around it (glob, exit codes, termination message).

The summaries are hand-written in the layout held_out.write_distillation_summary produces (schema 2): they are
the gate's input, not a stand-in for it. Nothing here trains or imports torch.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nnunet_distill import evaluation, gate
from nnunet_distill.cli import gate as gate_cli

BIN = Path(sys.executable).parent
MODEL = "/r/Dataset027_Liver/nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"


def summary(
    student: dict[str, float],
    teacher: dict[str, float] | None,
    *,
    evaluation_kind: str = "test_set",
    folds: list[int] | None = None,
    count: int = 6,
    source: str = "imagesTs",
) -> dict[str, Any]:
    """A schema-2 distillation summary, its retention computed by the trainer's own evaluation.retention."""
    s_mean = sum(student.values()) / len(student)
    t_mean = sum(teacher.values()) / len(teacher) if teacher else None
    ret = evaluation.retention(student, teacher) if teacher else None
    return {
        "schema_version": 2,
        "evaluation": evaluation_kind,
        "cases": {
            "ids": [f"case_{i}" for i in range(count)],
            "count": count,
            "source": source,
            "mirroring_tta": True,
        },
        "note": "held-out test cases",
        "student": {
            "model_folder": MODEL,
            "fold": 0,
            "checkpoint": "checkpoint_final.pth",
            "plans": "nnUNetPlans_r2",
            "parameters": 1_400_000,
            "dice": student,
            "mean_dice": s_mean,
            "predictions": "/x",
        },
        "teacher_ensemble": (
            {
                "folder": "/t",
                "folds": folds if folds is not None else [0, 1, 2],
                "checkpoint": "checkpoint_final.pth",
                "parameters_per_fold": 5_600_000,
                "dice": teacher,
                "mean_dice": t_mean,
                "predictions": "/y",
            }
            if teacher
            else None
        ),
        "retention": ret,
        "per_label": evaluation.label_rows(student, teacher or {}, ret),
        "validation": {},
        "distillation": {},
    }


TEACHER = {"organ": 0.98, "lesion": 0.92, "vessel": 0.98}
GOOD = summary({"organ": 0.975, "lesion": 0.90, "vessel": 0.97}, TEACHER)  # mean 0.988, worst lesion 0.978
LOW_MEAN = summary({"organ": 0.93, "lesion": 0.85, "vessel": 0.92}, TEACHER)  # mean 0.938, worst lesion 0.924
LOST_LESION = summary(
    {"organ": 0.98, "lesion": 0.80, "vessel": 0.98}, TEACHER
)  # mean 0.958, worst lesion 0.870
NO_BASELINE = summary(
    {"organ": 0.9, "lesion": 0.5, "vessel": 0.9},
    None,
    evaluation_kind="none",
    count=4,
    source="fold 0 validation split (splits_final.json)",
)
DEFAULT = gate.Thresholds()


# ------------------------------------------------------------------------------------------ pure verdict


def test_a_student_that_keeps_its_teachers_accuracy_passes_with_its_figures_and_cases() -> None:
    v = gate.evaluate(GOOD, DEFAULT)
    assert v.passed and not v.blocks and v.reason == "QualityGatePassed" and v.failures == ()
    assert v.retention == pytest.approx(GOOD["retention"]["mean"]) and v.retention >= 0.97
    assert v.worst_label == "lesion" and v.worst_label_retention == pytest.approx(0.90 / 0.92)
    assert v.teacher_folds == (0, 1, 2) and v.evaluated_on == "test_set: 6 cases (imagesTs)"
    assert v.message.startswith(
        "quality gate passed: retention 0.988 >= 0.970, worst label lesion 0.978 >= 0.900"
    )
    assert "evaluated on test_set: 6 cases (imagesTs), mirroring TTA on, teacher folds 0 1 2" in v.message
    assert "\n" not in v.message
    assert v.student == f"{MODEL}/fold_0"


def test_fails_on_the_mean_retention() -> None:
    v = gate.evaluate(LOW_MEAN, DEFAULT)
    assert not v.passed and v.blocks and v.reason == "QualityGateFailed"
    assert v.failures == (f"retention {LOW_MEAN['retention']['mean']:.3f} < 0.970",)
    assert v.message.startswith(
        "quality gate failed: retention 0.938 < 0.970 (passed: worst label lesion 0.924 >= 0.900);"
    )
    assert (
        "student mean Dice 0.900 vs teacher ensemble 0.960" in v.message
        and "teacher folds 0 1 2" in v.message
    )


def test_fails_on_the_worst_label_naming_it_even_when_the_mean_is_fine() -> None:
    v = gate.evaluate(LOST_LESION, gate.Thresholds(min_retention=0.9))
    assert LOST_LESION["retention"]["mean"] >= 0.9 and not v.passed
    (failure,) = v.failures
    assert failure == "worst label lesion retention 0.870 < 0.900"
    assert "worst label lesion retention 0.870 < 0.900 (passed: retention 0.958 >= 0.900);" in v.message
    assert v.labels_below == (("lesion", pytest.approx(0.80 / 0.92)),)
    several = gate.evaluate(LOW_MEAN, gate.Thresholds(min_retention=0.5, min_label_retention=0.95))
    assert several.failures == (
        (
            "worst label lesion retention 0.924 < 0.950 (labels below: lesion 0.924, "
            "vessel 0.939, organ 0.949)"
        ),
    )


def test_no_honest_baseline_fails_and_says_how_to_get_one() -> None:
    v = gate.evaluate(NO_BASELINE, DEFAULT)
    assert not v.passed and v.retention is None and v.teacher_folds is None
    (failure,) = v.failures
    assert failure.startswith("no honest baseline")
    assert "imagesTs + labelsTs" in failure and "include the student's fold 0 in the teacher folds" in failure
    assert "(thresholds: retention >= 0.970, every label >= 0.900)" in v.message
    assert "evaluated on none: 4 cases (fold 0 validation split (splits_final.json))" in v.message
    assert "teacher folds none" in v.message
    # Even the most lenient thresholds cannot pass a student nobody can measure honestly.
    assert not gate.evaluate(NO_BASELINE, gate.Thresholds(0.01, 0.01)).passed


def test_a_retention_that_cannot_be_computed_fails_naming_the_label() -> None:
    broken = copy.deepcopy(GOOD)
    broken["student"]["dice"]["lesion"] = None  # e.g. the student's predictions of one label were not scored
    broken["retention"] = None
    (failure,) = gate.evaluate(broken, DEFAULT).failures
    assert failure == "no retention could be computed from the test_set figures (no Dice for lesion)"


def test_a_label_the_teachers_never_find_is_named_not_judged() -> None:
    """The ensemble's Dice is 0 for a label: there is no ratio for it (evaluation.retention's `undefined`)."""
    doc = summary(
        {"organ": 0.94, "lesion": 0.1, "vessel": 0.97}, {"organ": 0.95, "lesion": 0.0, "vessel": 0.98}
    )
    assert doc["retention"]["undefined"] == ["lesion"] and "lesion" not in doc["retention"]["per_label"]
    v = gate.evaluate(doc, DEFAULT)
    assert v.passed and v.worst_label == "organ" and v.undefined == ("lesion",)
    assert "; no retention for lesion (the teacher ensemble's Dice is 0 there);" in v.message
    assert v.as_dict()["labelsWithoutRetention"] == ["lesion"]
    assert "labelsWithoutRetention" not in gate.evaluate(GOOD, DEFAULT).as_dict()


def test_not_enforced_reports_the_same_failure_without_blocking() -> None:
    v = gate.evaluate(LOW_MEAN, gate.Thresholds(enforce=False))
    assert not v.passed and not v.blocks and v.reason == "QualityGateNotEnforced"
    assert v.message.startswith(
        "quality gate failed (not enforced: enforce is false): retention 0.938 < 0.970"
    )
    assert gate.evaluate(GOOD, gate.Thresholds(enforce=False)).reason == "QualityGatePassed"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update(schema_version=1), "schema_version is 1"),
        (lambda s: s.update(evaluation="validation_all_folds"), "evaluation is 'validation_all_folds'"),
        (lambda s: s.update(evaluation="none"), "retention without an honest baseline"),
        (lambda s: s["retention"].update(mean=float("nan")), "must hold a finite mean"),
        (lambda s: s["retention"].update(worst_label=None), "a finite worst and its worst_label"),
        (lambda s: s.pop("student"), "'student' is missing"),
    ],
)
def test_summaries_it_cannot_judge_are_errors_not_verdicts(change: Any, expected: str) -> None:
    bad = copy.deepcopy(GOOD)
    change(bad)
    with pytest.raises(gate.SummaryError, match=expected) as info:
        gate.evaluate(bad, DEFAULT)
    assert info.value.reason == "InvalidSummary"


def test_thresholds_outside_their_range_are_named() -> None:
    assert gate.Thresholds(0.0, 2.0).problems() == [
        "--min-retention must be in (0, 1.5], got 0.0",
        "--min-label-retention must be in (0, 1.5], got 2.0",
    ]
    assert gate.Thresholds(1.5, 1e-3).problems() == []


@pytest.mark.parametrize(
    "doc", [GOOD, LOW_MEAN, LOST_LESION, NO_BASELINE], ids=["good", "low", "lesion", "none"]
)
def test_status_metrics_are_the_evaluations_own(doc: dict[str, Any]) -> None:
    assert gate.result_metrics(doc) == evaluation.result_metrics(doc)


def test_termination_message_keys() -> None:
    msg = gate.termination_message(gate.evaluate(LOST_LESION, DEFAULT), "/r/s.json")
    assert (
        set(msg) == {"stage", "ok", "gate", "metrics", "error"}
        and msg["stage"] == "gate"
        and msg["ok"] is False
    )
    assert msg["error"] == {"reason": "QualityGateFailed", "message": msg["gate"]["message"]}
    g = msg["gate"]
    assert g["thresholds"] == {"minRetention": 0.97, "minLabelRetention": 0.9}
    assert (g["passed"], g["enforced"], g["reason"], g["worstLabel"]) == (
        False,
        True,
        "QualityGateFailed",
        "lesion",
    )
    assert g["cases"] == {"count": 6, "source": "imagesTs", "mirroringTTA": True}
    assert g["teacherFolds"] == [0, 1, 2] and g["summary"] == "/r/s.json" and g["evaluation"] == "test_set"
    assert set(g["labelsBelow"]) == {"lesion"}
    assert msg["metrics"]["worstLabel"] == "lesion" and msg["metrics"]["teacherFolds"] == [0, 1, 2]
    assert "error" not in gate.termination_message(
        gate.evaluate(LOST_LESION, gate.Thresholds(enforce=False)), "x"
    )


# ------------------------------------------------------------------------------------------------- CLI


def layout(tmp_path: Path, doc: dict[str, Any] | str, dataset: str = "Dataset027_Liver") -> Path:
    """The summary where the distill stage writes it: <results>/<dataset>/<student>/fold_0/validation/."""
    path = (
        tmp_path / "results" / dataset / Path(MODEL).name / "fold_0" / "validation" / evaluation.SUMMARY_NAME
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def pattern(tmp_path: Path) -> str:
    return f"{tmp_path}/results/Dataset027_*/{Path(MODEL).name}/fold_0/validation/{evaluation.SUMMARY_NAME}"


def run_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *extra: str
) -> tuple[int, dict[str, Any], str, str]:
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(term))
    code = gate_cli.main(["--summary", pattern(tmp_path), *extra])
    out, err = capsys.readouterr()
    return code, json.loads(term.read_text()), out, err


def test_cli_pass_exits_0_with_one_verdict_line(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    path = layout(tmp_path, GOOD)
    code, msg, out, err = run_gate(tmp_path, capsys, monkeypatch)
    assert code == 0 and err == ""
    assert out.splitlines() == [msg["gate"]["message"]] and out.startswith(
        "quality gate passed: retention 0.988"
    )
    assert msg["ok"] is True and "error" not in msg and msg["gate"]["summary"] == str(path)
    assert msg["metrics"] == evaluation.result_metrics(GOOD)


def test_cli_enforced_failure_exits_3_with_the_reason(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    layout(tmp_path, LOW_MEAN)
    code, msg, out, err = run_gate(tmp_path, capsys, monkeypatch, "--min-retention", "0.95")
    assert code == gate.EXIT_GATE_FAILED == 3
    assert out.startswith(
        "quality gate failed: retention 0.938 < 0.950 (passed: worst label lesion 0.924 >= 0.900)"
    )
    assert msg["ok"] is False and msg["error"]["reason"] == "QualityGateFailed"
    assert msg["gate"]["thresholds"] == {"minRetention": 0.95, "minLabelRetention": 0.9}
    assert f"not published; it stays at {MODEL}/fold_0" in err


def test_cli_fails_on_the_worst_label(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    layout(tmp_path, LOST_LESION)
    code, msg, out, _ = run_gate(tmp_path, capsys, monkeypatch, "--min-retention", "0.9")
    assert code == 3 and "worst label lesion retention 0.870 < 0.900" in out
    assert msg["gate"]["worstLabel"] == "lesion" and msg["metrics"]["worstLabelRetention"] == pytest.approx(
        0.8 / 0.92
    )


def test_cli_no_honest_baseline_fails(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    layout(tmp_path, NO_BASELINE)
    code, msg, out, _ = run_gate(tmp_path, capsys, monkeypatch)
    assert code == 3 and "no honest baseline" in out and "imagesTs + labelsTs" in out
    assert msg["error"]["reason"] == "QualityGateFailed" and "retention" not in msg["metrics"]


def test_cli_no_enforce_reports_but_exits_0(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    layout(tmp_path, LOW_MEAN)
    code, msg, out, err = run_gate(tmp_path, capsys, monkeypatch, "--no-enforce")
    assert code == 0 and err == ""
    assert msg["ok"] is False and "error" not in msg
    assert (msg["gate"]["reason"], msg["gate"]["enforced"]) == ("QualityGateNotEnforced", False)
    assert out.startswith("quality gate failed (not enforced")


def test_cli_no_match_names_the_pattern(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    code, msg, _, err = run_gate(tmp_path, capsys, monkeypatch)
    assert code == 2
    assert msg == {
        "stage": "gate",
        "ok": False,
        "error": {"reason": "SummaryNotFound", "message": msg["error"]["message"]},
    }
    assert (
        f"no distillation summary matches {pattern(tmp_path)}" in err and len(err.strip().splitlines()) == 1
    )


def test_cli_two_matches_is_an_error_listing_them(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    first = layout(tmp_path, GOOD)
    second = layout(tmp_path, GOOD, dataset="Dataset027_Other")
    code, msg, _, err = run_gate(tmp_path, capsys, monkeypatch)
    assert code == 2 and msg["error"]["reason"] == "AmbiguousSummary"
    assert f"2 files match {pattern(tmp_path)}" in err and str(first) in err and str(second) in err


def test_cli_unreadable_summary_and_bad_thresholds(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    path = layout(tmp_path, "{not json")
    code, msg, _, err = run_gate(tmp_path, capsys, monkeypatch)
    assert code == 2 and msg["error"]["reason"] == "InvalidSummary" and f"{path} is not valid JSON" in err
    layout(tmp_path, GOOD)
    code = gate_cli.main(["--summary", pattern(tmp_path), "--min-retention", "0"])
    assert code == 2 and "--min-retention must be in (0, 1.5]" in capsys.readouterr().err


def test_console_script_dispatches_and_imports_neither_torch_nor_numpy(tmp_path: Path) -> None:
    layout(tmp_path, LOST_LESION)
    term = tmp_path / "t.json"
    result = subprocess.run(
        [str(BIN / "nnunet-distill"), "gate", "--summary", pattern(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "TERMINATION_MESSAGE_PATH": str(term)},
    )
    assert result.returncode == 3, result.stderr
    assert json.loads(term.read_text())["error"]["reason"] == "QualityGateFailed"
    code = (
        "import sys, nnunet_distill.cli.gate; heavy = {'torch', 'numpy', 'nnunetv2'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    check = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert check.returncode == 0, check.stderr
