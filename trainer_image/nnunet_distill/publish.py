"""Publish a packaged model directory to object storage so that readers only ever see verified models.

A model in a bucket is only useful if a consumer can trust it, so publishing is a small protocol rather
than a copy:

1. the local package is checked against its own `SHA256SUMS` first (a damaged package is refused);
2. every file is uploaded under a fresh version prefix `<prefix>/<version>/` (large files as multipart);
3. every object is read back and its size and SHA-256 compared with `SHA256SUMS`;
4. only then is the marker `<prefix>/<version>/_PUBLISHED` written, and after it `<prefix>/LATEST`.

A reader that follows `LATEST` (or lists versions and requires `_PUBLISHED`) never sees a half-published
model, and a failed publish leaves no marker: nothing partial is reported as the model. Uploads go through
obstore, whose per-request retries (exponential backoff with jitter) absorb short outages; an outer bounded
retry re-sends whole files when a transfer or a read-back still fails after that.

Storage access, credentials and error classification live in `storage.py`, checksums in `checksums.py`.
The least privilege that suffices is put + get on the prefix (delete is used, best effort, only to clean up
after a failed publish); listing the bucket is never needed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_distill.checksums import SUMS_FILE, ChecksumError, parse_sha256sums, sha256_file
from nnunet_distill.storage import (
    PublishError,
    Reason,
    RetryPolicy,
    is_missing_object,
    classify,
    open_store,
    parse_uri,
)
from nnunet_distill.store_session import StoreSession

log = logging.getLogger(__name__)

MARKER_FILE = "_PUBLISHED"
LATEST_FILE = "LATEST"
MARKER_SCHEMA = "nnunet-distill.published/v1"
DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True)
class PackageFile:
    path: str  # POSIX path relative to the package root, as written in SHA256SUMS
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class PublishResult:
    uri: str  # the version's URI, e.g. s3://models/liver/20261125T131834Z-1a2b3c4d5e6f
    version: str
    files: tuple[PackageFile, ...]
    sha256sums_sha256: str
    model_path: str | None  # the ONNX file inside the package (None when the package has none)
    model_sha256: str | None
    total_bytes: int  # every uploaded package file, SHA256SUMS included (marker and LATEST excluded)
    attempts: int = 1
    latest_uri: str = ""

    def artifacts(self) -> dict[str, Any]:
        """The `status.artifacts` fields this publish establishes (camelCase, as in the CRD)."""
        return {
            "uri": self.uri,
            "sha256": self.model_sha256 or self.sha256sums_sha256,
            "sizeBytes": self.total_bytes,
            "version": self.version,
            "modelPath": self.model_path,
            "sha256sums": self.sha256sums_sha256,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "version": self.version,
            "latest": self.latest_uri,
            "modelPath": self.model_path,
            "modelSha256": self.model_sha256,
            "sha256sumsSha256": self.sha256sums_sha256,
            "totalBytes": self.total_bytes,
            "attempts": self.attempts,
            "files": [f.as_dict() for f in self.files],
        }


# --------------------------------------------------------------------------------------------- pure parts


def verify_package(package_dir: str | os.PathLike[str]) -> tuple[list[PackageFile], bytes]:
    """Check the directory against its SHA256SUMS; returns the files and the SHA256SUMS bytes.

    Refuses a file missing, altered, or present but unlisted: a package whose contents and checksums
    disagree cannot be verified remotely either, so it must not be published.
    """
    root = Path(package_dir)
    if not root.is_dir():
        raise PublishError(Reason.PACKAGE_DAMAGED, f"package directory {root} does not exist")
    sums_path = root / SUMS_FILE
    if not sums_path.is_file():
        raise PublishError(
            Reason.PACKAGE_DAMAGED,
            f"{sums_path} is missing; create the package with `nnunet-distill package`",
        )
    sums_bytes = sums_path.read_bytes()
    try:
        entries = parse_sha256sums(sums_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        raise PublishError(Reason.PACKAGE_DAMAGED, f"{sums_path} is not UTF-8 text") from None
    except ChecksumError as exc:
        raise PublishError(Reason.PACKAGE_DAMAGED, str(exc)) from None
    files: list[PackageFile] = []
    for digest, rel in entries:
        local = root / rel
        if rel == SUMS_FILE or rel in (MARKER_FILE, LATEST_FILE):
            raise PublishError(Reason.PACKAGE_DAMAGED, f"{SUMS_FILE} may not list the reserved name {rel!r}")
        if not local.is_file():
            raise PublishError(Reason.PACKAGE_DAMAGED, f"{local} is listed in {SUMS_FILE} but missing")
        try:
            actual = sha256_file(local)
        except OSError as exc:
            raise PublishError(
                Reason.PACKAGE_DAMAGED, f"cannot read {local}: {exc.strerror or type(exc).__name__}"
            ) from None
        if actual != digest:
            raise PublishError(
                Reason.PACKAGE_DAMAGED,
                f"{local} has sha256 {actual[:12]}…, {SUMS_FILE} says {digest[:12]}…; re-create the package",
            )
        files.append(PackageFile(rel, local.stat().st_size, digest))
    listed = {f.path for f in files} | {SUMS_FILE}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() not in listed:
            raise PublishError(
                Reason.PACKAGE_DAMAGED, f"{p} is not listed in {SUMS_FILE}; re-create the package"
            )
    return files, sums_bytes


def version_name(sums_bytes: bytes, now: _dt.datetime) -> str:
    """`20261125T131834Z-1a2b3c4d5e6f`: sorts by time, and names the exact file set it holds."""
    stamp = now.astimezone(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{hashlib.sha256(sums_bytes).hexdigest()[:12]}"


def pick_model_file(files: Iterable[PackageFile]) -> PackageFile | None:
    """The largest `.onnx` file: the network the package serves (Triton repos hold exactly one)."""
    onnx = [f for f in files if f.path.lower().endswith(".onnx")]
    return max(onnx, key=lambda f: (f.size, f.path)) if onnx else None


def marker_document(
    *,
    version: str,
    uri: str,
    files: list[PackageFile],
    sums_bytes: bytes,
    model: PackageFile | None,
    created: _dt.datetime,
) -> dict[str, Any]:
    sums = PackageFile(SUMS_FILE, len(sums_bytes), hashlib.sha256(sums_bytes).hexdigest())
    return {
        "schema": MARKER_SCHEMA,
        "version": version,
        "uri": uri,
        "createdAt": created.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model.as_dict() if model else None,
        "sha256sums": sums.sha256,
        "totalBytes": sum(f.size for f in files) + sums.size,
        "files": [f.as_dict() for f in files] + [sums.as_dict()],
    }


# ------------------------------------------------------------------------------------------- side effects


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _bytes(files: list[PackageFile]) -> int:
    return sum(f.size for f in files)


@dataclass
class _Progress:
    """What earlier attempts of one publish achieved, so a retry repeats only what failed."""

    uploaded: set[str] = field(default_factory=set)  # package paths whose PUT succeeded
    verified: set[str] = field(default_factory=set)  # package paths whose read-back matched
    touched: set[str] = field(default_factory=set)  # package paths stored at least once (cleanup on failure)
    marker_written: bool = False


def _upload_missing(
    session: StoreSession, version: str, root: Path, to_send: list[PackageFile], done: _Progress
) -> None:
    for f in to_send:
        if f.path not in done.uploaded:
            session.put_file(f"{version}/{f.path}", root / f.path, f.size)
            done.uploaded.add(f.path)
            done.touched.add(f.path)
            log.info("uploaded %s (%d bytes)", f.path, f.size)


def _verify_uploads(
    session: StoreSession, version: str, version_uri: str, to_send: list[PackageFile], done: _Progress
) -> None:
    """Read every unverified object back; a mismatch is sent again on the next attempt (transient)."""
    mismatched: list[str] = []
    for f in to_send:
        if f.path in done.verified:
            continue
        size, digest = session.read_back(f"{version}/{f.path}")
        if size == f.size and digest == f.sha256:
            done.verified.add(f.path)
        else:
            done.uploaded.discard(f.path)  # send it again on the next attempt
            got = "missing" if size < 0 else f"{size} bytes, sha256 {digest[:12]}…"
            mismatched.append(f"{f.path} ({got}; expected {f.size} bytes, sha256 {f.sha256[:12]}…)")
    if mismatched:
        raise PublishError(
            Reason.VERIFICATION_FAILED,
            f"read-back of {version_uri} does not match {SUMS_FILE}: " + "; ".join(mismatched[:3]),
            transient=True,
        )


def _give_up(
    err: PublishError,
    attempt: int,
    session: StoreSession,
    version: str,
    to_send: list[PackageFile],
    done: _Progress,
) -> PublishError:
    """The error to raise after the last attempt; the partial upload removed when no marker was written."""
    if err.reason in (Reason.VERIFICATION_FAILED, Reason.UPLOAD_FAILED) and attempt > 1:
        err = PublishError(err.reason, f"{err.message} (gave up after {attempt} attempts)")
    if not done.marker_written:  # tidy up; without the marker nothing here counts as a model anyway
        session.delete_quietly([f"{version}/{f.path}" for f in to_send if f.path in done.touched])
    return err


def _mark_published(
    session: StoreSession,
    version: str,
    version_uri: str,
    files: list[PackageFile],
    sums_bytes: bytes,
    started: _dt.datetime,
    done: _Progress,
) -> None:
    """The `_PUBLISHED` marker (only once every object verified), then `LATEST` pointing at this version."""
    marker = marker_document(
        version=version,
        uri=version_uri,
        files=files,
        sums_bytes=sums_bytes,
        model=pick_model_file(files),
        created=started,
    )
    session.put_bytes(f"{version}/{MARKER_FILE}", json.dumps(marker, indent=1).encode(), "application/json")
    done.marker_written = True
    session.put_bytes(LATEST_FILE, f"{version}\n".encode(), "text/plain")


def publish(
    package_dir: str | os.PathLike[str],
    uri: str,
    *,
    env: Mapping[str, str] = os.environ,
    policy: RetryPolicy = DEFAULT_POLICY,
    now: Callable[[], _dt.datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishResult:
    """Upload, verify, then mark a packaged model under `<uri>/<version>/`; raises PublishError.

    Safe to call again after a failure: it starts from the same local files under a new version, and a
    failed attempt leaves no `_PUBLISHED` marker (its partial objects are removed when possible).
    """
    target = parse_uri(uri)
    files, sums_bytes = verify_package(package_dir)
    root = Path(package_dir)
    started = now()
    version = version_name(sums_bytes, started)
    version_uri = target.uri_of(version)
    store = open_store(target, env, policy)
    session = StoreSession(store, target, env, policy)

    sums_sha = hashlib.sha256(sums_bytes).hexdigest()
    to_send = files + [PackageFile(SUMS_FILE, len(sums_bytes), sums_sha)]
    done = _Progress()
    attempt = 0
    log.info("publishing %d files (%d bytes) from %s to %s", len(to_send), _bytes(to_send), root, version_uri)
    while True:
        attempt += 1
        try:
            _upload_missing(session, version, root, to_send, done)
            _verify_uploads(session, version, version_uri, to_send, done)
            _mark_published(session, version, version_uri, files, sums_bytes, started, done)
            break
        except PublishError as err:
            if not err.transient or attempt >= policy.attempts:
                raise _give_up(err, attempt, session, version, to_send, done) from None
            delay = policy.attempt_backoff_s * (2 ** (attempt - 1))
            log.warning(
                "publish attempt %d/%d failed (%s); retrying in %.1fs", attempt, policy.attempts, err, delay
            )
            sleep(delay)

    model = pick_model_file(files)
    result = PublishResult(
        uri=version_uri,
        version=version,
        files=tuple(files),
        sha256sums_sha256=sums_sha,
        model_path=model.path if model else None,
        model_sha256=model.sha256 if model else None,
        total_bytes=_bytes(to_send),
        attempts=attempt,
        latest_uri=target.uri_of(LATEST_FILE),
    )
    log.info("published and verified %s (%d files, %d bytes)", version_uri, len(to_send), result.total_bytes)
    return result


def resolve_latest(
    uri: str, *, env: Mapping[str, str] = os.environ, policy: RetryPolicy = DEFAULT_POLICY
) -> dict[str, Any]:
    """Follow `<uri>/LATEST` to its `_PUBLISHED` marker and return the marker (what a consumer should do)."""
    import obstore

    target = parse_uri(uri)
    store = open_store(target, env, policy)
    key = LATEST_FILE
    try:
        version = bytes(obstore.get(store, key).bytes()).decode().strip()
        key = f"{version}/{MARKER_FILE}"
        marker = json.loads(bytes(obstore.get(store, key).bytes()))
    except FileNotFoundError as exc:
        if not is_missing_object(exc):
            raise classify(exc, target=target, env=env, action="GET", key=key) from None
        raise PublishError(
            Reason.NOT_PUBLISHED, f"{target.uri_of(key)} does not exist: nothing published there"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise classify(exc, target=target, env=env, action="GET", key=key) from None
    return marker


__all__ = [
    "LATEST_FILE",
    "MARKER_FILE",
    "PackageFile",
    "PublishResult",
    "marker_document",
    "pick_model_file",
    "publish",
    "resolve_latest",
    "verify_package",
    "version_name",
]
