"""Console scripts: `nnunet-distill` (run/plan/crds/demo + trainer subcommands) and `nnunet-distill-operator`.

The trainer image installs this same script for `nnunet-distill package|publish|...`, without the
operator extra: nothing operator-side (pydantic models, kopf, kubernetes) is imported at module level,
and trainer subcommands are dispatched by name to `nnunet_distill.cli.<name>:main(argv)`, so the
operator never imports torch either.

Errors are one line on stderr and a non-zero exit (2: the command line or the job file is wrong,
1: the run failed), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

TRAINER_COMMANDS = {
    "synthetic": "write a synthetic nnU-Net dataset (demo, tests)",
    "train-teacher": "train one nnU-Net teacher fold",
    "package": "package an exported ONNX student for serving",
    "gate": "pass or block a distilled student on its held-out Dice retention (quality gate)",
    "publish": "upload and verify a package in object storage",
    "predict": "predict with an exported ONNX student",
    "figure": "draw held-out segmentations of teachers and student and the training curves (PNG)",
}
OPERATOR_COMMANDS = ("run", "plan", "crds", "demo")
PROG = "nnunet-distill"


class CliError(Exception):
    """A user-facing error: printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _fail(prog: str, message: str, code: int = 2) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ------------------------------------------------------------------------------------------ job files


def load_job(path: str) -> tuple[str, dict[str, Any]]:
    """(name, spec dict) of the first DistillationJob in a YAML file."""
    import yaml

    from nnunet_distill_operator import api

    try:
        text = Path(path).read_text() if path != "-" else sys.stdin.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == api.KIND:
            if doc.get("apiVersion") != api.API_VERSION:
                raise CliError(f"{path}: apiVersion must be {api.API_VERSION}, got {doc.get('apiVersion')!r}")
            name = (doc.get("metadata") or {}).get("name")
            if not name:
                raise CliError(f"{path}: metadata.name is missing")
            return str(name), doc.get("spec") or {}
    raise CliError(f"{path}: no `kind: {api.KIND}` document found")


def parse_job(path: str) -> tuple[str, Any]:
    from nnunet_distill_operator import api

    name, spec = load_job(path)
    try:
        return name, api.parse_spec(spec)
    except api.InvalidSpec as exc:
        raise CliError(f"{path}: invalid DistillationJob: {'; '.join(exc.problems)}") from None


def detect_device(choice: str) -> str:
    """auto -> cuda when an NVIDIA GPU answers nvidia-smi, else cpu (the contract's one device rule, with
    nvidia-smi as the probe: the operator never imports torch)."""
    from nnunet_distill.contract import choose_device

    return choose_device(None if choice == "auto" else choice, _nvidia_gpu_answers)


def _nvidia_gpu_answers() -> bool:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            if subprocess.run([smi, "-L"], capture_output=True, timeout=10, check=False).returncode == 0:
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    return False


# -------------------------------------------------------------------------------------------- commands


def _add_local_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="folder holding nnUNet_raw, nnUNet_preprocessed, nnUNet_results "
        "(default: the $nnUNet_* env vars)",
    )
    p.add_argument("--raw", help="nnUNet_raw folder (overrides --data-dir / $nnUNet_raw)")
    p.add_argument("--preprocessed", help="nnUNet_preprocessed folder")
    p.add_argument("--results", help="nnUNet_results folder")
    p.add_argument("--workdir", help="logs, status and export scratch (default ./nnunet-distill-runs/NAME)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device for training stages (default: cuda if nvidia-smi finds a GPU, else cpu)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Distill nnU-Net teacher ensembles into small ONNX "
        "students: run DistillationJobs locally, plan them, generate the CRD.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a DistillationJob YAML (locally with --local)")
    run.add_argument("job", metavar="JOB.yaml")
    run.add_argument("--local", action="store_true", help="run the stages as processes on this machine")
    _add_local_dirs(run)

    plan = sub.add_parser("plan", help="print the stages (command lines) a DistillationJob runs")
    plan.add_argument("job", metavar="JOB.yaml")
    plan.add_argument("--local", action="store_true", help="show local paths instead of the pod layout")
    plan.add_argument("--manifests", action="store_true", help="print the Kubernetes Job manifests (YAML)")
    _add_local_dirs(plan)

    crds = sub.add_parser("crds", help="print the CustomResourceDefinition, or --write it to the repository")
    crds.add_argument(
        "--write",
        action="store_true",
        help="write crds/ and charts/nnunet-distill-operator/files/crds/ under --root",
    )
    crds.add_argument("--root", default=".", help="repository root (default .)")

    demo = sub.add_parser("demo", help="synthetic data -> teachers -> student -> ONNX -> package, in minutes")
    demo.add_argument("--workdir", default=".demo", help="where the demo writes everything (default ./.demo)")
    demo.add_argument("--job", help="a DistillationJob YAML to use instead of the embedded demo")
    demo.add_argument("--clean", action="store_true", help="delete the workdir first")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    for name, help_ in TRAINER_COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from nnunet_distill_operator import k8s, plan

    name, spec = parse_job(args.job)
    if args.local:
        paths = _local_paths(args, name)
        device = detect_device(args.device)
    else:
        paths, device = plan.DataPaths.in_pod(name), None
    stages = plan.plan(spec, name=name, paths=paths, device=device)
    if args.manifests:
        owner = k8s.Owner(name, "default", "<uid>")
        docs = [k8s.job_for(s, owner=owner, spec=spec, paths=paths) for s in stages]
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    else:
        print(f"DistillationJob {name}: {len(stages)} stages")
        print(plan.describe(stages))
    return 0


def _local_paths(args: argparse.Namespace, name: str) -> Any:
    from nnunet_distill_operator import local

    workdir = args.workdir or str(Path("nnunet-distill-runs") / name)
    try:
        return local.local_paths(
            data_dir=args.data_dir,
            raw=args.raw,
            preprocessed=args.preprocessed,
            results=args.results,
            workdir=workdir,
            env=os.environ,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _run_local(
    name: str, spec: Any, paths: Any, device: str, extra_first: list[Any] | None = None
) -> dict[str, Any]:
    import signal

    from nnunet_distill_operator import local, plan

    stages = list(extra_first or []) + list(plan.plan(spec, name=name, paths=paths, device=device))
    runner = local.LocalRunner(name=name, paths=paths, workdir=Path(paths.work))

    def on_sigterm(signum: int, _frame: Any) -> None:
        runner.interrupt()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return runner.run(stages)
    except local.LocalRunError as exc:
        first, *rest = str(exc).splitlines()
        if rest:
            print("\n".join(rest), file=sys.stdout, flush=True)
        raise CliError(first, code=1) from None
    except KeyboardInterrupt:
        runner.interrupt()
        raise CliError(
            "interrupted; rerun the same command to continue (finished stages are skipped "
            "where their outputs exist)",
            code=130,
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise CliError(
            "only local runs are started from the command line: add --local, or submit the job to "
            "Kubernetes with `kubectl apply -f " + args.job + "`"
        )
    name, spec = parse_job(args.job)
    paths = _local_paths(args, name)
    device = detect_device(args.device)
    status = _run_local(name, spec, paths, device)
    print(f"status: {Path(paths.work) / 'status.yaml'} (phase {status.get('phase')})")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from nnunet_distill_operator import crd

    if args.write:
        for path in crd.write(args.root):
            print(f"wrote {path}")
    else:
        print(crd.crd_yaml(), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nnunet_distill_operator import demo

    job = args.job or str(demo.DEMO_JOB)
    name, spec = parse_job(job)
    return demo.run_demo(
        name,
        spec,
        workdir=Path(args.workdir),
        clean=args.clean,
        device=detect_device(args.device),
        run_local=_run_local,
    )


def dispatch_trainer(command: str, argv: list[str]) -> int:
    """`nnunet-distill synthetic ...` -> nnunet_distill.cli.synthetic.main(argv), imported only now."""
    module_name = f"nnunet_distill.cli.{command.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (
            exc.name == module_name
            or module_name.startswith(exc.name + ".")
            or exc.name in ("torch", "nnunetv2")
        ):
            raise CliError(
                f"`{PROG} {command}` needs the trainer: pip install 'nnunet-distill[trainer]' "
                f"({exc.name} is not installed)"
            ) from None
        raise
    result = module.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        try:
            return dispatch_trainer(argv[0], argv[1:])
        except CliError as exc:
            _fail(f"{PROG} {argv[0]}", str(exc), exc.code)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"run": cmd_run, "plan": cmd_plan, "crds": cmd_crds, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except CliError as exc:
        _fail(f"{PROG} {args.command}", str(exc), exc.code)
    except ImportError as exc:
        _fail(
            f"{PROG} {args.command}",
            f"needs the operator extra: pip install 'nnunet-distill[operator]' "
            f"({exc.name or exc} is not installed)",
        )


# ------------------------------------------------------------------------------------------- operator


def _add_trainer_defaults(p: argparse.ArgumentParser) -> None:
    """What stage pods get when a DistillationJob does not say (flags, else the chart's env)."""
    p.add_argument(
        "--trainer-image",
        default=os.environ.get("NNUNET_DISTILL_TRAINER_IMAGE"),
        help="default trainer image (env NNUNET_DISTILL_TRAINER_IMAGE)",
    )
    p.add_argument(
        "--trainer-image-pull-policy",
        choices=("Always", "IfNotPresent", "Never"),
        default=os.environ.get("NNUNET_DISTILL_TRAINER_IMAGE_PULL_POLICY") or None,
        help="default pull policy of stage pods (env NNUNET_DISTILL_TRAINER_IMAGE_PULL_POLICY)",
    )
    p.add_argument(
        "--trainer-service-account",
        default=os.environ.get("NNUNET_DISTILL_TRAINER_SERVICE_ACCOUNT"),
        help="default service account of stage pods (env NNUNET_DISTILL_TRAINER_SERVICE_ACCOUNT)",
    )


def build_operator_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-distill-operator",
        description="The DistillationJob operator (kopf): one replica per cluster.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs like ml-* allowed)",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else $KUBECONFIG)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument(
        "--metrics-port", type=int, default=9100, help="Prometheus /metrics port; -1 disables (default 9100)"
    )
    p.add_argument(
        "--metrics-addr", default="0.0.0.0", help="address of the metrics server (default 0.0.0.0)"
    )
    p.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        help="kopf liveness endpoint http://0.0.0.0:PORT/healthz; -1 disables (default 8080)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    peering = p.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering (only when you are sure a single operator runs)"
    )
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help="kopf peering object name (requires kopf's peering CRDs); by default peering is "
        "used when the CRDs exist",
    )
    _add_trainer_defaults(p)
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="seconds between level-triggered passes over all jobs (default 60)",
    )
    return p


def operator_main(argv: list[str] | None = None) -> int:
    prog = "nnunet-distill-operator"
    args = build_operator_parser().parse_args(argv)
    if not args.all_namespaces and not args.namespace:
        _fail(prog, "choose what to watch: --all-namespaces, or --namespace NS (repeatable)")
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        _fail(prog, f"--kubeconfig {args.kubeconfig}: no such file")
    if args.resync_seconds <= 0:
        _fail(prog, "--resync-seconds must be > 0")
    import logging

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )
    if args.log_level == "info":
        # kopf logs "Handler '...' succeeded." at INFO for every watch event it hands to a handler: four of
        # every five lines of an operator at INFO, and their formatting and the handler's lock were 5 % of its
        # CPU under a burst (`bench operator`). What the operator did (Jobs, Events, failures) is logged by
        # the operator itself; kopf's own warnings and errors still show, and --log-level debug shows all.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        from nnunet_distill_operator import controller, k8s
    except ImportError as exc:
        _fail(prog, f"needs the operator extra: pip install 'nnunet-distill[operator]' ({exc.name} missing)")
    defaults = k8s.Defaults(
        image=args.trainer_image or k8s.Defaults.image,
        image_pull_policy=args.trainer_image_pull_policy,
        service_account=args.trainer_service_account,
    )
    config = controller.OperatorConfig(
        defaults=defaults,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_addr=args.metrics_addr,
        resync_seconds=args.resync_seconds,
        kubeconfig=args.kubeconfig,
        context=args.context,
    )
    liveness = None if args.liveness_port < 0 else f"http://0.0.0.0:{args.liveness_port}/healthz"
    controller.run(
        namespaces=list(args.namespace),
        all_namespaces=args.all_namespaces,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        liveness_endpoint=liveness,
        config=config,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
