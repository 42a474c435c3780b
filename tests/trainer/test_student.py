"""Student derivation on plans made by nnU-Net's own planners (default and ResEnc M/L/XL)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from nnunet_distill import contract
from nnunet_distill.student import (
    BLOCK_STRATEGY_HELP,
    CompatibilityError,
    StudentPlansError,
    block_counts,
    build_network,
    check_compatible,
    count_parameters,
    derive_student_plans,
    reduce_features,
    write_student_plans,
)

CFG = "3d_fullres"
RATIO_BOUND = {2: 0.26, 4: 0.07, 8: 0.02}


def arch(plans: dict, cfg: str = CFG) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_configuration(cfg).network_arch_init_kwargs


def params(plans: dict, dataset_json: dict, cfg: str = CFG) -> int:
    return count_parameters(build_network(plans, cfg, dataset_json))


# --------------------------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    "features, r, expected",
    [
        ([32, 64, 128, 256, 320, 320], 2, [16, 32, 64, 128, 160, 160]),
        ([32, 64, 128, 256, 320, 320], 4, [8, 16, 32, 64, 80, 80]),
        (
            [32, 64, 128, 256, 320, 320],
            8,
            [8, 8, 16, 32, 40, 40],
        ),  # 32/8=4 and 64/8=8: the floor of 8 applies
        ([32, 64, 128, 256], 3, [10, 21, 42, 85]),  # floor division
        ([4, 16], 2, [4, 8]),  # never wider than the teacher
        ([32, 64], 1, [32, 64]),
    ],
)
def test_reduce_features_floor_division_with_minimum_8(features, r, expected):
    assert reduce_features(features, r) == expected


def test_reduce_features_rejects_r_below_1():
    with pytest.raises(ValueError, match="reduction factor"):
        reduce_features([32], 0)


def test_fixed_block_strategies_follow_their_rules():
    teacher = [1, 3, 4, 6, 6, 6]
    assert block_counts(teacher, "keep", 4) == teacher
    assert block_counts(teacher, "reduce", 4) == [1, 1, 2, 3, 3, 3]
    assert block_counts(teacher, "increase", 4) == [2, 4, 5, 7, 7, 7]
    assert block_counts([8, 9], "increase", 2) == [8, 9]  # capped at 8, never reduced
    assert set(BLOCK_STRATEGY_HELP) == set(contract.BLOCK_STRATEGIES)


def test_block_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="block strategy"):
        block_counts([1, 3], "halve", 2)
    with pytest.raises(ValueError, match="teacher_features"):
        block_counts([1, 3], "adaptive", 2)
    with pytest.raises(ValueError, match=">= 1"):
        block_counts([0, 3], "keep", 2)


def _encoder_cost(blocks, features, kernel_sizes):
    import math

    return sum(n * f * f * math.prod(k) for n, f, k in zip(blocks, features, kernel_sizes, strict=False))


@pytest.mark.parametrize("r", [2, 3, 4, 6, 8, 16])
def test_adaptive_changes_depth_for_every_r_within_the_keep_budget(r):
    teacher_blocks = [1, 3, 4, 6, 6, 6]
    features = [32, 64, 128, 256, 320, 320]
    kernels = [[3, 3, 3]] * 6
    adaptive = block_counts(teacher_blocks, "adaptive", r, teacher_features=features, kernel_sizes=kernels)
    student_features = reduce_features(features, r)
    assert adaptive != teacher_blocks, (
        "adaptive must do something for every r >= 2 (the seed's is a no-op below 4)"
    )
    assert all(1 <= n <= 8 for n in adaptive)
    assert all(a >= red for a, red in zip(adaptive, block_counts(teacher_blocks, "reduce", r), strict=False))
    # more depth where blocks are cheap (shallow stages), never over the parameter budget of `keep`
    assert adaptive[0] > teacher_blocks[0] and adaptive[1] > teacher_blocks[1]
    assert _encoder_cost(adaptive, student_features, kernels) <= _encoder_cost(
        teacher_blocks, student_features, kernels
    )
    assert block_counts(teacher_blocks, "adaptive", 1, teacher_features=features) == teacher_blocks


# --------------------------------------------------------------------------------------------- real plans

# Blocks per encoder stage of students of nnU-Net 2.8.1's ResEnc M/L/XL plans for the 48^3 synthetic
# dataset (4 stages, [32, 64, 128, 256] channels, [1, 3, 4, 6] blocks for all three presets).
EXPECTED_BLOCKS_48 = {
    ("keep", 2): [1, 3, 4, 6],
    ("keep", 4): [1, 3, 4, 6],
    ("keep", 8): [1, 3, 4, 6],
    ("reduce", 2): [1, 1, 2, 3],
    ("reduce", 4): [1, 1, 2, 3],
    ("reduce", 8): [1, 1, 2, 3],
    ("increase", 2): [2, 4, 5, 7],
    ("increase", 4): [2, 4, 5, 7],
    ("increase", 8): [2, 4, 5, 7],
    ("adaptive", 2): [2, 4, 5, 5],
    ("adaptive", 4): [3, 5, 6, 5],
    ("adaptive", 8): [3, 6, 6, 5],
}


def test_block_strategy_table_on_real_resenc_plans(resenc_plans):
    rows = []
    for identifier, plans in resenc_plans.items():
        teacher = arch(plans)
        assert teacher["n_blocks_per_stage"] == [1, 3, 4, 6], identifier
        for (strategy, r), expected in EXPECTED_BLOCKS_48.items():
            student = arch(derive_student_plans(plans, CFG, r, strategy))
            assert student["n_blocks_per_stage"] == expected, (identifier, strategy, r)
            assert student["features_per_stage"] == reduce_features(teacher["features_per_stage"], r)
            rows.append(f"{identifier:26s} r={r} {strategy:9s} {teacher['n_blocks_per_stage']} -> {expected}")
    print("\n".join(rows))


@pytest.mark.parametrize("r", [2, 4, 8])
def test_parameter_ratio_bounds_on_real_plans(nnunet_dataset, resenc_plans, r):
    dataset_json = nnunet_dataset.dataset_json()
    all_plans = {"nnUNetPlans": nnunet_dataset.plans("nnUNetPlans"), **resenc_plans}
    for identifier, plans in all_plans.items():
        teacher = params(plans, dataset_json)
        strategies = ["keep", "reduce", "adaptive"] if "n_blocks_per_stage" in arch(plans) else [None]
        for strategy in strategies:
            ratio = params(derive_student_plans(plans, CFG, r, strategy), dataset_json) / teacher
            assert ratio <= RATIO_BOUND[r], (identifier, strategy, r, ratio)
            assert ratio > 0.25 / r**2, (identifier, strategy, r, ratio)  # not degenerate
        if strategies[0] is not None:
            keep = params(derive_student_plans(plans, CFG, r, "keep"), dataset_json)
            assert params(derive_student_plans(plans, CFG, r, "increase"), dataset_json) > keep


@pytest.mark.slow
def test_realistic_six_stage_plans_ratios(realistic_plans):
    """Plans for 192^3 images: 6 stages up to 320 channels, the size class of real CT/MR datasets."""
    dataset_json = realistic_plans.dataset_json()
    by_name = realistic_plans.plans
    resenc_m = arch(by_name["nnUNetResEncUNetMPlans"])
    assert resenc_m["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert resenc_m["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert arch(by_name["nnUNetPlans"])["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    for identifier in ("nnUNetPlans", "nnUNetResEncUNetMPlans"):
        plans = by_name[identifier]
        teacher = params(plans, dataset_json)
        strategies = ["keep", "adaptive"] if identifier != "nnUNetPlans" else [None]
        for r in (2, 4, 8):
            for strategy in strategies:
                ratio = params(derive_student_plans(plans, CFG, r, strategy), dataset_json) / teacher
                assert ratio <= RATIO_BOUND[r], (identifier, strategy, r, ratio)
                assert ratio > 0.25 / r**2, (identifier, strategy, r, ratio)


def test_student_plans_change_only_the_architecture_width_and_depth(resenc_plans):
    base = resenc_plans["nnUNetResEncUNetMPlans"]
    before = copy.deepcopy(base)
    student = derive_student_plans(base, CFG, 4, "reduce")
    assert base == before, "the base plans must not be modified"
    # ResEnc M teachers (the base) with a ResEnc M student: the base is not their default plain student
    assert student["plans_name"] == "nnUNetResEncUNetMPlans_r4_nnUNetResEncUNetMPlans_bsreduce"
    assert student["distillation"] == {
        "base_plans": "nnUNetResEncUNetMPlans",
        "teacher_plans": "nnUNetResEncUNetMPlans",
        "reduction_factor": 4,
        "block_strategy": "reduce",
        "min_features": 8,
    }
    s_cfg, b_cfg = student["configurations"][CFG], base["configurations"][CFG]
    assert {k: v for k, v in s_cfg.items() if k != "architecture"} == {
        k: v for k, v in b_cfg.items() if k != "architecture"
    }
    s_kw, b_kw = s_cfg["architecture"]["arch_kwargs"], b_cfg["architecture"]["arch_kwargs"]
    assert {k for k in s_kw if s_kw[k] != b_kw[k]} == {"features_per_stage", "n_blocks_per_stage"}
    assert s_cfg["architecture"]["network_class_name"] == b_cfg["architecture"]["network_class_name"]
    assert {
        k: v for k, v in student.items() if k not in ("configurations", "plans_name", "distillation")
    } == {k: v for k, v in base.items() if k not in ("configurations", "plans_name")}
    # one plans file for every configuration: 2d is reduced the same way, and only its architecture changes
    s_2d, b_2d = student["configurations"]["2d"], base["configurations"]["2d"]
    assert {k: v for k, v in s_2d.items() if k != "architecture"} == {
        k: v for k, v in b_2d.items() if k != "architecture"
    }
    assert s_2d["architecture"]["arch_kwargs"]["features_per_stage"] == reduce_features(
        b_2d["architecture"]["arch_kwargs"]["features_per_stage"], 4
    )


def test_plain_or_resenc_student_follows_the_network_class_not_the_name(nnunet_dataset, resenc_plans):
    plain = nnunet_dataset.plans("nnUNetPlans")
    disguised = copy.deepcopy(resenc_plans["nnUNetResEncUNetMPlans"])
    disguised["plans_name"] = "MyPlainLookingPlans"
    student = derive_student_plans(disguised, CFG, 2, "reduce")
    assert arch(student)["n_blocks_per_stage"] == [1, 1, 2, 3]
    assert student["plans_name"] == "MyPlainLookingPlans_r2_bsreduce"
    plain_student = derive_student_plans(plain, CFG, 2, "keep", plans_name="custom_student")
    assert plain_student["plans_name"] == "custom_student"
    assert plain_student["distillation"]["block_strategy"] is None
    assert derive_student_plans(plain, CFG, 2)["plans_name"] == "nnUNetPlans_r2"
    with pytest.raises(StudentPlansError, match="ResidualEncoderUNet"):
        derive_student_plans(plain, CFG, 2, "adaptive")


def test_inherited_architectures_are_reduced_consistently(nnunet_dataset):
    base = nnunet_dataset.plans("nnUNetPlans")
    base["configurations"]["3d_fullres_bs4"] = {"inherits_from": CFG, "batch_size": 4}
    base["configurations"]["3d_fullres_bs4_child"] = {"inherits_from": "3d_fullres_bs4", "batch_size": 3}
    teacher_features = arch(base)["features_per_stage"]

    from_parent = derive_student_plans(base, CFG, 2)
    for cfg in (CFG, "3d_fullres_bs4", "3d_fullres_bs4_child"):
        assert arch(from_parent, cfg)["features_per_stage"] == reduce_features(teacher_features, 2), cfg

    # the configuration being trained does not change the plans: 2d and 3d students share one plans file
    from_child = derive_student_plans(base, "3d_fullres_bs4", 2)
    assert from_child == from_parent == derive_student_plans(base, "2d", 2)
    assert from_child["configurations"]["3d_fullres_bs4"]["batch_size"] == 4


def test_student_plans_name_says_the_teachers_and_r(nnunet_dataset, resenc_plans):
    plain = nnunet_dataset.plans("nnUNetPlans")
    of_resenc = derive_student_plans(plain, CFG, 2, teacher_plans_name="nnUNetResEncUNetLPlans")
    assert of_resenc["plans_name"] == "nnUNetResEncUNetLPlans_r2"
    assert of_resenc["distillation"]["teacher_plans"] == "nnUNetResEncUNetLPlans"
    assert derive_student_plans(plain, CFG, 2)["plans_name"] == "nnUNetPlans_r2"
    m = resenc_plans["nnUNetResEncUNetMPlans"]
    names = {
        derive_student_plans(plain, CFG, 2, teacher_plans_name="nnUNetResEncUNetLPlans")["plans_name"],
        derive_student_plans(plain, CFG, 2)["plans_name"],
        derive_student_plans(m, CFG, 2, "keep", teacher_plans_name="nnUNetResEncUNetLPlans")["plans_name"],
        derive_student_plans(m, CFG, 2, "adaptive", teacher_plans_name="nnUNetResEncUNetLPlans")[
            "plans_name"
        ],
        derive_student_plans(plain, CFG, 4, teacher_plans_name="nnUNetResEncUNetLPlans")["plans_name"],
    }
    assert len(names) == 5
    assert "nnUNetResEncUNetLPlans_r2_nnUNetResEncUNetMPlans_bsadaptive" in names


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"reduction_factor": 0}, "reduction factor"),
        ({"block_strategy": "halve"}, "block strategy"),
        ({"configuration": "3d_lowres"}, "configuration '3d_lowres' not found"),
    ],
)
def test_derive_student_plans_errors_name_the_field(nnunet_dataset, bad, match):
    kwargs = {"configuration": CFG, "reduction_factor": 2, "block_strategy": None, **bad}
    with pytest.raises(StudentPlansError, match=match):
        derive_student_plans(nnunet_dataset.plans("nnUNetPlans"), **kwargs)


# --------------------------------------------------------------------------------------------- torch and disk


@pytest.mark.parametrize("base, strategy", [("nnUNetPlans", None), ("nnUNetResEncUNetMPlans", "adaptive")])
def test_stock_nnunet_builds_the_same_student_from_the_written_plans(
    nnunet_dataset, resenc_plans, monkeypatch, base, strategy
):
    """What nnU-Net's own trainer builds from `-p <student plans>` equals build_network's student."""
    from nnunetv2.run.run_training import get_trainer_from_args

    for var, folder in (
        ("nnUNet_raw", nnunet_dataset.raw),
        ("nnUNet_preprocessed", nnunet_dataset.preprocessed),
        ("nnUNet_results", nnunet_dataset.results),
    ):
        monkeypatch.setenv(var, str(folder))
    plans = nnunet_dataset.plans(base)
    student_plans = derive_student_plans(
        plans, CFG, 4, strategy, plans_name=f"{contract.student_plans_identifier(base, 4, strategy)}_stock"
    )
    path = write_student_plans(nnunet_dataset.preprocessed_dataset, student_plans)
    assert path == nnunet_dataset.preprocessed_dataset / f"{student_plans['plans_name']}.json"

    trainer = get_trainer_from_args(
        nnunet_dataset.dataset_name,
        CFG,
        0,
        "nnUNetTrainer",
        student_plans["plans_name"],
        device=torch.device("cpu"),
    )
    trainer.initialize()
    stock = {k: tuple(v.shape) for k, v in trainer.network.state_dict().items()}
    ours = {
        k: tuple(v.shape)
        for k, v in build_network(student_plans, CFG, nnunet_dataset.dataset_json()).state_dict().items()
    }
    assert stock == ours
    teacher = build_network(plans, CFG, nnunet_dataset.dataset_json())
    assert count_parameters(trainer.network) < count_parameters(teacher) / 10


def test_write_student_plans_is_idempotent_and_never_overwrites_other_plans(nnunet_dataset, tmp_path):
    folder = tmp_path / "Dataset901_Synth"
    folder.mkdir()
    plans = derive_student_plans(nnunet_dataset.plans("nnUNetPlans"), CFG, 2)
    path = write_student_plans(folder, plans)
    assert json.loads(path.read_text()) == json.loads(json.dumps(plans))
    stamp = path.stat().st_mtime_ns
    assert write_student_plans(folder, copy.deepcopy(plans)) == path
    assert path.stat().st_mtime_ns == stamp
    other = copy.deepcopy(plans)
    other["configurations"][CFG]["batch_size"] = 7
    with pytest.raises(StudentPlansError, match="already exists with different plans"):
        write_student_plans(folder, other)
    assert (
        json.loads(path.read_text())["configurations"][CFG]["batch_size"]
        == plans["configurations"][CFG]["batch_size"]
    )
    # a file of the same name written before plans files reduced every configuration: the message says so
    older = copy.deepcopy(plans)
    older["distillation"] = {"base_plans": "nnUNetPlans", "configuration": CFG, "reduction_factor": 2}
    path.write_text(json.dumps(older))
    with pytest.raises(StudentPlansError, match=f"earlier nnunet-distill that reduced only {CFG}.*remove"):
        write_student_plans(folder, plans)
    path.write_text(json.dumps(plans))
    with pytest.raises(StudentPlansError, match="nnUNetv2_plan_and_preprocess"):
        write_student_plans(tmp_path / "missing", plans)
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary files left behind


def test_count_parameters_counts_every_parameter():
    assert count_parameters(torch.nn.Linear(3, 2)) == 8
    assert (
        count_parameters(
            torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
        )
        == 4 * 27 + 4 + 8
    )


def test_deep_supervision_switch(nnunet_dataset):
    plans = derive_student_plans(nnunet_dataset.plans("nnUNetPlans"), CFG, 4)
    x = torch.zeros(1, 1, 48, 48, 48)
    with torch.no_grad():
        ds = build_network(plans, CFG, nnunet_dataset.dataset_json(), deep_supervision=True)(x)
        single = build_network(plans, CFG, nnunet_dataset.dataset_json(), deep_supervision=False)(x)
    assert isinstance(ds, (list, tuple)) and len(ds) == 3 and tuple(ds[0].shape) == (1, 4, 48, 48, 48)
    assert tuple(single.shape) == (1, 4, 48, 48, 48)


# --------------------------------------------------------------------------------------------- compatibility


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_compatible_teacher_and_students_pass(nnunet_dataset, resenc_plans):
    dj = nnunet_dataset.dataset_json()
    teacher = nnunet_dataset.plans("nnUNetPlans")
    check_compatible(teacher, dj, derive_student_plans(teacher, CFG, 2), dj, CFG)
    resenc = resenc_plans["nnUNetResEncUNetMPlans"]
    check_compatible(resenc, dj, derive_student_plans(teacher, CFG, 2), dj, CFG)  # ResEnc -> plain
    check_compatible(teacher, dj, derive_student_plans(resenc, CFG, 8, "adaptive"), dj, CFG)


def _modified(plans: dict, **changes) -> dict:
    plans = copy.deepcopy(plans)
    plans["configurations"][CFG].update(changes)
    return plans


def test_compatibility_errors_name_the_mismatch_and_the_fix(nnunet_dataset, resenc_plans):
    dj = nnunet_dataset.dataset_json()
    teacher = nnunet_dataset.plans("nnUNetPlans")
    student = derive_student_plans(teacher, CFG, 2)
    resenc_student = derive_student_plans(resenc_plans["nnUNetResEncUNetMPlans"], CFG, 2, "keep")

    two_channels = {**dj, "channel_names": {"0": "CT", "1": "MR1"}}
    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, student, two_channels, CFG)
    assert "input channels differ: teacher 1, student 2" in _one_line(exc)

    more_labels = {**dj, "labels": {**dj["labels"], "extra": 4}}
    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, student, more_labels, CFG)
    assert "labels/regions differ" in _one_line(exc)

    flat = copy.deepcopy(student)
    flat["configurations"][CFG] = copy.deepcopy(student["configurations"]["2d"])
    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, flat, dj, CFG)
    assert "dimensionality differs: teacher 3D" in _one_line(exc)

    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, _modified(resenc_student, data_identifier="other_3d_fullres"), dj, CFG)
    assert "data_identifier" in _one_line(exc)
    assert "nnUNetv2_plan_experiment -d 901 -pl nnUNetPlannerResEncM" in str(exc.value)

    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, _modified(student, spacing=[2.0, 1.0, 1.0]), dj, CFG)
    assert "spacing is [1.0, 1.0, 1.0]" in _one_line(exc) and "nnUNetv2_plan_experiment -d 901" in str(
        exc.value
    )

    with pytest.raises(CompatibilityError) as exc:
        check_compatible(
            teacher, dj, _modified(student, normalization_schemes=["ZScoreNormalization"]), dj, CFG
        )
    assert "normalization_schemes" in _one_line(exc)

    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, _modified(resenc_student, patch_size=[44, 48, 48]), dj, CFG)
    message = _one_line(exc)
    assert "not divisible by its total stride [8, 8, 8]" in message and "-pl nnUNetPlannerResEncM" in message

    other_dataset = copy.deepcopy(student)
    other_dataset["dataset_name"] = "Dataset902_Other"
    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, other_dataset, dj, CFG)
    assert "Dataset901_Synth" in _one_line(exc) and "nnUNetv2_plan_experiment -d 901" in str(exc.value)

    with pytest.raises(CompatibilityError) as exc:
        check_compatible(teacher, dj, student, dj, "3d_lowres")
    assert "configuration '3d_lowres' is not in the teacher plans" in _one_line(exc)
