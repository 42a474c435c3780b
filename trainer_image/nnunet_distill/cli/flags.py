"""The argparse pieces every trainer command shares: a one-line usage error, flag tables, bounded numbers.

One place, so ``nnUNetv2_distillation_train``, ``nnunet-distill train-teacher`` and ``synthetic`` report a bad
flag the same way (``prog: error: ... (see --help)``, exit 2) instead of argparse's whole usage block.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def number(text: str) -> float:
    """A float flag value; nan is refused (it would pass every range check)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("must be a number, got nan")
    return v


def int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``, the bound named in the error."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return v

    parse.__name__ = f"int>={minimum}"
    return parse


def flag(*names: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One row of a flag table: ``add_argument``'s arguments, kept as data so tables can be shared."""
    return names, kwargs


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flags: Sequence[tuple[tuple[str, ...], dict[str, Any]]],
) -> None:
    for names, kwargs in flags:
        parser.add_argument(*names, **kwargs)
