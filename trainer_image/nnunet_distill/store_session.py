"""The store access of one publish: put, read back and delete objects in an opened store
(:func:`nnunet_distill.storage.open_store`), every failure classified into a one-line, secret-free
PublishError (:func:`nnunet_distill.storage.classify`).

The side effects of publishing; :mod:`nnunet_distill.storage` holds the URIs, the configuration from the
environment and the error classification.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnunet_distill.storage import (
    PublishError,
    Reason,
    RetryPolicy,
    Target,
    classify,
    is_missing_object,
    part_size,
)

log = logging.getLogger(__name__)


class StoreSession:
    """One publish's store access: classifies errors and remembers whether the endpoint ever answered."""

    def __init__(self, store: Any, target: Target, env: Mapping[str, str], policy: RetryPolicy):
        self.store, self.target, self.env, self.policy = store, target, env, policy
        self.reached = False  # any response at all (even an error status) proves the endpoint exists

    def _fail(self, exc: BaseException, action: str, key: str) -> PublishError:
        err = classify(exc, target=self.target, env=self.env, action=action, key=key)
        if err.http_status is not None:
            self.reached = True
        if err.reason == Reason.ENDPOINT_UNREACHABLE and self.reached:
            err.transient = True  # the endpoint worked a moment ago: a blip, worth another attempt
        return err

    def put_file(self, key: str, local: Path, size: int) -> None:
        import obstore

        kwargs: dict[str, Any] = {"chunk_size": part_size(size), "max_concurrency": 4}
        if self.target.scheme != "file":
            kwargs["attributes"] = {
                "Content-Type": mimetypes.guess_type(local.name)[0] or "application/octet-stream"
            }
        try:
            with open(local, "rb") as fh:
                obstore.put(self.store, key, fh, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            raise self._fail(exc, "PUT", key) from None
        self.reached = True

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        import obstore

        attributes = {"Content-Type": content_type} if self.target.scheme != "file" else None
        try:
            obstore.put(self.store, key, data, attributes=attributes, use_multipart=False)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "PUT", key) from None
        self.reached = True

    def read_back(self, key: str) -> tuple[int, str]:
        """(size, sha256) of the stored object, streamed so large files never sit in memory."""
        import obstore

        h, n = hashlib.sha256(), 0
        try:
            result = obstore.get(self.store, key)
            for chunk in result.stream(min_chunk_size=1024 * 1024):
                h.update(chunk)
                n += len(chunk)
        except FileNotFoundError as exc:
            if not is_missing_object(exc):
                raise self._fail(exc, "GET", key) from None
            self.reached = True
            return -1, ""
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "GET", key) from None
        self.reached = True
        return n, h.hexdigest()

    def delete_quietly(self, keys: list[str]) -> None:
        import obstore

        if not keys:
            return
        try:
            obstore.delete(self.store, keys)
        except Exception as exc:  # noqa: BLE001 - best effort; the missing marker already marks it unusable
            log.warning(
                "could not remove %d partial objects under %s (%s); they carry no publish marker",
                len(keys),
                self.target.base,
                type(exc).__name__,
            )
