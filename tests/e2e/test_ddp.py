"""DDP distillation on CPU with real nnU-Net and gloo: two ranks in one process group, three ways of starting
them, each finishing with a checkpoint that stock nnUNetv2_predict loads.

* the operator's one-pod command (``torchrun --standalone --nproc_per_node 2 --no-python
  nnUNetv2_distillation_train ...``, rendered by the operator's own launcher) with ``-d_device cpu``;
* nnU-Net's flag ``-num_gpus 2`` forced onto the CPU (``-d_device cpu``: gloo);
* two torchrun "nodes" (``--nnodes 2``, one rank each) meeting on 127.0.0.1 through the PET_* env the Indexed
  Job gives its pods, as ``nnunet-distill run --local`` starts them;

then the torchrun student is resumed by a single process (a different world size). Each run has its own
nnUNet_results (the session's teachers linked in) and no test set (the cheapest summary), one epoch of two
iterations. All commands run once in a module fixture; the tests only inspect what they produced.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from nnunet_distill_operator import distributed as launcher

from tests.trainer.distill_helpers import console_script, load_checkpoint, require_ok, run_cli, stock_predict

pytestmark = pytest.mark.slow

STUDENT = "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"
ARGS = [
    "-d",
    "901",
    "-f",
    "0",
    "-r",
    "2",
    "-d_device",
    "cpu",
    "-disable_mirroring",
    "--iterations_per_epoch",
    "2",
    "--val_iterations",
    "1",
]


@dataclass
class DdpRuns:
    torchrun: Path  # fold folder of each run
    num_gpus: Path
    two_nodes: Path
    torchrun_first: dict  # checkpoint_final.pth of the 2-rank torchrun run, before the resume
    torchrun_record: dict  # its ddp_ranks.json, before the resume
    resumed: dict  # after -c_continue -e 2 in one process
    resumed_stdout: str
    termination: dict  # -num_gpus run's termination message (rank 0's)
    predictions: Path
    predict_stdout: str
    fold0_train: list[str]


def _results(tmp: Path, name: str, teachers) -> tuple[Path, dict]:
    """An nnUNet_results of its own with the session's teachers linked in, and no raw test set."""
    results = tmp / name
    dataset = results / teachers.dataset.dataset_name
    dataset.mkdir(parents=True)
    (dataset / teachers.folder.name).symlink_to(teachers.folder)
    (tmp / "empty_raw").mkdir(exist_ok=True)
    env = {
        **teachers.dataset.env,
        "nnUNet_results": str(results),
        "nnUNet_raw": str(tmp / "empty_raw"),
        "OMP_NUM_THREADS": "1",
    }
    return dataset / STUDENT / "fold_0", env


def _executables(argv: tuple[str, ...]) -> list[str]:
    """The rendered command with this venv's torchrun and trainer (the pod finds them on its PATH)."""
    return [console_script(a) if a in ("torchrun", "nnUNetv2_distillation_train") else a for a in argv]


def _two_nodes(env: dict, log: Path) -> None:
    """Node 0 and node 1 as the Indexed Job's pods would start them, with the rendezvous on 127.0.0.1."""
    argv = _executables(launcher.launch_argv(["nnUNetv2_distillation_train", *ARGS, "-e", "1"], 1, 2))
    assert argv[1:3] == ["--nnodes", "2"]
    procs = [
        subprocess.Popen(
            argv, env={**env, **node}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for node in launcher.local_node_envs(1, 2, launcher.free_port())
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    with open(log, "a") as fh:
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
            fh.write(f"\n$ node {i}: {' '.join(argv)}\n[rc={p.returncode}]\n{out}\n")
    assert [p.returncode for p in procs] == [0, 0], f"a node failed; see {log}"


@pytest.fixture(scope="module")
def ddp_runs(nnunet_teachers, tmp_path_factory) -> DdpRuns:
    tmp = tmp_path_factory.mktemp("ddp")
    log = tmp / "commands.log"
    ds = nnunet_teachers.dataset

    torchrun_fold, env = _results(tmp, "results_torchrun", nnunet_teachers)
    one_pod = launcher.launch_argv(["nnUNetv2_distillation_train", *ARGS, "-e", "1"], 2, 1)
    require_ok(run_cli(_executables(one_pod), env, log), log)
    first = load_checkpoint(torchrun_fold / "checkpoint_final.pth")
    ddp_record_first = json.loads((torchrun_fold / "ddp_ranks.json").read_text())
    single_case = tmp / "one_test_image"
    single_case.mkdir()
    image = sorted((ds.raw_dataset / "imagesTs").iterdir())[0]
    (single_case / image.name).symlink_to(image)
    out = tmp / "predictions"
    pred = stock_predict(
        tmp, env, log, single_case, out, ds.dataset_id, "nnUNetDistillationTrainer", "nnUNetPlans_r2", 0
    )
    resumed = require_ok(
        run_cli([console_script("nnUNetv2_distillation_train"), *ARGS, "-e", "2", "-c_continue"], env, log),
        log,
    )

    num_gpus_fold, env = _results(tmp, "results_num_gpus", nnunet_teachers)
    env["TERMINATION_MESSAGE_PATH"] = str(tmp / "termination.json")
    require_ok(
        run_cli(
            [console_script("nnUNetv2_distillation_train"), *ARGS, "-e", "1", "-num_gpus", "2"], env, log
        ),
        log,
    )

    two_nodes_fold, env = _results(tmp, "results_two_nodes", nnunet_teachers)
    _two_nodes(env, log)

    splits = json.loads((ds.preprocessed_dataset / "splits_final.json").read_text())
    return DdpRuns(
        torchrun_fold,
        num_gpus_fold,
        two_nodes_fold,
        first,
        ddp_record_first,
        load_checkpoint(torchrun_fold / "checkpoint_final.pth"),
        resumed.stdout,
        json.loads((tmp / "termination.json").read_text()),
        out,
        pred.stdout,
        splits[0]["train"],
    )


@pytest.mark.parametrize("run", ["torchrun", "num_gpus", "two_nodes"])
def test_two_gloo_ranks_train_disjoint_cases_of_the_fold(ddp_runs: DdpRuns, run: str) -> None:
    fold = getattr(ddp_runs, run)
    record = (
        ddp_runs.torchrun_record if run == "torchrun" else json.loads((fold / "ddp_ranks.json").read_text())
    )
    assert (record["world_size"], record["backend"]) == (2, "gloo")
    ranks = record["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["batch_size"] for r in ranks] == [1, 1]  # nnU-Net's split of the plans' batch size 2
    seen = [set(r["cases"]) for r in ranks]
    assert all(seen), f"a rank drew no case: {ranks}"
    assert not seen[0] & seen[1], f"ranks drew the same cases: {ranks}"
    assert seen[0] | seen[1] <= set(ddp_runs.fold0_train)  # never a validation case


@pytest.mark.parametrize("run", ["torchrun", "num_gpus", "two_nodes"])
def test_rank_0_alone_writes_checkpoints_logs_and_the_summary(ddp_runs: DdpRuns, run: str) -> None:
    fold = getattr(ddp_runs, run)
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "distillation_summary.json").is_file()
    logs = sorted(fold.glob("training_log_*.txt"))
    expected = 2 if run == "torchrun" else 1  # the torchrun student was resumed once: a second log
    assert len(logs) == expected, logs
    assert json.loads((fold / "progress.json").read_text())["epoch"] == (2 if run == "torchrun" else 1)


def test_the_ddp_checkpoint_is_a_plain_stock_checkpoint(ddp_runs: DdpRuns) -> None:
    ckpt = ddp_runs.torchrun_first
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert not any(k.startswith("module.") for k in ckpt["network_weights"])  # unwrapped from DDP
    assert ckpt["distillation"]["world_size"] == 2 and ckpt["current_epoch"] == 1
    assert "STOCK_PREDICT_OK" in ddp_runs.predict_stdout
    assert len(list(ddp_runs.predictions.glob("*.nii.gz"))) == 1


def test_a_single_process_resumes_the_two_rank_student(ddp_runs: DdpRuns) -> None:
    assert "-c_continue: resuming from" in ddp_runs.resumed_stdout
    assert "at epoch 1 of 2" in ddp_runs.resumed_stdout
    resumed = ddp_runs.resumed
    assert resumed["current_epoch"] == 2 and resumed["distillation"]["world_size"] == 1
    assert len(resumed["logging"]["train_losses"]) == 2  # the 2-rank epoch's curve continues


def test_the_pods_termination_message_is_rank_0s_with_the_artifacts(ddp_runs: DdpRuns) -> None:
    message = ddp_runs.termination
    assert message["ok"] is True and message["stage"] == "distill"
    assert message["artifacts"]["checkpoint"] == str(ddp_runs.num_gpus / "checkpoint_final.pth")
    assert message["metrics"]["finalDice"] is not None  # only rank 0 computes the summary
