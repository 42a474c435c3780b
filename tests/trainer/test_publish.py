"""Publishing against real storage: a moto S3 server on loopback (started here), a fault-injecting HTTP proxy
in front of it (a real proxy forwarding to the real server: it only delays the truth with 503s or flips
bytes of responses), and obstore's LocalStore for file://.

Bad credentials: moto's server checks SigV4 signatures against its IAM backend once its
INITIAL_NO_AUTH_ACTION_COUNT is used up (set here through its `/moto-api/reset-auth` endpoint and put back
afterwards), so an unknown key id gets AWS's 403 InvalidAccessKeyId and a wrong secret for a real IAM key
gets 403 SignatureDoesNotMatch — the answers AWS gives.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest
from moto.server import ThreadedMotoServer
from nnunet_distill import publish as pub
from nnunet_distill.cli import publish as cli
from nnunet_distill import checksums, storage
from nnunet_distill.storage import PublishError, Reason, RetryPolicy

FAST = RetryPolicy(
    max_retries=2,
    init_backoff_s=0.05,
    max_backoff_s=0.2,
    retry_timeout_s=10,
    connect_timeout_s=1,
    attempts=3,
    attempt_backoff_s=0.05,
)
BIG = 6 * 1024 * 1024 + 123  # > 5 MiB: goes up as a multipart upload of two parts
SECRET = "SecretValueThatMustNeverBeLogged0123456789"


# ------------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def moto_endpoint():
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


def _s3(endpoint: str, key: str = "test", secret: str = "test"):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture()
def bucket(moto_endpoint, request):
    name = "models-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]
    _s3(moto_endpoint).create_bucket(Bucket=name)
    return name


def _env(endpoint: str, key: str = "test", secret: str = "test") -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "STORAGE_ALLOW_HTTP": "true",  # moto serves plain http: the explicit opt-in
    }


def _objects(endpoint: str, bucket: str) -> dict[str, dict]:
    out = {}
    for page in _s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = o
    return out


def _get(endpoint: str, bucket: str, key: str) -> bytes:
    return _s3(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


class FaultProxy:
    """HTTP proxy on 127.0.0.1 forwarding every request to the upstream server.

    `fail_first` requests get a 503 SlowDown instead; `corrupt(method, path, n)` decides whether the n-th
    response body for that path has a byte flipped on its way back. Records (method, path, status).
    """

    def __init__(self, upstream: str, fail_first: int = 0, corrupt=None):
        self.upstream = urlsplit(upstream)
        self.fail_first = fail_first
        self.corrupt = corrupt
        self.log: list[tuple[str, str, int]] = []
        self.rejected = 0
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    reject = proxy.rejected < proxy.fail_first
                    if reject:
                        proxy.rejected += 1
                if reject:
                    err = (
                        b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                        b"<Message>Slow down</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    proxy.log.append((self.command, self.path, 503))
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                hop = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                key = (self.command, self.path.split("?")[0])
                with proxy._lock:
                    n = proxy._seen.get(key, 0) + 1
                    proxy._seen[key] = n
                if data and proxy.corrupt is not None and proxy.corrupt(self.command, self.path, n):
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in hop:
                        self.send_header(k, v)
                self.send_header(
                    "Content-Length",
                    resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                proxy.log.append((self.command, self.path, resp.status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture()
def moto_auth(moto_endpoint):
    """Make moto check signatures from now on (and stop doing so afterwards)."""

    def set_count(value: str):
        req = urllib.request.Request(
            f"{moto_endpoint}/moto-api/reset-auth",
            data=value.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=5).read()

    yield lambda: set_count("0")
    set_count("inf")


# ------------------------------------------------------------------------------------------------ package


@pytest.fixture()
def package(tmp_path) -> Path:
    """A packaged model directory, its SHA256SUMS written by coreutils' own `sha256sum`."""
    root = tmp_path / "package"
    files = {
        "model_repository/student/1/model.onnx": os.urandom(BIG),
        "model_repository/student/config.pbtxt": b'name: "student"\nbackend: "onnxruntime"\n',
        "nnunet_inference.json": json.dumps({"patch_size": [32, 32, 32]}).encode(),
        "README.md": b"# student\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    sums = subprocess.run(["sha256sum", *sorted(files)], cwd=root, check=True, capture_output=True).stdout
    (root / "SHA256SUMS").write_bytes(sums)
    return root


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


FIXED_NOW = dt.datetime(2026, 11, 25, 13, 18, 34, tzinfo=dt.UTC)


# ------------------------------------------------------------------------------------------------- tests


def test_publish_to_s3_uploads_verifies_then_marks(moto_endpoint, bucket, package):
    with FaultProxy(moto_endpoint) as proxy:
        result = pub.publish(
            package, f"s3://{bucket}/liver/student", env=_env(proxy.url), policy=FAST, now=lambda: FIXED_NOW
        )

    sums = (package / "SHA256SUMS").read_bytes()
    version = f"20261125T131834Z-{hashlib.sha256(sums).hexdigest()[:12]}"
    assert result.version == version
    assert result.uri == f"s3://{bucket}/liver/student/{version}"
    assert result.model_path == "model_repository/student/1/model.onnx"
    onnx = (package / result.model_path).read_bytes()
    assert result.model_sha256 == hashlib.sha256(onnx).hexdigest()
    local = _local_files(package)
    assert result.total_bytes == sum(len(b) for b in local.values())
    assert (
        result.artifacts()["sha256"] == result.model_sha256
        and result.artifacts()["sizeBytes"] == result.total_bytes
    )

    objects = _objects(moto_endpoint, bucket)
    prefix = f"liver/student/{version}/"
    expected = {prefix + rel for rel in local} | {prefix + "_PUBLISHED", "liver/student/LATEST"}
    assert set(objects) == expected
    for rel, data in local.items():
        assert (
            hashlib.sha256(_get(moto_endpoint, bucket, prefix + rel)).digest()
            == hashlib.sha256(data).digest()
        )
    # the >5 MiB file went up as a multipart upload (S3 multipart ETags end in -<parts>)
    assert objects[prefix + result.model_path]["ETag"].strip('"').endswith("-2")

    marker = json.loads(_get(moto_endpoint, bucket, prefix + "_PUBLISHED"))
    assert marker["version"] == version and marker["uri"] == result.uri
    assert {f["path"]: (f["size"], f["sha256"]) for f in marker["files"]} == {
        rel: (len(d), hashlib.sha256(d).hexdigest()) for rel, d in local.items()
    }
    assert marker["model"]["sha256"] == result.model_sha256
    assert _get(moto_endpoint, bucket, "liver/student/LATEST").decode().strip() == version

    # order on the wire: every object read back before the marker is written, LATEST last
    puts = [p for m, p, s in proxy.log if m in ("PUT", "POST") and s < 300]
    gets = [i for i, (m, p, s) in enumerate(proxy.log) if m == "GET" and "/_PUBLISHED" not in p]
    marker_put = next(i for i, (m, p, _) in enumerate(proxy.log) if m == "PUT" and p.endswith("/_PUBLISHED"))
    latest_put = next(i for i, (m, p, _) in enumerate(proxy.log) if m == "PUT" and p.endswith("/LATEST"))
    assert gets and max(gets) < marker_put < latest_put == len(proxy.log) - 1
    assert any("uploadId=" in p for p in puts)  # multipart parts

    # a consumer following LATEST lands on the verified marker
    assert pub.resolve_latest(f"s3://{bucket}/liver/student", env=_env(moto_endpoint))["version"] == version


def test_transient_503s_are_retried_by_the_client(moto_endpoint, bucket, package):
    with FaultProxy(moto_endpoint, fail_first=3) as proxy:
        policy = RetryPolicy(max_retries=4, init_backoff_s=0.05, max_backoff_s=0.2, attempts=1)
        result = pub.publish(package, f"s3://{bucket}/m", env=_env(proxy.url), policy=policy)
    assert proxy.rejected == 3
    assert result.attempts == 1
    assert [s for _, _, s in proxy.log[:3]] == [503, 503, 503]
    assert _get(moto_endpoint, bucket, "m/LATEST").decode().strip() == result.version


def test_outer_retry_resends_after_client_retries_are_exhausted(moto_endpoint, bucket, package):
    policy = RetryPolicy(
        max_retries=1, init_backoff_s=0.05, max_backoff_s=0.1, attempts=3, attempt_backoff_s=0.05
    )
    with FaultProxy(moto_endpoint, fail_first=3) as proxy:
        result = pub.publish(package, f"s3://{bucket}/m", env=_env(proxy.url), policy=policy)
    assert proxy.rejected == 3
    assert result.attempts == 2  # 2 tries per request: attempt 1 fails on 503 503, attempt 2 gets through
    marker = json.loads(_get(moto_endpoint, bucket, f"m/{result.version}/_PUBLISHED"))
    assert marker["sha256sums"] == result.sha256sums_sha256


def test_read_back_mismatch_is_reuploaded(moto_endpoint, bucket, package):
    def corrupt_first_read(method, path, n):
        return method == "GET" and path.endswith("/README.md") and n == 1

    with FaultProxy(moto_endpoint, corrupt=corrupt_first_read) as proxy:
        result = pub.publish(package, f"s3://{bucket}/m", env=_env(proxy.url), policy=FAST)
    assert result.attempts == 2
    readme_puts = [p for m, p, s in proxy.log if m == "PUT" and p.endswith("/README.md")]
    assert len(readme_puts) == 2
    assert f"m/{result.version}/_PUBLISHED" in _objects(moto_endpoint, bucket)


def test_persistent_mismatch_fails_without_marker(moto_endpoint, bucket, package):
    def always(method, path, n):
        return method == "GET" and path.endswith("/model.onnx")

    with FaultProxy(moto_endpoint, corrupt=always) as proxy, pytest.raises(PublishError) as info:
        pub.publish(package, f"s3://{bucket}/m", env=_env(proxy.url), policy=FAST)
    assert info.value.reason == Reason.VERIFICATION_FAILED
    assert "model.onnx" in str(info.value) and "3 attempts" in str(info.value)
    objects = _objects(moto_endpoint, bucket)
    assert not any(k.endswith(("_PUBLISHED", "LATEST")) for k in objects)
    assert objects == {}  # the partial version was removed as well


def test_unknown_access_key_is_invalid_credentials(moto_endpoint, bucket, package, moto_auth):
    moto_auth()
    t = time.monotonic()
    with pytest.raises(PublishError) as info:
        pub.publish(
            package, f"s3://{bucket}/m", env=_env(moto_endpoint, key="AKIAUNKNOWN0000000", secret=SECRET)
        )
    assert time.monotonic() - t < 10  # a 403 is not retried
    assert info.value.reason == Reason.INVALID_CREDENTIALS
    assert "InvalidAccessKeyId" in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)
    assert SECRET not in str(info.value)


def test_wrong_secret_is_invalid_credentials_and_right_one_works(moto_endpoint, bucket, package, moto_auth):
    iam = boto3.client(
        "iam",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    user = f"publisher-{bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                        "Resource": f"arn:aws:s3:::{bucket}/*",
                    }
                ],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    moto_auth()

    with pytest.raises(PublishError) as info:
        pub.publish(package, f"s3://{bucket}/m", env=_env(moto_endpoint, key["AccessKeyId"], SECRET))
    assert info.value.reason == Reason.INVALID_CREDENTIALS
    assert "SignatureDoesNotMatch" in str(info.value) and SECRET not in str(info.value)

    # the same signing code path, with the real secret, satisfies moto's SigV4 check (put+get only, no list)
    result = pub.publish(
        package,
        f"s3://{bucket}/m",
        env=_env(moto_endpoint, key["AccessKeyId"], key["SecretAccessKey"]),
        policy=FAST,
    )
    assert result.uri.startswith(f"s3://{bucket}/m/")


def test_missing_bucket(moto_endpoint, package):
    with pytest.raises(PublishError) as info:
        pub.publish(package, "s3://no-such-bucket/m", env=_env(moto_endpoint), policy=FAST)
    assert info.value.reason == Reason.BUCKET_NOT_FOUND
    assert "'no-such-bucket'" in str(info.value) and moto_endpoint in str(info.value)


def test_unreachable_endpoint_fails_fast_with_default_policy(package):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(PublishError) as info:
        pub.publish(package, "s3://models/m", env=_env(f"http://127.0.0.1:{port}"))
    elapsed = time.monotonic() - t
    assert info.value.reason == Reason.ENDPOINT_UNREACHABLE
    assert f"127.0.0.1:{port}" in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)
    assert elapsed < 15, elapsed  # bounded client retries, no outer retry for a never-reached endpoint


def test_damaged_package_is_refused_before_any_request(moto_endpoint, bucket, package):
    (package / "README.md").write_bytes(b"# tampered\n")
    with FaultProxy(moto_endpoint) as proxy, pytest.raises(PublishError) as info:
        pub.publish(package, f"s3://{bucket}/m", env=_env(proxy.url), policy=FAST)
    assert info.value.reason == Reason.PACKAGE_DAMAGED and "README.md" in str(info.value)
    assert proxy.log == []


@pytest.mark.parametrize("damage", ["unlisted", "missing", "no-sums", "escape"])
def test_inconsistent_packages_are_refused(package, damage):
    if damage == "unlisted":
        (package / "extra.bin").write_bytes(b"x")
    elif damage == "missing":
        (package / "nnunet_inference.json").unlink()
    elif damage == "no-sums":
        (package / "SHA256SUMS").unlink()
    else:
        with open(package / "SHA256SUMS", "a") as fh:
            fh.write(f"{'0' * 64}  ../outside\n")
    with pytest.raises(PublishError) as info:
        pub.verify_package(package)
    assert info.value.reason == Reason.PACKAGE_DAMAGED


def test_file_uri_publish(package, tmp_path):
    dest = tmp_path / "store" / "models"
    result = pub.publish(package, f"file://{dest}", policy=FAST, now=lambda: FIXED_NOW)
    version_dir = dest / result.version
    assert _local_files(version_dir) == {
        **_local_files(package),
        "_PUBLISHED": (version_dir / "_PUBLISHED").read_bytes(),
    }
    assert (dest / "LATEST").read_text().strip() == result.version
    assert pub.resolve_latest(f"file://{dest}")["files"][-1]["path"] == "SHA256SUMS"
    # publishing again from the same files (a retried stage) at a later time makes a second, complete version
    again = pub.publish(
        package, f"file://{dest}", policy=FAST, now=lambda: FIXED_NOW + dt.timedelta(minutes=5)
    )
    assert again.version != result.version and (dest / again.version / "_PUBLISHED").is_file()
    assert (dest / "LATEST").read_text().strip() == again.version


# ---------------------------------------------------------------------------------------------- pure parts


def test_sha256sums_parsing():
    a, b = "a" * 64, "B" * 64
    assert checksums.parse_sha256sums(f"{a}  dir/x.onnx\n{b} *./y.json\n\n") == [
        (a, "dir/x.onnx"),
        (b.lower(), "y.json"),
    ]
    for bad in ("nonsense\n", f"{a}  /etc/passwd\n", f"{a}  x\n{a}  x\n", ""):
        with pytest.raises(checksums.ChecksumError):
            checksums.parse_sha256sums(bad)


def test_version_name_is_deterministic_and_sortable():
    v1 = pub.version_name(b"sums", FIXED_NOW)
    assert v1 == pub.version_name(b"sums", FIXED_NOW.astimezone(dt.timezone(dt.timedelta(hours=2))))
    assert v1 != pub.version_name(b"other", FIXED_NOW)
    assert v1 < pub.version_name(b"sums", FIXED_NOW + dt.timedelta(seconds=1))


def test_part_size_respects_s3_limits():
    assert storage.part_size(10) >= storage.MIN_PART_BYTES
    huge = 200 * 1024**3
    assert -(-huge // storage.part_size(huge)) <= storage.MAX_PARTS


def test_uri_parsing_and_store_options():
    t = storage.parse_uri("s3://bkt/a/b/")
    assert (t.bucket, t.prefix, t.base) == ("bkt", "a/b", "s3://bkt/a/b")
    for bad in ("bkt/a", "http://x/y", "s3:///a", "file://relative/x", "s3://b/p?x=1"):
        with pytest.raises(PublishError) as info:
            storage.parse_uri(bad)
        assert info.value.reason == Reason.INVALID_URI
    cfg, client = storage.store_options(t, {**_env("http://minio:9000"), "AWS_PROFILE": "ignored"}, FAST)
    assert cfg["aws_virtual_hosted_style_request"] == "false" and client["allow_http"] is True
    assert "aws_profile" not in cfg
    cfg, client = storage.store_options(t, {"AWS_REGION": "eu-west-1"}, FAST)
    assert "allow_http" not in client and "aws_virtual_hosted_style_request" not in cfg
    cfg, client = storage.store_options(t, {"AWS_ENDPOINT_URL": "https://minio:9000"}, FAST)
    assert "allow_http" not in client and cfg["aws_endpoint_url"] == "https://minio:9000"


@pytest.mark.parametrize(
    "uri,env",
    [
        ("s3://bkt/m", {"AWS_ENDPOINT_URL": "http://minio:9000"}),
        ("gs://bkt/m", {"GOOGLE_BASE_URL": "http://gcs:4443"}),
        ("az://models/m", {"AZURE_STORAGE_ENDPOINT": "http://azurite:10000/devstoreaccount1"}),
        ("az://models/m", {"AZURE_STORAGE_USE_EMULATOR": "true"}),
    ],
)
def test_plain_http_endpoints_need_the_explicit_opt_in(uri, env, package):
    """An http:// endpoint alone is refused before any request; STORAGE_ALLOW_HTTP=true lets it through."""
    with pytest.raises(PublishError) as info:
        pub.publish(package, uri, env=env, policy=FAST)
    assert info.value.reason == Reason.INSECURE_ENDPOINT and "STORAGE_ALLOW_HTTP=true" in str(info.value)
    _, client = storage.store_options(storage.parse_uri(uri), {**env, "STORAGE_ALLOW_HTTP": "true"}, FAST)
    assert client["allow_http"] is True


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_success_prints_json_and_writes_termination_message(
    moto_endpoint, bucket, package, tmp_path, monkeypatch, capsys
):
    term = tmp_path / "termination-log"
    for k, v in {**_env(moto_endpoint), "TERMINATION_MESSAGE_PATH": str(term)}.items():
        monkeypatch.setenv(k, v)
    assert cli.main([str(package), f"s3://{bucket}/cli"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["uri"].startswith(f"s3://{bucket}/cli/") and out["totalBytes"] > BIG
    summary = json.loads(term.read_text())
    assert summary["ok"] is True and summary["artifacts"]["uri"] == out["uri"]
    assert summary["artifacts"]["sha256"] == out["modelSha256"]


def test_cli_failure_is_one_line_without_traceback(moto_endpoint, package, tmp_path):
    term = tmp_path / "termination-log"
    env = {**os.environ, **_env(moto_endpoint, secret=SECRET), "TERMINATION_MESSAGE_PATH": str(term)}
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_distill.cli.publish", str(package), "s3://absent-bucket/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet-distill publish: error: BucketNotFound:"), (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr
    assert json.loads(term.read_text())["error"]["reason"] == "BucketNotFound"

    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_distill.cli.publish", str(package), "ftp://x/y"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "InvalidURI" in proc.stderr


def test_cli_parser_contract():
    args = cli.build_parser().parse_args(["/pkg", "s3://b/p"])
    assert (args.package_dir, args.uri) == ("/pkg", "s3://b/p")
