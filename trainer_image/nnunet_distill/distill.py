"""One distillation run, start to finish: the single code path behind both training CLIs.

resolve dataset -> derive + check student plans -> select and load teachers -> (resume checks) -> nnU-Net
training with KD -> nnU-Net's final validation -> student-vs-teacher summary. Every user-facing failure before
training raises :class:`DistillationError` with a one-line message naming the flag or file and the fix; the
CLIs print it and exit non-zero. Pure checks are separate functions so they are testable without training.
"""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_distill import contract
from nnunet_distill import nnunet_env
from nnunet_distill.config import DistillationConfig


class DistillationError(RuntimeError):
    """A run cannot start or continue; the message is one line for the user (flag/file + fix)."""


# ---------------------------------------------------------------------------------------------
# Pure checks
# ---------------------------------------------------------------------------------------------

#: Checkpoint fields that must match for -c_continue, with the flag that sets each.
RESUME_FIELDS = (
    ("alpha", "-a"),
    ("temperature", "-temp"),
    ("reduction_factor", "-r"),
    ("teacher_folds", "-tf"),
    ("teacher_folder", "-t"),
    ("block_strategy", "-bs"),
    ("student_plans", "-spl/-r/-bs"),
    ("kd_mode", "--kd_mode"),
    ("unlabelled_cases", "--unlabelled_cases"),
    ("labelled_share", "--labelled_share"),
)


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's ``distillation`` record and this run's."""
    out = []
    for key, flag in RESUME_FIELDS:
        if key not in saved:
            continue
        a, b = saved.get(key), current.get(key)
        if key == "teacher_folds":
            a, b = sorted(a or []), sorted(b or [])
        elif (
            (isinstance(a, float) or isinstance(b, float))
            and a is not None
            and b is not None
            and abs(float(a) - float(b)) <= 1e-12
        ):
            continue
        if a != b:
            out.append(f"{key} {a} (this run: {flag} {b})")
    return out


def pick_resume_checkpoint(fold_folder: Path) -> Path | None:
    """checkpoint_latest (written every epoch, newest) before checkpoint_final; None when neither exists."""
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth"):
        if (fold_folder / name).is_file():
            return fold_folder / name
    return None


def check_teacher_accepts_patch(teacher_plans: dict, student_plans: dict, configuration: str) -> None:
    """Teachers run on the student's patch: it must be divisible by the teacher's total stride too, or the
    teacher's skip connections do not line up (student and teacher patch sizes may differ, e.g. ResEnc)."""
    t_cfg = _resolved_configuration(teacher_plans, configuration)
    s_cfg = _resolved_configuration(student_plans, configuration)
    patch = [int(p) for p in s_cfg["patch_size"]]
    stride = nnunet_env.total_stride(t_cfg["architecture"]["arch_kwargs"].get("strides", []), len(patch))
    if any(p % s for p, s in zip(patch, stride, strict=False)):
        raise DistillationError(
            f"the student patch size {patch} ({student_plans.get('plans_name')}) is not divisible by the "
            f"teacher's total stride {stride} ({teacher_plans.get('plans_name')}): the teachers cannot run "
            "on the "
            f"student's batches; use student plans whose patch is a multiple of {stride}"
        )


def _resolved_configuration(plans: dict, configuration: str) -> dict:
    try:
        return nnunet_env.resolved_configuration(plans["configurations"], configuration)
    except nnunet_env.PlansError as exc:
        raise DistillationError(f"{plans.get('plans_name')}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Environment edges
# ---------------------------------------------------------------------------------------------


def _env_dir(name: str) -> Path:
    try:
        return nnunet_env.env_dir(name)
    except nnunet_env.NnUNetSetupError as exc:
        raise DistillationError(str(exc)) from None


def resolve_dataset(dataset: str) -> str:
    """'901' / 901 / 'Dataset901_Synth' -> 'Dataset901_Synth' (nnunet_env's lookup), preprocessed here."""
    try:
        name = nnunet_env.resolve_dataset_name(dataset)
    except nnunet_env.NnUNetSetupError as exc:
        raise DistillationError(f"{exc} (-d)") from None
    if not (_env_dir("nnUNet_preprocessed") / name).is_dir():
        raise DistillationError(
            f"{_env_dir('nnUNet_preprocessed') / name} does not exist: run "
            f"nnUNetv2_plan_and_preprocess -d {nnunet_env.dataset_id_of(name)} first"
        )
    return name


def resolve_device(text: str | None):
    """cpu | cuda | cuda:N | mps; default cuda when available. Never assumes CUDA exists."""
    try:
        return nnunet_env.select_device(text, flag="-d_device")
    except nnunet_env.NnUNetSetupError as exc:
        raise DistillationError(str(exc)) from None


def _configure_threads(device, ranks_on_node: int = 1) -> None:
    import torch

    from nnunet_distill.distributed import threads_per_rank

    # nnU-Net's own convention (run_training): all cores on CPU (shared by the node's ranks), one thread
    # when a GPU does the work.
    if device.type == "cpu":
        torch.set_num_threads(threads_per_rank(multiprocessing.cpu_count(), ranks_on_node))
    else:
        torch.set_num_threads(1)
        with_interop = getattr(torch, "set_num_interop_threads", None)
        if with_interop is not None:
            with contextlib.suppress(RuntimeError):  # already set once in this process
                with_interop(1)


def _load_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise DistillationError(f"{what} {path} does not exist: {fix}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """Everything resolved before training; cheap to build (no teacher weights loaded yet)."""

    config: DistillationConfig
    dataset_name: str
    preprocessed_dir: Path
    teacher_folder: Path
    teacher_plans: dict
    teacher_dataset_json: dict
    student_plans: dict
    dataset_json: dict
    teacher_folds: list  # list[TeacherFold]
    output_folder: Path  # .../<trainer>__<studentPlans>__<cfg>/fold_<f>


def prepare(config: DistillationConfig) -> PreparedRun:
    """Resolve the dataset, the teachers and the student plans, and check they fit, before any training."""
    from nnunet_distill.teachers import TeacherError, default_teacher_folder, read_teacher_json, select_folds

    dataset_name = resolve_dataset(config.dataset)
    preprocessed_dir = _env_dir("nnUNet_preprocessed") / dataset_name
    results_dir = _env_dir("nnUNet_results")
    teacher_folder = (
        Path(config.teacher_folder).resolve()
        if config.teacher_folder
        else default_teacher_folder(
            results_dir, dataset_name, config.teacher_trainer, config.teacher_plans, config.configuration
        )
    )
    try:
        teacher_plans, teacher_dataset_json = read_teacher_json(teacher_folder)
        teacher_folds = select_folds(teacher_folder, config.teacher_folds, config.teacher_checkpoint)
    except TeacherError as exc:
        raise DistillationError(str(exc)) from None
    if config.configuration not in teacher_plans.get("configurations", {}):
        raise DistillationError(
            f"configuration {config.configuration!r} (-c) is not in the teacher plans "
            f"{teacher_folder / 'plans.json'} (available: "
            f"{', '.join(teacher_plans.get('configurations', {}))})"
        )
    dataset_json = _load_json(
        preprocessed_dir / "dataset.json", "dataset.json", "run nnUNetv2_plan_and_preprocess first"
    )
    student_plans = derive_checked_student_plans(
        config, preprocessed_dir, teacher_plans, teacher_dataset_json, dataset_json
    )
    output_folder = (
        contract.student_model_folder(
            results_dir / dataset_name, student_plans["plans_name"], config.configuration, config.use_da5
        )
        / f"fold_{config.fold}"
    )
    return PreparedRun(
        config,
        dataset_name,
        preprocessed_dir,
        teacher_folder,
        teacher_plans,
        teacher_dataset_json,
        student_plans,
        dataset_json,
        teacher_folds,
        output_folder,
    )


def derive_checked_student_plans(
    config: DistillationConfig,
    preprocessed_dir: Path,
    teacher_plans: dict,
    teacher_dataset_json: dict,
    dataset_json: dict,
) -> dict:
    """The student plans (every configuration reduced, named by config.student_plans_identifier), checked
    against the teachers and the preprocessed data the configuration reads."""
    from nnunet_distill import student

    dataset_name = preprocessed_dir.name
    base_plans = _load_json(
        preprocessed_dir / f"{config.student_base_plans}.json",
        "student base plans",
        f"plan them with nnUNetv2_plan_experiment -d {dataset_name[7:10].lstrip('0')} "
        f"(-pl nnUNetPlannerResEncM/L/XL for ResEnc plans), or pick existing plans with "
        f"{'-spl' if config.variant == 'resenc' else '-p'}",
    )
    try:
        student_plans = student.derive_student_plans(
            base_plans,
            config.configuration,
            config.reduction_factor,
            config.block_strategy,
            teacher_plans_name=config.teacher_plans,
        )
        student.check_compatible(
            teacher_plans, teacher_dataset_json, student_plans, dataset_json, config.configuration
        )
    except (student.StudentPlansError, student.CompatibilityError) as exc:
        raise DistillationError(str(exc)) from None
    check_teacher_accepts_patch(teacher_plans, student_plans, config.configuration)
    data_dir = (
        preprocessed_dir / _resolved_configuration(student_plans, config.configuration)["data_identifier"]
    )
    if not data_dir.is_dir():
        raise DistillationError(
            f"preprocessed data {data_dir} does not exist: run nnUNetv2_preprocess -d "
            f"{dataset_name[7:10].lstrip('0')} -c {config.configuration} -plans_name "
            f"{config.student_base_plans}"
        )
    return student_plans


def check_test_cases(run: PreparedRun) -> None:
    """Fail before training, not after it, when --test_cases names a missing case or one a model trained
    on."""
    from nnunet_distill.evaluation import check_unseen, find_test_cases

    if run.config.test_cases is None:
        return
    raw = os.environ.get(contract.ENV_NNUNET_RAW)
    if not raw or not (Path(raw) / run.dataset_name).is_dir():
        raise DistillationError(
            f"--test_cases needs the raw dataset: {raw or '$nnUNet_raw'}/{run.dataset_name} "
            "does not exist (set nnUNet_raw)"
        )
    cases = find_test_cases(Path(raw) / run.dataset_name, run.dataset_json, run.config.test_cases)
    splits_file = run.preprocessed_dir / "splits_final.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else []
    student_train = splits[run.config.fold]["train"] if run.config.fold < len(splits) else []
    if any(c.source == "imagesTr" for c in cases) and run.config.fold >= len(splits):
        raise DistillationError(
            f"--test_cases names training cases, but {splits_file} does not define fold "
            f"{run.config.fold}: cannot prove the student never trains on them"
        )
    check_unseen(cases, splits, [f.fold for f in run.teacher_folds], run.config.fold, student_train)


def check_unlabelled_cases(run: PreparedRun) -> None:
    """Fail before training when --unlabelled_cases cannot be used (see :mod:`nnunet_distill.unlabelled`)."""
    from nnunet_distill import unlabelled

    config = _resolved_configuration(run.student_plans, run.config.configuration)
    if problems := unlabelled.check(
        run.config.unlabelled_cases, run.preprocessed_dir, config["data_identifier"]
    ):
        raise DistillationError("; ".join(problems))


def distillation_metadata(run: PreparedRun) -> dict:
    return {
        "teacher_folder": str(run.teacher_folder),
        "teacher_folds": [f.fold for f in run.teacher_folds],
        "teacher_plans_name": run.teacher_plans.get("plans_name"),
        "student_plans": run.student_plans["plans_name"],
        "dataset": run.dataset_name,
    }


def check_resume(run: PreparedRun) -> Path | None:
    """-c_continue: the checkpoint to resume from (None: start fresh), refusing on changed KD settings."""
    from nnunet_distill.teachers import load_checkpoint_file

    ckpt_path = pick_resume_checkpoint(run.output_folder)
    if ckpt_path is None:
        return None
    saved = load_checkpoint_file(ckpt_path).get("distillation")
    if saved is None:
        raise DistillationError(
            f"-c_continue: {ckpt_path} has no distillation record (not written by this tool); "
            "remove it or drop -c_continue"
        )
    current = {**run.config.as_dict(), **distillation_metadata(run)}
    diffs = resume_mismatches(saved, current)
    if diffs:
        raise DistillationError(
            f"-c_continue refused: {ckpt_path} was trained with {'; '.join(diffs)}; rerun with "
            "the checkpoint's settings to continue, or without -c_continue to start over"
        )
    return ckpt_path


def check_fresh_run(run: PreparedRun) -> None:
    """A fresh run never replaces another student silently: where this student's fold already holds a
    checkpoint, only --overwrite lets a new training start there (-c_continue resumes it instead)."""
    existing = pick_resume_checkpoint(run.output_folder)
    if existing is None or run.config.continue_training:
        return
    if not run.config.overwrite:
        raise DistillationError(
            f"{run.output_folder} already holds a trained student ({existing.name}): pass -c_continue to "
            "resume it, --overwrite to replace it with a fresh training, or change -r/-p/-c/-f for "
            "another student"
        )


def resume_or_refuse(run: PreparedRun, log) -> Path | None:
    """The checkpoint to resume from (-c_continue), None for a fresh start (refused over an existing
    student without --overwrite)."""
    check_fresh_run(run)
    if not run.config.continue_training:
        if pick_resume_checkpoint(run.output_folder) is not None:
            log(f"--overwrite: {run.output_folder} already holds a checkpoint; it will be replaced")
        return None
    resume_from = check_resume(run)
    if resume_from is None:
        log(f"-c_continue: no checkpoint in {run.output_folder}; starting a new training")
    return resume_from


@dataclass
class RunResult:
    output_folder: Path
    checkpoint: Path
    summary: Path | None
    resumed_from: Path | None
    artifacts: dict = field(default_factory=dict)  # for the termination message (status.artifacts)
    metrics: dict = field(default_factory=dict)  # evaluation.result_metrics: finalDice, retention, ...


def _result(trainer, summary_path: Path | None, resumed_from: Path | None) -> RunResult:
    folder = Path(trainer.output_folder)
    meta = trainer.distillation_meta
    artifacts = {
        "modelPath": str(folder.parent),
        "checkpoint": str(folder / "checkpoint_final.pth"),
        "studentPlans": meta.get("student_plans"),
        "studentParameters": meta.get("student_parameters"),
        "teacherParameters": meta.get("teacher_parameters"),
    }
    metrics = {}
    if summary_path is not None and summary_path.is_file():
        from nnunet_distill.evaluation import result_metrics

        metrics = result_metrics(json.loads(summary_path.read_text()))
    return RunResult(folder, folder / "checkpoint_final.pth", summary_path, resumed_from, artifacts, metrics)


def run(config: DistillationConfig, log=print) -> RunResult:
    """Train, validate and summarise one student fold. ``log`` receives the few lines meant for the user.

    Under torchrun (or ``-num_gpus``) every rank runs this; rank 0 alone logs, writes plans, progress,
    checkpoints and the summary (see :mod:`nnunet_distill.distributed`).
    """
    from nnunet_distill import distributed

    ranks = distributed.ranks_from_env()
    device = distributed.rank_device(resolve_device(config.device), ranks)
    if distributed.init_process_group(device, ranks):
        try:
            return _run(config, device, ranks, log if ranks.is_main else (lambda _msg: None))
        finally:
            distributed.destroy_process_group()
    return _run(config, device, ranks, log)


def load_teacher_ensemble(run: PreparedRun, device):
    """The selected teacher folds, loaded on `device` at the configured precision."""
    from nnunet_distill.teachers import TeacherEnsemble, load_teacher, resolve_precision

    cfg = run.config
    return TeacherEnsemble(
        [
            load_teacher(f, run.teacher_plans, cfg.configuration, run.teacher_dataset_json, device)
            for f in run.teacher_folds
        ],
        [f.fold for f in run.teacher_folds],
        precision=resolve_precision(cfg.teacher_precision, device),
    )


def _start_or_resume(trainer, config: DistillationConfig, resume_from: Path | None, log) -> None:
    """Load the checkpoint to resume, or initialise a fresh student (by default from the teachers)."""
    if resume_from is not None:
        trainer.load_checkpoint(str(resume_from))
        log(
            f"-c_continue: resuming from {resume_from} at epoch {trainer.current_epoch} of "
            f"{trainer.num_epochs}"
        )
    else:
        trainer.initialize()
        if config.student_init == "teacher":
            log(trainer.inherit_teacher_weights())


def _run(config: DistillationConfig, device, ranks, log) -> RunResult:
    from nnunet_distill import cascade, distributed

    run_ = prepare(config)
    check_test_cases(run_)
    check_unlabelled_cases(run_)
    cascade.check_before_training(run_)  # a 3d_cascade_fullres student needs its lowres stage first
    resume_from = resume_or_refuse(run_, log)

    from nnunet_distill import progress_hooks, student
    from nnunet_distill.held_out import write_distillation_summary
    from nnunet_distill.trainer import trainer_class

    _configure_threads(device, ranks.local_world_size)
    if ranks.is_main:
        student.write_student_plans(run_.preprocessed_dir, run_.student_plans)
    distributed.barrier()

    plans = copy.deepcopy(run_.student_plans)
    plans["continue_training"] = resume_from is not None
    trainer = trainer_class(config.use_da5)(
        plans, config.configuration, config.fold, run_.dataset_json, device
    )
    teachers = load_teacher_ensemble(run_, device)
    meta = distillation_metadata(run_)
    meta["world_size"] = ranks.world_size
    meta["student_parameters"] = None
    meta["teacher_parameters"] = student.count_parameters(teachers.teachers[0])
    trainer.configure_distillation(config, teachers, meta)
    _start_or_resume(trainer, config, resume_from, log)
    trainer.distillation_meta["student_parameters"] = student.count_parameters(trainer.network)

    # the same hooks as the teachers': progress.json, live status, restart count, resume checkpoint; rank 0
    # alone reports status (the other ranks' reporters get no pod env and stay inactive)
    reporter = progress_hooks.start_reporting(
        trainer, stage="distill", resumed=resume_from is not None, env=os.environ if ranks.is_main else {}
    )
    try:
        trainer.run_training()
        trainer.perform_actual_validation(False)  # DDP: nnU-Net splits the validation cases between ranks
        if not ranks.is_main:
            return _result(trainer, None, resume_from)
        raw = os.environ.get(contract.ENV_NNUNET_RAW)
        summary = write_distillation_summary(
            trainer,
            run_.teacher_plans,
            run_.teacher_dataset_json,
            [f.fold for f in run_.teacher_folds],
            str(run_.teacher_folder),
            raw_dataset=Path(raw) / run_.dataset_name if raw else None,
            test_cases=config.test_cases,
            teacher_checkpoint=config.teacher_checkpoint,
        )
    finally:
        reporter.close()
    return _result(trainer, summary, resume_from)
