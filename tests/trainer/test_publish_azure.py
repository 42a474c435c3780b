"""az:// publishing end to end against Azurite, Microsoft's Azure Storage emulator, started here from npm.

Azurite is pinned in tools/azurite/package.json (3.35.0, the newest release that runs on Node 20) and
installed by `make tools` / `.ci/run` (`npm ci --prefix tools/azurite`). It checks SharedKey signatures like
Azure does, so a wrong account key gets Azure's own 403, and a missing container Azure's own
ContainerNotFound.

The operator side is exercised too: the publish Job the operator renders for an az:// output names the Secret
keys it reads; the test fills exactly those keys, resolves them the way the kubelet does, and runs the publish
CLI with the result as its whole storage environment.

gs:// has no such test: no GCS emulator available here accepts obstore's uploads (see README, "Object
storage").
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from nnunet_distill import publish as pub
from nnunet_distill import storage
from nnunet_distill.storage import PublishError, Reason, RetryPolicy

REPO = Path(__file__).resolve().parents[2]
AZURITE = Path(
    os.environ.get("AZURITE_BIN", REPO / "tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob")
)
# Azurite's well-known development account (documented by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
FAST = RetryPolicy(
    max_retries=1,
    init_backoff_s=0.05,
    max_backoff_s=0.2,
    retry_timeout_s=10,
    connect_timeout_s=2,
    attempts=2,
    attempt_backoff_s=0.05,
)
BIG = 6 * 1024 * 1024 + 77  # > 5 MiB: goes up as blocks + a block list


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def azurite(tmp_path_factory) -> str:
    """Blob endpoint of a fresh Azurite (in a temporary workspace), e.g. http://127.0.0.1:PORT."""
    if not AZURITE.exists():
        message = f"{AZURITE} is missing: run `make tools` (npm ci --prefix tools/azurite)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): its absence there is a failure, not a skip
        pytest.skip(message)
    if shutil.which("node") is None:
        pytest.fail("Azurite is installed but node is not on PATH")
    port = _free_port()
    workspace = tmp_path_factory.mktemp("azurite")
    with open(workspace / "azurite.log", "w") as log:
        proc = subprocess.Popen(
            [
                str(AZURITE),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(port),
                "--location",
                str(workspace),
                "--silent",
                "--disableProductStyleUrl",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(
                        f"Azurite did not start: {(workspace / 'azurite.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
        proc.terminate()
        proc.wait(10)


def _signed(
    method: str, endpoint: str, path: str, query: dict[str, str], body: bytes = b""
) -> urllib.request.Request:
    """A request signed with Azure's SharedKey scheme (what the Azure SDKs send), for test setup and
    checks."""
    headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canon_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    canon_resource = f"/{ACCOUNT}/{ACCOUNT}/{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    length = str(len(body)) if body else ""
    to_sign = f"{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n{canon_headers}{canon_resource}"
    sig = base64.b64encode(
        hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    url = f"{endpoint}/{ACCOUNT}/{path}" + (
        "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
    )
    req = urllib.request.Request(
        url,
        data=body or None,
        method=method,
        headers={**headers, "Authorization": f"SharedKey {ACCOUNT}:{sig}"},
    )
    return req


def _create_container(endpoint: str, name: str) -> None:
    urllib.request.urlopen(_signed("PUT", endpoint, name, {"restype": "container"}), timeout=10).read()


def _get_blob(endpoint: str, container: str, blob: str) -> bytes:
    return urllib.request.urlopen(_signed("GET", endpoint, f"{container}/{blob}", {}), timeout=30).read()


def _list_blobs(endpoint: str, container: str) -> list[str]:
    xml = (
        urllib.request.urlopen(
            _signed("GET", endpoint, container, {"comp": "list", "restype": "container"}), timeout=10
        )
        .read()
        .decode()
    )
    return sorted(part.split("</Name>")[0] for part in xml.split("<Name>")[1:])


@pytest.fixture()
def container(azurite, request) -> str:
    name = "models-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]
    _create_container(azurite, name)
    return name


@pytest.fixture()
def package(tmp_path) -> Path:
    root = tmp_path / "package"
    files = {
        "model_repository/student/1/model.onnx": os.urandom(BIG),
        "model_repository/student/config.pbtxt": b'name: "student"\nbackend: "onnxruntime"\n',
        "nnunet_inference.json": json.dumps({"patch_size": [32, 32, 32]}).encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    sums = subprocess.run(["sha256sum", *sorted(files)], cwd=root, check=True, capture_output=True).stdout
    (root / "SHA256SUMS").write_bytes(sums)
    return root


def _env(endpoint: str, key: str = KEY) -> dict[str, str]:
    return {
        "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
        "AZURE_STORAGE_ACCOUNT_KEY": key,
        "AZURE_STORAGE_ENDPOINT": f"{endpoint}/{ACCOUNT}",
        "STORAGE_ALLOW_HTTP": "true",
    }


def test_publish_to_azurite_uploads_verifies_then_marks(azurite, container, package):
    now = dt.datetime(2026, 11, 25, 13, 18, 34, tzinfo=dt.UTC)
    result = pub.publish(
        package, f"az://{container}/liver/student", env=_env(azurite), policy=FAST, now=lambda: now
    )
    prefix = f"liver/student/{result.version}/"
    local = {p.relative_to(package).as_posix(): p.read_bytes() for p in package.rglob("*") if p.is_file()}
    assert result.uri == f"az://{container}/liver/student/{result.version}"
    assert _list_blobs(azurite, container) == sorted(
        [prefix + rel for rel in local] + [prefix + "_PUBLISHED", "liver/student/LATEST"]
    )
    for rel, data in local.items():  # read back through Azure's own REST API, not through obstore
        assert (
            hashlib.sha256(_get_blob(azurite, container, prefix + rel)).digest()
            == hashlib.sha256(data).digest()
        )
    marker = json.loads(_get_blob(azurite, container, prefix + "_PUBLISHED"))
    assert (
        marker["model"]["sha256"]
        == hashlib.sha256(local["model_repository/student/1/model.onnx"]).hexdigest()
    )
    assert _get_blob(azurite, container, "liver/student/LATEST").decode().strip() == result.version
    assert (
        pub.resolve_latest(f"az://{container}/liver/student", env=_env(azurite))["version"] == result.version
    )


def test_wrong_account_key_is_invalid_credentials(azurite, container, package):
    wrong = base64.b64encode(b"not the account key, but 64 bytes long enough for an hmac key....").decode()
    with pytest.raises(PublishError) as info:
        pub.publish(package, f"az://{container}/m", env=_env(azurite, key=wrong), policy=FAST)
    assert info.value.reason == Reason.INVALID_CREDENTIALS and info.value.http_status == 403
    assert wrong not in str(info.value)


def test_missing_container_is_bucket_not_found(azurite, package):
    with pytest.raises(PublishError) as info:
        pub.publish(package, "az://no-such-container/m", env=_env(azurite), policy=FAST)
    assert info.value.reason == Reason.BUCKET_NOT_FOUND and "'no-such-container'" in str(info.value)


def test_plain_http_azurite_is_refused_without_the_opt_in(azurite, container, package):
    env = {k: v for k, v in _env(azurite).items() if k != "STORAGE_ALLOW_HTTP"}
    with pytest.raises(PublishError) as info:
        pub.publish(package, f"az://{container}/m", env=env, policy=FAST)
    assert info.value.reason == Reason.INSECURE_ENDPOINT
    assert _list_blobs(azurite, container) == []


def test_emulator_mode_works_too(azurite, container, package, monkeypatch):
    """AZURE_STORAGE_USE_EMULATOR: obstore's own Azurite mode (account and key implied, URL from the process
    env)."""
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite)
    env = {"AZURE_STORAGE_USE_EMULATOR": "true", "STORAGE_ALLOW_HTTP": "true"}
    result = pub.publish(package, f"az://{container}/emu", env=env, policy=FAST)
    assert f"emu/{result.version}/_PUBLISHED" in _list_blobs(azurite, container)


def test_operator_secret_mapping_publishes_to_azurite(azurite, container, package, tmp_path):
    """The publish Job the operator renders for an az:// output, its Secret keys resolved like the kubelet
    does."""
    from nnunet_distill_operator import api, k8s, plan

    owner = k8s.Owner("liver", "ml", "0b5e5a0e-1111-2222-3333-444455556666")
    spec = api.parse_spec(
        {
            "dataset": {"id": 27},
            "storage": {"claimName": "data"},
            "output": {"uri": f"az://{container}/liver", "secretRef": {"name": "azure"}},
        }
    )
    paths = plan.DataPaths.in_pod(owner.name)
    stage = next(s for s in plan.plan(spec, name=owner.name, paths=paths) if s.name == "publish")
    job = k8s.job_for(stage, owner=owner, spec=spec, paths=paths, defaults=k8s.Defaults(image="trainer:1"))
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for c in job["spec"]["template"]["spec"]["containers"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {"AZURE_STORAGE_ENDPOINT", "STORAGE_ALLOW_HTTP"} <= set(refs)
    secret = _env(azurite)  # what a user would put into the Secret "azure"
    assert all(r["name"] == "azure" and (r.get("optional") or r["key"] in secret) for r in refs.values())
    pod_env = {name: secret[r["key"]] for name, r in refs.items() if r["key"] in secret}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE", "AZURITE", "STORAGE_"))}
    term = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_distill.cli.publish", str(package), f"az://{container}/liver"],
        env={**base_env, **pod_env, "TERMINATION_MESSAGE_PATH": str(term)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uri"].startswith(f"az://{container}/liver/")
    assert f"liver/{out['version']}/_PUBLISHED" in _list_blobs(azurite, container)
    assert json.loads(term.read_text())["artifacts"]["uri"] == out["uri"]


def test_gcs_configuration_mapping():
    """gs:// has no working emulator here (README): the configuration obstore receives is checked instead."""
    key = json.dumps({"type": "service_account", "client_email": "p@x.iam.gserviceaccount.com"})
    target = storage.parse_uri("gs://models/liver")
    cfg, client = storage.store_options(
        target, {"GOOGLE_SERVICE_ACCOUNT_KEY": key, "AWS_REGION": "ignored"}, FAST
    )
    assert cfg == {"google_service_account_key": key} and "allow_http" not in client
    cfg, client = storage.store_options(
        target,
        {
            "GOOGLE_SERVICE_ACCOUNT_KEY": key,
            "GOOGLE_BASE_URL": "http://gcs.test:4443",
            "STORAGE_ALLOW_HTTP": "true",
        },
        FAST,
    )
    assert cfg["google_base_url"] == "http://gcs.test:4443" and client["allow_http"] is True
    with pytest.raises(PublishError) as info:
        storage.store_options(target, {"GOOGLE_BASE_URL": "http://gcs.test:4443"}, FAST)
    assert info.value.reason == Reason.INSECURE_ENDPOINT
    from nnunet_distill_operator import k8s

    names = {var for var, _ in k8s.CREDENTIAL_ENV["gs"]}
    assert {"GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_BASE_URL", "STORAGE_ALLOW_HTTP"} <= names
    # every key the operator maps is one publish reads (the allow-http switch is read on its own)
    for scheme in ("s3", "gs", "az"):
        for var, _ in k8s.CREDENTIAL_ENV[scheme]:
            assert var == storage.ALLOW_HTTP_ENV or var in storage._ENV_KEYS[scheme], (scheme, var)
        assert storage.ENDPOINT_NAME[scheme] in {v for v, _ in k8s.CREDENTIAL_ENV[scheme]}
