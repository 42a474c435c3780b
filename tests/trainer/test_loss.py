"""Behaviour of the KD loss: exact values against a hand-written reference, T^2 scaling, regions, ignore
label, gradient flow, float32 under reduced precision, and the mix with nnU-Net's real hard loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunet_distill.loss import DistillationLoss, kd_loss, kd_mask
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _reference_softmax_kd(s: np.ndarray, t: np.ndarray, temp: float, mask: np.ndarray | None = None) -> float:
    """Textbook formula, voxel by voxel: T^2 * mean_v sum_c p_c (log p_c - log q_c)."""
    b, c = s.shape[:2]
    s = s.reshape(b, c, -1) / temp
    t = t.reshape(b, c, -1) / temp
    m = np.ones((b, s.shape[-1]), bool) if mask is None else mask.reshape(b, -1)
    vals = []
    for i in range(b):
        for v in range(s.shape[-1]):
            if not m[i, v]:
                continue
            p = np.exp(t[i, :, v] - t[i, :, v].max())
            p /= p.sum()
            q = np.exp(s[i, :, v] - s[i, :, v].max())
            q /= q.sum()
            vals.append(float(np.sum(p * (np.log(p) - np.log(q)))))
    return temp**2 * (float(np.mean(vals)) if vals else 0.0)


def _reference_bernoulli_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    p, q = sig(t / temp), sig(s / temp)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return temp**2 * float(kl.sum(axis=1).mean())


@pytest.mark.parametrize("regions", [False, True])
def test_zero_when_student_equals_teacher_ensemble(regions):
    teachers = [_logits(2, 4, 5, 6, 3, seed=k) for k in range(5)]
    ensemble = torch.stack(teachers).mean(0)  # the ensemble target: the mean of the teachers' logits
    loss = kd_loss(ensemble.clone(), ensemble, 3.0, regions=regions)
    assert abs(loss.item()) < 1e-6
    # ... and strictly positive as soon as the student differs from the *ensemble* (even if equal to one
    # teacher)
    assert kd_loss(teachers[0].clone(), ensemble, 3.0, regions=regions).item() > 1e-3


@pytest.mark.parametrize("temp", [1.0, 3.0, 5.0])
def test_softmax_kd_matches_textbook_formula_summed_over_classes(temp):
    s, t = _logits(2, 4, 3, 3, 2, seed=1), _logits(2, 4, 3, 3, 2, seed=2)
    got = kd_loss(s, t, temp).item()
    want = _reference_softmax_kd(s.numpy(), t.numpy(), temp)
    assert got == pytest.approx(want, rel=1e-5)
    # The original's kl_div(reduction="mean") divided by the class count as well: we are C times larger.
    original = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s / temp, 1), torch.softmax(t / temp, 1), reduction="none"
        )
        .mean()
        .item()
        * temp**2
    )
    assert got == pytest.approx(original * s.shape[1], rel=1e-5)


def test_t_squared_keeps_gradient_scale_independent_of_temperature():
    # d(T^2 KL)/ds = T (q - p)  ->  (centred(s) - centred(t)) / (C * voxels) as T grows: T-free thanks to T^2.
    s0, t = _logits(1, 3, 4, 4, 4, seed=3, scale=1.0), _logits(1, 3, 4, 4, 4, seed=4, scale=1.0)
    grads = {}
    for temp in (50.0, 100.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, temp).backward()
        grads[temp] = s.grad.clone()
    n_vox = s0[0, 0].numel()
    limit = ((s0 - s0.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) / (s0.shape[1] * n_vox)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(grads[50.0], grads[100.0]) < 0.02
    assert rel(grads[100.0], limit) < 0.02
    # Without T^2 the gradient would shrink 2x from T=50 to T=100; check that the loss itself carries T^2.
    kl_raw_40 = kd_loss(s0, t, 40.0).item() / 40.0**2
    assert kl_raw_40 == pytest.approx(_reference_softmax_kd(s0.numpy(), t.numpy(), 40.0) / 1600.0, rel=1e-4)


def test_region_kd_is_per_region_bernoulli_not_softmax():
    s, t = _logits(2, 3, 4, 4, 2, seed=5), _logits(2, 3, 4, 4, 2, seed=6)
    got = kd_loss(s, t, 2.0, regions=True).item()
    assert got == pytest.approx(_reference_bernoulli_kd(s.numpy(), t.numpy(), 2.0), rel=1e-5)
    # Overlapping regions: both regions confidently "on" in teacher and student -> near-zero Bernoulli KL,
    # while a channel softmax would still see a mismatch of relative confidences.
    teacher = torch.tensor([10.0, 6.0]).view(1, 2, 1, 1, 1).expand(1, 2, 2, 2, 2).contiguous()
    student = torch.tensor([6.0, 10.0]).view(1, 2, 1, 1, 1).expand(1, 2, 2, 2, 2).contiguous()
    assert kd_loss(student, teacher, 1.0, regions=True).item() < 0.05
    assert kd_loss(student, teacher, 1.0, regions=False).item() > 3.0


def test_ignore_label_voxels_are_masked_out_of_kd():
    ignore = 3
    s, t = _logits(2, 3, 4, 4, 4, seed=7), _logits(2, 3, 4, 4, 4, seed=8)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=torch.Generator().manual_seed(0)).float()
    target[:, :, :2] = ignore  # half of every volume is unannotated
    mask = kd_mask(target, regions=False, ignore_label=ignore)
    got = kd_loss(s, t, 3.0, mask=mask).item()
    assert got == pytest.approx(_reference_softmax_kd(s.numpy(), t.numpy(), 3.0, mask.numpy()), rel=1e-5)
    # Changing the student arbitrarily where the label is ignored changes nothing, and gets no gradient.
    s2 = s.clone()
    s2[:, :, :2] = 100.0 * torch.randn_like(s2[:, :, :2])
    assert kd_loss(s2, t, 3.0, mask=mask).item() == pytest.approx(got, rel=1e-6)
    s2.requires_grad_(True)
    kd_loss(s2, t, 3.0, mask=mask).backward()
    assert torch.count_nonzero(s2.grad[:, :, :2]) == 0 and torch.count_nonzero(s2.grad[:, :, 2:]) > 0
    # Fully ignored patch: zero, finite, differentiable.
    all_ignored = torch.full_like(target, ignore)
    s3 = s.clone().requires_grad_(True)
    val = kd_loss(s3, t, 3.0, mask=kd_mask(all_ignored, regions=False, ignore_label=ignore))
    val.backward()
    assert val.item() == 0.0 and torch.isfinite(s3.grad).all()
    assert kd_mask(target, regions=False, ignore_label=None) is None


def test_region_ignore_channel_is_masked():
    # nnU-Net appends the ignore label as the last region channel of the one-hot target.
    regions_target = torch.zeros(1, 3, 4, 4, 4, dtype=torch.bool)
    regions_target[:, -1, :1] = True
    mask = kd_mask(regions_target, regions=True, ignore_label=9)
    assert mask.shape == (1, 1, 4, 4, 4) and not mask[:, :, :1].any() and mask[:, :, 1:].all()
    float_mask = kd_mask(regions_target.float(), regions=True, ignore_label=9)
    assert torch.equal(float_mask, mask)


def test_gradient_flows_only_into_student():
    s = _logits(2, 3, 4, 4, 4, seed=9).requires_grad_(True)
    t = _logits(2, 3, 4, 4, 4, seed=10).requires_grad_(True)
    kd_loss(s, t, 3.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_math_runs_in_float32_under_reduced_precision():
    s, t = _logits(1, 3, 8, 8, 8, seed=11), _logits(1, 3, 8, 8, 8, seed=12)
    ref = kd_loss(s, t, 3.0)
    low = kd_loss(s.bfloat16(), t.bfloat16(), 3.0)
    assert low.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = kd_loss(s, t, 3.0)
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(ref.item(), rel=1e-6)
    # A student identical to a bf16-rounded teacher is still exactly zero (no fp16/bf16 underflow noise).
    tb = t.bfloat16()
    assert abs(kd_loss(tb.clone(), tb, 3.0).item()) < 1e-6


def _ds_targets(seg: torch.Tensor, n: int):
    return [seg[..., :: 2**i, :: 2**i, :: 2**i] for i in range(n)]


def _ds_outputs(c: int, n: int, seed: int):
    return [
        _logits(2, c, 8 // 2**i, 8 // 2**i, 8 // 2**i, seed=seed + i).requires_grad_(True) for i in range(n)
    ]


def _nnunet_hard_loss(ignore_label=None):
    # What nnUNetTrainer._build_loss returns for a 3-stage net (weights 1, 1/2, 0 normalised).
    weights = np.array([1.0, 0.5, 0.0])
    return DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=ignore_label,
            dice_class=MemoryEfficientSoftDiceLoss,
        ),
        weights / weights.sum(),
    )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_total_mixes_nnunet_hard_loss_and_kd(alpha):
    hard = _nnunet_hard_loss()
    loss = DistillationLoss(hard, alpha=alpha, temperature=3.0, regions=False, ignore_label=None)
    outputs = _ds_outputs(3, 3, seed=20)
    seg = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    targets = _ds_targets(seg, 3)
    teacher = _logits(2, 3, 8, 8, 8, seed=30)
    terms = loss(outputs, teacher, targets)
    assert terms.hard.item() == pytest.approx(hard(outputs, targets).item(), rel=1e-6)
    assert terms.kd.item() == pytest.approx(kd_loss(outputs[0], teacher, 3.0).item(), rel=1e-6)
    assert terms.total.item() == pytest.approx(
        (1 - alpha) * terms.hard.item() + alpha * terms.kd.item(), rel=1e-6
    )
    terms.total.backward()
    # The KD term touches only the full-resolution head; lower heads get the hard DS loss (weight 0 at the
    # bottom).
    assert outputs[0].grad.abs().sum() > 0
    assert (outputs[1].grad.abs().sum() > 0) == (alpha < 1.0)


def test_unlabelled_samples_get_kd_only_and_labelled_ones_both():
    hard = _nnunet_hard_loss()
    loss = DistillationLoss(hard, alpha=0.3, temperature=3.0, regions=False, ignore_label=None)
    outputs = _ds_outputs(3, 3, seed=40)
    seg = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(2)).float()
    targets = _ds_targets(seg, 3)
    teacher = _logits(2, 3, 8, 8, 8, seed=50)
    terms = loss(outputs, teacher, targets, labelled=torch.tensor([False, True]))
    # the hard term is nnU-Net's loss of the labelled sample alone; KD still covers the whole batch
    assert terms.hard.item() == pytest.approx(
        hard([o[1:] for o in outputs], [t[1:] for t in targets]).item(), rel=1e-6
    )
    assert terms.hard.item() != pytest.approx(hard(outputs, targets).item(), rel=1e-3)
    assert terms.kd.item() == pytest.approx(kd_loss(outputs[0], teacher, 3.0).item(), rel=1e-6)
    terms.total.backward()
    # the unlabelled sample's lower heads (hard loss only) get no gradient; its full-res head gets KD's
    assert outputs[1].grad[0].abs().sum() == 0 and outputs[1].grad[1].abs().sum() > 0
    assert outputs[0].grad[0].abs().sum() > 0


def test_a_batch_of_unlabelled_samples_learns_from_kd_alone():
    loss = DistillationLoss(_nnunet_hard_loss(), alpha=0.3, temperature=3.0, regions=False, ignore_label=None)
    outputs = _ds_outputs(3, 3, seed=60)
    targets = _ds_targets(torch.zeros(2, 1, 8, 8, 8), 3)  # the placeholders' all-background labels
    teacher = _logits(2, 3, 8, 8, 8, seed=70)
    terms = loss(outputs, teacher, targets, labelled=torch.tensor([False, False]))
    assert terms.hard.item() == 0.0
    assert terms.total.item() == pytest.approx(0.3 * kd_loss(outputs[0], teacher, 3.0).item(), rel=1e-6)
    terms.total.backward()
    assert outputs[1].grad.abs().sum() == 0 and outputs[0].grad.abs().sum() > 0


def test_region_dataset_with_ignore_label_end_to_end():
    weights = np.array([1.0, 0.0])
    hard = DeepSupervisionWrapper(
        DC_and_BCE_loss(
            {},
            {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
            use_ignore_label=True,
            dice_class=MemoryEfficientSoftDiceLoss,
        ),
        weights / weights.sum(),
    )
    loss = DistillationLoss(hard, alpha=0.5, temperature=2.0, regions=True, ignore_label=4)
    outputs = _ds_outputs(2, 2, seed=40)
    target = torch.zeros(2, 3, 8, 8, 8, dtype=torch.bool)  # 2 regions + ignore channel
    target[:, 0, 2:6] = True
    target[:, 1, 3:5] = True
    target[:, 2, :, :2] = True
    teacher = _logits(2, 2, 8, 8, 8, seed=50)
    terms = loss(outputs, teacher, [target, target[..., ::2, ::2, ::2]])
    keep = (~target[:, -1]).numpy()  # (B, X, Y, Z): annotated voxels

    def annotated(x: torch.Tensor) -> np.ndarray:  # -> (1, R, N) logits of the annotated voxels only
        return np.moveaxis(x.detach().numpy(), 1, -1)[keep].T[None]

    want = _reference_bernoulli_kd(annotated(outputs[0]), annotated(teacher), 2.0)
    assert terms.kd.item() == pytest.approx(want, rel=1e-5)
    assert math.isfinite(terms.total.item())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5, "temperature": 3.0}, "alpha"),
        ({"alpha": -0.1, "temperature": 3.0}, "alpha"),
        ({"alpha": 0.3, "temperature": 0.0}, "temperature"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationLoss(_nnunet_hard_loss(), regions=False, ignore_label=None, **kwargs)


def test_shape_mismatch_names_the_problem():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(_logits(1, 3, 4, 4, 4), _logits(1, 2, 4, 4, 4), 3.0)


# ---------------------------------------------------------------------------------------------
# Channel-wise KD (kd_mode="channel")
# ---------------------------------------------------------------------------------------------


def _reference_channel_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """Shu et al. 2021, written out: per (sample, channel) KL of spatial softmaxes, mean over both, times
    T^2."""
    b, c = s.shape[:2]
    vals = []
    for i in range(b):
        for k in range(c):
            a, z = t[i, k].ravel() / temp, s[i, k].ravel() / temp
            p = np.exp(a - a.max())
            p /= p.sum()
            q = np.exp(z - z.max())
            q /= q.sum()
            vals.append(float(np.sum(p * (np.log(p) - np.log(q)))))
    return temp**2 * float(np.mean(vals))


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_channel_kd_matches_the_written_out_formula(temp):
    s, t = _logits(2, 3, 4, 3, 2, seed=5), _logits(2, 3, 4, 3, 2, seed=6)
    got = kd_loss(s, t, temp, mode="channel").item()
    assert got == pytest.approx(_reference_channel_kd(s.numpy(), t.numpy(), temp), rel=1e-5)
    assert kd_loss(t.clone(), t, temp, mode="channel").item() == pytest.approx(0.0, abs=1e-6)


def test_channel_kd_weighs_a_small_structure_like_a_large_one():
    """A student that misses a 4-voxel lesion: pixel KD barely notices, channel KD sees a whole channel
    wrong."""
    shape = (1, 3, 16, 16, 16)
    teacher = torch.full(shape, -4.0)
    teacher[:, 0] = 4.0  # background everywhere ...
    teacher[:, 1, :8] = 4.0  # ... an organ in half the patch ...
    teacher[:, 0, :8] = -4.0
    teacher[:, 2, 10, 10, 10:14] = 4.0  # ... and a 4-voxel lesion
    teacher[:, 0, 10, 10, 10:14] = -4.0
    student = teacher.clone()
    student[:, 2, 10, 10, 10:14] = -4.0  # the student misses only the lesion
    student[:, 0, 10, 10, 10:14] = 4.0
    pixel = kd_loss(student, teacher, 1.0, mode="pixel").item()
    channel = kd_loss(student, teacher, 1.0, mode="channel").item()
    assert pixel < 0.01 and channel > 1.0


def test_channel_kd_excludes_ignored_voxels_and_all_ignored_is_zero():
    s, t = _logits(2, 3, 4, 4, 4, seed=7), _logits(2, 3, 4, 4, 4, seed=8)
    mask = torch.ones(2, 1, 4, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = False
    s_changed = s.clone()
    s_changed[:, :, :2] += 5.0  # only ignored voxels differ
    assert kd_loss(s, t, 2.0, mode="channel", mask=mask).item() == pytest.approx(
        kd_loss(s_changed, t, 2.0, mode="channel", mask=mask).item(), rel=1e-6
    )
    none = torch.zeros_like(mask)
    loss = kd_loss(s.requires_grad_(), t, 2.0, mode="channel", mask=none)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_distillation_loss_rejects_an_unknown_kd_mode():
    with pytest.raises(ValueError, match="kd_mode must be one of pixel, channel, both"):
        DistillationLoss(torch.nn.Identity(), 0.3, 3.0, regions=False, ignore_label=None, kd_mode="feature")


def test_both_kd_is_the_sum_of_pixel_and_channel_kd():
    s, t = _logits(2, 3, 4, 3, 2, seed=9), _logits(2, 3, 4, 3, 2, seed=10)
    mask = torch.rand(2, 1, 4, 3, 2, generator=torch.Generator().manual_seed(1)) > 0.3
    both = kd_loss(s, t, 2.0, mode="both", mask=mask).item()
    assert both == pytest.approx(
        kd_loss(s, t, 2.0, mode="pixel", mask=mask).item()
        + kd_loss(s, t, 2.0, mode="channel", mask=mask).item(),
        rel=1e-6,
    )
