"""A bench's nnU-Net workspace: the temporary raw/preprocessed/results folders, their environment, and a
timed, logged way to run the real command-line tools in it, shared by the benches that build real models."""

from __future__ import annotations

import time
from pathlib import Path


class BenchWorkspace:
    def __init__(self, root: Path, dataset_id: int, dataset_name: str):
        from nnunet_distill.nnunet_env import Workspace

        self.root = root
        self.ws = Workspace(root / "ws").create()
        self.env = self.ws.env()
        self.log = root / "bench.log"
        self.dataset = f"Dataset{dataset_id:03d}_{dataset_name}"

    def run(self, argv: list[str], planning: bool = False) -> float:
        """Run one tool to completion (its output goes to the bench log); the seconds it took.

        Planning gets one data-augmentation worker: nnU-Net's VRAM estimate crashes with
        ``nnUNet_n_proc_DA=0``.
        """
        from nnunet_distill.nnunet_env import run_logged

        env = {**self.env, "nnUNet_n_proc_DA": "1"} if planning else self.env
        t0 = time.perf_counter()
        run_logged(argv, env, self.log)
        return time.perf_counter() - t0
