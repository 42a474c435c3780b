"""Fold rotation (``-rotate_folds``/``-rotate_freq``) on top of nnU-Net's ``splits_final.json``.

The original moved the student to another fold's training split every ``rotate_freq`` epochs. Another fold's
training split contains the student's own validation cases, so its "validation Dice" was measured on cases it
had trained on (and the rotation crashed on nnU-Net v2 anyway). Here rotation cycles through the folds of
``splits_final.json`` but always holds the student fold's validation cases out:

    period k = epoch // rotate_freq,  g = (fold + k) mod n_folds
    train(k) = splits[g]["train"] minus splits[fold]["val"],   val = splits[fold]["val"] (never changes)

Period 0 is exactly nnU-Net's fold split; in every later period one other fold's cases (``splits[g]["val"]``)
rest, so the student sees a different subset each period while the reported validation Dice covers only
cases it never trained on. Pure functions: the trainer calls them with the epoch it is at, so a resumed run
lands in the same period.
"""

from __future__ import annotations

from collections.abc import Sequence


class RotationError(ValueError):
    """The split file cannot support fold rotation for this fold; the message says what to change."""


def rotation_period(epoch: int, rotate_freq: int) -> int:
    if rotate_freq < 1:
        raise RotationError(f"-rotate_freq must be >= 1 epoch, got {rotate_freq}")
    return max(epoch, 0) // rotate_freq


def rotation_source_fold(epoch: int, rotate_freq: int, fold: int, n_folds: int) -> int:
    """The fold whose training split (minus our validation cases) the student uses at ``epoch``."""
    return (fold + rotation_period(epoch, rotate_freq)) % n_folds


def _check(splits: Sequence[dict], fold: int) -> None:
    if len(splits) < 2:
        raise RotationError(f"-rotate_folds needs at least 2 folds in splits_final.json, found {len(splits)}")
    if not 0 <= fold < len(splits):
        raise RotationError(
            f"-rotate_folds: fold {fold} is not one of the {len(splits)} folds in "
            f"splits_final.json (0..{len(splits) - 1}); pick one of them or drop -rotate_folds"
        )


def rotated_split(splits: Sequence[dict], fold: int, source_fold: int) -> tuple[list[str], list[str]]:
    """(train keys, val keys) for the student of ``fold`` while it trains on ``source_fold``'s split."""
    _check(splits, fold)
    if not 0 <= source_fold < len(splits):
        raise RotationError(f"source fold {source_fold} is not in splits_final.json (0..{len(splits) - 1})")
    val = list(splits[fold]["val"])
    held_out = set(val)
    train = [k for k in splits[source_fold]["train"] if k not in held_out]
    if not train:
        raise RotationError(f"fold rotation left no training cases for source fold {source_fold}")
    return train, val


def describe(splits: Sequence[dict], fold: int, source_fold: int) -> str:
    """One log line saying what the student trains on and what its validation Dice covers."""
    train, val = rotated_split(splits, fold, source_fold)
    resting = sorted(set(splits[fold]["train"]) - set(train))
    return (
        f"fold rotation: training on fold {source_fold}'s split without fold {fold}'s validation cases "
        f"({len(train)} cases; resting this period: {len(resting)}); validation Dice covers fold {fold}'s "
        f"{len(val)} validation cases only, none of which the student trains on"
    )
