"""nnU-Net trainers that distil a frozen teacher ensemble into the student described by the student plans.

Only what distillation needs is overridden; everything else (data loading, augmentation, deep supervision,
optimiser, poly LR, validation, export of the final validation) is nnU-Net's own code path.

* The ``__init__`` signature is exactly nnU-Net's: nnU-Net records the init arguments from it into every
  checkpoint. Distillation settings arrive through :meth:`nnUNetDistillationTrainer.configure_distillation`
  before training, never through the constructor (the original monkey-patched ``nnUNetTrainer.__init__``
  with a copy of it, which broke with every nnU-Net release).
* The student network is whatever nnU-Net's *stock* ``build_network_architecture`` builds from the trainer's
  plans, which are the student plans (e.g. ``nnUNetPlans_r2``). Checkpoints therefore store the stock trainer
  name ``nnUNetTrainer``: ``nnUNetv2_predict -tr nnUNetDistillationTrainer -p nnUNetPlans_r2`` finds the
  folder by name, resolves ``checkpoint['trainer_name']`` inside nnunetv2 (see
  ``nnUNetPredictor.initialize_from_trained_model_folder``) and rebuilds the student from the folder's
  plans.json without this package on the import path. The real class name and all KD settings are stored in
  ``checkpoint['distillation']``.
* Checkpoints are written atomically (temp file + ``os.replace``) and ``checkpoint_latest.pth`` every epoch,
  so a crash or pre-emption loses at most one epoch and never leaves a truncated file.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from torch._dynamo import OptimizedModule

from nnunet_distill import distributed, rotation, unlabelled
from nnunet_distill.atomic import atomic_torch_save, atomic_write_json
from nnunet_distill.augmentation import split_views, with_clean_teacher_view, with_da5_spatial
from nnunet_distill.config import DistillationConfig
from nnunet_distill.loss import DistillationLoss
from nnunet_distill.teachers import TeacherEnsemble
from nnunet_distill.trainer_folds import FoldSplitMixin
from nnunet_distill.trainer_preemption import PreemptionMixin, TrainingPreempted

#: What checkpoints name as their trainer, so stock nnU-Net rebuilds the student from plans alone.
STOCK_TRAINER_NAME = "nnUNetTrainer"
#: Extra per-epoch series in nnU-Net's logger (kept in checkpoints, so a resumed run continues the curves).
KD_LOG_KEYS = ("train_kd_losses", "train_hard_losses")
#: Written by rank 0 of a DDP run beside the checkpoints: world size, backend, each rank's batch and cases.
DDP_RECORD = "ddp_ranks.json"


class nnUNetDistillationTrainer(PreemptionMixin, FoldSplitMixin, nnUNetTrainer):
    """Student trainer: nnU-Net's hard loss mixed with KD from a frozen teacher ensemble on the same batch.

    Pre-emption (SIGTERM) lives in :mod:`nnunet_distill.trainer_preemption`, fold rotation and DDP sharding
    of the training split in :mod:`nnunet_distill.trainer_folds`; both mixins sit before nnU-Net's trainer
    in the MRO.
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's exact signature
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net pins every CUDA run to cuda:0 and leaves the choice to CUDA_VISIBLE_DEVICES; honour cuda:N.
        if not self.is_ddp and device.type == "cuda" and device.index is not None:
            self.device = device
            torch.cuda.set_device(device)
            self.print_to_log_file(f"Using device: {self.device}")
        if (
            self.is_ddp
        ):  # nnU-Net assumes cuda:<global rank>; the caller passes cuda:<LOCAL_RANK> or cpu (gloo)
            self.device = device
        self._sampled_keys: set[str] = set()  # DDP: the training cases this rank drew (see DDP_RECORD)
        self.distillation_config: DistillationConfig | None = None
        self.distillation_meta: dict = {}
        self.teachers: TeacherEnsemble | None = None
        self.distillation_loss: DistillationLoss | None = None
        self.save_every = 1  # checkpoint_latest every epoch (atomic), see save_checkpoint
        self._rotation_source: int | None = None
        self._ensure_kd_log_keys()

    # ------------------------------------------------------------------ configuration
    def configure_distillation(
        self, config: DistillationConfig, teachers: TeacherEnsemble, metadata: dict | None = None
    ) -> None:
        """Attach the teachers and KD settings; must run before ``initialize``/``run_training``.

        ``metadata`` is merged into ``checkpoint['distillation']`` (resolved teacher folder, folds, plans...).
        """
        if self.was_initialized:
            raise RuntimeError("configure_distillation() must be called before the trainer is initialized")
        if config.fold != self.fold or config.configuration != self.configuration_name:
            raise ValueError(
                f"config is for fold {config.fold}/{config.configuration}, trainer for "
                f"{self.fold}/{self.configuration_name}"
            )
        self.distillation_config = config
        self.teachers = teachers.to(self.device)
        if config.epochs is not None:
            self.num_epochs = config.epochs
        if config.iterations_per_epoch is not None:
            self.num_iterations_per_epoch = config.iterations_per_epoch
        if config.val_iterations is not None:
            self.num_val_iterations_per_epoch = config.val_iterations
        self.distillation_meta = {
            "alpha": config.alpha,
            "temperature": config.temperature,
            "reduction_factor": config.reduction_factor,
            "teacher_folds": list(teachers.folds),
            "teacher_trainer": config.teacher_trainer,
            "teacher_plans": config.teacher_plans,
            "teacher_checkpoint": config.teacher_checkpoint,
            "teacher_precision": str(teachers.precision() or torch.float32).replace("torch.", ""),
            "student_plans": self.plans_manager.plans_name,
            "student_base_plans": config.student_base_plans,
            "block_strategy": config.block_strategy,
            "configuration": config.configuration,
            "da5": config.use_da5,
            "rotate_folds": config.rotate_folds,
            "rotate_freq": config.rotate_freq,
            "disable_mirroring": config.disable_mirroring,
            "variant": config.variant,
            "kd_mode": config.kd_mode,
            "student_init": config.student_init,
            "teacher_view": config.teacher_view,
            "unlabelled_cases": list(config.unlabelled_cases),
            "labelled_share": config.labelled_share,
            "trainer_class": self.__class__.__name__,
            **(metadata or {}),
        }
        self.print_to_log_file(
            f"Distillation: alpha={config.alpha} T={config.temperature} r={config.reduction_factor} "
            f"teacher folds {list(teachers.folds)} from {self.distillation_meta.get('teacher_folder')}, "
            f"student plans {self.plans_manager.plans_name}, epochs {self.num_epochs} x "
            f"{self.num_iterations_per_epoch} it (+{self.num_val_iterations_per_epoch} val it), "
            f"device {self.device}, teachers in {teachers.precision() or torch.float32}"
            f"{' channels-last' if teachers.uses_channels_last() else ''}"
        )

    def _require_configured(self) -> DistillationConfig:
        if self.distillation_config is None or self.teachers is None:
            raise RuntimeError(
                f"{self.__class__.__name__} needs teachers: call configure_distillation() first "
                "(run it through nnUNetv2_distillation_train, not nnUNetv2_train)"
            )
        return self.distillation_config

    def initialize(self):
        cfg = self._require_configured()
        if self.is_ddp and not self.was_initialized:
            self._initialize_ddp()
        else:
            super().initialize()
        self.distillation_loss = DistillationLoss(
            self.loss,
            cfg.alpha,
            cfg.temperature,
            regions=self.label_manager.has_regions,
            ignore_label=self.label_manager.ignore_label,
            kd_mode=cfg.kd_mode,
        )

    def _initialize_ddp(self) -> None:
        """nnU-Net's initialize with this rank's batch share, but our DDP wrapper (see distributed.wrap_ddp).

        nnU-Net wraps with ``device_ids=[global rank]``, which gloo on CPUs refuses and which points past the
        GPUs of every node but the first; so its wrapper is skipped (``is_ddp`` hidden while it runs), the
        network is wrapped here, and the loss is rebuilt with ``is_ddp`` set (Dice gathered across ranks).
        """
        self._set_batch_size_and_oversample()
        share = (self.batch_size, self.oversample_foreground_percent)
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self.batch_size, self.oversample_foreground_percent = share
        self.network = distributed.wrap_ddp(self.network, self.device)
        self.loss = self._build_loss()

    def inherit_teacher_weights(self) -> str:
        """Initialise the student from one teacher's sliced weights (see :mod:`nnunet_distill.inherit`).

        The teacher of the student's own fold when it is in the ensemble (it trained on the same cases), else
        the first one. Only for a fresh run: a resumed run loads its own checkpoint.
        """
        from nnunet_distill.inherit import inherit_from_teacher

        self._require_configured()
        teachers = self.teachers
        folds = list(teachers.folds)
        index = folds.index(self.fold) if self.fold in folds else 0
        student_net, teacher_net = self._unwrapped_network(), teachers.teachers[index]
        if type(student_net) is not type(teacher_net):
            # e.g. a plain student of ResEnc teachers: the encoders share no layers, and a half-inherited
            # network
            # (decoder from the teacher, encoder random) is worse than nnU-Net's own initialisation.
            self.distillation_meta["init_teacher_fold"] = None
            message = (
                f"student initialised randomly: --student_init teacher needs the teacher's architecture "
                f"({type(teacher_net).__name__}), the student is a {type(student_net).__name__}"
            )
            self.print_to_log_file(message)
            return message
        report = inherit_from_teacher(student_net, teacher_net)
        self.distillation_meta["init_teacher_fold"] = folds[index] if folds else None
        self.distillation_meta["inherited_fraction"] = round(report.fraction, 4)
        message = (
            f"student initialised from teacher fold {folds[index] if folds else '?'}: {report.describe()}"
        )
        self.print_to_log_file(message)
        return message

    # ------------------------------------------------------------------ training step
    def train_step(self, batch: dict) -> dict:
        if self.is_ddp:
            self._sampled_keys.update(str(k) for k in batch.get("keys", ()))
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (
            [t.to(self.device, non_blocking=True) for t in target]
            if isinstance(target, list)
            else target.to(self.device, non_blocking=True)
        )

        # Online KD: the teachers label this very batch, either as augmented for the student or, with the
        # clean
        # teacher view, before the intensity-only augmentations (see augmentation.py); float32 mean logits.
        if self._clean_teacher_view():
            data, teacher_data = split_views(data, self.num_input_channels)
        else:
            teacher_data = data
        teacher_logits = self.teachers(teacher_data)

        self.optimizer.zero_grad(set_to_none=True)
        amp = (
            torch.autocast(self.device.type, enabled=True)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with amp:
            output = self.network(data)
            terms = self.distillation_loss(output, teacher_logits, target, labelled=self._labelled(batch))

        if self.grad_scaler is not None:
            self.grad_scaler.scale(terms.total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {
            "loss": terms.total.detach().cpu().numpy(),
            "kd_loss": terms.kd.detach().cpu().numpy(),
            "hard_loss": terms.hard.detach().cpu().numpy(),
        }

    def _labelled(self, batch: dict) -> torch.Tensor | None:
        """Which samples' labels count (None: all of them), so placeholders of --unlabelled_cases get KD
        only."""
        cases = self._unlabelled_cases()
        if not cases:
            return None
        if "keys" not in batch:  # pragma: no cover - nnU-Net's data loaders always return the case keys
            raise RuntimeError("--unlabelled_cases needs the batch's case keys, which this data loader omits")
        return torch.tensor(unlabelled.labelled_samples(batch["keys"], cases), device=self.device)

    # ------------------------------------------------------------------ augmentation
    def _clean_teacher_view(self) -> bool:
        cfg = self.distillation_config
        return cfg is not None and cfg.teacher_view == "clean"

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training pipeline (DA5's for the DA5 trainer), optionally with the clean teacher view."""
        transforms = self._base_training_transforms(*args, **kwargs)
        if self._clean_teacher_view():
            transforms = with_clean_teacher_view(transforms, self.num_input_channels)
        return transforms

    def _base_training_transforms(self, *args, **kwargs):
        return super().get_training_transforms(*args, **kwargs)

    # ------------------------------------------------------------------ logging
    def _ensure_kd_log_keys(self) -> None:
        """Add our series to nnU-Net's logger, padded to the logged epochs (its plot needs equal lengths)."""
        log = self.logger.local_logger.my_fantastic_logging
        n = len(log.get("train_losses", []))
        for key in KD_LOG_KEYS:
            series = log.setdefault(key, [])
            series.extend([float("nan")] * (n - len(series)))

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)  # nnU-Net gathers the total loss across ranks
        local = (
            float(np.mean([o["kd_loss"] for o in train_outputs])),
            float(np.mean([o["hard_loss"] for o in train_outputs])),
        )
        per_rank = distributed.gather(local) if self.is_ddp else [local]
        kd = float(np.mean([r[0] for r in per_rank]))
        hard = float(np.mean([r[1] for r in per_rank]))
        if self.is_ddp:
            self._write_ddp_record()
        self.logger.log("train_kd_losses", kd, self.current_epoch)
        self.logger.log("train_hard_losses", hard, self.current_epoch)
        self.print_to_log_file(
            f"train_loss_kd {np.round(kd, 4)} (T^2-scaled KL), train_loss_hard {np.round(hard, 4)} "
            f"(nnU-Net Dice+CE)"
        )

    def on_epoch_end(self):
        # progress.json and the pod's status report come from progress_hooks.start_reporting (as for teachers)
        super().on_epoch_end()  # logs, checkpoints, progress.png, then current_epoch += 1
        # SIGTERM outside an iteration (validation, epoch end): nnU-Net has just saved checkpoint_latest.pth.
        # After
        # the last epoch it saves none; checkpoint_final.pth follows at once, so training simply ends then.
        if self.current_epoch < self.num_epochs and self._preemption_requested():
            self.print_to_log_file(
                f"pre-empted after epoch {self.current_epoch - 1}: checkpoint_latest.pth is current"
            )
            raise TrainingPreempted(f"SIGTERM: epoch {self.current_epoch - 1} checkpointed")

    def _write_ddp_record(self) -> None:
        """Rank 0 writes what every rank did (all ranks call it: a collective); shows disjoint cases."""
        import torch.distributed as dist

        mine = {
            "batch_size": self.batch_size,
            "cases": sorted(self._sampled_keys),
            "device": str(self.device),
        }
        ranks = distributed.gather(mine)
        if self.local_rank == 0:
            record = {
                "world_size": dist.get_world_size(),
                "backend": dist.get_backend(),
                "ranks": [{"rank": i, **r} for i, r in enumerate(ranks)],
            }
            atomic_write_json(record, join(self.output_folder, DDP_RECORD))

    # ------------------------------------------------------------------ checkpoints
    def _unwrapped_network(self) -> torch.nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def checkpoint_dict(self) -> dict:
        """nnU-Net's checkpoint layout, a stock-resolvable ``trainer_name``, plus our ``distillation``
        record."""
        return {
            "network_weights": self._unwrapped_network().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": STOCK_TRAINER_NAME,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "distillation": dict(self.distillation_meta),
        }

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        atomic_torch_save(self.checkpoint_dict(), filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)  # nnU-Net 2.8.1 only reads a file name correctly
        self._ensure_kd_log_keys()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        self._load_preemption_state(checkpoint)

    # ------------------------------------------------------------------ train start (pre-emption, rotation)
    def on_train_start(self):
        self._install_preemption_handler()
        if self._rotation_enabled():
            rotation.rotated_split(
                self._splits(), self.fold, self.fold
            )  # fails early if the fold is not in it
            self._set_rotation_for_epoch(self.current_epoch)
        super().on_train_start()

    # ------------------------------------------------------------------ final validation
    def validation_mirroring_axes(self) -> tuple[int, ...] | None:
        cfg = self.distillation_config
        if cfg is not None and cfg.disable_mirroring:
            return None
        return self.inference_allowed_mirroring_axes

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation on the fold's validation cases, with mirroring TTA off if requested.

        nnU-Net's augmentation setup rewrites ``inference_allowed_mirroring_axes`` at every train start (which
        is why the original's ``-disable_mirroring`` did nothing); we switch it off only around the
        validation, so checkpoints still record the axes the student was trained to be invariant to.
        """
        saved = self.inference_allowed_mirroring_axes
        self.inference_allowed_mirroring_axes = self.validation_mirroring_axes()
        axes = self.inference_allowed_mirroring_axes
        self.print_to_log_file(
            f"final validation: mirroring TTA {'off' if axes is None else 'on, axes ' + str(axes)}"
            f"; cases: this fold's validation split only"
        )
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = saved


class nnUNetDistillationTrainerDA5(nnUNetDistillationTrainer, nnUNetTrainerDA5):
    """Distillation with DA5 as the seed describes it: nnU-Net's DA5 plus elastic deformation and order-0
    segmentation resampling (see :mod:`nnunet_distill.augmentation`).

    MRO: this class -> nnUNetDistillationTrainer -> nnUNetTrainerDA5 -> nnUNetTrainer, so nnU-Net's DA5
    rotation, mirroring and initial patch size apply, and ``super()`` in the KD trainer's transform builder
    reaches DA5's.
    """

    def _base_training_transforms(self, *args, **kwargs):
        return with_da5_spatial(super()._base_training_transforms(*args, **kwargs))


def trainer_class(use_da5: bool) -> type[nnUNetDistillationTrainer]:
    return nnUNetDistillationTrainerDA5 if use_da5 else nnUNetDistillationTrainer
