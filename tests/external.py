"""External programs some tests need (promtool, buildah, Azurite, ...): found on PATH, or the test cannot run.

`.ci/run` installs every one of them, so in CI (CI set) a missing program fails the test; on a developer
machine without it the test is skipped with the command that installs it.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(program: str, install: str) -> str:
    path = shutil.which(program)
    if path:
        return path
    message = f"{program} not found; install it with: {install}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI installs it in .ci/run, so its absence is a failure there)")
    pytest.skip(message)


def promtool() -> str:
    return require("promtool", "apt-get install prometheus")
