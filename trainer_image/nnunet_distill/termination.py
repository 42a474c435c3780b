"""The stage's last word: a JSON summary in the container's termination message, which the operator reads.

The kubelet keeps at most 4096 bytes, so a large summary is cut to fit while keeping what the operator needs
to finish the job and explain it (stage, ok, error, artifact URI/digest, headline metrics). Writing it never
raises: a pod that cannot report still exits with its own status.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnunet_distill import contract

log = logging.getLogger(__name__)

ENV_TERMINATION_PATH = contract.ENV_TERMINATION_PATH
DEFAULT_TERMINATION_PATH = contract.DEFAULT_TERMINATION_PATH
TERMINATION_LIMIT = 4096  # the kubelet keeps at most 4096 bytes of a container's termination message

# Kept when a summary must be cut to fit: what the operator needs to finish the job and explain it.
_PROTECTED: tuple[tuple[str, ...], ...] = (
    ("stage",),
    ("ok",),
    ("truncated",),
    ("error", "reason"),
    ("error", "message"),
    ("artifacts", "uri"),
    ("artifacts", "sha256"),
    ("artifacts", "sizeBytes"),
    ("metrics", "finalDice"),
    ("metrics", "retention"),
)
_MAX_STRING = 256
_MAX_LIST = 16


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "item"):  # numpy / torch scalars
        try:
            return _jsonable(x.item())
        except (TypeError, ValueError):
            pass
    return str(x)


def _dump(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _size(x: Any) -> int:
    return len(_dump(x).encode())


def _shorten(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _shorten(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shorten(v) for v in x[:_MAX_LIST]]
    if isinstance(x, str) and len(x) > _MAX_STRING:
        return x[: _MAX_STRING - 1] + "…"
    return x


def _shorten_strings(x: Any, n: int) -> Any:
    if isinstance(x, dict):
        return {k: _shorten_strings(v, n) for k, v in x.items()}
    if isinstance(x, list):
        return [_shorten_strings(v, n) for v in x]
    return x[: n - 1] + "…" if isinstance(x, str) and len(x) > n else x


def _lookup(x: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(x, dict) or k not in x:
            return None
        x = x[k]
    return x


def _paths(x: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    if isinstance(x, dict):
        for k, v in x.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    return out


def _get(x: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        x = x[k]
    return x


def fit_json(summary: Mapping[str, Any], limit: int = TERMINATION_LIMIT) -> str:
    """Compact JSON of `summary` in at most `limit` bytes, still valid JSON.

    Over the limit it first shortens long strings and lists, then drops the largest fields that are not
    protected (uri, sha256, size, error reason, final Dice …) and sets `"truncated": true`.
    """
    doc = _jsonable(summary)
    text = _dump(doc)
    if len(text.encode()) <= limit:
        return text
    doc = _shorten(doc)
    doc["truncated"] = True
    while _size(doc) > limit:
        protected = set(_PROTECTED)
        candidates = [
            p for p in _paths(doc) if p not in protected and not any(q[: len(p)] == p for q in protected)
        ]
        if not candidates:
            break
        victim = max(candidates, key=lambda p: (_size(_get(doc, p)), len(p)))
        del _get(doc, victim[:-1])[victim[-1]]
    if _size(doc) > limit:  # only protected fields left and still too big: cut their strings hard
        doc = _shorten_strings(doc, 64)
    for path in reversed(_PROTECTED):  # last resort, least important first
        if _size(doc) <= limit:
            break
        if path != ("truncated",) and path[:-1] and isinstance(parent := _lookup(doc, path[:-1]), dict):
            parent.pop(path[-1], None)
        elif len(path) == 1 and path != ("truncated",):
            doc.pop(path[0], None)
    return _dump(doc)


def termination_path(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> Path:
    return Path(path or env.get(ENV_TERMINATION_PATH) or DEFAULT_TERMINATION_PATH)


def write_termination_message(
    summary: Mapping[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] = os.environ,
    limit: int = TERMINATION_LIMIT,
) -> Path | None:
    """Write the stage's final summary where the kubelet picks it up as the termination message.

    The path is `path`, else `$TERMINATION_MESSAGE_PATH`, else `/dev/termination-log`. The default is
    only written when it already exists (the kubelet creates it in a pod), so local runs outside a pod
    don't litter /dev. Returns the path written, or None; never raises (a stage that did its work must
    not fail over its summary).

    Summary keys the operator reads: `stage`, `ok`, `artifacts` (merged into `status.artifacts`: `uri`,
    `sha256`, `sizeBytes`, `studentParameters`, `teacherParameters`, …), `metrics` (`finalDice`,
    `teacherDice`, `retention`), `error` (`reason`, `message`).
    """
    target = termination_path(path, env)
    explicit = path is not None or bool(env.get(ENV_TERMINATION_PATH))
    if not explicit and not target.exists():
        log.debug("no %s (not in a pod); termination message not written", target)
        return None
    try:
        text = fit_json(summary, limit)
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the termination message to %s: %s", target, type(exc).__name__)
        return None
    return target


__all__ = ["fit_json", "termination_path", "write_termination_message"]
