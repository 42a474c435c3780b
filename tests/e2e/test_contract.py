"""The operator <-> trainer contract (docs/contracts.md): every command line the plan renders is parsed
by the trainer's own argument parser (and nnU-Net's), and the parsed values are the spec's.

The trainer's parsers are imported lazily, inside the tests: a missing module or parser factory is a
test failure (ImportError / AttributeError), never a skip.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from nnunet_distill_operator import api, cascade_plan, distributed, k8s, plan

ROOT = Path(__file__).resolve().parents[2]
PATHS = plan.DataPaths.in_pod("job")

SPECS: dict[str, dict[str, Any]] = {
    "minimal": {},
    "teachers-many-and-publish": {
        "teachers": {
            "train": True,
            "folds": [0, 1, 2],
            "training": {"epochs": 5, "iterationsPerEpoch": 3, "valIterations": 2},
        },
        "output": {"uri": "s3://models/liver", "secretRef": {"name": "s3"}},
    },
    "teacher-one-fold": {
        "teachers": {
            "train": True,
            "folds": [2],
            "trainer": "nnUNetTrainerDA5",
            "plans": "nnUNetResEncUNetMPlans",
        }
    },
    "standard-options": {
        "configuration": "3d_lowres",
        "teachers": {"folds": [0, 1, 2, 3, 4], "folder": "/data/nnUNet_results/T"},
        "student": {"reductionFactor": 4},
        "distillation": {
            "alpha": 0.5,
            "temperature": 4.5,
            "epochs": 20,
            "iterationsPerEpoch": 7,
            "valIterations": 3,
            "useDA5": True,
            "fold": 1,
            "rotateFolds": True,
            "rotateFrequency": 9,
            "disableMirroring": True,
            "unlabelledCases": ["scan_1", "scan_2"],
            "labelledShare": 0.4,
        },
        "export": {"dynamicShape": True, "simplify": True, "modelName": "m"},
        "qualityGate": {"minRetention": 0.955, "minLabelRetention": 0.8, "enforce": False},
    },
    "standard-static-trt": {
        "export": {"inputShape": [1, 1, 64, 64, 64], "tensorRTCompatible": True},
        "output": {"uri": "file:///models/out"},
    },
    "standard-nnunet-format-2d": {"configuration": "2d", "export": {"nnUNetFormat": True}},
    "resenc-defaults": {"student": {"architecture": "resenc"}},
    "ddp-one-pod": {"resources": {"distill": {"gpus": 4}}},
    "ddp-multi-node-resenc": {
        "student": {"architecture": "resenc"},
        "resources": {"distill": {"gpus": 2, "nodes": 3}},
    },
    "cascade-teachers-ddp": {
        "configuration": "3d_cascade_fullres",
        "teachers": {"train": True, "folds": [0, 1]},
        "resources": {"distill": {"gpus": 2}},
    },
    "resenc-dynamic": {
        "student": {"architecture": "resenc", "blockStrategy": "reduce"},
        "export": {"dynamicShape": True},
        "preprocess": {"mode": "Always", "processes": 3},
    },
}
for example in ("distillationjob-full.yaml", "distillationjob-minimal.yaml", "demo.yaml"):
    SPECS[f"example:{example}"] = yaml.safe_load((ROOT / "examples" / example).read_text())["spec"]


def _spec(overrides: dict[str, Any]) -> api.DistillationJobSpec:
    if "dataset" in overrides:
        return api.parse_spec(overrides)
    return api.parse_spec({"dataset": {"id": 27}, "storage": {"claimName": "data"}, **overrides})


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace, unknown: list[str]):
        self.namespace, self.unknown = namespace, unknown


def _nnunet_entry(entry: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run nnU-Net's own entry point just up to its argument parsing (it has no parser factory).

    Some nnU-Net entry points use parse_known_args and silently ignore unknown flags, so the unknown ones
    are collected and must be empty."""
    module = importlib.import_module("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints")
    original = argparse.ArgumentParser.parse_known_args

    def parse_and_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(*original(self, argv))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_and_stop)
    try:
        with pytest.raises(_Parsed) as parsed:
            getattr(module, entry)()
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", original)
    assert parsed.value.unknown == [], f"{entry} ignores {parsed.value.unknown}"
    return parsed.value.namespace


def parse(argv: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Parse a rendered command line with the parser of the program it invokes."""
    head, rest = argv[0], list(argv[1:])
    if head == "torchrun":  # torch's own parser for the launcher, then the trainer's for what it runs
        launcher = importlib.import_module("torch.distributed.run").get_args_parser().parse_args(rest)
        assert launcher.no_python and launcher.training_script == distributed.trainer_argv(argv)[0]
        return parse(distributed.trainer_argv(argv), monkeypatch)
    if head == "nnunet-distill":
        module = importlib.import_module(f"nnunet_distill.cli.{rest[0].replace('-', '_')}")
        parser = module.build_parser()
        rest = rest[1:]
    elif head == "nnUNetv2_distillation_train":
        parser = importlib.import_module("nnunet_distill.cli.train").build_parser_standard()
    elif head == "nnUNetv2_resenc_distillation_train":
        parser = importlib.import_module("nnunet_distill.cli.train").build_parser_resenc()
    elif head == "nnUNetv2_distillation_export_onnx":
        parser = importlib.import_module("nnunet_distill.cli.export").build_parser_standard()
    elif head == "nnUNetv2_resenc_distillation_export_onnx":
        parser = importlib.import_module("nnunet_distill.cli.export").build_parser_resenc()
    elif head == "nnUNetv2_plan_and_preprocess":
        return _nnunet_entry("plan_and_preprocess_entry", rest, monkeypatch)
    elif head == "nnUNetv2_plan_experiment":
        return _nnunet_entry("plan_experiment_entry", rest, monkeypatch)
    else:
        pytest.fail(f"the plan renders a command no contract covers: {head}")
    try:
        return parser.parse_args(rest)
    except SystemExit as exc:  # argparse's way of rejecting a command line
        pytest.fail(f"{head} rejected {rest}: exit {exc.code}")


def _check_values(
    stage: plan.Stage, command: plan.Command, args: argparse.Namespace, spec: api.DistillationJobSpec
) -> None:
    d, e = spec.distillation, spec.export
    head = command.argv[0]
    if head == "nnUNetv2_plan_and_preprocess":
        assert args.d == [spec.dataset.id] and args.c == list(cascade_plan.preprocess_configurations(spec))
        assert args.verify_dataset_integrity is spec.preprocess.verify_dataset_integrity
        n = spec.preprocess.processes or plan._cpu_count(stage.resources.cpu) or 4
        assert args.npfp == n and args.np == [n]
    elif head == "nnUNetv2_plan_experiment":
        assert args.d == [spec.dataset.id] and args.pl == spec.planner
    elif command.name == "train-teacher":
        folds = list(spec.teacher_folds or ())
        picked = args.folds_by_index if len(folds) > 1 else [args.fold]
        assert [int(f) for f in picked] == folds
        assert (args.trainer, args.plans, args.configuration) == (
            spec.teachers.trainer,
            spec.teacher_plans,
            spec.configuration,
        )
        assert args.epochs == spec.teachers.training.epochs
        assert args.iterations_per_epoch == spec.teachers.training.iterations_per_epoch
        assert args.continue_training is True and args.device == "cuda"
        assert str(args.dataset) == str(spec.dataset.id)
    elif command.name == "distill" or command.name.startswith("distill-lowres-fold"):
        assert str(args.dataset_id) == str(spec.dataset.id) and args.configuration == spec.configuration
        assert (args.fold, args.alpha, args.temperature) == (d.fold, d.alpha, d.temperature)
        assert (args.reduction_factor, args.epochs) == (spec.student.reduction_factor, d.epochs)
        assert args.iterations_per_epoch == d.iterations_per_epoch and args.val_iterations == d.val_iterations
        assert args.teacher_folds == (list(spec.teacher_folds) if spec.teacher_folds is not None else None)
        assert (args.teacher_trainer, args.teacher_plans) == (spec.teachers.trainer, spec.teacher_plans)
        assert args.teacher_model_folder == spec.teachers.folder
        assert (args.use_da5, args.rotate_folds, args.disable_mirroring) == (
            d.use_da5,
            d.rotate_folds,
            d.disable_mirroring,
        )
        if d.rotate_frequency is not None:
            assert args.rotate_freq == d.rotate_frequency
        assert (args.unlabelled_cases or []) == d.unlabelled_cases
        assert args.labelled_share == d.labelled_share
        assert args.d_device == "cuda" and args.continue_training is True  # automatic resume
        if spec.student.architecture == "resenc":
            assert (args.student_plans, args.block_strategy) == (
                spec.student_base_plans,
                spec.student.block_strategy,
            )
    elif command.name == "export":
        assert str(args.dataset_id) == str(spec.dataset.id) and str(args.fold) == str(d.fold)
        assert args.reduction_factor == spec.student.reduction_factor and args.use_da5 == d.use_da5
        assert args.simplify == e.simplify and args.trt == e.tensorrt_compatible
        assert args.plans == spec.teacher_plans
        if spec.student.architecture == "resenc":
            assert (args.student_plans, args.block_strategy) == (
                spec.student_base_plans,
                spec.student.block_strategy,
            )
        else:
            assert (args.dynamic_axes, args.nnunet_format) == (e.dynamic_shape, e.nnunet_format)
            assert args.input_shape == e.input_shape
    elif command.name == "package":
        _, onnx_file, package_dir = plan.export_paths(PATHS)
        assert (str(args.onnx), str(args.output)) == (onnx_file, package_dir)
        assert args.name == (e.model_name or "job")
    elif command.name == "gate":
        g = spec.quality_gate
        assert args.summary == plan.student_summary_glob(spec, PATHS)
        assert (args.min_retention, args.min_label_retention, args.enforce) == (
            g.min_retention,
            g.min_label_retention,
            g.enforce,
        )
    elif command.name == "publish":
        assert (args.package_dir, args.uri) == (plan.export_paths(PATHS)[2], spec.output.uri)  # type: ignore[union-attr]
    else:
        pytest.fail(f"unchecked command {command.name}")


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_rendered_command_parses_with_the_trainers_parser(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(SPECS[case])
    stages = plan.plan(spec, name="job", paths=PATHS)
    commands = [(s, c) for s in stages for c in s.commands]
    assert commands
    for stage, command in commands:
        args = parse(command.argv, monkeypatch)
        _check_values(stage, command, args, _stage_spec(spec, stage, command))


def _stage_spec(spec: api.DistillationJobSpec, stage: plan.Stage, command: plan.Command) -> Any:
    """A cascade's lowres stages run the commands of the same job for 3d_lowres (cascade_plan's specs)."""
    if stage.name == "teachers-lowres":
        return cascade_plan.lowres_teachers_spec(spec)
    if command.name.startswith("distill-lowres-fold"):
        return cascade_plan.lowres_student_spec(spec, int(command.name.removeprefix("distill-lowres-fold")))
    return spec


@pytest.mark.parametrize("case", sorted(SPECS))
def test_exporter_writes_the_file_the_packager_reads(case: str) -> None:
    spec = _spec(SPECS[case])
    export = next(s for s in plan.plan(spec, name="job", paths=PATHS) if s.name == "export")
    export_argv, package_argv = export.commands[0].argv, export.commands[1].argv
    cli_export = importlib.import_module("nnunet_distill.cli.export")
    resenc = spec.student.architecture == "resenc"
    parser = cli_export.build_parser_resenc() if resenc else cli_export.build_parser_standard()
    args = parser.parse_args(list(export_argv[1:]))
    request = (cli_export.request_resenc if resenc else cli_export.request_standard)(args, parser)
    assert str(request.output) == package_argv[package_argv.index("--onnx") + 1]


def test_pod_commands_are_the_planned_commands() -> None:
    """What Kubernetes runs is exactly the planned argv (after the optional skip guard)."""
    spec = _spec(SPECS["teachers-many-and-publish"])
    owner = k8s.Owner("job", "ns", "uid")
    for stage in plan.plan(spec, name="job", paths=PATHS):
        job = k8s.job_for(stage, owner=owner, spec=spec, paths=PATHS)
        pod = job["spec"]["template"]["spec"]
        containers = pod.get("initContainers", []) + pod["containers"]
        assert len(containers) == len(stage.commands)
        for container, command in zip(containers, stage.commands, strict=False):
            assert container["args"][-len(command.argv) :] == list(command.argv)
        env = {e["name"]: e.get("value") for c in containers for e in c["env"]}
        assert (env["nnUNet_raw"], env["nnUNet_preprocessed"], env["nnUNet_results"]) == (
            "/data/nnUNet_raw",
            "/data/nnUNet_preprocessed",
            "/data/nnUNet_results",
        )


@pytest.mark.parametrize(("gpus", "nodes"), [(4, 1), (2, 3), (1, 2)])
def test_the_pods_torchrun_line_and_env_make_the_planned_process_group(
    gpus: int, nodes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's own parser reads the distill pod's command line with the pod's env (PET_* from the Job, the
    node rank from the Indexed Job's completion index): nodes x GPUs ranks, a rendezvous on the index-0 pod,
    and the trainer's own command after --no-python."""
    spec = _spec({"resources": {"distill": {"gpus": gpus, "nodes": nodes}}})
    stage = next(s for s in plan.plan(spec, name="job", paths=PATHS) if s.name == "distill")
    job = k8s.job_for(stage, owner=k8s.Owner("job", "ns", "uid"), spec=spec, paths=PATHS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
        elif item["name"] == distributed.ENV_NODE_RANK:  # what the downward API gives pod index 1
            assert "job-completion-index" in item["valueFrom"]["fieldRef"]["fieldPath"]
            monkeypatch.setenv(item["name"], "1")
    run = importlib.import_module("torch.distributed.run")
    args = run.parse_args(container["args"][1:])
    assert (str(args.nnodes), int(args.nproc_per_node)) == (str(nodes), gpus)
    assert args.no_python and args.training_script == "nnUNetv2_distillation_train"
    trainer = importlib.import_module("nnunet_distill.cli.train").build_parser_standard()
    parsed = trainer.parse_args(args.training_script_args)
    assert parsed.num_gpus == 1 and parsed.d_device == "cuda" and parsed.continue_training
    if nodes == 1:
        assert args.standalone
    else:
        assert (args.node_rank, args.master_addr, int(args.master_port)) == (
            1,
            "job-distill-0.job-distill.ns.svc",
            distributed.RENDEZVOUS_PORT,
        )
        assert args.max_restarts == 0  # a failed rank fails the pod; Kubernetes restarts it (-c_continue)


def test_student_folder_naming_agrees_with_the_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder the operator globs for is the one the trainer derives from the distill command it is
    given (parsed by the trainer's own parser, mapped by its own config_from_args)."""
    naming = importlib.import_module("nnunet_distill.contract")
    cli_train = importlib.import_module("nnunet_distill.cli.train")
    assert (plan.DISTILL_TRAINER, plan.DISTILL_TRAINER_DA5) == (
        naming.DISTILL_TRAINER,
        naming.DISTILL_TRAINER_DA5,
    )
    assert api.DEFAULT_RESENC_TEACHER_PLANS == naming.DEFAULT_RESENC_TEACHER_PLANS
    assert plan.student_plans_identifier is naming.student_plans_identifier
    folders = set()
    for overrides in SPECS.values():
        spec = _spec(overrides)
        stage = next(s for s in plan.plan(spec, name="job", paths=PATHS) if s.name == "distill")
        argv = distributed.trainer_argv(stage.commands[0].argv)
        variant = cli_train.RESENC if argv[0] == "nnUNetv2_resenc_distillation_train" else cli_train.STANDARD
        config = cli_train.config_from_args(parse(tuple(argv), monkeypatch), variant)
        expected = naming.model_folder_name(
            config.trainer_name, config.student_plans_identifier, config.configuration
        )
        assert plan.student_model_folder(spec) == expected
        assert config.student_plans_identifier.startswith(f"{spec.teacher_plans}_r")  # says its teachers
        folders.add((spec.teacher_plans, spec.student_base_plans, expected))
    assert len({f for *_, f in folders}) == len(folders)  # different teachers/bases, different folders


def test_pod_env_contract_matches_the_trainers_reporter() -> None:
    report = importlib.import_module("nnunet_distill.report")
    assert (report.GROUP, report.VERSION, report.PLURAL) == (api.GROUP, api.VERSION, api.PLURAL)
    spec = _spec({})
    stage = plan.plan(spec, name="job", paths=PATHS)[-1]
    job = k8s.job_for(stage, owner=k8s.Owner("job", "ns", "uid"), spec=spec, paths=PATHS)
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {report.ENV_NAME, report.ENV_NAMESPACE, report.ENV_UID, report.ENV_STAGE} <= names
    container = job["spec"]["template"]["spec"]["containers"][0]
    termination = importlib.import_module("nnunet_distill.termination")
    assert container["terminationMessagePath"] == termination.DEFAULT_TERMINATION_PATH


def test_quality_gate_constants_agree_with_the_trainer() -> None:
    """The operator renders the gate's command, reads its exit code and termination message, and names the
    file the distill stage writes: every one of those names is the trainer's."""
    from nnunet_distill_operator import status

    gate = importlib.import_module("nnunet_distill.gate")
    evaluation = importlib.import_module("nnunet_distill.evaluation")
    assert plan.DISTILLATION_SUMMARY == evaluation.SUMMARY_NAME
    assert gate.SCHEMA_VERSION == evaluation.SCHEMA_VERSION
    assert (gate.TEST_SET, gate.VALIDATION_UNSEEN, gate.NO_HONEST_BASELINE) == (
        evaluation.TEST_SET,
        evaluation.VALIDATION_UNSEEN,
        evaluation.NO_HONEST_BASELINE,
    )
    assert status.EXIT_CODE_GATE_FAILED == gate.EXIT_GATE_FAILED != k8s.EXIT_CODE_USAGE
    assert (status.GATE_PASSED, status.GATE_FAILED, status.GATE_NOT_ENFORCED) == (
        gate.PASSED,
        gate.FAILED,
        gate.NOT_ENFORCED,
    )
    defaults = api.QualityGateSpec()
    assert (defaults.min_retention, defaults.min_label_retention, defaults.enforce) == (
        gate.DEFAULT_MIN_RETENTION,
        gate.DEFAULT_MIN_LABEL_RETENTION,
        True,
    )
    bounds = api.QualityGateSpec.model_json_schema()["properties"]["minRetention"]
    assert bounds["maximum"] == gate.MAX_THRESHOLD and bounds["exclusiveMinimum"] == 0


def test_gate_termination_message_becomes_status_metrics_and_the_condition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real gate CLI on a summary laid out where the plan's glob looks; its termination message read by
    the operator's own functions: every figure the trainer reports lands in status.metrics (the API model)."""
    import json

    from nnunet_distill_operator import status

    gate_cli = importlib.import_module("nnunet_distill.cli.gate")
    evaluation = importlib.import_module("nnunet_distill.evaluation")
    spec = _spec({})
    paths = plan.DataPaths(
        str(tmp_path / "raw"), str(tmp_path / "pre"), str(tmp_path / "results"), str(tmp_path / "work")
    )
    fold = tmp_path / "results" / "Dataset027_Liver" / plan.student_model_folder(spec) / "fold_0"
    (fold / "validation").mkdir(parents=True)
    summary = {
        "schema_version": 2,
        "evaluation": "test_set",
        "note": "held-out test cases",
        "cases": {"ids": ["c0", "c1", "c2"], "count": 3, "source": "imagesTs", "mirroring_tta": True},
        "student": {
            "model_folder": str(fold.parent),
            "fold": 0,
            "mean_dice": 0.6,
            "dice": {"organ": 0.9, "lesion": 0.3},
        },
        "teacher_ensemble": {"folds": [0, 1, 2], "mean_dice": 0.9, "dice": {"organ": 0.95, "lesion": 0.85}},
        "retention": {
            "mean": 0.6 / 0.9,
            "per_label": {"organ": 0.9 / 0.95, "lesion": 0.3 / 0.85},
            "worst_label": "lesion",
            "worst": 0.3 / 0.85,
        },
        "per_label": [],
    }
    (fold / "validation" / evaluation.SUMMARY_NAME).write_text(json.dumps(summary))
    gate_stage = next(s for s in plan.plan(spec, name="job", paths=paths) if s.name == "gate")
    term = tmp_path / "termination.json"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(term))
    assert gate_cli.main(list(gate_stage.argv[2:])) == status.EXIT_CODE_GATE_FAILED
    message = status.parse_summary(term.read_text())
    verdict = status.gate_verdict(message)
    assert verdict is not None and verdict.reason == "QualityGateFailed" and verdict.student == str(fold)
    _, metrics = status.results_from_summaries([message])
    assert metrics == evaluation.result_metrics(summary)  # the trainer's own status.metrics, key for key
    assert set(metrics) == set(status.METRIC_KEYS)
    model = api.Metrics.model_validate(metrics)
    assert (model.worst_label, model.teacher_folds, model.evaluated_on) == (
        "lesion",
        [0, 1, 2],
        "test_set: 3 cases (imagesTs)",
    )


def test_contract_module_imports_only_the_standard_library() -> None:
    """The operator image installs none of the trainer's dependencies: a fresh interpreter imports the
    contract, and every module that import loaded belongs to the standard library (or to the contract's own
    package)."""
    import json
    import subprocess
    import sys

    probe = (
        "import sys, json; before = set(sys.modules); import nnunet_distill.contract; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    assert "nnunet_distill" in loaded
    foreign = sorted(loaded - set(sys.stdlib_module_names) - {"nnunet_distill"})
    assert foreign == []


def test_resenc_planners_are_nnunets_own() -> None:
    """Each plans identifier the contract maps to a planner is that nnU-Net planner's default `plans_name`,
    and the operator picks the same planner for it (the two copies of this table had drifted by one entry)."""
    import inspect

    from nnunet_distill import contract

    planners = importlib.import_module(
        "nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners"
    )
    for plans, planner in contract.RESENC_PLANNERS.items():
        default = inspect.signature(getattr(planners, planner).__init__).parameters["plans_name"].default
        assert default == plans
        spec = _spec({"student": {"architecture": "resenc"}, "teachers": {"plans": plans}})
        assert spec.planner == planner


def test_one_device_rule_for_the_trainer_and_the_operator(monkeypatch, tmp_path) -> None:
    """No device asked for means cuda when a GPU answers, else cpu, on both sides: the trainer probes with
    torch, the operator (which never imports torch) with nvidia-smi; explicit choices are checked alike."""
    import torch
    from nnunet_distill import contract
    from nnunet_distill.config import ConfigError, parse_device_string
    from nnunet_distill.nnunet_env import select_device
    from nnunet_distill_operator import cli

    assert contract.choose_device(None, lambda: True) == "cuda"
    assert contract.choose_device("", lambda: False) == "cpu"
    assert contract.choose_device("cuda:1", lambda: False) == "cuda:1"  # explicit: kept, not probed
    assert contract.parse_device(" CUDA:2 ") == ("cuda", 2)
    with pytest.raises(ValueError, match="cpu, cuda, cuda:N or mps"):
        contract.choose_device("gpu", lambda: True)
    with pytest.raises(ConfigError, match="-d_device must be cpu, cuda, cuda:N or mps, got 'gpu'"):
        parse_device_string("gpu")
    assert str(select_device(None)) == contract.choose_device(None, torch.cuda.is_available)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on the PATH
    assert cli.detect_device("auto") == "cpu"
    assert cli.detect_device("cuda") == "cuda" and cli.detect_device("cpu") == "cpu"
