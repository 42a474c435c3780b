"""`nnunet-distill synthetic`: write a synthetic nnU-Net raw dataset (demo, tests, benchmarks)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nnunet_distill import synthetic
from nnunet_distill.cli.flags import OneLineParser
from nnunet_distill.nnunet_env import NnUNetSetupError, env_dir


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nnunet-distill synthetic",
        description="Write $nnUNet_raw/DatasetXXX_NAME: imagesTr/labelsTr (training cases), imagesTs/labelsTs"
        " (a labelled held-out test set no teacher sees) and dataset.json. Labels (--layout spheres): bright "
        "and dark ellipsoids and a small sphere; (--layout organ): an organ, a small lesion in it and a thin "
        "vessel. Gaussian noise and a smooth bias field on top. Deterministic for a given --seed. An earlier "
        "synthetic dataset of the same name is replaced; any other folder is never touched.",
    )
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="dataset id, 1..999")
    parser.add_argument("--name", required=True, help="dataset name (letters, digits, '-', '_')")
    parser.add_argument("--cases", type=int, default=16, help="training cases (default 16)")
    parser.add_argument("--test-cases", type=int, default=4, help="held-out labelled test cases (default 4)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="voxels per case (default 48 48 48; 48 48 16 with --anisotropic)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="input channels (default 1; channel 0 'CT', the others MR-like with other contrasts)",
    )
    parser.add_argument(
        "--anisotropic",
        action="store_true",
        help="3 mm slices (spacing 1 x 1 x 3 mm) instead of 1 mm isotropic",
    )
    parser.add_argument(
        "--layout",
        choices=synthetic.LAYOUTS,
        default="spheres",
        help="what the labels are: 'spheres' (bright, dark, small; default) or 'organ' (organ, "
        "lesion, vessel: a large, a small and a thin structure)",
    )
    _add_difficulty_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--raw-dir", type=Path, default=None, help="nnU-Net raw folder (default $nnUNet_raw)")
    return parser


def _add_difficulty_flags(parser: argparse.ArgumentParser) -> None:
    """What makes the data harder than its default: noisy annotations and images, and unlabelled images."""
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="MM",
        help="annotator noise in the training labels only: contours displaced by a smooth random field "
        "of this standard deviation per axis, in mm (default 0: exact labels; 0.8 gives a noisy/exact "
        "vessel Dice of about 0.63). The test labels stay exact.",
    )
    parser.add_argument(
        "--image-noise",
        type=float,
        default=synthetic.NOISE_SIGMA,
        metavar="SIGMA",
        help=f"standard deviation of the Gaussian image noise, in intensity units where background is 1 and "
        f"the organ 2 (default {synthetic.NOISE_SIGMA}; larger makes the task harder, so that a model "
        "trained on few cases errs where an ensemble averages)",
    )
    parser.add_argument(
        "--unlabelled-cases",
        type=int,
        default=0,
        metavar="N",
        help="also write N training images without annotations (unlabelled_0000...: an all-background "
        "placeholder label each, listed in dataset.json) for nnUNetv2_distillation_train "
        "--unlabelled_cases; keep them out of the teachers' splits_final.json (default 0)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = (
        tuple(args.size)
        if args.size
        else (synthetic.ANISOTROPIC_DEFAULT_SIZE if args.anisotropic else synthetic.DEFAULT_SIZE)
    )
    try:
        spec = synthetic.SyntheticSpec(
            dataset_id=args.dataset_id,
            name=args.name,
            cases=args.cases,
            test_cases=args.test_cases,
            size=size,
            channels=args.channels,
            anisotropic=args.anisotropic,
            seed=args.seed,
            layout=args.layout,
            label_noise=args.label_noise,
            unlabelled_cases=args.unlabelled_cases,
            image_noise=args.image_noise,
        )
        raw_dir = args.raw_dir if args.raw_dir is not None else env_dir("nnUNet_raw")
        start = time.perf_counter()
        folder = synthetic.write_dataset(raw_dir, spec)
    except (ValueError, FileExistsError, NnUNetSetupError, OSError) as exc:
        print(f"nnunet-distill synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {folder} ({spec.cases} training + {spec.test_cases} test cases"
        f"{f' + {spec.unlabelled_cases} unlabelled' if spec.unlabelled_cases else ''}, "
        f"{'x'.join(map(str, spec.size))} voxels, {spec.channels} channel(s)) in "
        f"{time.perf_counter() - start:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
