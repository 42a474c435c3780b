"""`nnUNetv2_distillation_predict` (also `nnunet-distill predict`): segment images with an exported student.

Input and output folders work as in `nnUNetv2_predict` (files `CASE_XXXX<ending>` in, `CASE<ending>` out); the
model is a package directory from `nnunet-distill package` or an exported .onnx file, no training folders.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "nnUNetv2_distillation_predict"


def _default_processes(env: str) -> int:
    try:
        return max(1, int(os.environ.get(env) or 3))
    except ValueError:
        return 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment images with a distilled nnU-Net student served by ONNX Runtime, using nnU-Net's "
        "own "
        "preprocessing, sliding window (Gaussian weighting, mirroring) and resampling/export.",
    )
    _io_flags(parser)
    _inference_flags(parser)
    _process_flags(parser)
    return parser


def _io_flags(parser: argparse.ArgumentParser) -> None:
    """What is read and written: images, segmentations, the model (and a cascade's previous stage)."""
    parser.add_argument(
        "-i",
        "--input",
        required=True,
        type=Path,
        help="input folder with images named CASE_XXXX<file ending> (one file per channel)",
    )
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="output folder for the segmentations"
    )
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        type=Path,
        help="package directory (nnunet-distill package) or exported .onnx file",
    )
    parser.add_argument(
        "--save_probabilities", action="store_true", help="also write class probabilities (.npz)"
    )
    parser.add_argument("--continue_prediction", action="store_true", help="skip cases already predicted")
    parser.add_argument(
        "-prev_stage_predictions",
        default=None,
        help="segmentations of the previous stage (cascade configurations only)",
    )


def _inference_flags(parser: argparse.ArgumentParser) -> None:
    """Where the network runs and how nnU-Net's sliding window drives it."""
    parser.add_argument(
        "-device", "--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--step_size",
        "-step_size",
        dest="step_size",
        type=float,
        default=None,
        help="sliding-window tile step as a fraction of the patch size, in (0, 1] "
        "(default: the model's, 0.5)",
    )
    parser.add_argument(
        "--disable_tta",
        action="store_true",
        help="no mirroring test-time augmentation (faster, slightly less accurate)",
    )


def _process_flags(parser: argparse.ArgumentParser) -> None:
    """Worker processes and threads, and how much the run prints."""
    parser.add_argument(
        "-npp",
        type=int,
        default=_default_processes("nnUNet_npp"),
        help="preprocessing processes (default: $nnUNet_npp or 3)",
    )
    parser.add_argument(
        "-nps",
        type=int,
        default=_default_processes("nnUNet_nps"),
        help="segmentation export processes (default: $nnUNet_nps or 3)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)"
    )
    parser.add_argument("--disable_progress_bar", action="store_true")
    parser.add_argument("--verbose", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.step_size is not None and not 0 < args.step_size <= 1:
        print(f"{PROG}: error: --step_size must be in (0, 1], got {args.step_size}", file=sys.stderr)
        return 2
    if not args.input.is_dir():
        print(f"{PROG}: error: input folder -i {args.input} does not exist", file=sys.stderr)
        return 2
    if args.npp < 1 or args.nps < 1:
        print(f"{PROG}: error: -npp and -nps must be >= 1", file=sys.stderr)
        return 2

    from nnunet_distill.metadata import MetadataError
    from nnunet_distill.nnunet_env import NnUNetSetupError, select_device
    from nnunet_distill.predict import OnnxRuntimePredictor, PredictorError

    try:
        device = select_device(args.device)
        predictor = OnnxRuntimePredictor(
            tile_step_size=args.step_size,
            use_mirroring=not args.disable_tta,
            device=device,
            verbose=args.verbose,
            allow_tqdm=not args.disable_progress_bar,
        )
        predictor.initialize_from_package(args.model, threads=args.threads)
    except (NnUNetSetupError, PredictorError, MetadataError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    ending = predictor.dataset_json["file_ending"]
    if not any(p.name.endswith(ending) for p in args.input.iterdir()):
        print(
            f"{PROG}: error: no {ending} images in {args.input} (the model was trained on {ending} files "
            "named CASE_XXXX" + ending + ")",
            file=sys.stderr,
        )
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(
        str(args.input),
        str(args.output),
        save_probabilities=args.save_probabilities,
        overwrite=not args.continue_prediction,
        num_processes_preprocessing=args.npp,
        num_processes_segmentation_export=args.nps,
        folder_with_segs_from_prev_stage=args.prev_stage_predictions,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
