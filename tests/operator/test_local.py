"""The local executor, running real processes: order, env, skipping, progress, summaries, failures.

Stages here are built directly (not through the planner) with small Python programs as commands, so
every executor behaviour is exercised in seconds; the real trainer commands run in the demo and in the
slow end-to-end test.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from nnunet_distill_operator import local, local_progress
from nnunet_distill_operator.plan import Command, DataPaths, Stage, StageResources

RES = StageResources(0, "1", "1Gi", 0)


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def paths(tmp_path: Path) -> DataPaths:
    return DataPaths(
        str(tmp_path / "raw"), str(tmp_path / "pre"), str(tmp_path / "res"), str(tmp_path / "work")
    )


def runner(tmp_path: Path, out: io.StringIO) -> local.LocalRunner:
    p = paths(tmp_path)
    return local.LocalRunner(
        name="t",
        paths=p,
        workdir=Path(p.work),
        env={"PATH": "/usr/bin:/bin", "nnUNet_n_proc_DA": "0"},
        out=out,
    )


# A trainer as nnunet_distill.trainer writes its progress: progress.json in its output folder, replaced
# atomically after every epoch, next to its console output.
TRAINER_EPOCHS = r"""
import json, os, pathlib, sys
fold = pathlib.Path(os.environ["nnUNet_results"]) / "Dataset027_Liver" / "T__P__3d_fullres" / "fold_0"
fold.mkdir(parents=True, exist_ok=True)
for e in range(3):
    print(f"2026-03-01 10:00:0{e}.000000: Epoch {e}")
    progress = {"epoch": e + 1, "totalEpochs": 10, "trainLoss": [-0.1, -0.2, -0.3][e],
                "kdLoss": [0.01, 0.02, 0.03][e], "hardLoss": 0.5, "valLoss": None,
                "pseudoDice": [0.55, 0.65, 0.75][e], "epochSeconds": 2.0, "lastEpochSeconds": 2.0,
                "etaSeconds": [14.4, 12.4, 10.4][e], "updatedAt": f"2026-03-01T10:00:0{e}+00:00"}
    tmp = fold / ".progress.json.tmp"
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, fold / "progress.json")
"""


def test_stages_run_in_order_with_env_indices_progress_and_summaries(tmp_path: Path) -> None:
    write_env = (
        "import os, json, pathlib; p = pathlib.Path(os.environ['nnUNet_results']) / "
        "f\"env-{os.environ.get('JOB_COMPLETION_INDEX', 'x')}.json\"; "
        "p.write_text(json.dumps({k: os.environ.get(k) for k in ('nnUNet_raw', 'nnUNet_results', "
        "'nnUNet_n_proc_DA', 'DISTILLATIONJOB_STAGE', 'JOB_COMPLETION_INDEX')}))"
    )
    summary = (
        "import os, json; open(os.environ['TERMINATION_MESSAGE_PATH'], 'w').write(json.dumps("
        "{'ok': True, 'artifacts': {'studentParameters': 1234, 'onnx': '/x/model.onnx'}, "
        "'metrics': {'finalDice': 0.8, 'teacherDice': 0.85}}))"
    )
    stages = [
        Stage(
            "first",
            "writes env per index",
            (Command("env", py(write_env)),),
            RES,
            index_values=("0", "3"),
            env=(("nnUNet_n_proc_DA", "7"),),
        ),
        Stage(
            "train",
            "prints nnU-Net epochs",
            (Command("train", py(TRAINER_EPOCHS)),),
            RES,
            reports_progress=True,
        ),
        Stage(
            "last",
            "two commands, a summary",
            (Command("a", py("print('A')")), Command("b", py(summary))),
            RES,
        ),
    ]
    out = io.StringIO()
    status = runner(tmp_path, out).run(stages)
    res = tmp_path / "res"
    env0, env1 = (json.loads((res / f"env-{i}.json").read_text()) for i in (0, 1))
    assert env0["nnUNet_raw"] == str(tmp_path / "raw") and env0["DISTILLATIONJOB_STAGE"] == "first"
    assert (env0["JOB_COMPLETION_INDEX"], env1["JOB_COMPLETION_INDEX"]) == ("0", "1")
    assert env0["nnUNet_n_proc_DA"] == "0"  # the user's env wins over the plan's pod sizing
    assert status["phase"] == "Succeeded"
    assert [s for s in status["stages"]] == ["first", "train", "last"]
    assert all(s["state"] == "Succeeded" for s in status["stages"].values())
    assert status["progress"] == {
        "stage": "train",
        "epoch": 3,
        "totalEpochs": 10,
        "trainLoss": -0.3,
        "kdLoss": 0.03,
        "pseudoDice": 0.75,
        "etaSeconds": 10,
        "updatedAt": "2026-03-01T10:00:02Z",
    }
    assert status["artifacts"] == {"studentParameters": 1234, "onnx": "/x/model.onnx"}
    assert status["metrics"] == {"finalDice": 0.8, "teacherDice": 0.85}
    text = out.getvalue()
    assert "[first:0] $" in text and "[first:3] $" in text and "[last] A" in text
    assert text.index("[first]") < text.index("[train]") < text.index("[last]")
    on_disk = yaml.safe_load((tmp_path / "work" / "status.yaml").read_text())
    assert on_disk == json.loads((tmp_path / "work" / "status.json").read_text())
    assert on_disk["phase"] == "Succeeded"
    assert [c["type"] for c in on_disk["conditions"]][:3] == ["Ready", "Reconciling", "Stalled"]
    assert "2026-03-01 10:00:02.000000: Epoch 2" in (tmp_path / "work" / "logs" / "train.log").read_text()


def test_done_stages_and_indices_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "res" / "fold_1").mkdir(parents=True)
    (tmp_path / "res" / "fold_1" / "done").write_text("x")
    (tmp_path / "res" / "whole").write_text("x")
    marker = (
        f"import pathlib; pathlib.Path({str(tmp_path)!r}, 'ran-' + __import__('os').environ.get("
        "'JOB_COMPLETION_INDEX', 'none')).write_text('1')"
    )
    stages = [
        Stage(
            "skipped",
            "all outputs there",
            (Command("c", py(marker)),),
            RES,
            done_when_exists=(f"{tmp_path}/res/whol*",),
        ),
        Stage(
            "folds",
            "fold 1 done",
            (Command("c", py(marker)),),
            RES,
            index_values=("0", "1"),
            done_when_exists=(f"{tmp_path}/res/fold_{{value}}/done",),
        ),
    ]
    out = io.StringIO()
    status = runner(tmp_path, out).run(stages)
    assert not (tmp_path / "ran-none").exists()
    assert (tmp_path / "ran-0").exists() and not (tmp_path / "ran-1").exists()
    assert status["stages"]["skipped"]["reason"] == "AlreadyDone"
    assert status["stages"]["folds"]["reason"] == "Succeeded"
    assert "[folds:1] outputs already present; skipping" in out.getvalue()


def test_first_failure_stops_with_stage_exit_code_and_log_tail(tmp_path: Path) -> None:
    failing = "import sys\nfor i in range(30): print('line', i)\nsys.exit(3)"
    stages = [
        Stage("ok", "fine", (Command("c", py("print('fine')")),), RES),
        Stage("bad", "fails", (Command("boom", py(failing)),), RES),
        Stage("never", "not reached", (Command("c", py("print('SHOULD NOT RUN')")),), RES),
    ]
    out = io.StringIO()
    with pytest.raises(local.LocalRunError) as info:
        runner(tmp_path, out).run(stages)
    message = str(info.value)
    first = message.splitlines()[0]
    assert first.startswith("stage bad failed:") and "exited with code 3" in first and "(boom)" in first
    assert f"log: {tmp_path / 'work' / 'logs' / 'bad.log'}" in message
    assert "line 29" in message and "line 9" not in message  # the tail only
    assert "SHOULD NOT RUN" not in out.getvalue()
    status = info.value.status
    assert status["phase"] == "Failed" and status["reason"] == "StageFailed"
    assert status["stages"]["bad"]["state"] == "Failed" and "never" not in status["stages"]
    on_disk = json.loads((tmp_path / "work" / "status.json").read_text())
    stalled = next(c for c in on_disk["conditions"] if c["type"] == "Stalled")
    assert on_disk["phase"] == "Failed" and stalled["status"] == "True"


def test_missing_command_is_a_clear_error(tmp_path: Path) -> None:
    stage = Stage("x", "missing", (Command("c", ("nnunet-distill-no-such-command",)),), RES)
    with pytest.raises(local.LocalRunError, match="not found on PATH"):
        runner(tmp_path, io.StringIO()).run([stage])


def test_progress_comes_from_the_newest_progress_json_written_since_the_start(tmp_path: Path) -> None:
    def write(model: str, doc: dict[str, object]) -> Path:
        path = tmp_path / "Dataset001_X" / model / "fold_0" / "progress.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return path

    old = write("Old__P__2d", {"epoch": 50, "totalEpochs": 50})
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # an earlier run's: not this stage's
    t = local_progress.ProgressTracker("distill", tmp_path)
    assert not t.poll() and t.progress is None
    write("Student__P__2d", {"epoch": 1, "totalEpochs": 4, "pseudoDice": None, "etaSeconds": 29.6})
    assert t.poll()
    assert t.progress == {"stage": "distill", "epoch": 1, "totalEpochs": 4, "etaSeconds": 30}
    assert not t.poll()  # unchanged file: nothing new
    path = write(
        "Student__P__2d", {"epoch": 2, "totalEpochs": 4, "trainLoss": -0.4, "etaSeconds": float("nan")}
    )
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert t.poll() and t.progress == {"stage": "distill", "epoch": 2, "totalEpochs": 4, "trainLoss": -0.4}


def test_local_paths_from_flags_env_or_data_dir(tmp_path: Path) -> None:
    p = local.local_paths(
        data_dir=str(tmp_path),
        raw=None,
        preprocessed=str(tmp_path / "P"),
        results=None,
        workdir=str(tmp_path / "w"),
        env={"nnUNet_raw": str(tmp_path / "R")},
    )
    assert (p.raw, p.preprocessed, p.results) == (
        str(tmp_path / "R"),
        str(tmp_path / "P"),
        str(tmp_path / "nnUNet_results"),
    )
    with pytest.raises(ValueError, match="--data-dir"):
        local.local_paths(data_dir=None, raw=None, preprocessed=None, results=None, workdir="w", env={})
