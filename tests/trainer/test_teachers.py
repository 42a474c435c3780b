"""Teachers are found, really loaded (the trained weights, exactly what nnU-Net itself loads), frozen and
ensembled; every failure names what is missing and what exists. Uses the two tiny trained teacher folds of the
session fixture; variants (missing folds, wrong plans, prefixed keys) are built as copies in tmp folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from nnunet_distill import teachers as T
from nnunet_distill.loss import kd_loss


def _input(teachers_fixture, seed=0):
    plans = json.loads((teachers_fixture.folder / "plans.json").read_text())
    patch = plans["configurations"][teachers_fixture.configuration]["patch_size"]
    return torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(seed))


def _copy_folder(src, dst, folds=(0, 1), link_checkpoints=True):
    """A teacher folder copy: json files copied (so tests may edit them), checkpoints linked (45 MB each)."""
    dst.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(src / name, dst / name)
    for f in folds:
        (dst / f"fold_{f}").mkdir()
        if link_checkpoints:
            (dst / f"fold_{f}" / "checkpoint_final.pth").symlink_to(
                src / f"fold_{f}" / "checkpoint_final.pth"
            )
    return dst


@pytest.fixture(scope="module")
def loaded(nnunet_teachers):
    plans, dataset_json = T.read_teacher_json(nnunet_teachers.folder)
    folds = T.select_folds(nnunet_teachers.folder)
    nets = [
        T.load_teacher(f, plans, nnunet_teachers.configuration, dataset_json, torch.device("cpu"))
        for f in folds
    ]
    return plans, dataset_json, folds, nets


def test_default_folder_and_fold_discovery(nnunet_teachers):
    folder = T.default_teacher_folder(nnunet_teachers.dataset.results, nnunet_teachers.dataset.dataset_name)
    assert folder == nnunet_teachers.folder
    assert T.available_folds(folder) == [0, 1]
    assert [f.fold for f in T.select_folds(folder)] == [0, 1]
    assert [f.fold for f in T.select_folds(folder, [1])] == [1]
    assert T.select_folds(folder, [1])[0].checkpoint == nnunet_teachers.checkpoint(1)


def test_loaded_teacher_holds_the_trained_weights(nnunet_teachers, loaded):
    """Output equals the network nnU-Net's own predictor loads for that fold, and differs from a fresh one."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans, dataset_json, folds, nets = loaded
    x = _input(nnunet_teachers)
    for fold, net in zip(folds, nets, strict=False):
        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(nnunet_teachers.folder), (fold.fold,))
        reference = predictor.network.eval()
        torch.manual_seed(123)
        random_net = T.build_teacher_network(plans, nnunet_teachers.configuration, dataset_json).eval()
        with torch.no_grad():
            ours, theirs, rand = net(x), reference(x), random_net(x)
        assert torch.allclose(ours, theirs, atol=1e-5), f"fold {fold.fold}: not the weights nnU-Net loads"
        assert (ours - rand).abs().max() > 1e-2, f"fold {fold.fold}: output looks like a random network's"
    with torch.no_grad():
        assert (nets[0](x) - nets[1](x)).abs().max() > 1e-3, "the two folds should be different networks"


def test_teachers_are_frozen_and_stay_in_eval_mode(loaded):
    _, _, folds, nets = loaded
    ensemble = T.TeacherEnsemble(nets, [f.fold for f in folds])
    assert all(not p.requires_grad for p in ensemble.parameters())
    ensemble.train()  # nnU-Net calls network.train() every epoch; teachers must not follow
    assert not ensemble.training and all(not m.training for m in ensemble.modules())
    assert ensemble.device == torch.device("cpu")
    assert not ensemble.uses_channels_last()  # slower on CPU
    # bf16 only where the CPU computes it natively; a user can always ask for exact fp32
    assert ensemble.precision() == (torch.bfloat16 if T.cpu_has_native_bf16() else None)
    assert T.TeacherEnsemble(nets, precision=T.resolve_precision("fp32", ensemble.device)).precision() is None
    with pytest.raises(T.TeacherError, match="teacher precision"):
        T.resolve_precision("int8", ensemble.device)


def test_ensemble_returns_mean_full_resolution_logits_usable_by_the_student_loss(nnunet_teachers, loaded):
    _, _, folds, nets = loaded
    x = _input(nnunet_teachers, seed=1)
    with torch.no_grad():
        expected = torch.stack([n(x) for n in nets]).mean(0)
    exact = T.TeacherEnsemble(nets, [f.fold for f in folds], precision=None)(x)
    assert exact.shape == expected.shape == (1, 4, *x.shape[2:])  # background + 3 labels, full resolution
    assert exact.dtype == torch.float32 and not exact.requires_grad
    assert torch.allclose(exact, expected, atol=1e-5)
    # bf16 teachers (the default where the hardware has it): the softened KD target barely moves
    fast = T.TeacherEnsemble(nets, [f.fold for f in folds], precision=torch.bfloat16)(x)
    assert fast.dtype == torch.float32
    p_exact, p_fast = torch.softmax(exact / 3.0, 1), torch.softmax(fast / 3.0, 1)
    assert (p_exact - p_fast).abs().max() < 0.05
    # ... its KD distance to the fp32 target is tiny next to that of an uninformed (uniform) student
    assert kd_loss(fast, exact, 3.0).item() < 0.02 * kd_loss(torch.zeros_like(exact), exact, 3.0).item()
    out = T.TeacherEnsemble(nets, [f.fold for f in folds])(x)
    # The ensemble runs in inference mode; its output must still be usable as a constant in the student's
    # graph.
    student = torch.zeros_like(out, requires_grad=True)
    loss = kd_loss(student, out, 3.0)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_missing_requested_fold_names_what_exists(nnunet_teachers):
    with pytest.raises(T.TeacherError) as exc:
        T.select_folds(nnunet_teachers.folder, [0, 3])
    msg = str(exc.value)
    assert "3" in msg and "-tf" in msg and "fold_0" in msg and "fold_1" in msg and "\n" not in msg
    with pytest.raises(T.TeacherError, match="twice"):
        T.select_folds(nnunet_teachers.folder, [0, 0])


def test_incomplete_and_non_integer_folds_are_not_teachers(nnunet_teachers, tmp_path):
    folder = _copy_folder(nnunet_teachers.folder, tmp_path / "teacher")
    (folder / "fold_2").mkdir()  # a crashed fold: no checkpoint_final.pth
    (folder / "fold_2" / "checkpoint_latest.pth").write_bytes(b"")
    (folder / "fold_all").mkdir()
    (folder / "fold_all" / "checkpoint_final.pth").symlink_to(nnunet_teachers.checkpoint(0))
    assert T.available_folds(folder) == [0, 1]
    with pytest.raises(T.TeacherError, match=r"fold_2 \[checkpoint_latest.pth\]"):
        T.select_folds(folder, [2])
    assert T.available_folds(folder, "checkpoint_best.pth") == []


def test_empty_or_missing_teacher_folder_errors(nnunet_teachers, tmp_path):
    with pytest.raises(T.TeacherError, match="no fold_N"):
        T.select_folds(_copy_folder(nnunet_teachers.folder, tmp_path / "empty", folds=()))
    with pytest.raises(T.TeacherError) as exc:
        T.select_folds(nnunet_teachers.folder.parent / "nnUNetTrainer__NoSuchPlans__3d_fullres")
    assert "does not exist" in str(exc.value) and nnunet_teachers.folder.name in str(exc.value)
    with pytest.raises(T.TeacherError, match="plans.json is missing"):
        T.read_teacher_json(tmp_path)


def test_architecture_mismatch_fails_loudly_instead_of_loading_partially(nnunet_teachers, tmp_path):
    folder = _copy_folder(nnunet_teachers.folder, tmp_path / "teacher")
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f // 2 for f in arch["features_per_stage"]]
    (folder / "plans.json").write_text(json.dumps(plans))
    plans, dataset_json = T.read_teacher_json(folder)
    fold = T.select_folds(folder, [0])[0]
    with pytest.raises(T.TeacherError, match="does not match the architecture"):
        T.load_teacher(fold, plans, "3d_fullres", dataset_json, torch.device("cpu"))
    with pytest.raises(T.TeacherError, match="trained on configuration '3d_fullres', not '3d_lowres'"):
        T.load_teacher(fold, plans, "3d_lowres", dataset_json, torch.device("cpu"))
    with pytest.raises(T.TeacherError, match="not in the teacher plans"):
        T.build_teacher_network(plans, "3d_lowres", dataset_json)


def test_wrapped_state_dict_keys_load(nnunet_teachers, loaded, tmp_path):
    """Checkpoints from DDP ('module.') or torch.compile ('_orig_mod.') runs load like plain ones."""
    plans, dataset_json, _, nets = loaded
    folder = _copy_folder(nnunet_teachers.folder, tmp_path / "teacher", folds=(0,), link_checkpoints=False)
    ckpt = torch.load(nnunet_teachers.checkpoint(0), map_location="cpu", weights_only=False)
    ckpt["network_weights"] = {f"module._orig_mod.{k}": v for k, v in ckpt["network_weights"].items()}
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    net = T.load_teacher(
        T.select_folds(folder, [0])[0], plans, "3d_fullres", dataset_json, torch.device("cpu")
    )
    x = _input(nnunet_teachers, seed=2)
    with torch.no_grad():
        assert torch.equal(net(x), nets[0](x))


def test_not_a_checkpoint_is_reported(nnunet_teachers, tmp_path):
    folder = _copy_folder(nnunet_teachers.folder, tmp_path / "teacher", folds=(0,), link_checkpoints=False)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"truncated")
    plans, dataset_json = T.read_teacher_json(folder)
    with pytest.raises(T.TeacherError, match="cannot be read"):
        T.load_teacher(T.select_folds(folder)[0], plans, "3d_fullres", dataset_json, torch.device("cpu"))


def test_load_ensemble_in_one_call(nnunet_teachers):
    ensemble, plans, dataset_json = T.load_ensemble(
        nnunet_teachers.folder, "3d_fullres", torch.device("cpu"), folds=[1]
    )
    assert ensemble.folds == (1,) and len(ensemble.teachers) == 1
    assert plans["plans_name"] == "nnUNetPlans" and "labels" in dataset_json
