"""Cost of distillation: one KD training step with 5 teachers vs one teacher's own training step.

Both steps are the real code paths, measured side by side (interleaved, same augmented batch, same patch) on
this machine: ``nnUNetTrainer.train_step`` of a teacher-sized network, and
``nnUNetDistillationTrainer.train_step`` of an r=2 student whose :class:`TeacherEnsemble` holds 5 teachers
built from the same planned architecture (random weights: the cost does not depend on them). The architecture
comes from nnU-Net's own planner on a small synthetic dataset.

It also times the 5-teacher forward pass alone under the options considered, so the printout says which one
the ensemble uses on this device and why:
  * ``no_grad`` fp32 loop: what the original did;
  * ``inference_mode`` fp32 loop: ours on CPU (no autograd/version-counter bookkeeping);
  * bf16 autocast, channels-last 3D: ours on CUDA (tensor cores), measured here too;
  * ``torch.func.stack_module_state`` + ``vmap`` over the 5 folds (one grouped network).

Goal: KD step / teacher step <= 2.0. Run with ``python -m bench.bench_kd_step [--size 64 64 64] [--repeats 7]
[--threads 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DATASET_ID = 981
DATASET_NAME = "BenchKD"
N_TEACHERS = 5


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _prepare_dataset(root: Path, size: list[int]) -> None:
    from nnunet_distill.nnunet_env import Workspace, nnunet_executable, run_logged

    ws = Workspace(root).create()
    env = ws.env()
    log = root / "bench.log"
    run_logged(
        [
            sys.executable,
            "-m",
            "nnunet_distill.cli.synthetic",
            "-d",
            str(DATASET_ID),
            "--name",
            DATASET_NAME,
            "--cases",
            "5",
            "--test-cases",
            "0",
            "--size",
            *map(str, size),
        ],
        env,
        log,
    )
    run_logged(
        [
            nnunet_executable("nnUNetv2_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-c",
            "3d_fullres",
            "-npfp",
            "2",
            "-np",
            "2",
        ],
        {**env, "nnUNet_n_proc_DA": "1"},
        log,
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})


def _teacher_networks(plans: dict, dataset_json: dict, device, n: int):
    import torch
    from nnunet_distill.teachers import build_teacher_network

    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        nets.append(
            build_teacher_network(plans, "3d_fullres", dataset_json).to(device).eval().requires_grad_(False)
        )
    return nets


def _forward_variants(nets, x, device):
    """name -> zero-arg callable running the 5-teacher forward that way (all return mean logits)."""
    import torch
    from nnunet_distill.teachers import TeacherEnsemble
    from torch.func import functional_call, stack_module_state

    def loop(ctx_factory, models, inp):
        def run():
            with ctx_factory():
                total = None
                for m in models:
                    o = m(inp).float()
                    total = o if total is None else total + o
                return total / len(models)

        return run

    variants = {
        "no_grad fp32 loop (original)": loop(torch.no_grad, nets, x),
        "inference_mode fp32 loop": loop(torch.inference_mode, nets, x),
    }
    low = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    variants[f"inference_mode {str(low).split('.')[-1]} autocast"] = loop(
        lambda: _stack(torch.inference_mode(), torch.autocast(device.type, dtype=low)), nets, x
    )
    cl_nets = [copy.deepcopy(m).to(memory_format=torch.channels_last_3d) for m in nets]
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    variants["inference_mode channels-last 3D"] = loop(torch.inference_mode, cl_nets, x_cl)
    params, buffers = stack_module_state(nets)
    skeleton = copy.deepcopy(nets[0]).to("meta")

    def one(p, b, inp):
        return functional_call(skeleton, (p, b), (inp,))

    def vmapped():
        with torch.inference_mode():
            return torch.vmap(one, in_dims=(0, 0, None))(params, buffers, x).float().mean(0)

    variants["vmap over stacked folds"] = vmapped
    ensemble = TeacherEnsemble(nets, list(range(len(nets))))
    variants[f"TeacherEnsemble default on {device.type}"] = lambda: ensemble(x)
    return variants


@contextlib.contextmanager
def _stack(*managers):
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_kd_step", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=int, nargs=3, default=[48, 48, 48], help="synthetic image size (voxels)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each step (median reported)")
    parser.add_argument("-r", "--reduction_factor", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is steadier on a CPU shared with other work",
    )
    args = parser.parse_args(argv)
    for key, value in (("nnUNet_n_proc_DA", "0"), ("nnUNet_def_n_proc", "1"), ("nnUNet_compile", "false")):
        os.environ.setdefault(key, value)

    import torch
    from nnunet_distill import student
    from nnunet_distill.config import DistillationConfig
    from nnunet_distill.distill import resolve_device
    from nnunet_distill.teachers import TeacherEnsemble
    from nnunet_distill.trainer import nnUNetDistillationTrainer
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_kd_") as tmp, contextlib.redirect_stdout(sys.stderr):
        root = Path(tmp)
        t0 = time.perf_counter()
        _prepare_dataset(root, args.size)
        pre = root / "nnUNet_preprocessed" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((pre / "dataset.json").read_text())
        setup_s = time.perf_counter() - t0

        teacher_trainer = nnUNetTrainer(
            {**copy.deepcopy(plans), "continue_training": False}, "3d_fullres", 0, dataset_json, device
        )
        teacher_trainer.initialize()
        dl_train, _ = teacher_trainer.get_dataloaders()
        batch = next(dl_train)

        student_plans = student.derive_student_plans(plans, "3d_fullres", args.reduction_factor)
        cfg = DistillationConfig(
            dataset=str(DATASET_ID), fold=0, reduction_factor=args.reduction_factor, device=str(device)
        )
        nets = _teacher_networks(plans, dataset_json, device, N_TEACHERS)
        ensemble = TeacherEnsemble(nets, list(range(N_TEACHERS)))
        kd_trainer = nnUNetDistillationTrainer(
            {**student_plans, "continue_training": False}, "3d_fullres", 0, dataset_json, device
        )
        kd_trainer.configure_distillation(cfg, ensemble)
        kd_trainer.initialize()
        teacher_trainer.network.train()
        kd_trainer.network.train()

        x = batch["data"].to(device)
        variants = _forward_variants(nets, x, device)
        reference = variants["no_grad fp32 loop (original)"]()
        errors = {
            name: float((fn().float() - reference).abs().max())  # also warms each variant up
            for name, fn in variants.items()
        }
        teacher_trainer.train_step(batch)  # warm-up (allocator, oneDNN/cuDNN kernel choice)
        kd_trainer.train_step(batch)
        # Everything is interleaved within each repeat, so a change of machine load hits all numbers alike;
        # ratios are taken per repeat, then the median.
        t_teacher, t_kd = [], []
        t_var: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            t_teacher.append(_timed(lambda: teacher_trainer.train_step(batch), device))
            t_kd.append(_timed(lambda: kd_trainer.train_step(batch), device))
            for name, fn in variants.items():
                t_var[name].append(_timed(fn, device))

    default_name = f"TeacherEnsemble default on {device.type}"
    med_teacher, med_kd = statistics.median(t_teacher), statistics.median(t_kd)
    ratios = [k / t for k, t in zip(t_kd, t_teacher, strict=False)]
    # the student's share of a KD step (fwd+bwd+KD+SGD): KD step minus the ensemble forward of the same repeat
    student_part = [max(k - d, 0.0) for k, d in zip(t_kd, t_var[default_name], strict=False)]
    n_params_teacher = student.count_parameters(nets[0])
    n_params_student = student.count_parameters(kd_trainer.network)
    cm = kd_trainer.configuration_manager
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(
        f"KD step benchmark on {device} ({torch.get_num_threads()} threads, load avg {load:.1f}); "
        f"setup {setup_s:.0f} s"
    )
    print(
        f"  planned 3d_fullres: patch {list(cm.patch_size)}, batch {kd_trainer.batch_size}, "
        f"{len(cm.network_arch_init_kwargs['features_per_stage'])} stages; "
        f"teacher {n_params_teacher:,} params, student r={args.reduction_factor} {n_params_student:,} params "
        f"({n_params_student / n_params_teacher:.3f})"
    )
    print(f"  teacher training step (nnUNetTrainer.train_step):           {med_teacher * 1000:8.0f} ms")
    print(
        f"  KD step, {N_TEACHERS} teachers (nnUNetDistillationTrainer.train_step): {med_kd * 1000:8.0f} ms "
        f"(student part {statistics.median(student_part) * 1000:.0f} ms)"
    )
    print(
        f"  {N_TEACHERS}-teacher forward, by option (median of {args.repeats}; "
        "max |diff| vs the original's logits):"
    )
    for name in variants:
        implied = statistics.median(
            [(sp + v) / t for sp, v, t in zip(student_part, t_var[name], t_teacher, strict=False)]
        )
        print(
            f"    {name:<38} {statistics.median(t_var[name]) * 1000:8.0f} ms   KD/teacher step with it "
            f"{implied:5.2f}   (diff {errors[name]:.1e})"
        )
    ratio = statistics.median(ratios)
    print(
        f"KD step with {N_TEACHERS} teachers / teacher training step: {ratio:.2f} "
        f"(per repeat {min(ratios):.2f}-{max(ratios):.2f}; "
        f"goal <= 2.0: {'met' if ratio <= 2.0 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
