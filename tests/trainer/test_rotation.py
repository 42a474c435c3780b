"""Fold rotation never lets the student train on the cases its validation Dice is computed on."""

from __future__ import annotations

import pytest
from nnunet_distill import rotation
from nnunetv2.utilities.crossval_split import generate_crossval_split


@pytest.fixture
def splits():
    # nnU-Net's own seeded 5-fold split, as written to splits_final.json
    return generate_crossval_split([f"case_{i:03d}" for i in range(23)], seed=12345, n_splits=5)


def test_period_zero_is_nnunets_fold_split(splits):
    for fold in range(5):
        assert rotation.rotation_source_fold(0, 3, fold, 5) == fold
        train, val = rotation.rotated_split(splits, fold, fold)
        assert train == list(splits[fold]["train"]) and val == list(splits[fold]["val"])


@pytest.mark.parametrize("fold", range(5))
def test_rotation_visits_every_fold_and_never_trains_on_validation_cases(splits, fold):
    freq = 4
    seen_sources, seen_training = [], set()
    for epoch in range(5 * freq * 2):
        source = rotation.rotation_source_fold(epoch, freq, fold, len(splits))
        train, val = rotation.rotated_split(splits, fold, source)
        assert val == list(splits[fold]["val"])  # validation never changes
        assert not set(train) & set(val)  # ... and is never trained on
        assert set(train) <= set(splits[fold]["train"])
        seen_training |= set(train)
        if not seen_sources or seen_sources[-1] != source:
            seen_sources.append(source)
    assert seen_sources[:5] == [(fold + k) % 5 for k in range(5)]  # every fold, in order, then again
    assert seen_sources[5:] == seen_sources[:5]
    assert seen_training == set(splits[fold]["train"])  # over a cycle, every training case is used


def test_rotation_is_a_function_of_the_epoch_so_resume_lands_in_the_same_period():
    assert [rotation.rotation_period(e, 5) for e in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert rotation.rotation_source_fold(12, 5, 3, 5) == 0


def test_describe_says_what_the_dice_covers(splits):
    line = rotation.describe(splits, 0, 2)
    assert (
        "fold 0's" in line
        and "validation Dice covers" in line
        and "none of which the student trains on" in line
    )


def test_bad_inputs(splits):
    with pytest.raises(rotation.RotationError, match="fold 7 is not one of the 5 folds"):
        rotation.rotated_split(splits, 7, 0)
    with pytest.raises(rotation.RotationError, match="at least 2 folds"):
        rotation.rotated_split(splits[:1], 0, 0)
    with pytest.raises(rotation.RotationError, match="-rotate_freq"):
        rotation.rotation_period(3, 0)
