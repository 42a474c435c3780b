"""`nnUNetv2_distillation_export_onnx` and `nnUNetv2_resenc_distillation_export_onnx`: one exporter, two flag
sets.

Both keep every flag of the original tools, with the semantics their docs promised (the original inverted
`-da` and crashed on `-nn`). The student is found from the same arguments it was trained with; the only new
flags are optional (`-p` on the standard CLI and `-bs` on the ResEnc CLI, so that students trained with them
can be found, `-chk`, `--opset` and the verification tolerances). The ResEnc `-p`/`-tpl` is honoured: the
student's folder name does not say which teachers it was distilled from, so the checkpoint's record is checked
against it and a student of other teachers is refused (without the flag, any is exported).

Each export writes its metadata beside its graph under the graph's own name (`contract.sidecar_path`), so
exports of several students into one folder never describe each other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunet_distill import contract

_PROG_STANDARD = "nnUNetv2_distillation_export_onnx"
_PROG_RESENC = "nnUNetv2_resenc_distillation_export_onnx"


def _common(parser: argparse.ArgumentParser) -> None:
    """The flags both CLIs share: which student, what to do to its graph, how strictly to verify it."""
    _student_flags(parser)
    _graph_flags(parser)
    _verification_flags(parser)


def _student_flags(parser: argparse.ArgumentParser) -> None:
    """The training arguments that find the student (its plans flags are each CLI's own)."""
    parser.add_argument(
        "-d",
        "--dataset_id",
        required=True,
        help="dataset id (e.g. 901) or full name (Dataset901_Name), as used for training",
    )
    parser.add_argument(
        "-c",
        "--configuration",
        default=contract.DEFAULT_CONFIGURATION,
        help="nnU-Net configuration the student was trained with (default: %(default)s)",
    )
    parser.add_argument("-f", "--fold", default="0", help="student fold (default: %(default)s)")
    parser.add_argument(
        "-r",
        "--reduction_factor",
        type=int,
        required=True,
        help="feature reduction factor the student was trained with (finds its plans, e.g. nnUNetPlans_r2)",
    )
    parser.add_argument(
        "-da5",
        "--use_da5",
        action="store_true",
        help="the student was trained with DA5 augmentation (nnUNetDistillationTrainerDA5 folder)",
    )


def _graph_flags(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint becomes the graph, and how the graph is written."""
    parser.add_argument(
        "-sim",
        "--simplify",
        action="store_true",
        help="simplify the graph with onnxslim, then verify it again",
    )
    parser.add_argument(
        "-fix",
        "--trt",
        "--fix_instancenorm",
        dest="trt",
        action="store_true",
        help="TensorRT-parsable graph: static shapes, opset <= 17, only TensorRT ops, no control "
        "flow, InstanceNorm scale/bias as initializers checked against the checkpoint",
    )
    parser.add_argument(
        "-chk",
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint file in the fold folder (default: %(default)s)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")


def _verification_flags(parser: argparse.ArgumentParser) -> None:
    """How closely ONNX Runtime must reproduce the torch student, and how much of it to print."""
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="verification: allowed max |logit difference| beyond rtol·max|logit| (default: %(default)s)",
    )
    parser.add_argument(
        "--rtol", type=float, default=1e-3, help="verification: relative part (default: %(default)s)"
    )
    parser.add_argument(
        "--min_agreement",
        type=float,
        default=0.999,
        help="verification: minimum fraction of voxels with the same predicted class (default: %(default)s)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the student, shapes and every verification result (max |Δlogit| and agreement per input)",
    )


def build_parser_standard() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG_STANDARD,
        description="Export a distilled nnU-Net student to ONNX, verify it against the torch model with ONNX "
        "Runtime, and write its metadata beside it (FILE.onnx -> FILE.nnunet_inference.json). Static shape "
        "by default.",
    )
    _common(parser)
    parser.add_argument(
        "-p",
        "--plans",
        "--teacher_plans",
        dest="plans",
        default=contract.DEFAULT_PLANS,
        help="teacher plans the student plans were derived from, as nnUNetv2_distillation_train -p "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output .onnx file; its metadata goes beside it as <name>.nnunet_inference.json, so several "
        "exports may share a folder (default: <student fold folder>/model.onnx)",
    )
    parser.add_argument(
        "-da",
        "--dynamic_axes",
        action="store_true",
        help="dynamic batch and spatial axes (spatial sizes must be multiples of the network's "
        "total stride); default is a static shape",
    )
    parser.add_argument(
        "-is",
        "--input_shape",
        type=int,
        nargs="+",
        metavar="N",
        default=None,
        help="static input shape b c x y z (c must be the model's channel count); with -da the "
        "shape traced and verified first",
    )
    parser.add_argument(
        "-nn",
        "--nnunet_format",
        action="store_true",
        help="the shape nnU-Net's sliding window feeds: fixed patch size, the model's channels, "
        "dynamic batch",
    )
    return parser


def build_parser_resenc() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG_RESENC,
        description="Export a distilled ResEnc nnU-Net student to DIR/model.onnx (+ "
        "DIR/model.nnunet_inference.json), verified against the torch model with ONNX Runtime.",
    )
    _common(parser)
    parser.add_argument(
        "-p",
        "-tpl",
        "--plans",
        "--teacher_plans",
        dest="plans",
        default=None,
        help="teacher plans the student was distilled from (-tpl/-p of the training CLI, e.g. "
        f"{contract.DEFAULT_RESENC_TEACHER_PLANS}): a student distilled from other teachers is refused "
        f"(default: {contract.DEFAULT_RESENC_TEACHER_PLANS}, as training; they are part of the student's "
        "plans name, so they also find its folder)",
    )
    parser.add_argument(
        "-spl",
        "--student_plans",
        default=contract.DEFAULT_PLANS,
        help="student base plans used for training, as nnUNetv2_resenc_distillation_train -spl "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "-bs",
        "--block_strategy",
        choices=contract.BLOCK_STRATEGIES,
        default="keep",
        help="block strategy used for training (default: %(default)s)",
    )
    parser.add_argument(
        "-b",
        "--batch_size",
        type=int,
        default=0,
        help="batch size; 0 = dynamic batch (default). Spatial size is the plans' patch size. "
        "With --trt, 0 means batch 1 (TensorRT needs a static shape)",
    )
    parser.add_argument(
        "-o",
        "--output_dir",
        type=Path,
        default=None,
        help="output directory for model.onnx and model.nnunet_inference.json "
        "(default: <student fold folder>/onnx)",
    )
    return parser


def _tolerance(args):
    from nnunet_distill.verify import Tolerance

    return Tolerance(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)


def _student_plans(
    parser: argparse.ArgumentParser, teacher: str, r: int, block_strategy: str | None, base: str | None = None
) -> str:
    """The student's plans identifier exactly as the training CLIs derive it
    (contract.student_plans_identifier of the teacher plans, r, the block strategy and the student base)."""
    try:
        return contract.student_plans_identifier(teacher, r, block_strategy, student_base_plans=base)
    except ValueError as exc:
        parser.error(str(exc))


def request_standard(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Pure mapping of the standard CLI's flags to an ExportRequest (flag conflicts are usage errors)."""
    from nnunet_distill.export import ExportRequest

    if args.nnunet_format and (args.dynamic_axes or args.input_shape):
        parser.error(
            "-nn fixes the shape to the patch size with a dynamic batch; it cannot be combined with "
            "-da or -is"
        )
    if args.trt and (args.dynamic_axes or args.nnunet_format):
        parser.error("--trt/-fix needs a static shape; drop -da/-nn (use -is to choose the static shape)")
    plans_identifier = _student_plans(parser, args.plans, args.reduction_factor, None)
    return ExportRequest(
        dataset=args.dataset_id,
        plans_identifier=plans_identifier,
        configuration=args.configuration,
        fold=args.fold,
        use_da5=args.use_da5,
        checkpoint_name=args.checkpoint,
        output=args.output,
        dynamic=args.dynamic_axes,
        dynamic_batch=args.nnunet_format,
        input_shape=tuple(args.input_shape) if args.input_shape else None,
        tensorrt=args.trt,
        simplify=args.simplify,
        opset=args.opset,
        tolerance=_tolerance(args),
        teacher_plans=args.plans,
        verbose=args.verbose,
    )


def request_resenc(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from nnunet_distill.export import ExportRequest

    if args.batch_size < 0:
        parser.error(f"-b must be >= 0 (0 = dynamic batch), got {args.batch_size}")
    # The student's name says its teachers: without -tpl/-p, the ResEnc CLI's default teachers (as training).
    teacher_plans = args.plans or contract.DEFAULT_RESENC_TEACHER_PLANS
    plans_identifier = _student_plans(
        parser, teacher_plans, args.reduction_factor, args.block_strategy, args.student_plans
    )
    dynamic_batch = args.batch_size == 0 and not args.trt
    output = args.output_dir / contract.ONNX_FILENAME if args.output_dir else None
    return ExportRequest(
        dataset=args.dataset_id,
        plans_identifier=plans_identifier,
        configuration=args.configuration,
        fold=args.fold,
        use_da5=args.use_da5,
        checkpoint_name=args.checkpoint,
        output=output,
        dynamic_batch=dynamic_batch,
        batch=max(args.batch_size, 1),
        tensorrt=args.trt,
        simplify=args.simplify,
        opset=args.opset,
        tolerance=_tolerance(args),
        teacher_plans=teacher_plans,
        expected_teacher_plans=args.plans,
        verbose=args.verbose,
    )


def _run(prog: str, request, default_output) -> int:
    from nnunet_distill.export import ExportError, export_student
    from nnunet_distill.metadata import MetadataError
    from nnunet_distill.trt_graph import TensorRTGraphError
    from nnunet_distill.verify import VerificationError

    try:
        result = export_student(request, default_output)
    except (ExportError, MetadataError, TensorRTGraphError, VerificationError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    v = result.metadata["verification"]
    print(
        f"wrote {result.onnx_path} and {result.sidecar_path.name} (input "
        f"{result.metadata['io']['input_shape']}, "
        f"verified on {len(result.comparisons)} inputs: max|Δlogit|={v['max_abs_diff']:.2e}, "
        f"agreement={100 * v['min_agreement']:.3f}%)"
    )
    return 0


def main_standard(argv: Sequence[str] | None = None) -> int:
    parser = build_parser_standard()
    args = parser.parse_args(argv)
    return _run(
        _PROG_STANDARD, request_standard(args, parser), lambda fold_dir: fold_dir / contract.ONNX_FILENAME
    )


def main_resenc(argv: Sequence[str] | None = None) -> int:
    parser = build_parser_resenc()
    args = parser.parse_args(argv)
    return _run(
        _PROG_RESENC,
        request_resenc(args, parser),
        lambda fold_dir: fold_dir / "onnx" / contract.ONNX_FILENAME,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return main_standard(argv)


if __name__ == "__main__":
    sys.exit(main_standard())
