"""SHA-256 checksums and the `SHA256SUMS` file: one definition for the packager, the publisher and metadata.

A package carries `SHA256SUMS` in `sha256sum`'s own format, so `sha256sum -c SHA256SUMS` checks it without
this project; the publisher verifies the same file before and after uploading.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

SUMS_FILE = "SHA256SUMS"


class ChecksumError(ValueError):
    """A `SHA256SUMS` text that is not `sha256sum` output for files inside the package."""


def sha256_file(path: str | Path, chunk: int = 1024 * 1024) -> str:
    """Hex SHA-256 of a file, streamed (models are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256sums(root: Path) -> str:
    """`sha256sum` output for every file under root (sorted, relative paths), SHA256SUMS itself excluded."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != SUMS_FILE)
    return "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)


def parse_sha256sums(text: str) -> list[tuple[str, str]]:
    """`sha256sum` output → [(hex digest, relative path)]; accepts text (`  `) and binary (` *`) mode lines.

    Paths must stay inside the package (no absolute paths, no `..`), because they become object keys.
    """
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if m is None:
            raise ChecksumError(f"{SUMS_FILE} line {lineno} is not '<sha256>  <path>'")
        digest, path = m.group(1).lower(), m.group(2)
        path = path.removeprefix("./")
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts or "\\" in path or not path:
            raise ChecksumError(f"{SUMS_FILE} line {lineno}: path {path!r} leaves the package")
        if path in seen:
            raise ChecksumError(f"{SUMS_FILE} lists {path!r} twice")
        seen.add(path)
        entries.append((digest, path))
    if not entries:
        raise ChecksumError(f"{SUMS_FILE} lists no files")
    return entries
