"""``nnUNetv2_distillation_train`` and ``nnUNetv2_resenc_distillation_train``: one parser factory, one code
path.

The two commands differ only in configuration (:class:`Variant`): which flags name the teacher and student
plans, their defaults and the default rotation frequency. Both map their flags onto one
:class:`~nnunet_distill.config.DistillationConfig` and call :func:`nnunet_distill.distill.run`.

Errors a user can fix (a bad value, a missing fold, an unknown dataset, incompatible plans) print one line to
stderr and exit non-zero without a traceback; anything else is a bug and keeps its traceback.

The flags and their mapping onto the configuration are in :mod:`nnunet_distill.cli.train_flags`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nnunet_distill.cli.train_flags import (  # the parsers, re-exported: tests and the contract use them here
    RESENC,
    STANDARD,
    Variant,
    build_parser,
    build_parser_resenc,
    build_parser_standard,
    config_from_args,
)
from nnunet_distill.config import ConfigError

__all__ = [
    "RESENC",
    "STANDARD",
    "Variant",
    "build_parser",
    "build_parser_resenc",
    "build_parser_standard",
    "config_from_args",
    "main_resenc",
    "main_standard",
]


def _user_errors() -> dict[type[BaseException], str]:
    """Errors a user fixes by changing flags or files, with the reason the termination message reports."""
    from nnunet_distill.cascade import CascadeError
    from nnunet_distill.distill import DistillationError
    from nnunet_distill.distributed import DistributedError
    from nnunet_distill.evaluation import EvaluationError
    from nnunet_distill.rotation import RotationError
    from nnunet_distill.student import CompatibilityError, StudentPlansError
    from nnunet_distill.teachers import TeacherError

    return {
        ConfigError: "InvalidArgument",
        DistillationError: "InvalidSetup",
        TeacherError: "TeacherUnavailable",
        CompatibilityError: "IncompatiblePlans",
        StudentPlansError: "InvalidStudentPlans",
        RotationError: "InvalidSplits",
        EvaluationError: "InvalidTestSet",
        DistributedError: "InvalidLaunch",
        CascadeError: "MissingPreviousStage",
    }


def _terminate(summary: dict) -> None:
    from nnunet_distill.termination import write_termination_message

    write_termination_message(summary)  # only inside a pod (or with $TERMINATION_MESSAGE_PATH); never raises


def _no_termination_message(summary: dict) -> None:
    """Ranks > 0 of a DDP run write none: the pod's termination message is rank 0's."""


def _launch_ranks(variant: Variant, argv: Sequence[str] | None, nproc: int) -> int:
    """-num_gpus N: N ranks of this command through torch's launcher (torchrun --standalone, in-process)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from nnunet_distill.distributed import launch_local

    try:
        codes = launch_local(nproc, _rank_main, variant.name, list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        sys.stderr.write(f"{variant.prog}: error: a rank of -num_gpus {nproc} failed: {exc}\n")
        return 1
    return max(codes.values(), default=0)


def _rank_main(variant_name: str, argv: list[str]) -> int:
    """One rank started by :func:`_launch_ranks` (module level: the launcher pickles it into each process)."""
    return _main(STANDARD if variant_name == STANDARD.name else RESENC, argv, launched=True)


def _main(variant: Variant, argv: Sequence[str] | None, launched: bool = False) -> int:
    from nnunet_distill.distributed import DistributedError, ranks_from_env

    parser = build_parser(variant)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, variant)
        ranks = ranks_from_env()
    except (ConfigError, DistributedError) as exc:
        parser.error(str(exc))
    if args.num_gpus > 1 and not launched:
        if ranks.distributed:
            parser.error(f"-num_gpus {args.num_gpus} under torchrun (WORLD_SIZE={ranks.world_size}): use one")
        return _launch_ranks(variant, argv, args.num_gpus)
    terminate = _terminate if ranks.is_main else _no_termination_message  # the pod's message is rank 0's
    from nnunet_distill import distill

    user_errors = _user_errors()
    try:
        result = distill.run(config, log=lambda msg: print(f"{variant.prog}: {msg}", flush=True))
    except tuple(user_errors) as exc:
        sys.stderr.write(f"{variant.prog}: error: {exc}\n")
        reason = next(r for cls, r in user_errors.items() if isinstance(exc, cls))
        terminate({"stage": "distill", "ok": False, "error": {"reason": reason, "message": str(exc)}})
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{variant.prog}: interrupted; resume with -c_continue\n")
        return 130
    except Exception as exc:
        terminate(
            {
                "stage": "distill",
                "ok": False,
                "error": {"reason": "TrainingFailed", "message": f"{type(exc).__name__}: {exc}"},
            }
        )
        raise  # a bug or an environment failure: keep the traceback
    terminate({"stage": "distill", "ok": True, "artifacts": result.artifacts, "metrics": result.metrics})
    if ranks.is_main:
        print(
            f"{variant.prog}: student saved in {result.output_folder}"
            + (f"; summary {result.summary}" if result.summary else ""),
            flush=True,
        )
    return 0


def main_standard(argv: Sequence[str] | None = None) -> int:
    return _main(STANDARD, argv)


def main_resenc(argv: Sequence[str] | None = None) -> int:
    return _main(RESENC, argv)


if __name__ == "__main__":  # the spawn pools of nnU-Net's validation re-import __main__: keep this guard
    sys.exit(main_standard())
