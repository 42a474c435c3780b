"""Training augmentation for distillation: DA5 as the seed describes it, and the teachers' view of each patch.

**DA5.** nnU-Net's ``nnUNetTrainerDA5`` is the strong augmentation for small datasets, but its spatial
transform has elastic deformation switched off (``p_elastic_deform=0``) and interpolates segmentations
linearly (a one-hot interpolation then argmax, which erodes structures one or two voxels thin). The seed's DA5
promises elastic deformation and a reduced interpolation order "for better preservation of fine details". We
keep every DA5 transform and swap only the ``SpatialTransform``, the way nnU-Net's own
``nnUNetTrainerDA5ord0`` variant does: elastic deformation with probability :data:`DA5_P_ELASTIC` and
nearest-neighbour (order 0) resampling of the segmentation; images keep linear interpolation (order 1, already
below the cubic order of nnU-Net v1's DA5).

**Teacher view.** In online KD the teachers label the very patch the student sees. Intensity-only
augmentations (noise, blur, gamma, contrast, low resolution, blank rectangles, local gamma and brightness
gradients) produce images the teachers were never trained on (nnU-Net's default augmentation has no blank
rectangles or local gamma), so their soft labels there can be wrong exactly where the student needs them. With
``teacher_view="clean"`` the teachers see the patch after the spatial transforms (which the label follows) but
before the intensity-only ones: the clean patch travels as extra image channels through the pipeline and is
split off in the train step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import (
    RemoveRandomConnectedComponentFromOneHotEncodingTransform,
)
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.spatial.transpose import TransposeAxesTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

#: Probability of an elastic deformation per sample in DA5 (nnU-Net v1's default augmentation used 0.2).
DA5_P_ELASTIC = 0.2
#: Displacement-field smoothness and magnitude, as fractions of the patch (batchgeneratorsv2's defaults).
DA5_ELASTIC_SCALE = (0.0, 0.2)
DA5_ELASTIC_MAGNITUDE = (0.0, 0.2)
#: Interpolation of segmentations in DA5's spatial transform: nearest neighbour (order 0).
DA5_SEG_MODE = "nearest"
#: Interpolation of images: linear (order 1).
DA5_IMAGE_MODE = "bilinear"

TEACHER_VIEWS = ("augmented", "clean")

_SPATIAL = (
    SpatialTransform,
    Convert3DTo2DTransform,
    Convert2DTo3DTransform,
    MirrorTransform,
    Rot90Transform,
    TransposeAxesTransform,
)
_LABEL_SIDE = (
    MaskImageTransform,
    RemoveLabelTansform,
    MoveSegAsOneHotToDataTransform,
    ApplyRandomBinaryOperatorTransform,
    RemoveRandomConnectedComponentFromOneHotEncodingTransform,
    ConvertSegmentationToRegionsTransform,
    DownsampleSegForDSTransform,
)


def da5_spatial_transform(template: SpatialTransform) -> SpatialTransform:
    """DA5's SpatialTransform with elastic deformation on and order-0 segmentation resampling; all else
    kept."""
    return SpatialTransform(
        template.patch_size,
        template.patch_center_dist_from_border,
        template.random_crop,
        p_elastic_deform=DA5_P_ELASTIC,
        elastic_deform_scale=DA5_ELASTIC_SCALE,
        elastic_deform_magnitude=DA5_ELASTIC_MAGNITUDE,
        p_synchronize_def_scale_across_axes=template.p_synchronize_def_scale_across_axes,
        p_rotation=template.p_rotation,
        rotation=template.rotation,
        p_rot_per_axis=template.p_rot_per_axis,
        p_scaling=template.p_scaling,
        scaling=template.scaling,
        p_synchronize_scaling_across_axes=template.p_synchronize_scaling_across_axes,
        bg_style_seg_sampling=template.bg_style_seg_sampling,
        mode_seg=DA5_SEG_MODE,
        border_mode_seg=template.border_mode_seg,
        center_deformation=template.center_deformation,
        mode_image=DA5_IMAGE_MODE,
        padding_mode_image=template.padding_mode_image,
        padding_value_seg=template.padding_value_seg,
        padding_value_image=template.padding_value_image,
        align_corners=template.align_corners,
    )


def with_da5_spatial(transforms: ComposeTransforms) -> ComposeTransforms:
    """nnU-Net's DA5 pipeline with its one SpatialTransform replaced by :func:`da5_spatial_transform`."""
    index = [i for i, t in enumerate(transforms.transforms) if isinstance(t, SpatialTransform)]
    if len(index) != 1:
        raise RuntimeError(
            f"expected one SpatialTransform in nnU-Net's DA5 pipeline, found {len(index)}: "
            "nnU-Net's DA5 changed; update nnunet_distill.augmentation"
        )
    out = list(transforms.transforms)
    out[index[0]] = da5_spatial_transform(out[index[0]])
    return ComposeTransforms(out)


def _inner(t: BasicTransform) -> list[BasicTransform]:
    if isinstance(t, RandomTransform):
        return _inner(t.transform)
    if isinstance(t, OneOfTransform):
        return [x for sub in t.list_of_transforms for x in _inner(sub)]
    if isinstance(t, ComposeTransforms):
        return [x for sub in t.transforms for x in _inner(sub)]
    return [t]


def kind(t: BasicTransform) -> str:
    """'spatial' (moves voxels; the label follows), 'label' (label side, masking, DS) or 'intensity'."""
    inner = _inner(t)
    if all(isinstance(x, _SPATIAL) for x in inner):
        return "spatial"
    if all(isinstance(x, _LABEL_SIDE) for x in inner):
        return "label"
    if any(isinstance(x, _SPATIAL + _LABEL_SIDE) for x in inner):
        raise RuntimeError(
            f"{type(t).__name__} mixes spatial/label and intensity transforms; cannot split it"
        )
    return "intensity"


class StudentOnly(BasicTransform):
    """Keeps a copy of the incoming image (the teachers' view) as extra channels; ``inner`` changes only the
    student's channels. The copy rides along through later label-side transforms untouched."""

    def __init__(self, inner: ComposeTransforms, num_channels: int):
        super().__init__()
        self.inner = inner
        self.num_channels = num_channels

    def apply(self, data_dict, **params):
        image = data_dict["image"]
        clean = image.clone()
        data_dict = self.inner(**{**data_dict, "image": image})
        data_dict["image"] = torch.cat([data_dict["image"], clean], dim=0)
        return data_dict


def with_clean_teacher_view(transforms: ComposeTransforms, num_channels: int) -> ComposeTransforms:
    """Reorder into [spatial..., StudentOnly(intensity...), label-side...] so the teachers get the clean
    patch.

    Mirroring moves in front of the intensity transforms; they are spatially random, so the distribution of
    augmented patches is unchanged. A MaskImageTransform (nonzero-mask normalisation) masks both copies.
    """
    spatial, intensity, label = [], [], []
    for t in transforms.transforms:
        {"spatial": spatial, "intensity": intensity, "label": label}[kind(t)].append(t)
    if any(isinstance(x, MoveSegAsOneHotToDataTransform) for t in label for x in _inner(t)):
        raise RuntimeError(
            "--teacher_view clean does not support cascade configurations (the previous stage's "
            "segmentation joins the image channels); use --teacher_view augmented"
        )
    fixed = []
    for t in label:
        if isinstance(t, MaskImageTransform):
            channels = list(t.apply_to_channels)
            t = MaskImageTransform(
                channels + [c + num_channels for c in channels], t.channel_idx_in_seg, t.set_outside_to
            )
        fixed.append(t)
    return ComposeTransforms([*spatial, StudentOnly(ComposeTransforms(intensity), num_channels), *fixed])


def split_views(data: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student input, teacher input) from a batch built with :func:`with_clean_teacher_view`."""
    if data.shape[1] != 2 * num_channels:
        raise RuntimeError(
            f"batch has {data.shape[1]} channels; a clean-teacher-view batch has 2 x {num_channels}"
        )
    return data[:, :num_channels], data[:, num_channels:]


def describe(transforms: ComposeTransforms) -> list[str]:
    """Class names of every transform, nested ones included (for logs and tests)."""
    return [type(x).__name__ for t in transforms.transforms for x in _inner(t)]


def spatial_settings(transforms: ComposeTransforms) -> Sequence[dict]:
    return [
        {"p_elastic_deform": x.p_elastic_deform, "mode_seg": x.mode_seg, "mode_image": x.mode_image}
        for t in transforms.transforms
        for x in _inner(t)
        if isinstance(x, SpatialTransform)
    ]
