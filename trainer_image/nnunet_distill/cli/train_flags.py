"""The flags of ``nnUNetv2_distillation_train`` and ``nnUNetv2_resenc_distillation_train``: one parser
factory for both commands (:class:`Variant`) and the mapping of flags onto one
:class:`~nnunet_distill.config.DistillationConfig` (pure, torch-free: the operator's contract test parses
rendered commands with these parsers). The entry points are in :mod:`nnunet_distill.cli.train`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from nnunet_distill import contract
from nnunet_distill.cli.flags import OneLineParser, add_flags, flag, int_at_least, number
from nnunet_distill.config import (
    TEACHER_PRECISIONS,
    ConfigError,
    DistillationConfig,
    alpha_problem,
    parse_device_string,
    temperature_problem,
)


@dataclass(frozen=True)
class Variant:
    name: str
    prog: str
    teacher_plans_flags: tuple[str, ...]
    teacher_plans_default: str
    rotate_freq_default: int
    student_plans_flag: bool  # -spl: the student's base plans may differ from the teacher's
    block_strategy_flag: bool  # -bs


STANDARD = Variant(
    "standard",
    "nnUNetv2_distillation_train",
    ("-p", "--teacher_plans"),
    contract.DEFAULT_PLANS,
    400,
    student_plans_flag=False,
    block_strategy_flag=False,
)
RESENC = Variant(
    "resenc",
    "nnUNetv2_resenc_distillation_train",
    ("-tpl", "--teacher_plans", "-p"),
    contract.DEFAULT_RESENC_TEACHER_PLANS,
    5,
    student_plans_flag=True,
    block_strategy_flag=True,
)


def _alpha(text: str) -> float:
    v = number(text)
    if problem := alpha_problem(v, text):
        raise argparse.ArgumentTypeError(problem)
    return v


def _temperature(text: str) -> float:
    v = number(text)
    if problem := temperature_problem(v, text):
        raise argparse.ArgumentTypeError(problem)
    return v


def _device(text: str) -> str:
    try:
        parse_device_string(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or mps, got {text!r}") from None
    return text


def _block_strategy_help() -> str:
    from nnunet_distill.student import BLOCK_STRATEGY_HELP

    rules = "; ".join(f"{name}: {BLOCK_STRATEGY_HELP[name]}" for name in contract.BLOCK_STRATEGIES)
    return (
        f"residual blocks per encoder stage of a ResEnc student (a plain student accepts only keep). "
        f"{rules}. Default: %(default)s"
    )


#: Flags both commands share, in --help order: before the variant's plans flags ...
_FLAGS_BEFORE_PLANS = (
    flag(
        "-d",
        "--dataset_id",
        required=True,
        metavar="ID",
        help="dataset ID (e.g. 901) or full name (Dataset901_Name), as for nnUNetv2_train",
    ),
    flag(
        "-f",
        "--fold",
        required=True,
        type=int_at_least(0),
        help="the student's fold: it trains on this fold's training split of splits_final.json and is "
        "validated on its validation split",
    ),
    flag(
        "-c",
        "--configuration",
        default=contract.DEFAULT_CONFIGURATION,
        help="nnU-Net configuration of teachers and student (default: %(default)s)",
    ),
    flag(
        "-tf",
        "--teacher_folds",
        nargs="+",
        type=int_at_least(0),
        metavar="FOLD",
        help="teacher folds to distil from (default: every fold_N in the teacher folder that holds the "
        "teacher checkpoint); a listed fold that is missing is an error",
    ),
    flag(
        "-a",
        "--alpha",
        type=_alpha,
        default=0.3,
        help="weight of the KD term in [0, 1]; 1-alpha weights nnU-Net's Dice+CE (default: %(default)s)",
    ),
    flag(
        "-temp",
        "--temperature",
        type=_temperature,
        default=3.0,
        help="softmax/sigmoid temperature T > 0 of the KD term, which is scaled by T^2 "
        "(default: %(default)s)",
    ),
    flag(
        "-r",
        "--reduction_factor",
        type=int_at_least(1),
        default=2,
        help="divide every stage's channels by r (floor, at least 8 channels); r=2/4/8 give about "
        "1/4, 1/16, 1/64 of the teacher's parameters (default: %(default)s)",
    ),
    flag(
        "-c_continue",
        "--continue_training",
        action="store_true",
        help="resume from the student's checkpoint_latest.pth (or checkpoint_final.pth, to train on with "
        "a larger -e); refused if alpha, T, r, the teacher folds or folder differ from the "
        "checkpoint's; starts fresh (and says so) when there is no checkpoint",
    ),
    flag(
        "--overwrite",
        action="store_true",
        help="start a fresh training even where this student (same teacher plans, r, configuration and "
        "fold) already has a checkpoint, replacing it; without it such a run is refused (use "
        "-c_continue to resume it instead)",
    ),
    flag(
        "-disable_mirroring",
        action="store_true",
        help="no mirroring test-time augmentation in the final validation (student and teachers); "
        "training augmentation is unchanged",
    ),
    flag(
        "-e",
        "--epochs",
        type=int_at_least(1),
        default=None,
        help="number of epochs (default: nnU-Net's 1000)",
    ),
    flag(
        "--iterations_per_epoch",
        type=int_at_least(1),
        default=None,
        help="training iterations per epoch (default: nnU-Net's 250)",
    ),
    flag(
        "--val_iterations",
        type=int_at_least(1),
        default=None,
        help="validation iterations per epoch for the pseudo Dice (default: nnU-Net's 50)",
    ),
    flag(
        "-t",
        "--teacher_model_folder",
        default=None,
        metavar="PATH",
        help="teacher model folder holding plans.json, dataset.json and fold_N/ (default: "
        "$nnUNet_results/<Dataset>/<-tr>__<teacher plans>__<-c>)",
    ),
    flag(
        "-tr",
        "--teacher_trainer",
        default=contract.DEFAULT_TEACHER_TRAINER,
        help="trainer the teachers were trained with; only used to find the default teacher folder "
        "(default: %(default)s)",
    ),
)
#: ... and after them (-rotate_freq's default is the variant's).
_FLAGS_AFTER_PLANS = (
    flag(
        "-tcp",
        "--teacher_checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint file of each teacher fold (default: %(default)s; checkpoint_best.pth also works)",
    ),
    flag(
        "--teacher_precision",
        choices=TEACHER_PRECISIONS,
        default="auto",
        help="autocast dtype of the teachers' forward passes: auto = bf16 on CUDA (fp16 without bf16) "
        "and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; fp32 for bit-exact teacher "
        "logits. The KD loss itself is always computed in fp32 (default: %(default)s)",
    ),
    flag(
        "-rotate_folds",
        action="store_true",
        help="every -rotate_freq epochs, train on the next fold's training split of splits_final.json, "
        "always without this fold's validation cases, so the validation Dice never covers cases "
        "the student trained on",
    ),
    flag("-rotate_freq", type=int_at_least(1), help="epochs between fold rotations (default: %(default)s)"),
    flag(
        "-d_device",
        type=_device,
        default=None,
        metavar="DEVICE",
        help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu); teachers run on the same "
        "device; mixed precision only on CUDA",
    ),
    flag(
        "--kd_mode",
        choices=("pixel", "channel", "both"),
        default="pixel",
        help="KD term: pixel = KL of the class distributions at every voxel, averaged over voxels "
        "(Hinton-style); channel = channel-wise KD (Shu et al. 2021): per class, KL of where "
        "the class is (a softmax over the patch), so small structures weigh as much as large "
        "ones; both = the sum of the two. With teachers trained as long as the student, pixel kept "
        "more held-out Dice than both in bench quality (r=2 1.002 vs 0.986, r=4 0.996 vs 0.981) "
        "(default: %(default)s)",
    ),
    flag(
        "--student_init",
        choices=("teacher", "random"),
        default="teacher",
        help="teacher = start the student from a teacher's weights cut to the student's width (the "
        "leading channels of every layer; the teacher of the student's fold, else the first; "
        "needs the teacher's architecture, else random); random = nnU-Net's initialisation. "
        "On held-out data teacher init kept a thin vessel that a randomly initialised student "
        "lost in the same budget (bench quality) (default: %(default)s)",
    ),
    flag(
        "--teacher_view",
        choices=("augmented", "clean"),
        default="augmented",
        help="what the teachers label: augmented = the student's augmented patch; clean = the same "
        "patch after the spatial transforms but before the intensity-only ones (noise, blur, "
        "gamma, blank rectangles...) the teachers never trained on (default: %(default)s)",
    ),
    flag(
        "--test_cases",
        nargs="+",
        metavar="CASE",
        default=None,
        help="held-out cases to score student and teacher ensemble on (default: every case of "
        "imagesTs that has a label in labelsTs). A case from imagesTr is accepted only if neither "
        "the student nor any teacher fold trained on it",
    ),
    flag(
        "--unlabelled_cases",
        nargs="+",
        metavar="CASE",
        default=None,
        help="training cases without annotations that the student learns from the teachers alone: they "
        "join its training split, and in every batch nnU-Net's Dice+CE sees only the labelled samples "
        "while KD sees all of them (needs -a > 0). Each must be preprocessed like any training case, with "
        "a placeholder label (e.g. all background), and be in no fold of splits_final.json, so that no "
        "teacher trained on a placeholder (default: none)",
    ),
    flag(
        "--labelled_share",
        type=number,
        metavar="S",
        default=None,
        help="with --unlabelled_cases: the probability that a training sample comes from a labelled case, "
        "in (0, 1). nnU-Net draws cases uniformly, so 4 labelled beside 16 unlabelled cases give a hard "
        "loss to one sample in five; S = 0.5 draws each labelled case 4x as often (default: the uniform "
        "draw)",
    ),
    flag(
        "-num_gpus",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="train with N processes in one DDP process group on this machine (nnU-Net's flag; with "
        "-d_device cpu they use gloo, for tests): each rank trains on its share of the batch and its own "
        "cases, rank 0 writes checkpoints and logs. The same as torchrun --standalone --nproc_per_node N "
        "<this command>; under torchrun leave it at 1 (default: %(default)s)",
    ),
    flag(
        "--use_da5",
        action="store_true",
        help="DA5 strong augmentation for small datasets: nnU-Net's nnUNetTrainerDA5 pipeline plus elastic "
        "deformation (p 0.2) and order-0 (nearest) segmentation resampling that keeps thin "
        "structures; the model folder is nnUNetDistillationTrainerDA5__...",
    ),
)


def build_parser(variant: Variant) -> argparse.ArgumentParser:
    """Both commands' parser: the shared flags (`_FLAGS_BEFORE_PLANS`, `_FLAGS_AFTER_PLANS`), defined once,
    plus the variant's plans flags."""
    p = OneLineParser(
        prog=variant.prog,
        allow_abbrev=False,
        description=(
            "Distil an ensemble of nnU-Net teacher folds into one smaller student (channels / r) by "
            "knowledge distillation: loss = (1-a)*nnU-Net Dice+CE + a*T^2*KL(teacher||student). The "
            "student is saved as a normal nnU-Net model (trainer folder "
            "nnUNetDistillationTrainer[DA5]__<plans>_r<r>__<cfg>) that stock nnUNetv2_predict can run."
            + (
                " ResEnc variant: teachers are Residual Encoder U-Nets (-tpl); the student is plain or "
                "ResEnc depending on -spl."
                if variant.name == "resenc"
                else ""
            )
        ),
    )
    add_flags(p, _FLAGS_BEFORE_PLANS)
    p.add_argument(
        *variant.teacher_plans_flags,
        dest="teacher_plans",
        default=variant.teacher_plans_default,
        help="plans identifier of the teachers; names the default teacher folder"
        + ("" if variant.student_plans_flag else " and is the base of the student plans (<plans>_r<r>)")
        + " (default: %(default)s)",
    )
    if variant.student_plans_flag:
        p.add_argument(
            "-spl",
            "--student_plans",
            default=contract.DEFAULT_PLANS,
            help="plans the student is derived from (in $nnUNet_preprocessed/<Dataset>/): plain U-Net "
            "plans (nnUNetPlans) give a plain student, ResEnc plans (nnUNetResEncUNetMPlans...) a "
            "ResEnc student; they must share the teachers' preprocessed data (default: %(default)s)",
        )
    if variant.block_strategy_flag:
        p.add_argument(
            "-bs",
            "--block_strategy",
            choices=contract.BLOCK_STRATEGIES,
            default="keep",
            help=_block_strategy_help(),
        )
    add_flags(p, _FLAGS_AFTER_PLANS)
    p.set_defaults(rotate_freq=variant.rotate_freq_default)
    return p


def build_parser_standard() -> argparse.ArgumentParser:
    return build_parser(STANDARD)


def build_parser_resenc() -> argparse.ArgumentParser:
    return build_parser(RESENC)


def config_from_args(args: argparse.Namespace, variant: Variant) -> DistillationConfig:
    """Flags -> the one configuration object both commands share (pure)."""
    return DistillationConfig(
        dataset=str(args.dataset_id),
        fold=args.fold,
        configuration=args.configuration,
        alpha=args.alpha,
        temperature=args.temperature,
        reduction_factor=args.reduction_factor,
        teacher_folds=tuple(args.teacher_folds) if args.teacher_folds else None,
        teacher_trainer=args.teacher_trainer,
        teacher_plans=args.teacher_plans,
        teacher_folder=args.teacher_model_folder,
        teacher_checkpoint=args.teacher_checkpoint,
        teacher_precision=args.teacher_precision,
        student_base_plans=args.student_plans if variant.student_plans_flag else args.teacher_plans,
        block_strategy=args.block_strategy if variant.block_strategy_flag else None,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        val_iterations=args.val_iterations,
        use_da5=args.use_da5,
        rotate_folds=args.rotate_folds,
        rotate_freq=args.rotate_freq,
        disable_mirroring=args.disable_mirroring,
        device=args.d_device,
        continue_training=args.continue_training,
        overwrite=args.overwrite,
        variant=variant.name,
        kd_mode=args.kd_mode,
        student_init=args.student_init,
        teacher_view=args.teacher_view,
        test_cases=tuple(args.test_cases) if args.test_cases else None,
        unlabelled_cases=tuple(args.unlabelled_cases or ()),
        labelled_share=args.labelled_share,
    )
