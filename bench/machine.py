"""What machine a bench ran on, printed beside its figures: figures from different machines do not compare."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """The CPU model and core count, e.g. 'Intel(R) Xeon(R) Processor, 2 CPUs'."""
    return f"{cpu_model()}, {os.cpu_count()} CPUs"
