"""Weight inheritance: a student starts as the teacher's leading channels, consistently across every layer."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunet_distill.inherit import inherit_from_teacher, sliced


def _kwargs(features, n_stages=4):
    return {
        "input_channels": 2,
        "n_stages": n_stages,
        "features_per_stage": features,
        "conv_op": torch.nn.Conv3d,
        "kernel_sizes": 3,
        "strides": [1, 2, 2, 2][:n_stages],
        "num_classes": 4,
        "conv_bias": True,
        "norm_op": torch.nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": torch.nn.LeakyReLU,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "deep_supervision": False,
    }


def plain(features, seed=0):
    torch.manual_seed(seed)
    return PlainConvUNet(n_conv_per_stage=[2] * 4, **_kwargs(features)).eval()


def resenc(features, blocks=(1, 2, 2, 2), seed=0):
    torch.manual_seed(seed)
    return ResidualEncoderUNet(n_blocks_per_stage=list(blocks), **_kwargs(features)).eval()


TEACHER = [16, 32, 64, 128]


@pytest.mark.parametrize("build", [plain, resenc])
def test_r1_student_is_the_teacher(build):
    """The slicing rule at r=1 copies everything: the student computes exactly what the teacher computes."""
    teacher, student = build(TEACHER, seed=1), build(TEACHER, seed=2)
    x = torch.randn(1, 2, 16, 16, 16)
    assert not torch.allclose(teacher(x), student(x))
    report = inherit_from_teacher(student, teacher)
    assert report.random == [] and report.fraction == pytest.approx(1.0)
    assert torch.allclose(teacher(x), student(x), atol=1e-6)


@pytest.mark.parametrize("build", [plain, resenc])
def test_r2_student_holds_the_leading_channels_of_every_layer(build):
    teacher, student = build(TEACHER, seed=1), build([f // 2 for f in TEACHER], seed=2)
    report = inherit_from_teacher(student, teacher)
    assert report.random == [] and report.fraction == pytest.approx(1.0)
    t, s = teacher.state_dict(), student.state_dict()
    stem = "encoder.stages.0.0.convs.0.conv.weight" if build is plain else "encoder.stem.convs.0.conv.weight"
    assert torch.equal(s[stem], t[stem][:8])  # 8 of 16 filters, both input channels
    assert torch.equal(s["decoder.seg_layers.2.weight"], t["decoder.seg_layers.2.weight"][:, :8])
    # the decoder's first conv reads cat(upsampled, skip): the leading channels of *each* half
    w_t, w_s = t["decoder.stages.0.convs.0.conv.weight"], s["decoder.stages.0.convs.0.conv.weight"]
    assert w_t.shape[:2] == (64, 128) and w_s.shape[:2] == (32, 64)
    assert torch.equal(w_s[:, :32], w_t[:32, :32]) and torch.equal(w_s[:, 32:], w_t[:32, 64:96])
    x = torch.randn(1, 2, 16, 16, 16)
    agree = (teacher(x).argmax(1) == student(x).argmax(1)).float().mean()
    assert agree > 0.25  # a random 4-class segmenter agrees on ~25 %: the inherited one starts closer


def test_resenc_student_with_fewer_blocks_inherits_the_blocks_it_has_and_more_blocks_stay_random():
    teacher = resenc(TEACHER, blocks=(1, 2, 2, 2))
    fewer = resenc([8, 16, 32, 64], blocks=(1, 1, 1, 1))
    assert inherit_from_teacher(fewer, teacher).random == []
    more = resenc([8, 16, 32, 64], blocks=(1, 3, 3, 3))
    report = inherit_from_teacher(more, teacher)
    assert report.random and all(".blocks.2." in name for name in report.random)
    assert 0.5 < report.fraction < 1.0


def test_sliced_refuses_what_is_not_a_slice():
    t = torch.randn(16, 8, 3, 3, 3)
    assert sliced("x.weight", t, torch.Size([8, 4, 3, 3, 3])).shape == (8, 4, 3, 3, 3)
    assert sliced("x.weight", t, torch.Size([8, 4, 1, 1, 1])) is None  # other kernel
    assert sliced("x.weight", t, torch.Size([32, 8, 3, 3, 3])) is None  # wider than the teacher
    assert sliced("x.weight", t, torch.Size([8])) is None  # other rank
    odd = torch.randn(8, 7, 3, 3, 3)
    assert sliced("decoder.stages.1.convs.0.conv.weight", odd, torch.Size([4, 4, 3, 3, 3])) is None
