"""The built operator image, run with buildah (chroot isolation, the host's network): its entrypoint answers
--help, it runs as a non-root user, it holds the code of this checkout, and from inside the container it
reconciles one DistillationJob against the kmock API server this test serves on loopback.

Needs the image: `make test-images` builds it (`make image-operator`) and runs this file with OPERATOR_IMAGE
set; `.ci/run` runs `make test-images` after `make test`, and `make test` leaves this file out (--ignore) for
that reason. Without OPERATOR_IMAGE this file is skipped on a developer machine and fails where CI is set;
with it set, a missing image or buildah fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.external import require
from tests.operator.conftest import dj
from tests.operator.harness import exists, get, job_key, wait_for

IMAGE = os.environ.get("OPERATOR_IMAGE", "")
# The Makefile's buildah storage (STORAGE_DRIVER, default vfs; CONTAINERS_STORAGE_CONF passes through).
ENV = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs"), "BUILDAH_ISOLATION": "chroot"}
REPO = Path(__file__).resolve().parents[2]
# The packages the operator wheel holds (pyproject.toml: packages.find over operator/ and trainer_image/).
PACKAGES = {
    "nnunet_distill_operator": REPO / "operator" / "nnunet_distill_operator",
    "nnunet_distill": REPO / "trainer_image" / "nnunet_distill",
}


@pytest.fixture(scope="module")
def container() -> str:
    if not IMAGE:
        message = "OPERATOR_IMAGE not set: `make test-images` builds the operator image and runs this file"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI runs it through `make test-images`, never without the image)")
        pytest.skip(message)
    buildah = require("buildah", "apt-get install buildah")
    ctr = subprocess.run(
        [buildah, "from", "--pull-never", IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.strip()
    yield ctr
    subprocess.run([buildah, "rm", ctr], env=ENV, capture_output=True, check=False, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(ctr: str, *argv: str, volumes: tuple[str, ...] = ()) -> list[str]:
    cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
    for v in volumes:
        cmd += ["-v", v]
    return [*cmd, ctr, "--", *argv]


def test_entrypoint_help_and_non_root_user(container: str) -> None:
    inspect = subprocess.run(
        ["buildah", "inspect", "--type", "image", IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    config = json.loads(inspect)["OCIv1"]["config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["nnunet-distill-operator"]
    helped = subprocess.run(
        _run(container, "nnunet-distill-operator", "--help"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert helped.returncode == 0 and "--all-namespaces" in helped.stdout, helped.stdout + helped.stderr
    ids = subprocess.run(
        _run(container, "id", "-u"), env=ENV, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert ids == "10001"
    torch = subprocess.run(
        _run(container, "python", "-c", "import importlib.util as u; print(u.find_spec('torch'))"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert torch == "None", "the operator image must not contain torch"


def _source_digests(roots: dict[str, Path]) -> dict[str, str]:
    """sha256 of every .py file of the given packages, keyed by package-relative path."""
    return {
        f"{name}/{path.relative_to(root)}": hashlib.sha256(path.read_bytes()).hexdigest()
        for name, root in roots.items()
        for path in sorted(root.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def test_the_image_holds_the_code_of_this_checkout(container: str) -> None:
    """A stale image tests old code: buildah once reused a cached layer holding an older operator (a RUN
    with a bind mount from another stage is cached by its text alone), and that old operator made API calls
    the chart rightly does not grant. The installed packages must be byte-identical to the sources."""
    where = subprocess.run(
        _run(
            container,
            "python",
            "-c",
            f"import importlib; print(*(importlib.import_module(n).__file__ for n in {sorted(PACKAGES)!r}))",
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    rootfs = Path(
        subprocess.run(
            ["buildah", "mount", container], env=ENV, capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    )
    try:
        installed = {
            name: rootfs / Path(init).parent.relative_to("/")
            for name, init in zip(sorted(PACKAGES), where, strict=True)
        }
        in_image = _source_digests(installed)
    finally:
        subprocess.run(
            ["buildah", "umount", container], env=ENV, capture_output=True, timeout=60, check=False
        )
    here = _source_digests(PACKAGES)
    differ = sorted(k for k in here.keys() | in_image.keys() if here.get(k) != in_image.get(k))
    assert not differ, (
        f"{IMAGE} is not built from this checkout ({differ[:10]}): rebuild it, `make image-operator`"
    )


async def test_the_image_reconciles_a_distillationjob_against_kmock(
    container: str, kmock: Any, kubeconfig: Path, clients: Any, tmp_path: Path
) -> None:
    kube_dir = kubeconfig.parent
    os.chmod(kube_dir, 0o755)
    os.chmod(kubeconfig, 0o644)  # the container runs as 10001
    log = tmp_path / "operator-image.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *_run(
                container,
                "nnunet-distill-operator",
                "--all-namespaces",
                "--standalone",
                f"--kubeconfig={kubeconfig}",
                f"--metrics-port={_free_port()}",
                "--metrics-addr=127.0.0.1",
                f"--liveness-port={_free_port()}",
                "--log-level=info",
                volumes=(f"{kube_dir}:{kube_dir}:ro",),
            ),
            stdout=out,
            stderr=out,
            env=ENV,
            start_new_session=True,
        )
        try:
            await clients.create_dj(dj("image", preprocess={"mode": "Never"}))
            await wait_for(
                lambda: exists(kmock, job_key(kmock, "image-distill")),
                timeout=120,
                what="the operator in the image to create the Job",
            )
            job = get(kmock, job_key(kmock, "image-distill"))
            assert job["metadata"]["ownerReferences"][0]["kind"] == "DistillationJob"
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
