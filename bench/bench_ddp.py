"""DDP scaling of distillation: training iterations/s with 1 vs 2 ranks, on CPU (gloo) and on CUDA (nccl).

Each rank runs the real code path: ``nnUNetDistillationTrainer`` (the student, DistributedDataParallel over
the ranks, nnU-Net's split of the plans' global batch) with a ``TeacherEnsemble`` of random-weight teachers
built from the planned architecture (the cost does not depend on the weights), started by torch's launcher
(:func:`nnunet_distill.distributed.launch_local`, the code path of ``torchrun --standalone``). The batches
are drawn before the clock starts, so the numbers are the training step (teachers, student forward and
backward, gradient all-reduce, optimizer) and not nnU-Net's data augmentation, which runs in background
workers in a real run.

An iteration is one optimizer step over the global batch, so 2 ranks ideally give twice the iterations/s of 1;
scaling efficiency = it/s(2 ranks) / (2 x it/s(1 rank)). Goal: >= 0.85 at 2 ranks on GPUs. On a CPU the two
ranks share the machine's cores (threads are split between them), so a CPU efficiency says little about GPUs;
it shows that the gloo path works and what it costs.

Run with ``python -m bench ddp`` or ``python -m bench.bench_ddp [--iterations 6] [--teachers 5]``; the JSON
goes to ``--json`` (default ``bench/results/ddp.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ddp.json"
GOAL_EFFICIENCY = 0.85
RANKS = (1, 2)


def _rank(
    preprocessed: str, device_text: str, iterations: int, warmup: int, teachers: int, reduction: int
) -> dict:
    """One rank: build the student trainer and teachers, draw batches, time ``iterations`` training steps."""
    import torch
    from nnunet_distill import distributed, student
    from nnunet_distill.config import DistillationConfig
    from nnunet_distill.teachers import TeacherEnsemble
    from nnunet_distill.trainer import nnUNetDistillationTrainer

    from bench.bench_kd_step import _teacher_networks, _timed

    ranks = distributed.ranks_from_env()
    device = distributed.rank_device(torch.device(device_text), ranks)
    distributed.init_process_group(device, ranks)
    try:
        if device.type == "cpu":
            torch.set_num_threads(distributed.threads_per_rank(os.cpu_count() or 1, ranks.local_world_size))
        pre = Path(preprocessed)
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((pre / "dataset.json").read_text())
        student_plans = student.derive_student_plans(plans, "3d_fullres", reduction)
        cfg = DistillationConfig(dataset=pre.name, fold=0, reduction_factor=reduction, device=str(device))
        ensemble = TeacherEnsemble(
            _teacher_networks(plans, dataset_json, device, teachers), list(range(teachers))
        )
        trainer = nnUNetDistillationTrainer(
            {**student_plans, "continue_training": False}, "3d_fullres", 0, dataset_json, device
        )
        trainer.configure_distillation(cfg, ensemble)
        trainer.initialize()
        loader, _ = trainer.get_dataloaders()
        batches = [next(loader) for _ in range(warmup + iterations)]
        trainer.network.train()
        for batch in batches[:warmup]:  # allocator, kernel choice, DDP buckets
            trainer.train_step(batch)
        distributed.barrier()

        def steps() -> None:
            for batch in batches[warmup:]:
                trainer.train_step(batch)
            distributed.barrier()  # the slowest rank sets the pace

        seconds = _timed(steps, device)
        return {
            "rank": ranks.rank,
            "seconds": seconds,
            "batch_size": trainer.batch_size,
            "threads": torch.get_num_threads(),
        }
    finally:
        distributed.destroy_process_group()


def _measure(world: int, device: str, args, preprocessed: Path, logs: Path) -> dict:
    from nnunet_distill.distributed import launch_local

    per_rank = launch_local(
        world,
        _rank,
        str(preprocessed),
        device,
        args.iterations,
        args.warmup,
        args.teachers,
        args.reduction_factor,
        log_dir=str(logs / f"{device}-{world}"),
    )
    seconds = max(r["seconds"] for r in per_rank.values())
    return {
        "ranks": world,
        "iterations_per_s": args.iterations / seconds,
        "seconds": seconds,
        "batch_per_rank": [per_rank[i]["batch_size"] for i in sorted(per_rank)],
        "threads_per_rank": per_rank[0]["threads"],
    }


def _devices() -> tuple[list[tuple[str, str]], list[str]]:
    """(device, backend) pairs to measure, and why the others are not measured."""
    import torch

    measured = [("cpu", "gloo")]
    notes = []
    if torch.cuda.device_count() >= 2:
        measured.append(("cuda", "nccl"))
    else:
        notes.append(
            f"cuda (nccl): not measured here: {torch.cuda.device_count()} CUDA device(s) visible, 2 needed"
        )
    return measured, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_ddp", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[48, 48, 48], help="synthetic image size")
    parser.add_argument("--iterations", type=int, default=6, help="timed training iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--teachers", type=int, default=5, help="teachers in the ensemble (5 folds)")
    parser.add_argument("-r", "--reduction_factor", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the results go")
    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))
    for key, value in (("nnUNet_n_proc_DA", "0"), ("nnUNet_def_n_proc", "1"), ("nnUNet_compile", "false")):
        os.environ.setdefault(key, value)

    from bench.bench_kd_step import DATASET_ID, DATASET_NAME, _prepare_dataset

    devices, notes = _devices()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp, contextlib.redirect_stdout(sys.stderr):
        root = Path(tmp)
        _prepare_dataset(root, args.size)  # 5 cases: fold 0 trains on 4, enough for 2 disjoint shards
        preprocessed = root / "nnUNet_preprocessed" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
        for device, backend in devices:
            runs = [_measure(world, device, args, preprocessed, root / "logs") for world in RANKS]
            base = runs[0]["iterations_per_s"]
            for run in runs:
                run["speedup"] = run["iterations_per_s"] / base
                run["efficiency"] = run["speedup"] / run["ranks"]
            results.append({"device": device, "backend": backend, "runs": runs})

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"DDP scaling of a distillation step: {'x'.join(map(str, args.size))} patches, "
        f"r={args.reduction_factor} student, {args.teachers} teachers, {args.iterations} timed iterations "
        f"after {args.warmup} warm-up; "
        f"{os.cpu_count()} CPUs, load avg {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        f"  {'device':<12}{'ranks':>6}{'batch/rank':>12}{'it/s':>10}{'speed-up':>10}{'efficiency':>12}  goal"
    )
    for entry in results:
        for run in entry["runs"]:
            goal = (
                f">= {GOAL_EFFICIENCY} on GPUs"
                + (" (CPU ranks share the cores)" if entry["device"] == "cpu" else "")
                if run["ranks"] > 1
                else "baseline"
            )
            print(
                f"  {entry['device'] + ' ' + entry['backend']:<12}{run['ranks']:>6}"
                f"{'+'.join(map(str, run['batch_per_rank'])):>12}{run['iterations_per_s']:>10.3f}"
                f"{run['speedup']:>10.2f}{run['efficiency']:>12.2f}  {goal}"
            )
    for note in notes:
        print(f"  {note}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "benchmark": "ddp",
                "goal_efficiency_2_ranks_gpu": GOAL_EFFICIENCY,
                "size": args.size,
                "teachers": args.teachers,
                "reduction_factor": args.reduction_factor,
                "iterations": args.iterations,
                "cpu_count": os.cpu_count(),
                "load_avg": list(load),
                "results": results,
                "not_measured": notes,
            },
            indent=2,
        )
    )
    print(f"  -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
