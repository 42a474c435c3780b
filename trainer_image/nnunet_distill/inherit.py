"""Start the student from a teacher's weights instead of from random ones ("weight inheritance").

A student of reduction factor r has the teacher's stages, kernels, strides and blocks, with every stage's
channel count divided by r. Every student tensor is therefore a slice of the teacher tensor of the same name:
the first
``c`` output channels of each convolution, the first ``c`` input channels, the matching instance-norm scales
and biases. Slicing the *leading* channels of every channel space keeps the spaces consistent wherever two
layers share one (a residual addition in a ResEnc stage, the skip into the decoder, a transposed convolution
feeding the next decoder stage) without knowing the architecture. The one place that needs knowing is
nnU-Net's decoder, whose first convolution of every stage reads ``cat(upsampled, skip)``: its input is two
spaces, so the student's input channels are the first ``c`` of each half.

Why it matters: a thinner network trained from scratch learns small and thin structures far more slowly than
the teacher did (measured by ``bench quality``), so for the same budget it loses them entirely. Inherited
filters already detect what the teacher detects; instance normalisation after every convolution
re-standardises the activations that dropping channels rescales, so the sliced network starts close to a
working segmenter and KD only has to close the remaining gap. Tensors the teacher does not have (extra ResEnc
blocks of ``-bs increase``) keep their random initialisation, and tensors of different rank are never forced:
the report says what was inherited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

#: nnU-Net's UNetDecoder: ``stages.<s>`` starts with a convolution over ``cat(transpconv(x), skip)``.
_DECODER_CONCAT = re.compile(
    r"(^|\.)decoder\.stages\.\d+\.(convs\.0\.|0\.convs\.0\.)(conv|all_modules\.0)\.weight$"
)

INIT_CHOICES = ("teacher", "random")


@dataclass
class InheritanceReport:
    """What was copied: tensors fully or partly inherited, and those left at their random initialisation."""

    inherited: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    inherited_parameters: int = 0
    total_parameters: int = 0

    @property
    def fraction(self) -> float:
        return self.inherited_parameters / self.total_parameters if self.total_parameters else 0.0

    def describe(self) -> str:
        return (
            f"{len(self.inherited)} tensors ({self.fraction:.1%} of the student's parameters) inherited from "
            "the "
            f"teacher, {len(self.random)} left random"
        )


def _leading(index_len: int, keep: int) -> torch.Tensor:
    return torch.arange(min(index_len, keep))


def _concat_halves(teacher_in: int, student_in: int) -> torch.Tensor | None:
    """Input channels of a decoder stage's first convolution: the leading part of each half of the concat."""
    if teacher_in % 2 or student_in % 2:
        return None
    t_half, s_half = teacher_in // 2, student_in // 2
    return torch.cat([torch.arange(s_half), t_half + torch.arange(s_half)])


def sliced(name: str, teacher: torch.Tensor, student_shape: torch.Size) -> torch.Tensor | None:
    """The teacher tensor cut to ``student_shape``, or None where no consistent slice exists.

    Pure function of (name, tensor, shape), so it is tested on its own. Only channel dimensions (dim 0 and 1)
    may shrink; kernel dimensions must match.
    """
    if teacher.dim() != len(student_shape):
        return None
    if teacher.dim() > 2 and tuple(teacher.shape[2:]) != tuple(student_shape[2:]):
        return None
    if any(s > t for s, t in zip(student_shape, teacher.shape, strict=False)):
        return None  # the student is wider somewhere (e.g. more classes): not a slice of the teacher
    out = teacher
    for dim in range(min(2, teacher.dim())):
        t, s = teacher.shape[dim], student_shape[dim]
        if t == s:
            continue
        index = _concat_halves(t, s) if dim == 1 and _DECODER_CONCAT.search(name) else _leading(t, s)
        if index is None:
            return None
        out = out.index_select(dim, index.to(out.device))
    return out if tuple(out.shape) == tuple(student_shape) else None


@torch.no_grad()
def inherit_from_teacher(student: nn.Module, teacher: nn.Module) -> InheritanceReport:
    """Copy every sliceable teacher tensor into the student in place (both plain nn.Modules, same key
    names)."""
    report = InheritanceReport()
    teacher_state = teacher.state_dict()
    seen: set[int] = set()  # state_dict lists shared tensors under several names (conv / all_modules.0)
    for name, tensor in student.state_dict().items():
        first_time = id(tensor) not in seen and tensor.untyped_storage().data_ptr() not in seen
        seen.update({id(tensor), tensor.untyped_storage().data_ptr()})
        if first_time and tensor.is_floating_point():
            report.total_parameters += tensor.numel()
        source = teacher_state.get(name)
        piece = sliced(name, source, tensor.shape) if source is not None else None
        if piece is None:
            report.random.append(name)
            continue
        tensor.copy_(piece.to(device=tensor.device, dtype=tensor.dtype))
        report.inherited.append(name)
        if first_time and tensor.is_floating_point():
            report.inherited_parameters += tensor.numel()
    return report
