"""The pure planner: which stages a spec produces and the command line of each."""

from __future__ import annotations

from typing import Any

from nnunet_distill_operator import api, plan

PATHS = plan.DataPaths("/r", "/p", "/res", "/res/nnunet-distill/j")


def _plan(**spec: Any) -> tuple[plan.Stage, ...]:
    body = {"dataset": {"id": 27}, "storage": {"claimName": "data"}, **spec}
    return plan.plan(api.parse_spec(body), name="j", paths=PATHS)


def _stage(stages: tuple[plan.Stage, ...], name: str) -> plan.Stage:
    return next(s for s in stages if s.name == name)


def _flag(argv: tuple[str, ...], flag: str, n: int = 1) -> list[str]:
    i = argv.index(flag)
    return list(argv[i + 1 : i + 1 + n])


def test_minimal_job_preprocesses_if_missing_distills_and_exports() -> None:
    stages = _plan()
    assert [s.name for s in stages] == ["preprocess", "distill", "export", "gate"]
    assert [s.needs for s in stages] == [(), ("preprocess",), ("distill",), ("export",)]
    pre = stages[0]
    assert pre.argv[:5] == ("nnUNetv2_plan_and_preprocess", "-d", "27", "-c", "3d_fullres")
    assert "--verify_dataset_integrity" in pre.argv
    assert pre.done_when_exists == (
        "/p/Dataset027_*/nnUNetPlans.json",
        "/p/Dataset027_*/nnUNetPlans_3d_fullres",
    )
    distill = stages[1]
    assert distill.argv[0] == "nnUNetv2_distillation_train"
    assert _flag(distill.argv, "-a") == ["0.3"] and _flag(distill.argv, "-temp") == ["3.0"]
    assert _flag(distill.argv, "-r") == ["2"] and _flag(distill.argv, "-e") == ["1000"]
    assert "-tf" not in distill.argv  # folds detected by the trainer
    assert _flag(distill.argv, "-d_device") == ["cuda"]  # the stage has a GPU by default
    assert distill.argv[-1] == "-c_continue"  # a restarted pod resumes from its newest checkpoint
    assert distill.resources.gpus == 1 and distill.reports_progress


def test_preprocess_always_has_no_skip_guard_and_never_has_no_stage() -> None:
    assert _stage(_plan(preprocess={"mode": "Always"}), "preprocess").done_when_exists == ()
    assert "preprocess" not in [s.name for s in _plan(preprocess={"mode": "Never"})]


def test_teachers_are_one_indexed_stage_with_one_gpu_per_fold_and_a_per_fold_guard() -> None:
    stages = _plan(teachers={"train": True, "folds": [0, 2, 4], "training": {"epochs": 50}})
    teachers = _stage(stages, "teachers")
    assert [s.name for s in stages] == ["preprocess", "teachers", "distill", "export", "gate"]
    assert teachers.index_values == ("0", "2", "4") and teachers.completions == 3
    assert teachers.argv[:2] == ("nnunet-distill", "train-teacher")
    assert _flag(teachers.argv, "--folds-by-index", 3) == ["0", "2", "4"]
    assert _flag(teachers.argv, "-e") == ["50"] and "--c" in teachers.argv
    assert teachers.resources.gpus == 1
    assert teachers.done_when_exists == (
        "/res/Dataset027_*/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_{value}/checkpoint_final.pth",
    )
    assert _flag(_stage(stages, "distill").argv, "-tf", 3) == ["0", "2", "4"]


def test_single_teacher_fold_is_a_plain_job() -> None:
    teachers = _stage(_plan(teachers={"train": True, "folds": [3]}), "teachers")
    assert teachers.index_values == () and teachers.completions == 1
    assert _flag(teachers.argv, "-f") == ["3"] and "--folds-by-index" not in teachers.argv
    assert teachers.done_when_exists[0].endswith("/fold_3/checkpoint_final.pth")


def test_resenc_uses_its_cli_plans_and_planner() -> None:
    stages = _plan(
        student={
            "architecture": "resenc",
            "reductionFactor": 4,
            "blockStrategy": "adaptive",
            "plans": "nnUNetResEncUNetMPlans",
        }
    )
    pre = _stage(stages, "preprocess")
    assert [c.name for c in pre.commands] == ["plan-and-preprocess", "plan-experiment"]
    assert pre.commands[1].argv == ("nnUNetv2_plan_experiment", "-d", "27", "-pl", "nnUNetPlannerResEncL")
    assert "/p/Dataset027_*/nnUNetResEncUNetLPlans.json" in pre.done_when_exists
    distill = _stage(stages, "distill")
    assert distill.argv[0] == "nnUNetv2_resenc_distillation_train"
    assert _flag(distill.argv, "-tpl") == ["nnUNetResEncUNetLPlans"]
    assert _flag(distill.argv, "-spl") == ["nnUNetResEncUNetMPlans"]
    assert _flag(distill.argv, "-bs") == ["adaptive"] and "-p" not in distill.argv
    export = _stage(stages, "export")
    assert export.commands[0].argv[0] == "nnUNetv2_resenc_distillation_export_onnx"
    assert _flag(export.commands[0].argv, "-o") == ["/res/nnunet-distill/j/export"]
    assert (
        plan.student_model_folder(
            api.parse_spec(
                {
                    "dataset": {"id": 1},
                    "storage": {"claimName": "d"},
                    "student": {
                        "architecture": "resenc",
                        "reductionFactor": 4,
                        "blockStrategy": "adaptive",
                        "plans": "nnUNetResEncUNetMPlans",
                    },
                }
            )
        )
        == "nnUNetDistillationTrainer__nnUNetResEncUNetLPlans_r4_nnUNetResEncUNetMPlans_bsadaptive"
        "__3d_fullres"
    )


def test_distillation_options_map_to_flags() -> None:
    distill = _stage(
        _plan(
            distillation={
                "alpha": 0.5,
                "temperature": 4.0,
                "epochs": 20,
                "iterationsPerEpoch": 7,
                "valIterations": 3,
                "useDA5": True,
                "fold": 2,
                "rotateFolds": True,
                "rotateFrequency": 9,
                "disableMirroring": True,
            },
            teachers={"folder": "/data/nnUNet_results/T", "trainer": "nnUNetTrainerDA5"},
        ),
        "distill",
    )
    argv = distill.argv
    assert _flag(argv, "-f") == ["2"] and _flag(argv, "-a") == ["0.5"] and _flag(argv, "-temp") == ["4.0"]
    assert _flag(argv, "--iterations_per_epoch") == ["7"] and _flag(argv, "--val_iterations") == ["3"]
    assert _flag(argv, "-t") == ["/data/nnUNet_results/T"] and _flag(argv, "-tr") == ["nnUNetTrainerDA5"]
    assert "--use_da5" in argv and "-disable_mirroring" in argv
    assert _flag(argv, "-rotate_freq") == ["9"] and argv.index("-rotate_folds") < argv.index("-rotate_freq")


def test_kd_method_and_held_out_cases_map_to_flags() -> None:
    default = _stage(_plan(), "distill").argv
    assert _flag(default, "--kd_mode") == ["pixel"] and _flag(default, "--student_init") == ["teacher"]
    assert _flag(default, "--teacher_view") == ["augmented"] and "--test_cases" not in default
    argv = _stage(
        _plan(
            distillation={
                "kdMode": "channel",
                "studentInit": "random",
                "teacherView": "clean",
                "testCases": ["case_7", "liver.12"],
            }
        ),
        "distill",
    ).argv
    assert _flag(argv, "--kd_mode") == ["channel"] and _flag(argv, "--student_init") == ["random"]
    assert _flag(argv, "--teacher_view") == ["clean"] and _flag(argv, "--test_cases", 2) == [
        "case_7",
        "liver.12",
    ]


def test_held_out_case_lists_are_checked_at_admission() -> None:
    import pytest

    for bad, words in ((["a", "a"], "lists a case twice"), ([], "at least 1 item"), (["../x"], "pattern")):
        with pytest.raises(api.InvalidSpec) as err:
            api.parse_spec(
                {"dataset": {"id": 27}, "storage": {"claimName": "data"}, "distillation": {"testCases": bad}}
            )
        assert "spec.distillation.testCases" in str(err.value.problems) and words in str(err.value.problems)
    with pytest.raises(api.InvalidSpec, match="kdMode"):
        api.parse_spec(
            {"dataset": {"id": 27}, "storage": {"claimName": "data"}, "distillation": {"kdMode": "x"}}
        )


def test_unlabelled_cases_map_to_the_flag_and_need_kd() -> None:
    import pytest

    assert "--unlabelled_cases" not in _stage(_plan(), "distill").argv
    argv = _stage(_plan(distillation={"unlabelledCases": ["scan_1", "scan_2"]}), "distill").argv
    assert _flag(argv, "--unlabelled_cases", 2) == ["scan_1", "scan_2"]
    base = {"dataset": {"id": 27}, "storage": {"claimName": "data"}}
    for distillation, words in (
        ({"alpha": 0, "unlabelledCases": ["scan_1"]}, "needs KD: with alpha 0"),
        ({"unlabelledCases": ["scan_1"], "testCases": ["scan_1", "t"]}, "also in testCases: scan_1"),
        ({"unlabelledCases": ["a", "a"]}, "lists a case twice"),
    ):
        with pytest.raises(api.InvalidSpec) as err:
            api.parse_spec({**base, "distillation": distillation})
        assert "spec.distillation.unlabelledCases" in str(err.value.problems), err.value.problems
        assert words in str(err.value.problems)


def test_labelled_share_maps_to_the_flag_beside_unlabelled_cases_only() -> None:
    import pytest

    assert "--labelled_share" not in _stage(_plan(distillation={"unlabelledCases": ["u1"]}), "distill").argv
    argv = _stage(_plan(distillation={"unlabelledCases": ["u1"], "labelledShare": 0.5}), "distill").argv
    assert _flag(argv, "--labelled_share", 1) == ["0.5"]
    base = {"dataset": {"id": 27}, "storage": {"claimName": "data"}}
    for distillation, words in (
        ({"labelledShare": 0.5}, "needs unlabelled cases"),
        ({"unlabelledCases": ["u1"], "labelledShare": 1}, "less than 1"),
        ({"unlabelledCases": ["u1"], "labelledShare": 0}, "greater than 0"),
    ):
        with pytest.raises(api.InvalidSpec) as err:
            api.parse_spec({**base, "distillation": distillation})
        assert "spec.distillation.labelledShare" in str(err.value.problems), err.value.problems
        assert words in str(err.value.problems)


def test_export_then_package_in_one_cpu_stage() -> None:
    stages = _plan(
        export={"dynamicShape": True, "simplify": True, "modelName": "liver"}, distillation={"useDA5": True}
    )
    export = _stage(stages, "export")
    assert export.resources.gpus == 0
    first, second = export.commands
    assert first.argv[0] == "nnUNetv2_distillation_export_onnx"
    assert {"-da", "-sim", "-da5"} <= set(first.argv)
    assert _flag(first.argv, "-o") == ["/res/nnunet-distill/j/export/model.onnx"]
    assert second.argv == (
        "nnunet-distill",
        "package",
        "--onnx",
        "/res/nnunet-distill/j/export/model.onnx",
        "-o",
        "/res/nnunet-distill/j/package",
        "--name",
        "liver",
    )


def test_quality_gate_judges_the_students_summary_after_export_and_before_publish() -> None:
    stages = _plan(output={"uri": "s3://models/liver"}, distillation={"fold": 3})
    assert [s.name for s in stages][-3:] == ["export", "gate", "publish"]
    gate = _stage(stages, "gate")
    assert gate.needs == ("export",) and _stage(stages, "publish").needs == ("gate",)
    # Defaults: on, 0.97 mean, 0.90 per label; the summary is a glob the CLI expands (no shell in a pod).
    assert gate.argv == (
        "nnunet-distill",
        "gate",
        "--summary",
        (
            "/res/Dataset027_*/nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres/fold_3/validation/"
            "distillation_summary.json"
        ),
        "--min-retention",
        "0.97",
        "--min-label-retention",
        "0.9",
    )
    assert gate.fail_fast_exit_codes == (3,)  # a failed verdict is deterministic: no retries
    assert (gate.resources.gpus, gate.resources.cpu, gate.resources.memory) == (0, "500m", "512Mi")
    assert not gate.uses_credentials and not gate.reports_progress and gate.done_when_exists == ()
    assert "0.97" in gate.description and "not published" in gate.description


def test_quality_gate_thresholds_enforce_and_student_folder_follow_the_spec() -> None:
    stages = _plan(
        qualityGate={"minRetention": 0.99, "minLabelRetention": 0.95, "enforce": False},
        student={"architecture": "resenc", "reductionFactor": 4, "blockStrategy": "reduce"},
        distillation={"useDA5": True},
        resources={"gate": {"cpu": 1, "memory": "1Gi"}},
    )
    gate = _stage(stages, "gate")
    assert _flag(gate.argv, "--min-retention") == ["0.99"] and _flag(gate.argv, "--min-label-retention") == [
        "0.95"
    ]
    assert gate.argv[-1] == "--no-enforce" and "reported only" in gate.description
    assert _flag(gate.argv, "--summary")[0].startswith(
        "/res/Dataset027_*/nnUNetDistillationTrainerDA5__nnUNetResEncUNetLPlans_r4_bsreduce__3d_fullres/fold_0/"
    )
    assert (gate.resources.cpu, gate.resources.memory) == ("1", "1Gi")


def test_publish_only_with_an_output_and_only_it_uses_credentials() -> None:
    stages = _plan(output={"uri": "s3://models/liver", "secretRef": {"name": "s3"}})
    assert stages[-1].name == "publish"
    assert stages[-1].argv == (
        "nnunet-distill",
        "publish",
        "/res/nnunet-distill/j/package",
        "s3://models/liver",
    )
    assert [s.name for s in stages if s.uses_credentials] == ["publish"]


def test_resources_defaults_overrides_and_worker_env() -> None:
    stages = _plan(resources={"distill": {"gpus": 2, "cpu": "7500m", "memory": "64Gi"}})
    distill = _stage(stages, "distill")
    assert (distill.resources.gpus, distill.resources.cpu, distill.resources.memory) == (2, "7500m", "64Gi")
    # 7500m CPU: 6 data-augmentation workers and 7 processes per pod, split between its 2 DDP ranks (#11).
    assert dict(distill.env) == {"nnUNet_n_proc_DA": "3", "nnUNet_def_n_proc": "3"}
    export = _stage(stages, "export")
    assert (export.resources.gpus, export.resources.cpu, export.resources.memory) == (0, "2", "8Gi")


def test_device_override_for_local_runs() -> None:
    spec = api.parse_spec({"dataset": {"id": 1}, "storage": {"claimName": "d"}, "teachers": {"train": True}})
    stages = plan.plan(spec, name="j", paths=PATHS, device="cpu")
    assert _flag(_stage(stages, "teachers").argv, "-device") == ["cpu"]
    assert _flag(_stage(stages, "distill").argv, "-d_device") == ["cpu"]


def test_planning_is_deterministic() -> None:
    assert _plan(teachers={"train": True}) == _plan(teachers={"train": True})


def test_describe_lists_every_command() -> None:
    stages = _plan(teachers={"train": True, "folds": [0, 1]})
    text = plan.describe(stages)
    for stage in stages:
        for command in stage.commands:
            assert command.argv[0] in text
    assert "2 pods (indexed)" in text


def test_cascade_runs_nnunets_stages_in_order_lowres_on_every_fold_first() -> None:
    stages = _plan(
        configuration="3d_cascade_fullres",
        teachers={"train": True, "folds": [0, 1]},
        distillation={"fold": 2},
        resources={"distill": {"gpus": 2}},
    )
    assert [s.name for s in stages] == [
        "preprocess",
        "teachers-lowres",
        "teachers",
        "distill-lowres",
        "distill",
        "export",
        "gate",
    ]
    assert [s.needs for s in stages[1:5]] == [
        ("preprocess",),
        ("teachers-lowres",),
        ("teachers",),
        ("distill-lowres",),
    ]
    pre = stages[0]
    assert _flag(pre.argv, "-c", 2) == ["3d_lowres", "3d_fullres"]  # the cascade reads 3d_fullres data
    assert pre.done_when_exists[-2:] == (
        "/p/Dataset027_*/nnUNetPlans_3d_lowres",
        "/p/Dataset027_*/nnUNetPlans_3d_fullres",
    )
    # every lowres teacher fold (each case's lowres segmentation is some fold's validation), then the
    # cascade teachers the spec asks for
    lowres_teachers, teachers = _stage(stages, "teachers-lowres"), _stage(stages, "teachers")
    assert _flag(lowres_teachers.argv, "-c") == ["3d_lowres"]
    assert lowres_teachers.index_values == ("0", "1", "2", "3", "4")
    assert "__nnUNetPlans__3d_lowres/fold_{value}/" in lowres_teachers.done_when_exists[0]
    assert _flag(teachers.argv, "-c") == ["3d_cascade_fullres"] and teachers.index_values == ("0", "1")
    # the lowres student on every fold, on the distill stage's GPUs, each with the cascade's teacher folds
    lowres = _stage(stages, "distill-lowres")
    assert [c.name for c in lowres.commands] == [f"distill-lowres-fold{f}" for f in range(5)]
    for fold, command in enumerate(lowres.commands):
        assert _flag(command.argv, "-c") == ["3d_lowres"] and _flag(command.argv, "-f") == [str(fold)]
        assert _flag(command.argv, "-tf", 3) == ["0", "1", "-a"]  # the cascade's teacher folds
        assert command.argv[-1] == "-c_continue"
        assert command.argv[0] == "torchrun"  # 2 GPUs
    assert lowres.resources.gpus == 2 and lowres.resources.nodes == 1
    distill = _stage(stages, "distill")
    assert _flag(distill.argv, "-c") == ["3d_cascade_fullres"] and _flag(distill.argv, "-f") == ["2"]
    export = _stage(stages, "export")
    assert _flag(export.commands[0].argv, "-c") == ["3d_cascade_fullres"]
    assert "nnUNetPlans_r2__3d_cascade_fullres/fold_2/validation/" in _stage(stages, "gate").argv[3]


def test_cascade_without_teacher_training_still_distills_lowres_first() -> None:
    stages = _plan(configuration="3d_cascade_fullres", teachers={"numFolds": 3})
    assert [s.name for s in stages] == ["preprocess", "distill-lowres", "distill", "export", "gate"]
    lowres = _stage(stages, "distill-lowres")
    assert [_flag(c.argv, "-f") for c in lowres.commands] == [["0"], ["1"], ["2"]]
    assert all(c.argv[0] == "nnUNetv2_distillation_train" for c in lowres.commands)


def test_cascade_refuses_a_teacher_folder_and_the_clean_teacher_view() -> None:
    import pytest

    with pytest.raises(api.InvalidSpec) as err:
        _plan(
            configuration="3d_cascade_fullres",
            teachers={"folder": "/res/Dataset027_X/nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"},
            distillation={"teacherView": "clean"},
        )
    problems = " | ".join(err.value.problems)
    assert "spec.teachers.folder: is not supported with configuration 3d_cascade_fullres" in problems
    assert "spec.distillation.teacherView: clean does not support 3d_cascade_fullres" in problems
