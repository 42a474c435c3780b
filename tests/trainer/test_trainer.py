"""The distillation trainers in-process on real nnU-Net data and teachers (session fixture): DA5 really
supplies
the augmentation, teachers and student see the same batch, checkpoints are atomic and stock-loadable, fold
rotation keeps validation cases out of training, and -disable_mirroring really removes mirroring from the
final
validation. Results go to a temporary nnUNet_results."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from nnunet_distill import student as S
from nnunet_distill import teachers as T
from nnunet_distill.config import DistillationConfig
from nnunet_distill.trainer import (
    STOCK_TRAINER_NAME,
    nnUNetDistillationTrainer,
    nnUNetDistillationTrainerDA5,
    trainer_class,
)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

pytestmark = pytest.mark.slow


def _make_trainer(nnunet_teachers, results: Path, **config_kwargs):
    ds = nnunet_teachers.dataset
    cfg = DistillationConfig(
        dataset=ds.dataset_name,
        fold=0,
        reduction_factor=4,
        alpha=0.3,
        temperature=3.0,
        epochs=3,
        iterations_per_epoch=1,
        val_iterations=1,
        device="cpu",
        **config_kwargs,
    )
    plans = S.derive_student_plans(ds.plans("nnUNetPlans"), "3d_fullres", cfg.reduction_factor)
    plans["continue_training"] = False
    ensemble, _, _ = T.load_ensemble(nnunet_teachers.folder, "3d_fullres", torch.device("cpu"))
    assert str(results) == os.environ["nnUNet_results"]  # noqa: SIM112 - set by the module's `env` fixture
    trainer = trainer_class(cfg.use_da5)(
        copy.deepcopy(plans), "3d_fullres", 0, ds.dataset_json(), torch.device("cpu")
    )
    trainer.configure_distillation(cfg, ensemble, {"teacher_folder": str(nnunet_teachers.folder)})
    trainer.initialize()
    return trainer


def _transform_names(transform) -> set[str]:
    """Class names of every transform in a batchgeneratorsv2 pipeline, looking inside Random/OneOf
    wrappers."""
    names = {type(transform).__name__}
    for child in [
        getattr(transform, "transform", None),
        *getattr(transform, "transforms", []),
        *getattr(transform, "list_of_transforms", []),
    ]:
        if child is not None:
            names |= _transform_names(child)
    return names


@pytest.fixture(scope="module")
def env(nnunet_teachers, tmp_path_factory):
    """nnU-Net's folders for the whole module: the fixture's data, a private results folder."""
    results = tmp_path_factory.mktemp("results")
    mp = pytest.MonkeyPatch()
    for key, value in nnunet_teachers.dataset.env.items():
        if key.startswith("nnUNet"):
            mp.setenv(key, value)
    mp.setenv("nnUNet_results", str(results))
    yield results
    mp.undo()


@pytest.fixture(scope="module")
def da5_trainer(nnunet_teachers, env):
    return _make_trainer(nnunet_teachers, env, use_da5=True, disable_mirroring=True)


def test_keeps_nnunets_init_signature_and_da5_mro():
    import inspect

    # nnU-Net rebuilds trainers from the init args it records by parameter name: names and defaults must
    # match.
    ours = inspect.signature(nnUNetDistillationTrainer.__init__).parameters
    theirs = inspect.signature(nnUNetTrainer.__init__).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    mro = nnUNetDistillationTrainerDA5.__mro__
    assert mro.index(nnUNetDistillationTrainer) < mro.index(nnUNetTrainerDA5) < mro.index(nnUNetTrainer)
    # Rotation, mirroring and initial patch size are DA5's own; the transforms are DA5's, modified (see
    # below).
    assert (
        nnUNetDistillationTrainerDA5.configure_rotation_dummyDA_mirroring_and_inital_patch_size
        is nnUNetTrainerDA5.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    )


def test_da5_augmentation_is_what_the_dataloader_runs(da5_trainer, nnunet_teachers, env):
    dl_train, _ = da5_trainer.get_dataloaders()
    names = _transform_names(dl_train.data_loader.transforms)
    assert {
        "BlankRectangleTransform",
        "BrightnessGradientAdditiveTransform",
        "LocalGammaTransform",
        "SharpeningTransform",
    } <= names  # DA5-only transforms
    # DA5 as the seed describes it: elastic deformation and order-0 (nearest) segmentation resampling.
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    spatial = [t for t in dl_train.data_loader.transforms.transforms if isinstance(t, SpatialTransform)]
    assert len(spatial) == 1
    assert spatial[0].p_elastic_deform == pytest.approx(0.2) and spatial[0].mode_seg == "nearest"
    assert spatial[0].mode_image == "bilinear" and spatial[0].p_rotation == pytest.approx(
        0.4
    )  # DA5's rotation
    plain = _make_trainer(nnunet_teachers, env)
    plain_pipeline = plain.get_dataloaders()[0].data_loader.transforms
    plain_names = _transform_names(plain_pipeline)
    assert "BlankRectangleTransform" not in plain_names and "SpatialTransform" in plain_names
    plain_spatial = [t for t in plain_pipeline.transforms if isinstance(t, SpatialTransform)]
    assert plain_spatial[0].p_elastic_deform == 0  # nnU-Net's default pipeline is untouched
    assert da5_trainer.output_folder.endswith(
        "nnUNetDistillationTrainerDA5__nnUNetPlans_r4__3d_fullres/fold_0"
    )


def test_train_step_teachers_see_the_students_batch_and_only_the_student_learns(da5_trainer):
    dl_train, _ = da5_trainer.get_dataloaders()
    batch = next(dl_train)
    seen = {}
    h1 = da5_trainer.teachers.register_forward_pre_hook(
        lambda m, a: seen.setdefault("teachers", a[0].clone())
    )
    h2 = da5_trainer.network.register_forward_pre_hook(lambda m, a: seen.setdefault("student", a[0].clone()))
    teacher_before = [p.clone() for p in da5_trainer.teachers.parameters()]
    student_before = [p.clone() for p in da5_trainer.network.parameters()]
    try:
        da5_trainer.network.train()
        out = da5_trainer.train_step(batch)
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(seen["teachers"], seen["student"]) and torch.equal(seen["student"], batch["data"])
    assert float(out["loss"]) == pytest.approx(
        0.7 * float(out["hard_loss"]) + 0.3 * float(out["kd_loss"]), rel=1e-5
    )
    assert float(out["kd_loss"]) > 0
    assert all(
        torch.equal(a, b) for a, b in zip(teacher_before, da5_trainer.teachers.parameters(), strict=False)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(student_before, da5_trainer.network.parameters(), strict=False)
    )
    assert {id(p) for g in da5_trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in da5_trainer.network.parameters()
    }


def test_clean_teacher_view_gives_teachers_the_patch_before_intensity_augmentation(nnunet_teachers, env):
    trainer = _make_trainer(nnunet_teachers, env, use_da5=True, teacher_view="clean")
    dl_train, dl_val = trainer.get_dataloaders()
    batch = next(dl_train)
    assert batch["data"].shape[1] == 2 * trainer.num_input_channels  # student view + teacher view
    assert next(dl_val)["data"].shape[1] == trainer.num_input_channels  # validation is unchanged
    seen = {}
    h1 = trainer.teachers.register_forward_pre_hook(lambda m, a: seen.setdefault("teachers", a[0].clone()))
    h2 = trainer.network.register_forward_pre_hook(lambda m, a: seen.setdefault("student", a[0].clone()))
    try:
        trainer.network.train()
        trainer.train_step(batch)
    finally:
        h1.remove()
        h2.remove()
    c = trainer.num_input_channels
    assert torch.equal(seen["student"], batch["data"][:, :c]) and torch.equal(
        seen["teachers"], batch["data"][:, c:]
    )


def test_checkpoint_is_atomic_stock_loadable_and_round_trips(da5_trainer, tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    da5_trainer.save_checkpoint(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]  # no temp file left behind
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == STOCK_TRAINER_NAME
    assert ckpt["distillation"]["trainer_class"] == "nnUNetDistillationTrainerDA5"
    assert ckpt["distillation"]["teacher_folds"] == [0, 1] and ckpt["distillation"]["da5"] is True
    # What nnUNetv2_predict does with it: stock nnUNetTrainer builds the student from the student plans.
    pm = PlansManager(da5_trainer.plans_manager.plans)
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 4, enable_deep_supervision=False)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    # Round trip: a fresh trainer resumes epoch, logger series (incl. the KD ones) and weights.
    da5_trainer.current_epoch = 1
    da5_trainer.logger.log("train_kd_losses", 0.5, 0)
    da5_trainer.save_checkpoint(str(path))
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["logging"]["train_kd_losses"][0] == 0.5


def test_fold_rotation_never_trains_on_validation_cases(nnunet_teachers, env):
    import json

    trainer = _make_trainer(nnunet_teachers, env, rotate_folds=True, rotate_freq=1)
    splits = json.loads((nnunet_teachers.dataset.preprocessed_dataset / "splits_final.json").read_text())
    val = set(splits[0]["val"])
    trainer.on_train_start()
    sources = []
    try:
        for epoch in range(6):
            trainer.current_epoch = epoch
            trainer.on_train_epoch_start()
            train_ids = set(trainer.dataloader_train.data_loader.indices)
            assert set(trainer.dataloader_val.data_loader.indices) == val
            assert not train_ids & val, f"epoch {epoch}: training on validation cases"
            source = (0 + epoch) % 5
            assert train_ids == set(splits[source]["train"]) - val
            sources.append(source)
        assert trainer.do_split()[1] == splits[0]["val"]  # what the final validation will use
    finally:
        trainer._shutdown_dataloaders()
    log = Path(trainer.log_file).read_text()
    assert log.count("validation Dice covers fold 0's") == 6
    assert sources == [0, 1, 2, 3, 4, 0]


def test_disable_mirroring_really_removes_mirroring_from_the_final_validation(da5_trainer):
    da5_trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # as every train start does
    assert da5_trainer.inference_allowed_mirroring_axes == (0, 1, 2)  # ... writing the axes back
    calls = []
    hook = da5_trainer.network.register_forward_hook(lambda *a: calls.append(1))
    try:
        da5_trainer.perform_actual_validation(False)
    finally:
        hook.remove()
    n_val = len(da5_trainer.do_split()[1])
    assert len(calls) == n_val  # one pass per case (1 tile each); mirroring would need 8 per tile
    assert da5_trainer.inference_allowed_mirroring_axes == (0, 1, 2)  # checkpoints keep the trained axes
    assert (Path(da5_trainer.output_folder) / "validation" / "summary.json").is_file()


def test_an_unlabelled_cases_placeholder_label_gets_no_hard_loss_in_the_training_step(nnunet_teachers, env):
    dataset = nnunet_teachers.dataset
    cases = sorted(p.stem for p in (dataset.preprocessed_dataset / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    trainer = _make_trainer(nnunet_teachers, env, unlabelled_cases=(cases[0],))
    batch = next(trainer.get_dataloaders()[0])
    assert len(batch["keys"]) >= 2
    batch["keys"] = [cases[0], *cases[1 : len(batch["keys"])]]  # sample 0 is the unlabelled case
    trainer.network.train()
    with torch.no_grad():
        output = trainer.network(batch["data"])
        labelled_only = trainer.loss([o[1:] for o in output], [t[1:] for t in batch["target"]])
        whole_batch = trainer.loss(output, batch["target"])
    out = trainer.train_step(batch)
    assert float(out["hard_loss"]) == pytest.approx(float(labelled_only), rel=1e-4)
    assert float(out["hard_loss"]) != pytest.approx(float(whole_batch), rel=1e-3)
    assert float(out["kd_loss"]) > 0
    assert trainer.distillation_meta["unlabelled_cases"] == [cases[0]]
