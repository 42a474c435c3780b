"""Object storage for the publisher: destination URIs, obstore configuration from the standard environment
variables, error classification (one line, never a secret) and opening the store; the puts, read-backs
and deletes of one publish are in :mod:`nnunet_distill.store_session`.

Credentials come only from the standard environment variables (for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`; `GOOGLE_*` for `gs://`,
`AZURE_*` for `az://`), as a Kubernetes `secretKeyRef` sets them. Each scheme has one endpoint variable for
self-hosted or emulated stores (`AWS_ENDPOINT_URL`, `GOOGLE_BASE_URL`, `AZURE_STORAGE_ENDPOINT`); a plain
`http://` endpoint is refused unless `STORAGE_ALLOW_HTTP=true` is set as well, so credentials never travel
unencrypted because of a typo in a URL.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest allowed multipart part (except the last)
MAX_PARTS = 10_000  # S3's largest number of parts in one multipart upload
SUPPORTED_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "file")


class Reason:
    """Failure reasons: stable strings the operator copies into the publish stage's condition."""

    PACKAGE_DAMAGED = "PackageDamaged"
    INVALID_URI = "InvalidURI"
    INVALID_CREDENTIALS = "InvalidCredentials"
    PERMISSION_DENIED = "PermissionDenied"
    BUCKET_NOT_FOUND = "BucketNotFound"
    ENDPOINT_UNREACHABLE = "EndpointUnreachable"
    VERIFICATION_FAILED = "VerificationFailed"
    UPLOAD_FAILED = "UploadFailed"
    NOT_PUBLISHED = "NotPublished"
    INSECURE_ENDPOINT = "InsecureEndpoint"


class PublishError(Exception):
    """A classified publish failure; `reason` is one of `Reason`, `str()` is one line without secrets.

    `transient` says whether trying the same request again could help (5xx, dropped connections,
    a read-back mismatch); the outer retry only repeats transient failures.
    """

    def __init__(self, reason: str, message: str, *, transient: bool = False, http_status: int | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.transient = transient
        self.http_status = http_status


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. Defaults fail an unreachable endpoint within seconds but ride out brief outages.

    The first five fields configure obstore's per-request retry; `attempts` bounds the outer retry that
    re-sends whole files (only after the endpoint has answered at least once, so a wrong endpoint fails fast).
    """

    max_retries: int = 4
    init_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    retry_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 300.0
    attempts: int = 3
    attempt_backoff_s: float = 1.0

    def obstore_retry_config(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "retry_timeout": _dt.timedelta(seconds=self.retry_timeout_s),
            "backoff": {
                "init_backoff": _dt.timedelta(seconds=self.init_backoff_s),
                "max_backoff": _dt.timedelta(seconds=self.max_backoff_s),
                "base": 2,
            },
        }


def part_size(size: int) -> int:
    """Multipart chunk size: S3's 5 MiB minimum, larger only when needed to stay within 10 000 parts."""
    return max(MIN_PART_BYTES, -(-size // MAX_PARTS))


@dataclass(frozen=True)
class Target:
    """A parsed destination URI; `base` is the URI of the prefix (no trailing slash)."""

    scheme: str
    bucket: str  # bucket / container, or the root directory for file://
    prefix: str  # key prefix inside the bucket, '' for the bucket root
    base: str

    def uri_of(self, key: str) -> str:
        return f"{self.base}/{key}"


def parse_uri(uri: str) -> Target:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise PublishError(
            Reason.INVALID_URI,
            f"URI {uri!r} must start with s3://, gs://, az:// or file:// (bucket/prefix follows)",
        )
    if parts.query or parts.fragment:
        raise PublishError(Reason.INVALID_URI, f"URI {_redact(uri)!r} must not carry a query or fragment")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise PublishError(Reason.INVALID_URI, f"file URI {uri!r} must be absolute: file:///path/to/dir")
        root = parts.path.rstrip("/") or "/"
        return Target("file", root, "", f"file://{root.rstrip('/')}")
    if not parts.netloc:
        raise PublishError(Reason.INVALID_URI, f"URI {uri!r} names no bucket: use {scheme}://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    base = f"{scheme}://{parts.netloc}" + (f"/{prefix}" if prefix else "")
    return Target(scheme, parts.netloc, prefix, base)


# Env vars each store understands (from obstore's documented configuration); bucket names come from the URI.
_ENV_KEYS: dict[str, tuple[str, ...]] = {
    "s3": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_STS_ENDPOINT",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_SERVER_SIDE_ENCRYPTION",
        "AWS_SSE_KMS_KEY_ID",
        "AWS_SSE_BUCKET_KEY_ENABLED",
        "AWS_REQUEST_PAYER",
        "AWS_SKIP_SIGNATURE",
        "AWS_UNSIGNED_PAYLOAD",
        "AWS_IMDSV1_FALLBACK",
        "AWS_METADATA_ENDPOINT",
        "AWS_S3_EXPRESS",
    ),
    "gs": (
        "GOOGLE_SERVICE_ACCOUNT",
        "GOOGLE_SERVICE_ACCOUNT_PATH",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_BASE_URL",
        "GOOGLE_BEARER_TOKEN",
        "GOOGLE_SKIP_SIGNATURE",
    ),
    "az": (
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_MASTER_KEY",
        "AZURE_STORAGE_CLIENT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_STORAGE_CLIENT_SECRET",
        "AZURE_CLIENT_SECRET",
        "AZURE_STORAGE_TENANT_ID",
        "AZURE_TENANT_ID",
        "AZURE_STORAGE_AUTHORITY_ID",
        "AZURE_AUTHORITY_ID",
        "AZURE_AUTHORITY_HOST",
        "AZURE_STORAGE_AUTHORITY_HOST",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_TOKEN",
        "AZURE_STORAGE_USE_EMULATOR",
        "AZURE_STORAGE_ENDPOINT",
        "AZURE_ENDPOINT",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_USE_AZURE_CLI",
        "AZURE_MSI_ENDPOINT",
        "AZURE_IDENTITY_ENDPOINT",
        "AZURE_OBJECT_ID",
        "AZURE_MSI_RESOURCE_ID",
        "AZURE_SKIP_SIGNATURE",
    ),
}
_FAMILY = {"s3": "s3", "s3a": "s3", "gs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
_CREDENTIAL_HINT = {
    "s3": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the storage secret",
    "gs": "check GOOGLE_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS in the storage secret",
    "az": "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (or the SAS token) in the secret",
    "file": "check that the directory is writable by the pod's user",
}


# The variable naming each family's endpoint (first one set wins), as obstore reads them.
ENDPOINT_ENV: dict[str, tuple[str, ...]] = {
    "s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "gs": ("GOOGLE_BASE_URL",),
    "az": ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"),
}
# The one the operator passes from the storage secret (the others work too when set by hand).
ENDPOINT_NAME = {"s3": "AWS_ENDPOINT_URL", "gs": "GOOGLE_BASE_URL", "az": "AZURE_STORAGE_ENDPOINT"}
# Plain http (no TLS) needs this set to true, whatever the endpoint says: an explicit opt-in.
ALLOW_HTTP_ENV = "STORAGE_ALLOW_HTTP"
AZURITE_DEFAULT_URL = "http://127.0.0.1:10000"  # what obstore uses with AZURE_STORAGE_USE_EMULATOR


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def endpoint_of(env: Mapping[str, str], family: str = "s3") -> str | None:
    """The custom endpoint configured for a family, or None for the provider's public endpoint."""
    for key in ENDPOINT_ENV.get(family, ()):
        if env.get(key):
            return env[key]
    if family == "az" and _truthy(env.get("AZURE_STORAGE_USE_EMULATOR")):
        # obstore reads AZURITE_BLOB_STORAGE_URL from the process environment in emulator mode
        return (
            env.get("AZURITE_BLOB_STORAGE_URL")
            or os.environ.get("AZURITE_BLOB_STORAGE_URL")
            or AZURITE_DEFAULT_URL
        )
    return None


def store_options(
    target: Target, env: Mapping[str, str], policy: RetryPolicy
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(store config, client options) for obstore from the standard env vars.

    A custom S3 endpoint (MinIO, Ceph, moto, …) gets path-style requests unless
    AWS_VIRTUAL_HOSTED_STYLE_REQUEST says otherwise. Plain http is allowed only when STORAGE_ALLOW_HTTP is
    true; an http:// endpoint without it is refused (InsecureEndpoint) before any request is sent.
    """
    family = _FAMILY.get(target.scheme, target.scheme)
    config = {k.lower(): env[k] for k in _ENV_KEYS.get(family, ()) if env.get(k)}
    client: dict[str, Any] = {
        "connect_timeout": _dt.timedelta(seconds=policy.connect_timeout_s),
        "timeout": _dt.timedelta(seconds=policy.request_timeout_s),
    }
    endpoint = endpoint_of(env, family)
    allow_http = _truthy(env.get(ALLOW_HTTP_ENV))
    if endpoint and endpoint.lower().startswith("http://") and not allow_http:
        raise PublishError(
            Reason.INSECURE_ENDPOINT,
            f"the {family} endpoint {_redact(endpoint)} is plain http; use https, or set "
            f"{ALLOW_HTTP_ENV}=true in the storage secret to allow unencrypted transfers (test and "
            "in-cluster stores only)",
        )
    if allow_http:
        client["allow_http"] = True
    if family == "s3" and endpoint:
        if "aws_virtual_hosted_style_request" not in config:
            config["aws_virtual_hosted_style_request"] = "false"
        if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
            config["aws_region"] = "us-east-1"  # MinIO & co. accept any region; SigV4 needs one
    return config, client


_URL_RE = re.compile(r"(https?://[^\s?#]+)\?[^\s]*")
_CODE_RE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_STATUS_RE = re.compile(r"(?:status code: |status: )(\d{3})")

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "AuthenticationFailed",
    "InvalidAuthenticationInfo",
    "NoAuthenticationInformation",
    "AccountIsDisabled",
}
_PERMISSION_CODES = {
    "AccessDenied",
    "AuthorizationPermissionMismatch",
    "AuthorizationFailure",
    "AllAccessDisabled",
}
_BUCKET_CODES = {"NoSuchBucket", "ContainerNotFound", "ContainerBeingDeleted", "ResourceNotFound"}
_UNREACHABLE_HINTS = (
    "error sending request",
    "connection refused",
    "dns error",
    "failed to lookup address",
    "connect",
    "tcp connect error",
    "timed out",
    "operation timed out",
    "no route to host",
)


def is_missing_object(exc: BaseException) -> bool:
    """A 404 for the object itself, not for its bucket (both arrive as FileNotFoundError)."""
    code = _CODE_RE.search(str(exc))
    return code is None or code.group(1) not in _BUCKET_CODES


def _redact(text: str) -> str:
    """Drop query strings from URLs (SAS tokens and presigned signatures live there)."""
    return _URL_RE.sub(r"\1?…", text)


@dataclass(frozen=True)
class _Failure:
    """What an exception says, parsed once: the service's error code and HTTP status, where it happened."""

    text: str
    type_name: str
    code: str | None
    status: int | None
    family: str
    where: str
    hint: str
    endpoint: str | None

    @property
    def detail(self) -> str:
        if self.status and self.code:
            return f"{self.status} {self.code}"
        return self.code or (str(self.status) if self.status else "")


def _failure_of(
    exc: BaseException, target: Target, env: Mapping[str, str], action: str, key: str
) -> _Failure:
    text = str(exc)
    code_m, status_m = _CODE_RE.search(text), _STATUS_RE.search(text)
    family = _FAMILY.get(target.scheme, target.scheme)
    return _Failure(
        text=text,
        type_name=type(exc).__name__,
        code=code_m.group(1) if code_m else None,
        status=int(status_m.group(1)) if status_m else None,
        family=family,
        where=f"{action} {target.uri_of(key)}",
        hint=_CREDENTIAL_HINT.get(family, ""),
        endpoint=endpoint_of(env, family),
    )


def _service_refusal(f: _Failure, target: Target) -> PublishError | None:
    """The service answered and refused: no such bucket, bad credentials, access denied."""
    code, status, where, detail = f.code, f.status, f.where, f.detail
    if code in _BUCKET_CODES or (
        status == 404 and "bucket" in f.text.lower() and "does not exist" in f.text.lower()
    ):
        return PublishError(
            Reason.BUCKET_NOT_FOUND,
            f"bucket {target.bucket!r} does not exist{' at ' + f.endpoint if f.endpoint else ''} "
            f"({where}: {detail}); "
            "create it or fix the URI",
            http_status=status,
        )
    if code in _CREDENTIAL_CODES or f.type_name == "UnauthenticatedError" or status == 401:
        return PublishError(
            Reason.INVALID_CREDENTIALS,
            f"the storage service rejected the credentials ({where}: {detail}); {f.hint}",
            http_status=status,
        )
    if code in _PERMISSION_CODES or f.type_name == "PermissionDeniedError" or status == 403:
        return PublishError(
            Reason.INVALID_CREDENTIALS if f.family != "file" else Reason.PERMISSION_DENIED,
            f"access denied ({where}: {detail or 'forbidden'}); {f.hint} and that they may put and get "
            "objects under the prefix",
            http_status=status,
        )
    return None


def _no_answer(f: _Failure, exc: BaseException, target: Target) -> PublishError | None:
    """No service answer: a local permission error, no credentials found, or an endpoint out of reach."""
    if isinstance(exc, PermissionError):
        return PublishError(Reason.PERMISSION_DENIED, f"permission denied ({f.where}); {f.hint}")
    lowered = f.text.lower()
    if f.status is None and any(
        h in lowered for h in ("credential", "imds", "missing secretaccesskey", "missing accesskey")
    ):
        return PublishError(
            Reason.INVALID_CREDENTIALS,
            f"no usable credentials for {target.base} ({f.where}); {f.hint}",
        )
    if f.status is None and any(h in lowered for h in _UNREACHABLE_HINTS):
        target_host = f.endpoint or f"the {f.family} service"
        return PublishError(
            Reason.ENDPOINT_UNREACHABLE,
            f"cannot reach {target_host} ({f.where}); check {ENDPOINT_NAME[f.family]} and the network path"
            if f.family in ENDPOINT_NAME
            else f"cannot reach {target_host} ({f.where}); check the network path",
        )
    return None


def classify(
    exc: BaseException, *, target: Target, env: Mapping[str, str], action: str, key: str
) -> PublishError:
    """Map an obstore/OS exception to a PublishError with a reason and a one-line, secret-free message."""
    if isinstance(exc, PublishError):
        return exc
    f = _failure_of(exc, target, env, action, key)
    known = _service_refusal(f, target) or _no_answer(f, exc, target)
    if known is not None:
        return known
    status = f.status
    transient = status is None or status >= 500 or status in (408, 429)
    first_line = _redact(f.text.splitlines()[0] if f.text else f.type_name)[:200]
    return PublishError(
        Reason.UPLOAD_FAILED,
        f"{f.where} failed: {f.detail or f.type_name} ({first_line})",
        transient=transient,
        http_status=status,
    )


def open_store(target: Target, env: Mapping[str, str], policy: RetryPolicy) -> Any:
    """An obstore store rooted at the target prefix (keys below are relative to it)."""
    from obstore.store import LocalStore, from_url

    if target.scheme == "file":
        try:
            return LocalStore(prefix=target.bucket, mkdir=True)
        except Exception as exc:  # noqa: BLE001 - obstore raises plain exceptions for mkdir failures
            raise PublishError(
                Reason.PERMISSION_DENIED, f"cannot create directory {target.bucket}: {type(exc).__name__}"
            ) from None
    config, client = store_options(target, env, policy)
    url = f"{target.scheme}://{target.bucket}" + (f"/{target.prefix}" if target.prefix else "")
    try:
        return from_url(url, config=config, client_options=client, retry_config=policy.obstore_retry_config())
    except Exception as exc:  # noqa: BLE001 - configuration errors (bad key file, missing account, ...)
        first = _redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        family = _FAMILY.get(target.scheme, target.scheme)
        raise PublishError(
            Reason.INVALID_CREDENTIALS,
            f"cannot configure {target.base}: {first[:200]}; {_CREDENTIAL_HINT[family]}",
        ) from None
