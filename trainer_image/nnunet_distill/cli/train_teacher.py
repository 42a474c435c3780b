"""`nnunet-distill train-teacher`: train one teacher fold with stock nnU-Net.

The teacher is an ordinary nnU-Net model: nnU-Net's own trainer class (looked up by name, so custom
and external trainers work), its own results folder `<trainer>__<plans>__<cfg>/fold_<f>`, its own
checkpoints and final validation. What this adds over `nnUNetv2_train`: a training budget that can be
cut for demos and tests (`-e`, `--iterations_per_epoch`, `--val_iterations`, set on the trainer
instance before training, nnU-Net's defaults otherwise), `--folds-by-index` so one Kubernetes Indexed
Job trains every fold, `cuda:N` devices, and one-line errors instead of tracebacks for setup mistakes.
"""

from __future__ import annotations

import argparse
import os
import sys

from nnunet_distill import contract
from nnunet_distill.cli.flags import OneLineParser, add_flags, flag
from nnunet_distill.nnunet_env import (
    NnUNetSetupError,
    load_dataset_json,
    load_plans,
    resolve_dataset_name,
    select_device,
)

PROG = "nnunet-distill train-teacher"


def _fold(value: str) -> int | str:
    if value == "all":
        return value
    try:
        fold = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be an integer >= 0 or 'all', got {value!r}") from None
    if fold < 0:
        raise argparse.ArgumentTypeError(f"fold must be >= 0, got {fold}")
    return fold


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


_FLAGS_BEFORE_FOLDS = (
    flag("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name"),
    flag(
        "-c",
        "--configuration",
        default=contract.DEFAULT_CONFIGURATION,
        help=f"nnU-Net configuration (default {contract.DEFAULT_CONFIGURATION})",
    ),
)
_FOLD_FLAGS = (
    flag("-f", "--fold", type=_fold, help="fold to train (0..4 or 'all')"),
    flag(
        "--folds-by-index",
        type=_fold,
        nargs="+",
        metavar="FOLD",
        help="train folds[$JOB_COMPLETION_INDEX] (one Kubernetes Indexed Job trains all folds)",
    ),
)
_FLAGS_AFTER_FOLDS = (
    flag(
        "-tr",
        "--trainer",
        default=contract.DEFAULT_TEACHER_TRAINER,
        help=f"nnU-Net trainer class (default {contract.DEFAULT_TEACHER_TRAINER}; external trainers "
        "via nnUNet_extTrainer)",
    ),
    flag(
        "-p",
        "--plans",
        default=contract.DEFAULT_PLANS,
        help=f"plans identifier (default {contract.DEFAULT_PLANS}; e.g. nnUNetResEncUNetMPlans)",
    ),
    flag(
        "-e",
        "--epochs",
        type=_positive,
        default=None,
        help="epochs (default: the trainer's, 1000 for nnUNetTrainer)",
    ),
    flag(
        "--iterations_per_epoch",
        type=_positive,
        default=None,
        help="training iterations per epoch (default: the trainer's, 250)",
    ),
    flag(
        "--val_iterations",
        type=_positive,
        default=None,
        help="validation iterations per epoch (default: the trainer's, 50)",
    ),
    flag(
        "-device",
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)",
    ),
    flag(
        "--c",
        "--continue",
        dest="continue_training",
        action="store_true",
        help="continue from this fold's latest checkpoint when there is one",
    ),
    flag("--npz", action="store_true", help="also save softmax probabilities of the final validation"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Train one nnU-Net teacher fold (a normal nnU-Net model in "
        "$nnUNet_results/DatasetXXX/<trainer>__<plans>__<cfg>/fold_<f>), then run nnU-Net's final "
        "validation. Needs preprocessed data (nnUNetv2_plan_and_preprocess).",
    )
    add_flags(parser, _FLAGS_BEFORE_FOLDS)
    add_flags(parser.add_mutually_exclusive_group(required=True), _FOLD_FLAGS)
    add_flags(parser, _FLAGS_AFTER_FOLDS)
    return parser


def pick_fold(
    fold: int | str | None, folds_by_index: list[int | str] | None, environ: os._Environ | dict | None = None
) -> int | str:
    """The fold this process trains: `-f`, or `folds[JOB_COMPLETION_INDEX]` for Indexed Jobs."""
    if folds_by_index is None:
        assert fold is not None
        return fold
    environ = os.environ if environ is None else environ
    raw = environ.get("JOB_COMPLETION_INDEX")
    if raw is None:
        raise NnUNetSetupError(
            "--folds-by-index needs JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job): "
            "set it, or pass -f FOLD"
        )
    try:
        index = int(raw)
    except ValueError:
        raise NnUNetSetupError(f"JOB_COMPLETION_INDEX must be an integer, got {raw!r}") from None
    if not 0 <= index < len(folds_by_index):
        raise NnUNetSetupError(
            f"JOB_COMPLETION_INDEX={index} is outside --folds-by-index "
            f"{' '.join(map(str, folds_by_index))} ({len(folds_by_index)} folds): set the Job's "
            "completions to the number of folds"
        )
    return folds_by_index[index]


def _find_trainer_class(name: str):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise NnUNetSetupError(
            f"trainer (-tr) {name!r} not found among nnU-Net's trainers or in "
            "nnUNet_extTrainer: check the name or set nnUNet_extTrainer"
        ) from None


def apply_budget(
    trainer, epochs: int | None, iterations_per_epoch: int | None, val_iterations: int | None
) -> None:
    """Override the training length on the instance; must run before `initialize()` builds the LR schedule."""
    if epochs is not None:
        trainer.num_epochs = epochs
    if iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = iterations_per_epoch
    if val_iterations is not None:
        trainer.num_val_iterations_per_epoch = val_iterations


def _check_setup(args: argparse.Namespace):
    """(fold, dataset name, device), every setup mistake raised as NnUNetSetupError before torch loads."""
    fold = pick_fold(args.fold, args.folds_by_index)
    dataset_name = resolve_dataset_name(args.dataset)
    load_plans(dataset_name, args.plans, args.configuration, require_data=True)
    load_dataset_json(dataset_name)
    device = select_device(args.device)
    _find_trainer_class(args.trainer)
    return fold, dataset_name, device


def _configure_device(device) -> None:
    import torch

    if device.type == "cpu":
        torch.set_num_threads(
            max(
                1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            )
        )
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if device.index is not None:
            torch.cuda.set_device(device)


def _build_trainer(args: argparse.Namespace, fold: int | str, dataset_name: str, device):
    """nnU-Net's trainer for the fold, on ``device``, with the requested budget."""
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(
        dataset_name,
        args.configuration,
        fold,
        args.trainer,
        args.plans,
        args.continue_training,
        device=device,
    )
    if device.type == "cuda" and device.index is not None:
        # nnUNetTrainer.__init__ pins a single-process run to cuda:0; honour cuda:N before initialize()
        # moves the network, loss and batches to trainer.device.
        trainer.device = device
    apply_budget(trainer, args.epochs, args.iterations_per_epoch, args.val_iterations)
    trainer.print_to_log_file(
        f"{PROG}: fold {fold}, {trainer.num_epochs} epochs x "
        f"{trainer.num_iterations_per_epoch} iterations "
        f"({trainer.num_val_iterations_per_epoch} validation iterations), device {device}"
    )
    return trainer


def _train(trainer, fold: int | str, continue_training: bool, npz: bool) -> None:
    """Resume if asked, train with progress reporting and atomic checkpoints, then the final validation."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from nnunet_distill import progress_hooks
    from nnunet_distill.student import count_parameters
    from nnunet_distill.termination import write_termination_message

    trainer.save_every = 1  # checkpoint_latest every epoch (nnU-Net: 50), so a restarted pod loses <= 1 epoch
    progress_hooks.make_checkpoints_atomic(trainer)
    maybe_load_checkpoint(trainer, continue_training, False)
    resumed = trainer.current_epoch > 0
    if resumed:
        print(
            f"{PROG}: resuming fold {fold} at epoch {trainer.current_epoch} (checkpoint in "
            f"{trainer.output_folder})"
        )
    reporter = progress_hooks.start_reporting(trainer, stage="teachers", resumed=resumed)
    try:
        trainer.run_training()
        trainer.perform_actual_validation(npz)
    finally:
        reporter.close()
    write_termination_message(
        progress_hooks.teacher_summary(trainer, fold, count_parameters(trainer.network))
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fold, dataset_name, device = _check_setup(args)
    except NnUNetSetupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _configure_device(device)
    trainer = _build_trainer(args, fold, dataset_name, device)
    _train(trainer, fold, args.continue_training, args.npz)
    print(f"teacher fold {fold} done: {trainer.output_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
