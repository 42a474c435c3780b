"""`nnunet-distill gate --summary GLOB [--min-retention X] [--min-label-retention Y] [--no-enforce]`.

The quality-gate stage of a DistillationJob, between export and publish: it reads the student's
`distillation_summary.json` and decides (`nnunet_distill.gate`, pure) whether the student keeps enough of its
teacher ensemble's held-out Dice to be published.

Pods get their argv without a shell, so `--summary` is a glob (the dataset folder's name is not known to the
operator) expanded here; it must match exactly one file.

Prints one verdict line on stdout and leaves the verdict, thresholds, figures and cases in the termination
message (`stage: gate`, `ok`, `gate`, `metrics`, and `error` when it blocks). Exit codes: 0 passed (or failed
with --no-enforce), 3 failed and enforced (deterministic: the operator fails the Job without retrying),
2 usage error or a summary that is missing, ambiguous or unreadable. Standard library only (no torch).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from nnunet_distill import gate
from nnunet_distill.termination import write_termination_message

PROG = "nnunet-distill gate"
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pass or block a distilled student: its held-out Dice retention (student / teacher "
        "ensemble, "
        "from distillation_summary.json) must reach --min-retention, and every label's retention "
        "--min-label-retention. A summary without an honest baseline (no labelled test set and every teacher "
        "fold trained on the student's validation cases) fails.",
    )
    p.add_argument(
        "--summary",
        required=True,
        metavar="GLOB",
        help="the student's validation/distillation_summary.json; a glob pattern (expanded here) that "
        "must match exactly one file",
    )
    p.add_argument(
        "--min-retention",
        type=float,
        default=gate.DEFAULT_MIN_RETENTION,
        metavar="X",
        help="least mean Dice retention, in (0, 1.5] (default %(default)s)",
    )
    p.add_argument(
        "--min-label-retention",
        type=float,
        default=gate.DEFAULT_MIN_LABEL_RETENTION,
        metavar="Y",
        help="least retention of every single label, in (0, 1.5] (default %(default)s)",
    )
    p.add_argument(
        "--no-enforce",
        dest="enforce",
        action="store_false",
        help="report the verdict but exit 0 when it fails (the job goes on and publishes)",
    )
    return p


def find_summary(pattern: str) -> Path:
    """The one file `pattern` matches; SummaryError naming the pattern (and the matches) otherwise."""
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise gate.SummaryError(
            "SummaryNotFound",
            f"no distillation summary matches {pattern}: did the distill stage finish and write "
            "validation/distillation_summary.json (a trainer image that evaluates the student)?",
        )
    if len(matches) > 1:
        shown = ", ".join(matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise gate.SummaryError(
            "AmbiguousSummary",
            f"{len(matches)} files match {pattern} ({shown}); the gate judges exactly one "
            "student: two datasets share the ID?",
        )
    return Path(matches[0])


def read_summary(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise gate.SummaryError("InvalidSummary", f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise gate.SummaryError("InvalidSummary", f"{path} is not valid JSON: {exc}") from None


def _error(reason: str, message: str) -> int:
    write_termination_message({"stage": "gate", "ok": False, "error": {"reason": reason, "message": message}})
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    thresholds = gate.Thresholds(args.min_retention, args.min_label_retention, args.enforce)
    problems = thresholds.problems()
    if problems:
        print(f"{PROG}: error: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = find_summary(args.summary)
        verdict = gate.evaluate(read_summary(path), thresholds)
    except gate.SummaryError as err:
        return _error(err.reason, err.message)
    write_termination_message(gate.termination_message(verdict, str(path)))
    print(verdict.message, flush=True)
    if verdict.blocks:
        print(
            f"{PROG}: the student is not published; it stays at {verdict.student or path.parent} for "
            "inspection",
            file=sys.stderr,
        )
        return gate.EXIT_GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
