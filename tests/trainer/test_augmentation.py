"""DA5 as the seed describes it, and the clean teacher view, on nnU-Net's own transform pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunet_distill import augmentation as A
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

PATCH = (24, 24, 24)
ROT = (-np.pi / 6, np.pi / 6)


def _pipeline(cls, mask=False):
    return cls.get_training_transforms(
        PATCH,
        ROT,
        None,
        (0, 1, 2),
        False,
        use_mask_for_norm=[mask],
        is_cascaded=False,
        foreground_labels=[1, 2],
    )


def test_da5_keeps_every_nnunet_da5_transform_and_adds_elastic_and_order0_segmentation():
    stock = _pipeline(nnUNetTrainerDA5)
    ours = A.with_da5_spatial(stock)
    assert A.describe(ours) == A.describe(stock)  # same transforms, same order
    (settings,) = A.spatial_settings(ours)
    assert settings == {"p_elastic_deform": A.DA5_P_ELASTIC, "mode_seg": "nearest", "mode_image": "bilinear"}
    assert A.spatial_settings(stock)[0]["p_elastic_deform"] == 0
    new = next(t for t in ours.transforms if isinstance(t, SpatialTransform))
    old = next(t for t in stock.transforms if isinstance(t, SpatialTransform))
    assert (new.p_rotation, new.rotation, new.p_scaling, new.scaling) == (
        old.p_rotation,
        old.rotation,
        old.p_scaling,
        old.scaling,
    )


def test_nearest_segmentation_resampling_keeps_a_one_voxel_vessel():
    torch.manual_seed(0)
    np.random.seed(0)
    seg = torch.zeros(1, *PATCH, dtype=torch.int16)
    seg[0, 12, 12, :] = 1  # a one-voxel-thin line through the patch
    spatial = A.da5_spatial_transform(
        next(t for t in _pipeline(nnUNetTrainerDA5).transforms if isinstance(t, SpatialTransform))
    )
    kept = []
    for _ in range(10):
        out = spatial(image=torch.rand(1, *PATCH), segmentation=seg.clone())
        kept.append(int((out["segmentation"] == 1).sum()))
    assert min(kept) > 0 and set(torch.unique(out["segmentation"]).tolist()) <= {0, 1}


@pytest.mark.parametrize("cls", [nnUNetTrainer, nnUNetTrainerDA5])
def test_clean_teacher_view_is_the_patch_before_intensity_augmentation(cls):
    pipeline = A.with_clean_teacher_view(_pipeline(cls), num_channels=1)
    kinds = [A.kind(t) for t in pipeline.transforms]
    assert kinds == sorted(kinds, key=["spatial", "intensity", "label"].index)  # spatial, then the rest
    torch.manual_seed(1)
    np.random.seed(1)
    image = torch.zeros(1, *PATCH)
    image[:, 6:18, 6:18, 6:18] = 1.0  # a binary image: only interpolation makes in-betweens
    seg = (image > 0).to(torch.int16)
    differs = 0
    for _ in range(20):
        out = pipeline(image=image.clone(), segmentation=seg.clone())
        student, teacher = A.split_views(out["image"][None], 1)
        assert student.shape == teacher.shape == (1, 1, *PATCH)
        assert (
            float(teacher.min()) >= -1e-5 and float(teacher.max()) <= 1 + 1e-5
        )  # no noise, no gamma, no boxes
        differs += not torch.allclose(student, teacher)
    assert differs >= 5  # the student's copy really is augmented (seeded)


def test_clean_teacher_view_masks_both_copies_and_refuses_cascades():
    pipeline = A.with_clean_teacher_view(_pipeline(nnUNetTrainer, mask=True), num_channels=1)
    masks = [t for t in pipeline.transforms if type(t).__name__ == "MaskImageTransform"]
    assert masks and masks[0].apply_to_channels == [0, 1]
    cascade = nnUNetTrainer.get_training_transforms(
        PATCH,
        ROT,
        None,
        (0, 1, 2),
        False,
        use_mask_for_norm=[False],
        is_cascaded=True,
        foreground_labels=[1, 2],
    )
    with pytest.raises(RuntimeError, match="cascade"):
        A.with_clean_teacher_view(cascade, num_channels=1)
