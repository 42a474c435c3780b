"""`nnunet-distill figure`: draw a held-out slice of teacher ensemble and student, and their training
curves."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-distill figure",
        description="Write a PNG from a distillation summary: image, ground truth, teacher-ensemble and "
        "student "
        "segmentations on the held-out slice where the smallest structure is largest, and the "
        "training curves of the teacher folds and the student (from their checkpoints).",
    )
    parser.add_argument(
        "--summary",
        required=True,
        type=Path,
        help="the student's validation/distillation_summary.json (with a test-set evaluation)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    parser.add_argument(
        "--teacher-checkpoints",
        nargs="*",
        default=[],
        type=Path,
        metavar="CKPT",
        help="teacher folds' checkpoint_final.pth, for their training curves",
    )
    parser.add_argument("--title", default=None, help="figure title")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnunet_distill.figure import render

    try:
        out = render(args.summary, args.output, args.teacher_checkpoints, args.title)
    except (OSError, ValueError, KeyError) as exc:
        print(f"nnunet-distill figure: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
