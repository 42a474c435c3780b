"""The synthetic dataset generator and its CLI (`nnunet-distill synthetic`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_distill import synthetic
from nnunet_distill.cli.synthetic import build_parser, main
from nnunet_distill.synthetic import (
    LABELS,
    SyntheticSpec,
    labelled_case_ids,
    unlabelled_case_ids,
    write_dataset,
)


def read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def small(tmp_path) -> Path:
    return write_dataset(
        tmp_path, SyntheticSpec(dataset_id=7, name="Small", cases=4, test_cases=2, size=(32, 40, 24), seed=3)
    )


def test_writes_an_nnunet_raw_dataset(small):
    assert small.name == "Dataset007_Small"
    assert names(small) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs"]
    assert names(small / "imagesTr") == [f"case_{i:04d}_0000.nii.gz" for i in range(4)]
    assert names(small / "labelsTr") == [f"case_{i:04d}.nii.gz" for i in range(4)]
    assert names(small / "imagesTs") == [f"test_{i:04d}_0000.nii.gz" for i in range(2)]
    assert names(small / "labelsTs") == [f"test_{i:04d}.nii.gz" for i in range(2)]
    meta = json.loads((small / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "bright": 1, "dark": 2, "small": 3}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    assert not list(small.parent.glob(".*tmp"))  # written through a temporary folder, renamed at the end


def test_every_case_has_every_label_and_a_small_structure(small):
    for label_file in [*(small / "labelsTr").iterdir(), *(small / "labelsTs").iterdir()]:
        label, spacing = read(label_file)
        image, _ = read(
            small
            / label_file.parent.name.replace("labels", "images")
            / label_file.name.replace(".nii.gz", "_0000.nii.gz")
        )
        assert label.shape == image.shape == (24, 40, 32)  # numpy z, y, x for --size 32 40 24
        assert label.dtype == np.uint8 and image.dtype == np.float32
        assert spacing == (1.0, 1.0, 1.0)
        counts = np.bincount(label.ravel(), minlength=4)
        assert set(np.unique(label)) == set(LABELS.values()), label_file.name
        assert counts[LABELS["small"]] < 0.5 * min(counts[LABELS["bright"]], counts[LABELS["dark"]])
        means = [float(image[label == v].mean()) for v in range(4)]
        # learnable: each label has its own intensity, clearly apart given the noise
        assert means[2] + 0.4 < means[0] and means[0] + 0.3 < means[1] and means[1] < means[3], means


def test_noise_and_smooth_bias_field(tmp_path):
    folder = write_dataset(tmp_path, SyntheticSpec(dataset_id=8, name="Bias", cases=2, test_cases=0, seed=1))
    image, _ = read(folder / "imagesTr" / "case_0000_0000.nii.gz")
    label, _ = read(folder / "labelsTr" / "case_0000.nii.gz")
    background = np.where(label == 0, image, np.nan)
    # noise: neighbouring background voxels differ by about sqrt(2) * sigma
    diffs = np.diff(background, axis=2)
    assert 0.1 < np.nanstd(diffs) / np.sqrt(2) < 0.25
    # bias: the background's mean over 12^3 blocks drifts across the volume (0.2-0.3 for seeds 0-29), far more
    # than averaging ~1700 noisy voxels allows (~0.004)
    blocks = [
        np.nanmean(background[i : i + 12, j : j + 12, k : k + 12])
        for i in range(0, 48, 12)
        for j in range(0, 48, 12)
        for k in range(0, 48, 12)
    ]
    assert np.nanmax(blocks) - np.nanmin(blocks) > 0.1


def test_anisotropic_spacing_and_default_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["-d", "9", "--name", "Aniso", "--cases", "2", "--test-cases", "1", "--anisotropic"]) == 0
    image, spacing = read(tmp_path / "Dataset009_Aniso" / "imagesTr" / "case_0000_0000.nii.gz")
    assert spacing == (1.0, 1.0, 3.0)
    assert image.shape == (16, 48, 48)
    label, _ = read(tmp_path / "Dataset009_Aniso" / "labelsTr" / "case_0000.nii.gz")
    assert LABELS["small"] in np.unique(label)
    assert "wrote" in capsys.readouterr().out


def test_multiple_channels_carry_different_contrasts(tmp_path):
    folder = write_dataset(
        tmp_path, SyntheticSpec(dataset_id=10, name="Multi", cases=2, test_cases=1, channels=3)
    )
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "MR1", "2": "MR2"}
    assert names(folder / "imagesTr")[:3] == [
        "case_0000_0000.nii.gz",
        "case_0000_0001.nii.gz",
        "case_0000_0002.nii.gz",
    ]
    assert len(names(folder / "imagesTs")) == 3
    label, _ = read(folder / "labelsTr" / "case_0000.nii.gz")
    ch0, _ = read(folder / "imagesTr" / "case_0000_0000.nii.gz")
    ch1, _ = read(folder / "imagesTr" / "case_0000_0001.nii.gz")
    bright = label == LABELS["bright"]
    background = label == 0
    assert ch0[bright].mean() > ch0[background].mean() + 0.5  # bright is bright in channel 0 ...
    assert ch1[bright].mean() < ch1[background].mean() - 0.3  # ... and dark in channel 1
    assert synthetic.contrast_table(2) != synthetic.contrast_table(0)


def test_held_out_test_set_is_disjoint_from_training(small):
    meta = json.loads((small / "dataset.json").read_text())
    train = {p.name.split("_0000")[0] for p in (small / "imagesTr").iterdir()}
    test = {p.name.split("_0000")[0] for p in (small / "imagesTs").iterdir()}
    assert not train & test and len(train) == meta["numTraining"]
    train_arrays = [read(p)[0] for p in (small / "imagesTr").iterdir()]
    for p in (small / "imagesTs").iterdir():
        test_array = read(p)[0]
        assert all(not np.array_equal(test_array, t) for t in train_arrays)


def test_deterministic_by_seed_and_independent_of_case_count(tmp_path):
    a = write_dataset(tmp_path / "a", SyntheticSpec(dataset_id=11, name="D", cases=3, test_cases=1, seed=5))
    b = write_dataset(tmp_path / "b", SyntheticSpec(dataset_id=11, name="D", cases=2, test_cases=1, seed=5))
    c = write_dataset(tmp_path / "c", SyntheticSpec(dataset_id=11, name="D", cases=2, test_cases=1, seed=6))
    for sub, name in (
        ("imagesTr", "case_0001_0000.nii.gz"),
        ("labelsTr", "case_0001.nii.gz"),
        ("imagesTs", "test_0000_0000.nii.gz"),
    ):
        assert np.array_equal(read(a / sub / name)[0], read(b / sub / name)[0])
        assert not np.array_equal(read(a / sub / name)[0], read(c / sub / name)[0])


def test_unlabelled_cases_are_extra_images_with_a_placeholder_label(tmp_path, capsys):
    plain = write_dataset(
        tmp_path / "a", SyntheticSpec(dataset_id=15, name="U", cases=2, test_cases=1, seed=4)
    )
    assert (
        main(
            ["-d", "15", "--name", "U", "--cases", "2", "--test-cases", "1", "--seed", "4"]
            + ["--unlabelled-cases", "2", "--raw-dir", str(tmp_path / "b")]
        )
        == 0
    )
    assert "2 training + 1 test cases + 2 unlabelled" in capsys.readouterr().out
    folder = tmp_path / "b" / "Dataset015_U"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 4
    assert meta["synthetic"]["unlabelled_cases"] == ["unlabelled_0000", "unlabelled_0001"]
    labelled_image = read(folder / "imagesTr" / "case_0001_0000.nii.gz")[0]
    # the labelled cases are the ones written without unlabelled cases, byte for byte
    assert np.array_equal(labelled_image, read(plain / "imagesTr" / "case_0001_0000.nii.gz")[0])
    assert np.array_equal(
        read(folder / "labelsTr" / "case_0001.nii.gz")[0], read(plain / "labelsTr" / "case_0001.nii.gz")[0]
    )
    written = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").iterdir())
    assert written == sorted(labelled_case_ids(2) + unlabelled_case_ids(2))  # the names splits must use
    for case in meta["synthetic"]["unlabelled_cases"]:
        image = read(folder / "imagesTr" / f"{case}_0000.nii.gz")[0]
        assert image.std() > 0 and not np.array_equal(image, labelled_image)  # a real image of its own
        assert not read(folder / "labelsTr" / f"{case}.nii.gz")[0].any()  # an all-background placeholder
    with pytest.raises(ValueError, match="--unlabelled-cases must be >= 0"):
        SyntheticSpec(dataset_id=15, name="U", unlabelled_cases=-1)


def test_fast_enough_for_tests_and_demos(tmp_path):
    start = time.perf_counter()
    write_dataset(tmp_path, SyntheticSpec(dataset_id=12, name="Fast", cases=16, test_cases=0))
    elapsed = time.perf_counter() - start
    # ~0.4 s on an idle 2-core machine; the bound leaves room for a loaded CI runner
    assert elapsed < 5.0, elapsed


def test_replaces_only_its_own_datasets(tmp_path):
    spec = SyntheticSpec(dataset_id=13, name="Mine", cases=2, test_cases=0)
    folder = write_dataset(tmp_path, spec)
    (folder / "stale.txt").write_text("x")
    assert write_dataset(tmp_path, spec) == folder and not (folder / "stale.txt").exists()

    real = tmp_path / "Dataset014_Real"
    (real / "imagesTr").mkdir(parents=True)
    (real / "dataset.json").write_text(json.dumps({"name": "Real", "labels": {"background": 0}}))
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        write_dataset(tmp_path, SyntheticSpec(dataset_id=14, name="Real", cases=2))
    assert (real / "imagesTr").is_dir()
    with pytest.raises(FileExistsError, match="already used by Dataset014_Real"):
        write_dataset(tmp_path, SyntheticSpec(dataset_id=14, name="Other", cases=2))


def test_parser_matches_the_contract():
    args = build_parser().parse_args(
        [
            "-d",
            "901",
            "--name",
            "Synth",
            "--cases",
            "16",
            "--test-cases",
            "4",
            "--size",
            "48",
            "48",
            "48",
            "--channels",
            "2",
            "--anisotropic",
            "--seed",
            "7",
        ]
    )
    assert (
        args.dataset_id,
        args.name,
        args.cases,
        args.test_cases,
        args.size,
        args.channels,
        args.anisotropic,
        args.seed,
    ) == (901, "Synth", 16, 4, [48, 48, 48], 2, True, 7)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["-d", "5", "--name", "bad name"], True, "--name"),
        (["-d", "1000", "--name", "X"], True, "1..999"),
        (["-d", "5", "--name", "X", "--cases", "1"], True, "--cases must be >= 2"),
        (["-d", "5", "--name", "X", "--size", "8", "48", "48"], True, "--size"),
        (["-d", "5", "--name", "X"], False, "nnUNet_raw is not set"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, argv, env, message):
    environ = {"PATH": "/usr/bin:/bin", **({"nnUNet_raw": str(tmp_path)} if env else {})}
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_distill.cli.synthetic", *argv],
        env=environ,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_nnunet_verifies_and_preprocesses_the_dataset(nnunet_dataset):
    """The session dataset went through `nnUNetv2_plan_and_preprocess --verify_dataset_integrity`."""
    data = nnunet_dataset.preprocessed_dataset / "nnUNetPlans_3d_fullres"
    cases = {p.name[: -len(".pkl")] for p in data.iterdir() if p.name.endswith(".pkl")}
    assert cases == {f"case_{i:04d}" for i in range(16)}  # test cases never preprocessed


def test_organ_layout_has_a_large_organ_a_small_lesion_inside_it_and_a_thin_vessel(tmp_path):
    folder = write_dataset(
        tmp_path,
        SyntheticSpec(
            dataset_id=15, name="Organ", cases=3, test_cases=2, size=(32, 32, 32), layout="organ", seed=2
        ),
    )
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == synthetic.ORGAN_LABELS and meta["synthetic"]["layout"] == "organ"
    for label_file in [*(folder / "labelsTr").iterdir(), *(folder / "labelsTs").iterdir()]:
        label, _ = read(label_file)
        counts = np.bincount(label.ravel(), minlength=4)
        organ, lesion, vessel = (counts[synthetic.ORGAN_LABELS[k]] for k in ("organ", "lesion", "vessel"))
        assert organ > 10 * lesion > 0 and vessel > 0, label_file.name
        assert lesion < 0.02 * label.size  # a small structure, under 2 % of the volume
        # the vessel is thin: no voxel of it has all 6 face neighbours in the vessel further than 1 voxel in
        v = label == synthetic.ORGAN_LABELS["vessel"]
        core = (
            v[1:-1, 1:-1, 1:-1]
            & v[2:, 1:-1, 1:-1]
            & v[:-2, 1:-1, 1:-1]
            & v[1:-1, 2:, 1:-1]
            & v[1:-1, :-2, 1:-1]
            & v[1:-1, 1:-1, 2:]
            & v[1:-1, 1:-1, :-2]
        )
        assert core.sum() < 0.5 * v.sum()
        # the lesion lies inside the organ: every lesion voxel has organ (or lesion/vessel) around it
        zs, ys, xs = np.nonzero(label == synthetic.ORGAN_LABELS["lesion"])
        centre = label[int(zs.mean()), int(ys.mean()), int(xs.mean())]
        assert centre == synthetic.ORGAN_LABELS["lesion"]
    with pytest.raises(ValueError, match="--layout must be one of spheres, organ"):
        SyntheticSpec(dataset_id=16, name="X", layout="liver")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_label_noise_perturbs_only_the_training_labels_and_hurts_thin_structures_most(tmp_path):
    """`--label-noise`: the training labels as annotators would draw them, everything else byte-identical."""
    common = dict(cases=8, test_cases=2, size=(32, 32, 32), layout="organ", seed=1)
    exact = write_dataset(tmp_path / "exact", SyntheticSpec(dataset_id=16, name="Organ", **common))
    noisy = write_dataset(
        tmp_path / "noisy", SyntheticSpec(dataset_id=16, name="Organ", label_noise=0.8, **common)
    )
    assert json.loads((noisy / "dataset.json").read_text())["synthetic"]["label_noise_mm"] == 0.8
    for sub in ("imagesTr", "imagesTs", "labelsTs"):
        for f in (exact / sub).iterdir():
            assert np.array_equal(read(f)[0], read(noisy / sub / f.name)[0]), f"{sub}/{f.name} changed"
    dice: dict[str, list[float]] = {k: [] for k in ("organ", "lesion", "vessel")}
    for f in sorted((exact / "labelsTr").iterdir()):
        a, b = read(f)[0], read(noisy / "labelsTr" / f.name)[0]
        assert set(np.unique(b)) <= set(np.unique(a))  # no new labels, only moved contours
        for k in dice:
            dice[k].append(_dice(a == synthetic.ORGAN_LABELS[k], b == synthetic.ORGAN_LABELS[k]))
    mean = {k: float(np.mean(v)) for k, v in dice.items()}
    # the figures quoted beside LABEL_NOISE_SMOOTHING_MM: inter-rater-like agreement, worst for the vessel
    assert 0.84 < mean["organ"] < 0.92 and 0.70 < mean["lesion"] < 0.82 and 0.58 < mean["vessel"] < 0.70, mean
    assert mean["vessel"] < mean["lesion"] < mean["organ"]
    # unbiased: the noisy organ is about as large as the exact one
    sizes = [
        (read(f)[0] == 1).sum() / max((read(noisy / "labelsTr" / f.name)[0] == 1).sum(), 1)
        for f in (exact / "labelsTr").iterdir()
    ]
    assert 0.9 < float(np.mean(sizes)) < 1.1


def test_label_noise_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--label-noise must be in 0\.\.5"):
        SyntheticSpec(dataset_id=17, name="X", label_noise=-1.0)


def test_image_noise_scales_only_the_noise_and_leaves_every_label_as_it_was(tmp_path, capsys):
    """`--image-noise`: the same cases, their noise drawn from the same streams at another strength."""
    folders = {}
    for sigma in (0.15, 0.6, 1.05):
        raw = tmp_path / str(sigma)
        argv = ["-d", "18", "--name", "N", "--layout", "organ", "--cases", "2", "--test-cases", "1"]
        assert (
            main([*argv, "--size", "16", "16", "16", "--image-noise", str(sigma), "--raw-dir", str(raw)]) == 0
        )
        folders[sigma] = raw / "Dataset018_N"
    assert json.loads((folders[0.6] / "dataset.json").read_text())["synthetic"]["image_noise_sigma"] == 0.6
    for sub, name in (("labelsTr", "case_0001.nii.gz"), ("labelsTs", "test_0000.nii.gz")):
        assert np.array_equal(read(folders[0.15] / sub / name)[0], read(folders[1.05] / sub / name)[0])
    image = {
        s: read(f / "imagesTr" / "case_0001_0000.nii.gz")[0].astype(np.float64) for s, f in folders.items()
    }
    step_1, step_2 = image[0.6] - image[0.15], image[1.05] - image[0.6]  # (0.45 * noise) * bias, twice
    assert np.allclose(step_1, step_2, atol=1e-4) and step_1.std() > 0.1
    # the default is the generator's own noise, and a noise-free or absurd image is refused
    assert SyntheticSpec(dataset_id=18, name="N").image_noise == synthetic.NOISE_SIGMA
    for bad in (0.0, 4.0):
        with pytest.raises(ValueError, match=r"--image-noise must be in \(0, 3\]"):
            SyntheticSpec(dataset_id=18, name="N", image_noise=bad)
    assert main(["-d", "18", "--name", "N", "--image-noise", "0", "--raw-dir", str(tmp_path / "z")]) == 2
    assert "--image-noise must be in (0, 3]" in capsys.readouterr().err
