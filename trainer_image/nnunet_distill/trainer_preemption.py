"""Pre-emption (SIGTERM) of the distillation trainer: stop between iterations, checkpoint, resume mid-epoch.

nnU-Net checkpoints once per epoch. On SIGTERM the iteration in flight finishes, then checkpoint_latest.pth is
written with the epoch still open plus the outputs of its completed iterations; the resumed run replays those
outputs instead of training them again (their batches are drawn and dropped) and trains the rest. Nothing is
repeated and no completed iteration is lost. ``optimizer_steps`` counts every trained iteration across
resumes. A mixin of :class:`nnunet_distill.trainer.nnUNetDistillationTrainer`, which calls these hooks from
``on_train_start``, ``on_epoch_end`` and ``load_checkpoint``.
"""

from __future__ import annotations

import contextlib
import signal

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_distill import distributed
from nnunet_distill.atomic import atomic_torch_save


class TrainingPreempted(KeyboardInterrupt):
    """SIGTERM (pod pre-emption, eviction, node drain) arrived and a checkpoint of every completed iteration
    was saved; the same command line with -c_continue resumes inside the interrupted epoch. A
    KeyboardInterrupt so that no ``except Exception`` on the way up swallows it and the CLI exits as for
    Ctrl-C."""


class PreemptionMixin:
    """SIGTERM handling of an nnU-Net trainer that has ``checkpoint_dict`` and ``distillation_meta``."""

    def _install_preemption_handler(self) -> None:
        state = self.__dict__.setdefault(
            "_preemption", {"signal": None, "epoch": None, "outputs": [], "replay": []}
        )
        self.distillation_meta.setdefault("optimizer_steps", 0)

        def on_sigterm(signum, _frame):
            state["signal"] = signum  # acted on between iterations, never inside one

        with contextlib.suppress(ValueError):  # not the main thread (embedded use): no handler, as before
            signal.signal(signal.SIGTERM, on_sigterm)
        inner = self.train_step

        def train_step(batch: dict) -> dict:
            if state["epoch"] != self.current_epoch:
                state["epoch"], state["outputs"] = self.current_epoch, []
            if state["replay"]:  # completed before the pre-emption: keep its result, do not train it twice
                out = state["replay"].pop(0)
            else:
                out = inner(batch)
                self.distillation_meta["optimizer_steps"] += 1
            state["outputs"].append(out)
            if self._preemption_requested():
                self._save_preempted_checkpoint()
            return out

        self.train_step = train_step  # instance attribute: nnU-Net's run_training calls self.train_step

    def _preemption_requested(self) -> bool:
        """SIGTERM seen here, or under DDP by any rank: all ranks stop at the same iteration (a collective),
        so none is left waiting in an all-reduce for a rank that already stopped."""
        asked = getattr(self, "_preemption", {}).get("signal") is not None
        return distributed.any_rank(asked, self.device) if self.is_ddp else asked

    def _save_preempted_checkpoint(self) -> None:
        state = self._preemption
        done = len(state["outputs"]) if state["epoch"] == self.current_epoch else 0
        checkpoint = self.checkpoint_dict()
        checkpoint["current_epoch"] = (
            self.current_epoch
        )  # the epoch is still open: the resumed run re-enters it
        checkpoint["preempted"] = {
            "epoch": self.current_epoch,
            "iterations_done": done,
            "train_outputs": [
                {k: np.asarray(v).tolist() for k, v in o.items()} for o in state["outputs"][:done]
            ],
        }
        if self.local_rank == 0 and not self.disable_checkpointing:
            atomic_torch_save(checkpoint, join(self.output_folder, "checkpoint_latest.pth"))
        self.print_to_log_file(
            f"pre-empted: checkpoint_latest.pth saved after {done} of "
            f"{self.num_iterations_per_epoch} iterations of epoch {self.current_epoch} "
            f"({self.distillation_meta['optimizer_steps']} optimizer steps in all)"
        )
        raise TrainingPreempted(f"SIGTERM: checkpointed epoch {self.current_epoch} after {done} iterations")

    def _load_preemption_state(self, checkpoint: dict) -> None:
        steps = (checkpoint.get("distillation") or {}).get("optimizer_steps")
        if steps is not None:
            self.distillation_meta["optimizer_steps"] = steps
        preempted = checkpoint.get("preempted")
        if preempted and preempted["epoch"] == self.current_epoch:
            replay = [{k: np.asarray(v) for k, v in o.items()} for o in preempted["train_outputs"]]
            self.__dict__["_preemption"] = {"signal": None, "epoch": None, "outputs": [], "replay": replay}
            self.print_to_log_file(
                f"resuming epoch {self.current_epoch} after iteration "
                f"{preempted['iterations_done']} (pre-empted run)"
            )
