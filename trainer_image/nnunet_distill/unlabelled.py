"""Unlabelled training cases: images only the teachers label, so the student learns them by KD alone.

Hospitals hold far more scans than annotations. Distillation can use them where a plain student cannot: the
ensemble's soft targets exist on every image, labelled or not. ``--unlabelled_cases`` names training cases of
the preprocessed dataset whose label files are placeholders (nnU-Net needs a label file for every training
case; all background is the usual placeholder). They join the student's training split, and in every batch
nnU-Net's hard loss sees only the labelled samples while KD sees all of them.

The teachers must never have trained on a placeholder label, so an unlabelled case may not appear in any
fold of ``splits_final.json`` (nnU-Net's split file, which the teachers' folds come from). Pure rules here;
``repeated``, ``needs_kd`` and ``held_out``, which the spec and the CLI both check, live in
:mod:`nnunet_distill.contract` so that the operator can import them. :func:`check` is the one read of the
preprocessed dataset the rules need before training; the trainer applies them
(:class:`nnunet_distill.trainer_folds.FoldSplitMixin`, ``train_step``).

nnU-Net draws a batch's cases uniformly from the training dataset's identifiers, so 4 labelled cases beside
16 unlabelled ones leave four samples in five without a hard loss. ``--labelled_share`` raises the share of
labelled draws: :func:`weighted_identifiers` repeats identifiers so that the same uniform draw picks a
labelled case with that probability (nnU-Net's loader samples ``dataset.identifiers``; nothing else of it
changes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

FLAG = "--unlabelled_cases"


def problems(
    unlabelled: Sequence[str], dataset_keys: Iterable[str], splits: Sequence[dict], splits_file: str
) -> list[str]:
    """Why these cases cannot be used as unlabelled cases (empty when they can), one line each."""
    if not unlabelled:
        return []
    known = set(dataset_keys)
    out = []
    missing = [c for c in unlabelled if c not in known]
    if missing:
        out.append(
            f"{FLAG} names {', '.join(missing)}, not in the preprocessed dataset (run "
            "nnUNetv2_plan_and_preprocess with their images in imagesTr and a placeholder label in labelsTr)"
        )
    if not splits:
        out.append(
            f"{FLAG} needs {splits_file} listing the labelled cases only: without it nnU-Net splits every "
            "case, placeholders included, into the teachers' folds"
        )
    for fold, split in enumerate(splits):
        used = sorted(set(unlabelled) & (set(split.get("train", [])) | set(split.get("val", []))))
        if used:
            out.append(
                f"{FLAG} names {', '.join(used)}, which fold {fold} of {splits_file} trains or validates "
                "on: a case in the teachers' folds is a labelled case (remove it from the flag, or from "
                "every fold of the split file before the teachers train)"
            )
    return out


def check(unlabelled: Sequence[str], preprocessed_dir: Path, data_identifier: str) -> list[str]:
    """:func:`problems` of these cases in a preprocessed dataset: its case identifiers and split file."""
    if not unlabelled:
        return []
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data_dir = str(preprocessed_dir / data_identifier)
    keys = infer_dataset_class(data_dir).get_identifiers(data_dir)
    splits_file = preprocessed_dir / "splits_final.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else []
    return problems(unlabelled, keys, splits, str(splits_file))


def training_split(train_keys: Sequence[str], unlabelled: Sequence[str]) -> list[str]:
    """The student's training cases: the fold's (labelled) training cases, then the unlabelled ones."""
    labelled = set(train_keys)
    return [*train_keys, *(c for c in unlabelled if c not in labelled)]


def labelled_samples(batch_keys: Sequence[str], unlabelled: Sequence[str]) -> list[bool]:
    """Per sample of a batch: does its label count (False for an unlabelled case's placeholder)?"""
    skip = set(unlabelled)
    return [str(k) not in skip for k in batch_keys]


def weighted_identifiers(keys: Sequence[str], unlabelled: Sequence[str], share: float) -> list[str]:
    """``keys`` with repeats: a uniform draw from the result picks a labelled case with probability
    ``share`` (within :data:`SHARE_TOLERANCE` where bounded repeats allow it), every labelled case equally
    often and every unlabelled one equally often, and never drops either kind.

    With L labelled and U unlabelled keys, each labelled key appears a times and each unlabelled one b
    times, a·L / (a·L + b·U) ≈ share, with the fewest repeats that reach the tolerance: nnU-Net's loader
    turns the list into an array for every batch, so an exact fraction over 10,000 cases is not worth its
    million entries. Without keys of either kind there is nothing to weigh (a DDP shard may hold only one
    kind), and the keys come back unchanged.
    """
    skip = set(unlabelled)
    labelled = [k for k in keys if k not in skip]
    others = [k for k in keys if k in skip]
    if not labelled or not others:
        return list(keys)
    a, b = _repeats(share, len(labelled), len(others))
    return sorted([*labelled * a, *others * b])


#: How far the labelled share of :func:`weighted_identifiers` may be from the one asked for.
SHARE_TOLERANCE = 0.005
#: The most times one identifier is repeated.
MAX_REPEATS = 1000


def _repeats(share: float, n_labelled: int, n_unlabelled: int) -> tuple[int, int]:
    """The smallest repeats (a, b), 1 to :data:`MAX_REPEATS`, whose labelled share is within the
    tolerance (the closest pair when none is)."""
    ratio = share * n_unlabelled / ((1.0 - share) * n_labelled)  # the exact a / b

    def error(a: int, b: int) -> float:
        return abs(a * n_labelled / (a * n_labelled + b * n_unlabelled) - share)

    best = (math.inf, 1, 1)
    for n in range(1, 101):
        for a, b in ((_clamp(ratio * n), n), (n, _clamp(n / ratio))):
            if error(a, b) < best[0]:
                best = (error(a, b), a, b)
        if best[0] <= SHARE_TOLERANCE:
            break
    return best[1], best[2]


def _clamp(repeats: float) -> int:
    """1 to :data:`MAX_REPEATS`: a share near 0 or 1 keeps both kinds and a list of bounded length."""
    return min(MAX_REPEATS, max(1, round(repeats)))
