"""Fold rotation and DDP sharding of the distillation trainer's training split.

The split is the fold's training cases plus any ``--unlabelled_cases`` (:mod:`nnunet_distill.unlabelled`).
With ``-rotate_folds`` the student trains, every ``rotate_freq`` epochs, on the next fold's training split
of splits_final.json minus this fold's validation cases (:mod:`nnunet_distill.rotation` holds the pure
rules); under DDP each rank trains on a disjoint shard of it. A mixin of
:class:`nnunet_distill.trainer.nnUNetDistillationTrainer`, placed before nnU-Net's trainer in the MRO so
``super()`` reaches nnU-Net's own split and dataloaders.
"""

from __future__ import annotations

from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from nnunet_distill import distributed, rotation, unlabelled


class FoldSplitMixin:
    """The training split of an nnU-Net trainer: rotated across folds on request, sharded across DDP ranks."""

    def _splits(self) -> list[dict]:
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if not isfile(splits_file):
            super().do_split()  # nnU-Net creates its seeded 5-fold split file on first use
        return load_json(splits_file)

    def _rotation_enabled(self) -> bool:
        cfg = self.distillation_config
        return cfg is not None and cfg.rotate_folds

    def get_tr_and_val_datasets(self):
        """The training dataset of a DDP rank holds only its share of the fold's training cases.

        nnU-Net lets every rank draw from the whole split, so ranks train on the same cases; here each rank
        gets a disjoint shard (:func:`distributed.shard`). ``do_split`` itself stays the fold's split for
        everyone else (the final validation, the held-out evaluation's "never trained on" checks).
        """
        self._shard_training = self.is_ddp
        try:
            dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        finally:
            self._shard_training = False
        self._weigh_labelled_cases(dataset_tr)
        return dataset_tr, dataset_val

    def _weigh_labelled_cases(self, dataset_tr) -> None:
        """--labelled_share: nnU-Net's loader draws uniformly from ``dataset.identifiers``, so repeating
        identifiers there draws labelled cases more often (:func:`unlabelled.weighted_identifiers`)."""
        cfg = self.distillation_config
        if cfg is None or cfg.labelled_share is None:
            return
        keys = list(dataset_tr.identifiers)
        dataset_tr.identifiers = unlabelled.weighted_identifiers(
            keys, cfg.unlabelled_cases, cfg.labelled_share
        )
        drawn = unlabelled.labelled_samples(dataset_tr.identifiers, cfg.unlabelled_cases)
        self.print_to_log_file(
            f"--labelled_share {cfg.labelled_share}: a training sample comes from a labelled case with "
            f"probability {sum(drawn) / len(drawn):.2f} (uniform draw: "
            f"{sum(unlabelled.labelled_samples(keys, cfg.unlabelled_cases)) / len(keys):.2f})"
        )

    def do_split(self):
        tr_keys, val_keys = self._fold_split()
        if getattr(self, "_shard_training", False):
            import torch.distributed as dist

            tr_keys = distributed.shard(tr_keys, dist.get_rank(), dist.get_world_size())
        return tr_keys, val_keys

    def _unlabelled_cases(self) -> tuple[str, ...]:
        cfg = self.distillation_config
        return cfg.unlabelled_cases if cfg is not None else ()

    def _fold_split(self):
        tr_keys, val_keys = self._labelled_fold_split()
        cases = self._unlabelled_cases()
        if not cases:
            return tr_keys, val_keys
        self.print_to_log_file(
            f"training split: {len(tr_keys)} labelled cases + {len(cases)} unlabelled cases "
            f"(--unlabelled_cases: KD only, their labels are placeholders)"
        )
        return unlabelled.training_split(tr_keys, cases), val_keys

    def _labelled_fold_split(self):
        tr_keys, val_keys = super().do_split()
        if not self._rotation_enabled() or self._rotation_source is None:
            return tr_keys, val_keys
        splits = self._splits()
        rot_train, rot_val = rotation.rotated_split(splits, self.fold, self._rotation_source)
        if sorted(rot_val) != sorted(val_keys):  # pragma: no cover - guards a future nnU-Net change
            raise RuntimeError("fold rotation and nnU-Net disagree about this fold's validation cases")
        return rot_train, val_keys

    def _set_rotation_for_epoch(self, epoch: int) -> bool:
        """Pick the rotation source for ``epoch``; True if it changed (the dataloaders must be rebuilt)."""
        cfg = self.distillation_config
        splits = self._splits()
        source = rotation.rotation_source_fold(epoch, cfg.rotate_freq, self.fold, len(splits))
        changed = source != self._rotation_source
        if changed:
            self._rotation_source = source
            self.print_to_log_file(f"epoch {epoch}: " + rotation.describe(splits, self.fold, source))
        return changed

    def on_train_epoch_start(self):
        if self._rotation_enabled() and self._set_rotation_for_epoch(self.current_epoch):
            self._shutdown_dataloaders()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        super().on_train_epoch_start()

    def _shutdown_dataloaders(self) -> None:
        for dl in (self.dataloader_train, self.dataloader_val):
            if isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._finish()
