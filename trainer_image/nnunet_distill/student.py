"""Student architecture from nnU-Net plans: fewer channels, same topology, its own plans file.

The student is described entirely by a plans file (a deep copy of the student base plans with the
configuration's channel counts divided by the reduction factor r, and for residual encoders a new
number of blocks per stage). Everything that decides which preprocessed data a configuration reads
(data_identifier, spacing, normalization, patch and batch size) is left untouched, so the student
trains on the teacher's preprocessed data and stock nnU-Net (`nnUNetv2_predict`) rebuilds exactly
this network from the plans alone, with no code of ours on the import path.

Pure functions first (features, blocks, plans); the two functions touching torch or the disk
(`build_network`, `write_student_plans`) are at the end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pydoc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnunet_distill import contract, nnunet_env
from nnunet_distill.atomic import atomic_write_json

MIN_FEATURES = 8
MAX_BLOCKS = 8

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"

BLOCK_STRATEGY_HELP = {
    "reduce": "halve the residual blocks of every encoder stage, at least 1 (the seed's rule): "
    "a shallower and narrower, fastest student",
    "keep": "keep the teacher's blocks per stage (default): only the width shrinks, so parameters "
    "and compute fall by about r^2",
    "increase": "one more block per stage, at most 8 (the seed's rule): a deeper student, "
    "about (n+1)/n times the parameters of `keep`",
    "adaptive": "give back depth for the width lost: up to one extra block per halving of a stage's "
    "width (at most 8), added shallow stages first, within the encoder parameter budget "
    "of teacher/r^2, taking blocks from the deepest stages to pay for it; never larger than "
    "`keep`, and it changes the network for every r >= 2",
}


class CompatibilityError(ValueError):
    """Teacher and student cannot be distilled together; the message is one line naming the fix."""


class StudentPlansError(ValueError):
    """The student plans cannot be derived or written; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------


def reduce_features(features: Sequence[int], r: int, minimum: int = MIN_FEATURES) -> list[int]:
    """Channels per stage of the student: floor(f / r), but never below `minimum` (8).

    Floor division is the seed's rule and keeps r=2/4/8 students at exactly 1/r of every power-of-two
    stage. The floor of 8 channels exists because a stage with 2 or 4 channels cannot hold enough
    distinct filters for a multi-label output, its per-channel InstanceNorm statistics get noisy, and
    GPU kernels (tensor cores) work on channel counts in multiples of 8; without the floor r=8 would
    turn a 32-channel stem into 4 channels. A teacher stage that is already narrower than the floor is
    kept as is (a student is never wider than its teacher).
    """
    if r < 1:
        raise ValueError(f"reduction factor must be >= 1, got {r}")
    if minimum < 1:
        raise ValueError(f"minimum feature count must be >= 1, got {minimum}")
    return [min(int(f), max(int(f) // r, minimum)) for f in features]


def width_loss(teacher_features: Sequence[int], student_features: Sequence[int]) -> list[float]:
    """Per stage, how many times narrower the student is (>= 1; below r where the min-8 floor applied)."""
    return [t / s for t, s in zip(teacher_features, student_features, strict=False)]


def block_counts(
    teacher_blocks: Sequence[int],
    strategy: str,
    r: int,
    *,
    teacher_features: Sequence[int] | None = None,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    minimum_features: int = MIN_FEATURES,
    max_blocks: int = MAX_BLOCKS,
) -> list[int]:
    """Residual blocks per encoder stage of a ResEnc student.

    - `reduce`:   max(n // 2, 1). The seed's rule; r does not enter.
    - `keep`:     n. Width alone shrinks, so the student is ~1/r^2 of the teacher.
    - `increase`: min(n + 1, max_blocks). The seed's rule; r does not enter.
    - `adaptive`: thin-and-deep under a parameter budget (the FitNets observation: at a fixed budget
      a thinner, deeper student distils better than a wide, shallow one). Each stage may get back one
      block per halving of its width, ceil(log2(teacher/student width)), capped at `max_blocks`; the
      budget is the encoder's residual parameters of the teacher divided by r^2 (what `keep` costs,
      counted at width f/r where the min-8 floor made a stage wider), so the student never grows past
      the size the user asked for with r. Blocks are assigned round-robin, shallow stages first, starting from
      `reduce`'s counts: a block at the shallowest stages costs a small fraction of one at the deepest
      (parameters grow with channels^2), so depth moves to the high-resolution stages, where small structures
      are resolved, and the deepest, widest stages pay for it. Unlike the seed's rule (a no-op below r=4) this
      changes the network for every r >= 2; r=1 returns the teacher's counts. Compute (FLOPs) grows
      a little because shallow stages run at high resolution.

    `adaptive` needs `teacher_features` (and uses `kernel_sizes`, if given, to weigh a block by its
    kernel volume).
    """
    blocks = [int(n) for n in teacher_blocks]
    if any(n < 1 for n in blocks):
        raise ValueError(f"teacher blocks per stage must all be >= 1, got {blocks}")
    if r < 1:
        raise ValueError(f"reduction factor must be >= 1, got {r}")
    if strategy == "keep":
        return blocks
    if strategy == "reduce":
        return [max(n // 2, 1) for n in blocks]
    if strategy == "increase":
        return [max(min(n + 1, max_blocks), n) for n in blocks]
    if strategy != "adaptive":
        raise ValueError(
            f"block strategy must be one of {', '.join(contract.BLOCK_STRATEGIES)}, got {strategy!r}"
        )
    if teacher_features is None or len(teacher_features) != len(blocks):
        raise ValueError(
            "the adaptive block strategy needs teacher_features, one per encoder stage "
            f"({len(blocks)} stages)"
        )
    if r == 1:
        return blocks
    return _adaptive_block_counts(blocks, teacher_features, r, kernel_sizes, minimum_features, max_blocks)


def _adaptive_block_counts(
    blocks: list[int],
    teacher_features: Sequence[int],
    r: int,
    kernel_sizes: Sequence[Sequence[int]] | None,
    minimum_features: int,
    max_blocks: int,
) -> list[int]:
    """`adaptive` (see `block_counts`): round-robin, shallow stages first, within the teacher/r^2 budget."""
    student_features = reduce_features(teacher_features, r, minimum_features)
    volumes = (
        [math.prod(int(k) for k in ks) for ks in kernel_sizes]
        if kernel_sizes is not None
        else [1] * len(blocks)
    )
    if len(volumes) != len(blocks):
        raise ValueError(f"kernel_sizes has {len(volumes)} stages, teacher blocks {len(blocks)}")
    cost = [f * f * v for f, v in zip(student_features, volumes, strict=False)]
    budget = sum(
        n * min(f / r, fs) ** 2 * v
        for n, f, fs, v in zip(blocks, teacher_features, student_features, volumes, strict=False)
    )
    target = [
        min(max(max_blocks, n), n + math.ceil(math.log2(c) - 1e-9))
        for n, c in zip(blocks, width_loss(teacher_features, student_features), strict=False)
    ]
    counts = [max(n // 2, 1) for n in blocks]
    spent = sum(n * c for n, c in zip(counts, cost, strict=False))
    grew = True
    while grew:
        grew = False
        for s in range(len(counts)):
            if counts[s] < target[s] and spent + cost[s] <= budget + 1e-9:
                counts[s] += 1
                spent += cost[s]
                grew = True
    return counts


# ---------------------------------------------------------------------------------------------
# Plans derivation (pure: dict in, dict out)
# ---------------------------------------------------------------------------------------------


def _arch_class(class_name: str) -> type | None:
    located = pydoc.locate(class_name)
    return located if isinstance(located, type) else None


def is_residual_encoder(architecture: dict) -> bool:
    """Decided by the plans' network class (and its kwargs), never by the plans identifier's name."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    cls = _arch_class(architecture.get("network_class_name", ""))
    if cls is not None and issubclass(cls, ResidualEncoderUNet):
        return True
    if cls is not None and issubclass(cls, PlainConvUNet):
        return False
    kwargs = architecture.get("arch_kwargs", {})
    if "n_blocks_per_stage" in kwargs:
        return True
    if "n_conv_per_stage" in kwargs:
        return False
    raise StudentPlansError(
        f"unsupported student architecture {architecture.get('network_class_name')!r}: "
        "the student plans must use PlainConvUNet or ResidualEncoderUNet "
        "(plans made by nnUNetv2_plan_experiment with the default or a ResEnc planner)"
    )


def _resolved_architecture(configurations: dict, configuration: str) -> dict:
    try:
        cfg = nnunet_env.resolved_configuration(configurations, configuration)
    except nnunet_env.PlansError as exc:
        raise StudentPlansError(f"student plans: {exc}") from None
    if "architecture" not in cfg:
        raise StudentPlansError(
            f"configuration {configuration!r} has no architecture in the plans "
            "(re-plan it with nnUNetv2_plan_experiment)"
        )
    return cfg["architecture"]


def _reduce_architecture(architecture: dict, r: int, block_strategy: str | None) -> dict:
    arch = copy.deepcopy(architecture)
    kwargs = arch["arch_kwargs"]
    teacher_features = [int(f) for f in kwargs["features_per_stage"]]
    kwargs["features_per_stage"] = reduce_features(teacher_features, r)
    if kwargs.get("stem_channels") is not None:
        kwargs["stem_channels"] = reduce_features([kwargs["stem_channels"]], r)[0]
    if kwargs.get("bottleneck_channels") is not None:
        bc = kwargs["bottleneck_channels"]
        kwargs["bottleneck_channels"] = (
            reduce_features(bc, r) if isinstance(bc, (list, tuple)) else reduce_features([bc], r)[0]
        )
    if is_residual_encoder(arch):
        blocks = kwargs["n_blocks_per_stage"]
        blocks = (
            [int(blocks)] * len(teacher_features) if isinstance(blocks, int) else [int(b) for b in blocks]
        )
        kwargs["n_blocks_per_stage"] = block_counts(
            blocks,
            block_strategy or "keep",
            r,
            teacher_features=teacher_features,
            kernel_sizes=kwargs.get("kernel_sizes"),
        )
    elif block_strategy not in (None, "keep"):
        raise StudentPlansError(
            f"block strategy {block_strategy!r} needs a ResidualEncoderUNet student, but the "
            f"student plans use {arch.get('network_class_name')}: pass -bs keep, or ResEnc "
            "student plans (-spl nnUNetResEncUNetMPlans)"
        )
    return arch


def _check_reduction(reduction_factor: int, block_strategy: str | None) -> None:
    if reduction_factor < 1:
        raise StudentPlansError(f"reduction factor (-r) must be >= 1, got {reduction_factor}")
    if block_strategy is not None and block_strategy not in contract.BLOCK_STRATEGIES:
        raise StudentPlansError(
            f"block strategy (-bs) must be one of {', '.join(contract.BLOCK_STRATEGIES)}, "
            f"got {block_strategy!r}"
        )


def derive_student_plans(
    student_base_plans: dict,
    configuration: str,
    reduction_factor: int,
    block_strategy: str | None = None,
    plans_name: str | None = None,
    teacher_plans_name: str | None = None,
) -> dict:
    """Student plans: the base plans with every configuration's channels divided by r.

    Returns a new dict (the input is not modified). One student plans file serves every configuration
    (2d, 3d_lowres, 3d_fullres, 3d_cascade_fullres...), so students of several configurations of one
    dataset coexist under one plans name, as nnU-Net's own configurations do, and a cascade's stages share
    it. Every configuration with an architecture of its own gets reduced `features_per_stage` (and, for a
    ResidualEncoderUNet, blocks per stage from `block_strategy`, default `keep`); one that inherits its
    architecture (`inherits_from`, e.g. 3d_cascade_fullres from 3d_fullres) inherits the reduced one.
    Kernels, strides, convs per stage, norm, non-linearity, deep supervision, data_identifier, patch, batch
    and spacing are untouched, so the student reads the teacher's preprocessed data. `configuration` (the
    one being trained) must exist and decides whether the student is plain or residual (its
    `network_class_name`). The name is `contract.student_plans_identifier` of the teacher plans (default:
    the base), unless `plans_name` is given. A `distillation` entry records r, the strategy and the base.
    """
    _check_reduction(reduction_factor, block_strategy)
    plans = copy.deepcopy(student_base_plans)
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        available = ", ".join(configurations) if isinstance(configurations, dict) else "none"
        raise StudentPlansError(
            f"configuration {configuration!r} not found in plans "
            f"{plans.get('plans_name')!r} (available: {available})"
        )
    base_name = plans.get("plans_name", contract.DEFAULT_PLANS)
    resenc = is_residual_encoder(_resolved_architecture(configurations, configuration))
    strategy = block_strategy if resenc else (None if block_strategy in (None, "keep") else block_strategy)
    recorded_strategy = (strategy or "keep") if resenc else None

    for name in configurations:
        cfg = configurations[name]
        if "architecture" in cfg:
            cfg["architecture"] = _reduce_architecture(cfg["architecture"], reduction_factor, strategy)

    plans["plans_name"] = plans_name or contract.student_plans_identifier(
        teacher_plans_name or base_name,
        reduction_factor,
        recorded_strategy,
        student_base_plans=base_name,
    )
    plans["distillation"] = {
        "base_plans": base_name,
        "teacher_plans": teacher_plans_name or base_name,
        "reduction_factor": reduction_factor,
        "block_strategy": recorded_strategy,
        "min_features": MIN_FEATURES,
    }
    plans.pop("continue_training", None)
    return plans


# ---------------------------------------------------------------------------------------------
# Compatibility check (pure)
# ---------------------------------------------------------------------------------------------


def _dataset_id(plans: dict) -> str:
    name = str(plans.get("dataset_name", ""))
    return str(int(name[7:10])) if name.startswith("Dataset") and name[7:10].isdigit() else "ID"


def _fix_command(plans: dict) -> str:
    planner = plans.get("experiment_planner_used") or "ExperimentPlanner"
    pl = "" if planner == "ExperimentPlanner" else f" -pl {planner}"
    return f"nnUNetv2_plan_experiment -d {_dataset_id(plans)}{pl}"


def _labels_key(dataset_json: dict) -> list:
    labels = dataset_json.get("labels", {})
    return sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in labels.items())


def check_compatible(
    teacher_plans: dict,
    teacher_dataset_json: dict,
    student_plans: dict,
    student_dataset_json: dict,
    configuration: str,
) -> None:
    """Raise CompatibilityError (one line, naming the mismatch and the fix) if the student cannot learn
    from the teachers: the KD loss compares logits voxel by voxel on one shared batch, so both must read
    the same preprocessed data and predict the same outputs from the same inputs."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for plans, who in ((teacher_plans, "teacher"), (student_plans, "student")):
        if configuration not in plans.get("configurations", {}):
            raise CompatibilityError(
                f"configuration {configuration!r} is not in the {who} plans "
                f"{plans.get('plans_name')!r}: plan it with {_fix_command(plans)} "
                f"or choose one of {', '.join(plans.get('configurations', {}))}"
            )
    if teacher_plans.get("dataset_name") != student_plans.get("dataset_name"):
        raise CompatibilityError(
            f"teacher plans {teacher_plans.get('plans_name')} are for {teacher_plans.get('dataset_name')} "
            f"but student plans {student_plans.get('plans_name')} for {student_plans.get('dataset_name')}: "
            "use student plans of the teacher's dataset "
            f"({_fix_command({**student_plans, 'dataset_name': teacher_plans.get('dataset_name')})})"
        )
    t_pm, s_pm = PlansManager(teacher_plans), PlansManager(student_plans)
    _check_same_inputs_and_outputs(t_pm, s_pm, configuration, teacher_dataset_json, student_dataset_json)
    _check_shared_data(t_pm, s_pm, configuration)
    _check_patch_fits_network(s_pm, configuration)


def _check_same_inputs_and_outputs(t_pm, s_pm, configuration: str, t_json: dict, s_json: dict) -> None:
    """Same input channels (a cascade's previous-stage one-hot included), labels/regions and heads."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    t_cm, s_cm = t_pm.get_configuration(configuration), s_pm.get_configuration(configuration)
    t_in = determine_num_input_channels(t_pm, t_cm, t_json)
    s_in = determine_num_input_channels(s_pm, s_cm, s_json)
    if t_in != s_in:
        raise CompatibilityError(
            f"input channels differ: teacher {t_in}, student {s_in} (dataset.json "
            "channel_names): train the student on the teacher's dataset.json"
        )
    if _labels_key(t_json) != _labels_key(s_json) or t_json.get("regions_class_order") != s_json.get(
        "regions_class_order"
    ):
        raise CompatibilityError(
            f"labels/regions differ: teacher {t_json.get('labels')}, student {s_json.get('labels')}: "
            "train the student on the teacher's dataset.json"
        )
    t_heads = t_pm.get_label_manager(t_json).num_segmentation_heads
    s_heads = s_pm.get_label_manager(s_json).num_segmentation_heads
    if t_heads != s_heads:
        raise CompatibilityError(
            f"output heads differ: teacher {t_heads}, student {s_heads}: "
            "train the student on the teacher's dataset.json"
        )


def _check_shared_data(t_pm, s_pm, configuration: str) -> None:
    """Teacher and student read the same preprocessed arrays: same dimensionality, data, spacing, norm."""
    t_name, s_name = t_pm.plans.get("plans_name"), s_pm.plans.get("plans_name")
    t_cm, s_cm = t_pm.get_configuration(configuration), s_pm.get_configuration(configuration)
    if len(t_cm.patch_size) != len(s_cm.patch_size):
        raise CompatibilityError(
            f"configuration dimensionality differs: teacher {len(t_cm.patch_size)}D "
            f"({t_name}), student {len(s_cm.patch_size)}D ({s_name}): use the same -c for both"
        )
    checks = (
        ("data_identifier", t_cm.data_identifier, s_cm.data_identifier),
        ("spacing", [float(x) for x in t_cm.spacing], [float(x) for x in s_cm.spacing]),
        ("normalization_schemes", list(t_cm.normalization_schemes), list(s_cm.normalization_schemes)),
        ("use_mask_for_norm", list(t_cm.use_mask_for_norm), list(s_cm.use_mask_for_norm)),
        ("transpose_forward", list(t_pm.transpose_forward), list(s_pm.transpose_forward)),
    )
    for field, t_val, s_val in checks:
        if t_val != s_val:
            raise CompatibilityError(
                f"teacher and student do not share preprocessed data: {configuration} "
                f"{field} is {t_val} in {t_name} but {s_val} in {s_name}; make student "
                f"plans from the teacher's fingerprint with {_fix_command(s_pm.plans)} (the ResEnc and "
                "default planners share nnUNetPlans_3d_fullres data)"
            )


def _check_patch_fits_network(s_pm, configuration: str) -> None:
    s_cm = s_pm.get_configuration(configuration)
    dim = len(s_cm.patch_size)
    total = nnunet_env.total_stride(s_cm.network_arch_init_kwargs.get("strides", []), dim)
    if any(int(p) % t for p, t in zip(s_cm.patch_size, total, strict=False)):
        raise CompatibilityError(
            f"student patch size {list(s_cm.patch_size)} is not divisible by its total "
            f"stride {total} ({s_pm.plans.get('plans_name')}, {configuration}): re-plan the student "
            f"with {_fix_command(s_pm.plans)}"
        )


# ---------------------------------------------------------------------------------------------
# Edges: torch and the disk
# ---------------------------------------------------------------------------------------------


def _normalized(plans: dict) -> Any:
    return json.loads(json.dumps(plans))


def _different_plans_message(path: Path, existing: dict) -> str:
    """Why it is not ours, and the fix (older files name the one configuration they reduced)."""
    earlier = (existing.get("distillation") or {}).get("configuration")
    if earlier:
        return (
            f"{path} was written by an earlier nnunet-distill that reduced only {earlier}; plans files now "
            "reduce every configuration. Its students keep their own plans.json (prediction and export are "
            f"unaffected): remove {path.name} to derive the new file (resuming such a student with "
            "-c_continue needs the old file, so finish it first)"
        )
    return (
        f"{path} already exists with different plans: remove it or choose another "
        "reduction factor/block strategy/plans name"
    )


def write_student_plans(preprocessed_dataset_dir: str | os.PathLike, plans: dict) -> Path:
    """Write `<plans_name>.json` beside the teacher's plans (where nnU-Net's `-p` looks).

    Idempotent: several folds distilled in parallel may all write the same file. A different file of
    that name is never overwritten, because a student trained earlier from it would silently no longer
    match its plans.
    """
    name = plans.get("plans_name")
    if not name:
        raise StudentPlansError("student plans have no plans_name; derive them with derive_student_plans")
    directory = Path(preprocessed_dataset_dir)
    if not directory.is_dir():
        raise StudentPlansError(
            f"preprocessed dataset folder {directory} does not exist: run nnUNetv2_plan_and_preprocess first"
        )
    path = directory / f"{name}.json"
    content = _normalized(plans)
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StudentPlansError(f"{path} exists but cannot be read ({exc}): remove it") from exc
        if existing == content:
            return path
        raise StudentPlansError(_different_plans_message(path, existing))
    return atomic_write_json(content, path, indent=4)


def build_network(plans: dict, configuration: str, dataset_json: dict, deep_supervision: bool = True):
    """The network stock nnU-Net builds from these plans (same classes, same calls, same init)."""
    return nnunet_env.network_from_plans(plans, configuration, dataset_json, deep_supervision)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
