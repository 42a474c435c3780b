"""Pure planning: a DistillationJob spec becomes an ordered list of Stages, each a trainer-image command line.

The same Stages drive both executors: `k8s.py` renders them into batch/v1 Jobs, `local.py` runs them as
processes. Everything here is a function of (spec, paths): no cluster, no file system, no clock, so the
plan can be printed (`nnunet-distill plan`), unit-tested, and parsed by the trainer's own argument
parsers in the contract test (tests/e2e/test_contract.py).

"Only when missing" (preprocessed data, trained teacher folds) cannot be decided by the operator, which
never sees the volumes. A stage therefore carries `done_when_exists` globs: the executor checks them at
run time — in the pod (a tiny /bin/sh guard around the command, see k8s.py) or in Python (local.py) —
and a stage or fold whose outputs are already there finishes at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# nnU-Net model folder naming, the ONNX file name and the distill stage's held-out evaluation (which the
# quality gate judges) are the trainer's: one definition, in the standard-library-only contract module.
from nnunet_distill.contract import (
    DISTILL_TRAINER as DISTILL_TRAINER,
    DISTILL_TRAINER_DA5 as DISTILL_TRAINER_DA5,
    ONNX_FILENAME,
    student_plans_identifier as student_plans_identifier,
)
from nnunet_distill.contract import SUMMARY_NAME as DISTILLATION_SUMMARY

from nnunet_distill_operator import api, cascade_plan
from nnunet_distill_operator.distributed import launch_argv, per_rank_env
from nnunet_distill_operator.model_folders import (
    student_model_folder as student_model_folder,
    teacher_model_folder as teacher_model_folder,
)
from nnunet_distill_operator.status import EXIT_CODE_GATE_FAILED

GATE_STAGE = "gate"

DEFAULT_RESOURCES: dict[str, tuple[int, str, str]] = {
    # stage: (gpus, cpu, memory)
    "preprocess": (0, "4", "16Gi"),
    "teachers": (1, "8", "32Gi"),
    "distill": (1, "8", "32Gi"),
    "export": (0, "2", "8Gi"),
    "gate": (0, "500m", "512Mi"),
    "publish": (0, "1", "2Gi"),
}


@dataclass(frozen=True)
class DataPaths:
    """Where the executor makes the nnU-Net folders (and a scratch folder for exports) visible."""

    raw: str
    preprocessed: str
    results: str
    work: str

    @classmethod
    def in_pod(cls, job_name: str) -> DataPaths:
        """The pod layout: the volumes at /data/nnUNet_*, scratch on the results volume per job."""
        return cls(
            api.MOUNT_RAW,
            api.MOUNT_PREPROCESSED,
            api.MOUNT_RESULTS,
            f"{api.MOUNT_RESULTS}/nnunet-distill/{job_name}",
        )

    def env(self) -> dict[str, str]:
        return {
            "nnUNet_raw": self.raw,
            "nnUNet_preprocessed": self.preprocessed,
            "nnUNet_results": self.results,
        }


@dataclass(frozen=True)
class Command:
    """One process of a stage; a stage's commands run in order, each only if the previous succeeded."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class StageResources:
    gpus: int
    cpu: str | None
    memory: str | None
    data_loader_workers: int
    nodes: int = 1  # pods of one multi-node DDP run (distill only; see distributed.py)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a batch/v1 Job in Kubernetes, one or more processes locally."""

    name: str
    description: str
    commands: tuple[Command, ...]
    resources: StageResources
    needs: tuple[str, ...] = ()
    # Indexed stage: one pod per value; pod i works on index_values[i] (via $JOB_COMPLETION_INDEX).
    index_values: tuple[str, ...] = ()
    # The stage (or, for indexed stages, index value "{value}") is already done when every glob matches.
    done_when_exists: tuple[str, ...] = ()
    uses_credentials: bool = False
    reports_progress: bool = False
    # Pod sizing (nnU-Net worker counts from the stage's CPUs): a local run keeps the user's values.
    env: tuple[tuple[str, str], ...] = field(default=())
    # Values the command needs to work at all: they override the environment everywhere.
    required_env: tuple[tuple[str, str], ...] = field(default=())
    # Exit codes that mean a deterministic outcome (e.g. the quality gate's "failed"): the Job fails at once
    # instead of retrying the same verdict (podFailurePolicy FailJob, besides the usage-error code 2).
    fail_fast_exit_codes: tuple[int, ...] = field(default=())

    @property
    def completions(self) -> int:
        return max(1, len(self.index_values), self.resources.nodes)

    @property
    def argv(self) -> tuple[str, ...]:
        """The main (last) command; earlier ones prepare it (init containers in Kubernetes)."""
        return self.commands[-1].argv


def _cpu_count(cpu: str | None) -> int | None:
    """Whole CPUs in a quantity ('8' -> 8, '7500m' -> 7, '0.5' -> 0); None when not given."""
    if cpu is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d*)?)(m?)", cpu)
    if not m:
        return None
    value = float(m.group(1)) / (1000 if m.group(2) else 1)
    return int(value)


def stage_resources(spec: api.DistillationJobSpec, stage: str) -> StageResources:
    gpus, cpu, memory = DEFAULT_RESOURCES[stage]
    own: api.StageResourcesSpec = getattr(spec.resources, stage)
    gpus = own.gpus if own.gpus is not None else gpus
    cpu = own.cpu if own.cpu is not None else cpu
    memory = own.memory if own.memory is not None else memory
    workers = own.data_loader_workers
    if workers is None:
        workers = max(1, (_cpu_count(cpu) or 2) - 1)
    return StageResources(
        gpus=gpus, cpu=cpu, memory=memory, data_loader_workers=workers, nodes=own.nodes or 1
    )


def _device(resources: StageResources, override: str | None) -> str:
    if override is not None:
        return override
    return "cuda" if resources.gpus > 0 else "cpu"


def _num(x: float) -> str:
    return repr(float(x))


def export_paths(paths: DataPaths) -> tuple[str, str, str]:
    """(export dir, ONNX file, package dir) in the job's scratch folder."""
    export_dir = f"{paths.work}/export"
    return export_dir, f"{export_dir}/{ONNX_FILENAME}", f"{paths.work}/package"


def _dataset_glob(root: str, dataset_id: int) -> str:
    return f"{root}/Dataset{dataset_id:03d}_*"


def _preprocess(spec: api.DistillationJobSpec, paths: DataPaths) -> Stage | None:
    if spec.preprocess.mode == "Never":
        return None
    res = stage_resources(spec, "preprocess")
    n = spec.preprocess.processes or _cpu_count(res.cpu) or 4
    d = str(spec.dataset.id)
    data = cascade_plan.preprocess_configurations(spec)  # a cascade: its lowres and its fullres data
    argv = ["nnUNetv2_plan_and_preprocess", "-d", d, "-c", *data]
    if spec.preprocess.verify_dataset_integrity:
        argv.append("--verify_dataset_integrity")
    argv += ["-npfp", str(n), "-np", str(n)]
    commands = [Command("plan-and-preprocess", tuple(argv))]
    planner = spec.planner
    if planner:
        commands.append(Command("plan-experiment", ("nnUNetv2_plan_experiment", "-d", d, "-pl", planner)))
    done: tuple[str, ...] = ()
    if spec.preprocess.mode == "IfMissing":
        ds = _dataset_glob(paths.preprocessed, spec.dataset.id)
        plans = sorted({api.DEFAULT_STANDARD_TEACHER_PLANS, spec.teacher_plans, spec.student_base_plans})
        done = tuple(f"{ds}/{p}.json" for p in plans) + tuple(f"{ds}/nnUNetPlans_{c}" for c in data)
    return Stage(
        name="preprocess",
        description=f"plan and preprocess Dataset{spec.dataset.id:03d} ({' '.join(data)})"
        + (f" + {planner}" if planner else ""),
        commands=tuple(commands),
        resources=res,
        done_when_exists=done,
        env=(("nnUNet_def_n_proc", str(n)),),
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0 (a common
        # setting for training on small machines).
        required_env=(("nnUNet_n_proc_DA", str(n)),),
    )


def _teachers(spec: api.DistillationJobSpec, paths: DataPaths, device: str | None) -> Stage | None:
    if not spec.teachers.train:
        return None
    folds = spec.teacher_folds or ()
    res = stage_resources(spec, "teachers")
    argv = ["nnunet-distill", "train-teacher", "-d", str(spec.dataset.id), "-c", spec.configuration]
    if len(folds) == 1:
        argv += ["-f", str(folds[0])]
        index_values: tuple[str, ...] = ()
        fold_part = str(folds[0])
    else:
        argv += ["--folds-by-index", *map(str, folds)]
        index_values = tuple(map(str, folds))
        fold_part = "{value}"
    argv += ["-tr", spec.teachers.trainer, "-p", spec.teacher_plans]
    budget = spec.teachers.training
    if budget.epochs is not None:
        argv += ["-e", str(budget.epochs)]
    if budget.iterations_per_epoch is not None:
        argv += ["--iterations_per_epoch", str(budget.iterations_per_epoch)]
    if budget.val_iterations is not None:
        argv += ["--val_iterations", str(budget.val_iterations)]
    argv += ["-device", _device(res, device), "--c"]
    fold_dir = (
        f"{_dataset_glob(paths.results, spec.dataset.id)}/{teacher_model_folder(spec)}/fold_{fold_part}"
    )
    done = (f"{fold_dir}/checkpoint_final.pth",)
    return Stage(
        name="teachers",
        description=f"train teacher folds {' '.join(map(str, folds))} ({spec.teachers.trainer}, "
        f"{spec.teacher_plans})",
        commands=(Command("train-teacher", tuple(argv)),),
        resources=res,
        index_values=index_values,
        done_when_exists=done,
        reports_progress=True,
        env=_worker_env(res),
    )


def _worker_env(res: StageResources) -> tuple[tuple[str, str], ...]:
    return (
        ("nnUNet_n_proc_DA", str(res.data_loader_workers)),
        ("nnUNet_def_n_proc", str(max(1, _cpu_count(res.cpu) or 1))),
    )


def _kd_flags(d: api.DistillationSpec) -> list[str]:
    """The distillation options of the trainer's command line (augmentation, fold rotation, KD mode)."""
    flags = []
    if d.use_da5:
        flags.append("--use_da5")
    if d.rotate_folds:
        flags.append("-rotate_folds")
        if d.rotate_frequency is not None:
            flags += ["-rotate_freq", str(d.rotate_frequency)]
    if d.disable_mirroring:
        flags.append("-disable_mirroring")
    flags += ["--kd_mode", d.kd_mode, "--student_init", d.student_init, "--teacher_view", d.teacher_view]
    if d.test_cases:
        flags += ["--test_cases", *d.test_cases]
    if d.unlabelled_cases:
        flags += ["--unlabelled_cases", *d.unlabelled_cases]
    if d.labelled_share is not None:
        flags += ["--labelled_share", str(d.labelled_share)]
    return flags


def _distill(spec: api.DistillationJobSpec, device: str | None) -> Stage:
    res = stage_resources(spec, "distill")
    d = spec.distillation
    resenc = spec.student.architecture == "resenc"
    argv = [
        "nnUNetv2_resenc_distillation_train" if resenc else "nnUNetv2_distillation_train",
        "-d",
        str(spec.dataset.id),
        "-c",
        spec.configuration,
        "-f",
        str(d.fold),
    ]
    folds = spec.teacher_folds
    if folds is not None:
        argv += ["-tf", *map(str, folds)]
    argv += [
        "-a",
        _num(d.alpha),
        "-temp",
        _num(d.temperature),
        "-r",
        str(spec.student.reduction_factor),
        "-e",
        str(d.epochs),
    ]
    if d.iterations_per_epoch is not None:
        argv += ["--iterations_per_epoch", str(d.iterations_per_epoch)]
    if d.val_iterations is not None:
        argv += ["--val_iterations", str(d.val_iterations)]
    argv += ["-tr", spec.teachers.trainer]
    if resenc:
        argv += [
            "-tpl",
            spec.teacher_plans,
            "-spl",
            spec.student_base_plans,
            "-bs",
            spec.student.block_strategy,
        ]
    else:
        argv += ["-p", spec.teacher_plans]
    if spec.teachers.folder:
        argv += ["-t", spec.teachers.folder]
    argv += _kd_flags(d)
    # Always resume: a restarted pod (retry, preemption, node loss) continues from the newest checkpoint on
    # the volume; without one the trainer starts fresh (and says so).
    argv += ["-d_device", _device(res, device), "-c_continue"]
    return Stage(
        name="distill",
        description=f"distill {spec.student.architecture} student r={spec.student.reduction_factor} "
        f"(alpha {d.alpha}, T {d.temperature}, {d.epochs} epochs) on fold {d.fold}",
        # torchrun when several GPUs or nodes train one student (distributed.launch_argv).
        commands=(Command("distill", launch_argv(argv, res.gpus, res.nodes)),),
        resources=res,
        reports_progress=True,
        env=per_rank_env(_worker_env(res), res.gpus),
    )


def _resenc_export_argv(spec: api.DistillationJobSpec, common: list[str], export_dir: str) -> list[str]:
    e = spec.export
    argv = [
        "nnUNetv2_resenc_distillation_export_onnx",
        *common,
        "-tpl",
        spec.teacher_plans,
        "-spl",
        spec.student_base_plans,
        "-bs",
        spec.student.block_strategy,
    ]
    batch = 0 if e.dynamic_shape and e.batch_size is None else e.batch_size
    if batch is not None:
        argv += ["-b", str(batch)]
    if e.tensorrt_compatible:
        argv.append("-fix")
    if spec.distillation.use_da5:
        argv.append("-da5")
    if e.simplify:
        argv.append("-sim")
    return [*argv, "-v", "-o", export_dir]


def _export_argv(spec: api.DistillationJobSpec, common: list[str], onnx_file: str) -> list[str]:
    e = spec.export
    argv = ["nnUNetv2_distillation_export_onnx", *common, "-p", spec.teacher_plans]
    if e.tensorrt_compatible:
        argv.append("-fix")
    if spec.distillation.use_da5:
        argv.append("-da5")
    if e.dynamic_shape:
        argv.append("-da")
    if e.input_shape is not None:
        argv += ["-is", *map(str, e.input_shape)]
    if e.nnunet_format:
        argv.append("-nn")
    if e.simplify:
        argv.append("-sim")
    return [*argv, "-v", "-o", onnx_file]


def _export(spec: api.DistillationJobSpec, name: str, paths: DataPaths) -> Stage:
    res = stage_resources(spec, "export")
    e = spec.export
    resenc = spec.student.architecture == "resenc"
    export_dir, onnx_file, package_dir = export_paths(paths)
    common = [
        "-d",
        str(spec.dataset.id),
        "-c",
        spec.configuration,
        "-f",
        str(spec.distillation.fold),
        "-r",
        str(spec.student.reduction_factor),
    ]
    argv = _resenc_export_argv(spec, common, export_dir) if resenc else _export_argv(spec, common, onnx_file)
    package = (
        "nnunet-distill",
        "package",
        "--onnx",
        onnx_file,
        "-o",
        package_dir,
        "--name",
        e.model_name or name,
    )
    return Stage(
        name="export",
        description=f"export the student to ONNX and package it ({package_dir})",
        commands=(Command("export", tuple(argv)), Command("package", package)),
        resources=res,
        env=(("nnUNet_def_n_proc", str(max(1, _cpu_count(res.cpu) or 1))),),
    )


def student_summary_glob(spec: api.DistillationJobSpec, paths: DataPaths) -> str:
    """The student's distillation_summary.json; a glob because only the dataset ID (not its name) is known."""
    return (
        f"{_dataset_glob(paths.results, spec.dataset.id)}/{student_model_folder(spec)}/"
        f"fold_{spec.distillation.fold}/validation/{DISTILLATION_SUMMARY}"
    )


def _gate(spec: api.DistillationJobSpec, paths: DataPaths) -> Stage:
    g = spec.quality_gate
    argv = [
        "nnunet-distill",
        "gate",
        "--summary",
        student_summary_glob(spec, paths),
        "--min-retention",
        _num(g.min_retention),
        "--min-label-retention",
        _num(g.min_label_retention),
    ]
    if not g.enforce:
        argv.append("--no-enforce")
    return Stage(
        name=GATE_STAGE,
        description=f"quality gate: held-out Dice retention >= {g.min_retention:g} and every label >= "
        f"{g.min_label_retention:g} "
        + ("(a failing student is not published)" if g.enforce else "(enforce: false, reported only)"),
        commands=(Command("gate", tuple(argv)),),
        resources=stage_resources(spec, GATE_STAGE),
        fail_fast_exit_codes=(EXIT_CODE_GATE_FAILED,),
    )


def _publish(spec: api.DistillationJobSpec, paths: DataPaths) -> Stage | None:
    if spec.output is None:
        return None
    _, _, package_dir = export_paths(paths)
    return Stage(
        name="publish",
        description=f"publish and verify the package at {spec.output.uri}",
        commands=(Command("publish", ("nnunet-distill", "publish", package_dir, spec.output.uri)),),
        resources=stage_resources(spec, "publish"),
        uses_credentials=True,
    )


def plan(
    spec: api.DistillationJobSpec, *, name: str, paths: DataPaths, device: str | None = None
) -> tuple[Stage, ...]:
    """The ordered stages of a job. `device` overrides the per-stage choice (cuda when the stage has GPUs)."""
    stages = [
        s
        for s in (
            _preprocess(spec, paths),
            cascade_plan.lowres_teachers(spec, lambda s: _teachers(s, paths, device)),
            _teachers(spec, paths, device),
            cascade_plan.lowres_students(spec, lambda s: _distill(s, device)),
            _distill(spec, device),
            _export(spec, name, paths),
            _gate(spec, paths),
            _publish(spec, paths),
        )
        if s is not None
    ]
    chained = []
    for i, stage in enumerate(stages):
        needs = (stages[i - 1].name,) if i else ()
        chained.append(Stage(**{**stage.__dict__, "needs": needs}))
    return tuple(chained)


def describe(stages: tuple[Stage, ...]) -> str:
    """Human-readable plan (`nnunet-distill plan`): one block per stage with its command lines."""
    import shlex

    lines = []
    for i, stage in enumerate(stages, 1):
        r = stage.resources
        res = f"gpus={r.gpus} cpu={r.cpu or '-'} memory={r.memory or '-'}"
        extra = f", {stage.completions} pods (indexed)" if stage.index_values else ""
        lines.append(f"{i}. {stage.name}: {stage.description} [{res}{extra}]")
        if stage.done_when_exists:
            lines.append(f"   skipped when present: {', '.join(stage.done_when_exists)}")
        for command in stage.commands:
            lines.append(f"   $ {shlex.join(command.argv)}")
    return "\n".join(lines)
