"""Inference cost and quality: stock nnU-Net teacher ensemble vs our ONNX predictor with the r=2 student.

Everything is built here, for real, in a temporary nnU-Net workspace: a synthetic dataset with a labelled
held-out case, K stock nnU-Net teacher folds (`nnunet-distill train-teacher`), an r=2 student distilled from
them (`nnUNetv2_distillation_train`), exported and verified (`nnUNetv2_distillation_export_onnx -nn`) and
packaged (`nnunet-distill package`). Then, side by side on the same held-out case:

* end to end (command line, as a user runs it): `nnUNetv2_predict` with all K teacher folds and mirroring vs
  `nnUNetv2_distillation_predict` on the package, with and without mirroring;
* end to end in process (no interpreter start-up, no worker spawning): nnU-Net's sequential pipeline
  (`predict_from_files_sequential`: read, preprocess, sliding window, resample, write) for both predictors;
* network only, per patch: the teacher ensemble's K folds x 8 mirror passes (torch) vs one student pass (ONNX
  Runtime); plus single passes of teacher and student in torch, which isolate what the thinner network alone
  buys. K < 5 trained folds are extrapolated linearly to 5 folds, and the table says so;
* Dice of both segmentations against the held-out labels.

Speed-up goals (issue 4): >= 30x end to end and >= 100x network only, against a 5-fold ensemble with
mirroring. Tiny CPU-trained models segment poorly; the Dice rows show agreement with the labels honestly, not
a quality claim. Run: `python -m bench inference` or
`python -m bench.bench_inference [--folds 2] [--repeats 5] [--keep DIR]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.workspace import BenchWorkspace

DATASET_ID = 982
DATASET_NAME = "BenchInfer"
CONFIGURATION = "3d_fullres"
HELDOUT_ID = 983
TEACHER_BUDGET = ("-e", "2", "--iterations_per_epoch", "6", "--val_iterations", "2")
STUDENT_BUDGET = ("-e", "2", "--iterations_per_epoch", "6", "--val_iterations", "2")
TARGET_FOLDS = 5


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench(BenchWorkspace):
    def __init__(self, root: Path, folds: int, device: str):
        super().__init__(root, DATASET_ID, DATASET_NAME)
        self.folds = list(range(folds))
        self.device_name = device

    # ---------------------------------------------------------------- building the models
    def build(self, cases: int, size: list[int], heldout_size: list[int]) -> None:
        from nnunet_distill.nnunet_env import nnunet_executable as exe

        py = [sys.executable, "-m"]
        heldout_raw = self.root / "heldout"
        self.onnx = self.root / "export" / "student.onnx"
        self.package = self.root / "package"
        self.images = heldout_raw / f"Dataset{HELDOUT_ID:03d}_Heldout" / "imagesTs"
        self.labels = heldout_raw / f"Dataset{HELDOUT_ID:03d}_Heldout" / "labelsTs"
        self.teacher_dir = self.ws.results / self.dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        self.student_dir = (
            self.ws.results / self.dataset / "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"
        )
        if (self.package / "SHA256SUMS").is_file():
            self.say(f"reusing the models built in {self.root}")
            return
        self.say(
            f"building: {cases} training cases of {'x'.join(map(str, size))}, {len(self.folds)} teacher "
            f"folds, r=2 student, a held-out case of {'x'.join(map(str, heldout_size))} (log: {self.log})"
        )
        self.run(
            [
                *py,
                "nnunet_distill.cli.synthetic",
                "-d",
                str(DATASET_ID),
                "--name",
                DATASET_NAME,
                "--cases",
                str(cases),
                "--test-cases",
                "0",
                "--size",
                *map(str, size),
            ]
        )
        # the held-out case is larger than the training cases (and so than the patch): the sliding window then
        # visits several positions, as on real scans; same generator, contrasts and spacing, its own seed
        self.run(
            [
                *py,
                "nnunet_distill.cli.synthetic",
                "-d",
                str(HELDOUT_ID),
                "--name",
                "Heldout",
                "--cases",
                "2",
                "--test-cases",
                "1",
                "--size",
                *map(str, heldout_size),
                "--seed",
                "7",
                "--raw-dir",
                str(heldout_raw),
            ]
        )
        self.run(
            [
                exe("nnUNetv2_plan_and_preprocess"),
                "-d",
                str(DATASET_ID),
                "-c",
                CONFIGURATION,
                "--verify_dataset_integrity",
                "-npfp",
                "2",
                "-np",
                "2",
            ],
            planning=True,
        )
        for fold in self.folds:
            seconds = self.run(
                [
                    *py,
                    "nnunet_distill.cli.train_teacher",
                    "-d",
                    str(DATASET_ID),
                    "-c",
                    CONFIGURATION,
                    "-f",
                    str(fold),
                    "-p",
                    "nnUNetPlans",
                    *TEACHER_BUDGET,
                    "-device",
                    self.device_name,
                ]
            )
            self.say(f"  teacher fold {fold} trained in {seconds:.0f} s")
        seconds = self.run(
            [
                exe("nnUNetv2_distillation_train"),
                "-d",
                str(DATASET_ID),
                "-f",
                "0",
                "-r",
                "2",
                "-tf",
                *map(str, self.folds),
                *STUDENT_BUDGET,
                "-d_device",
                self.device_name,
            ]
        )
        self.say(f"  student distilled in {seconds:.0f} s")
        self.run(
            [
                exe("nnUNetv2_distillation_export_onnx"),
                "-d",
                str(DATASET_ID),
                "-f",
                "0",
                "-r",
                "2",
                "-nn",
                "-o",
                str(self.onnx),
            ]
        )
        self.run([*py, "nnunet_distill.cli.package", "--onnx", str(self.onnx), "-o", str(self.package)])

    # ---------------------------------------------------------------- measurements
    def cli_end_to_end(self) -> dict[str, float]:
        from nnunet_distill.nnunet_env import nnunet_executable as exe

        common = [
            "-i",
            str(self.images),
            "-device",
            self.device_name,
            "-npp",
            "1",
            "-nps",
            "1",
            "--disable_progress_bar",
        ]
        runs = {
            "teacher": [
                exe("nnUNetv2_predict"),
                *common,
                "-o",
                str(self.root / "pred_teacher"),
                "-d",
                str(DATASET_ID),
                "-c",
                CONFIGURATION,
                "-tr",
                "nnUNetTrainer",
                "-p",
                "nnUNetPlans",
                "-f",
                *map(str, self.folds),
            ],
            "student_tta": [
                exe("nnUNetv2_distillation_predict"),
                *common,
                "-o",
                str(self.root / "pred_student"),
                "-m",
                str(self.package),
            ],
            "student": [
                exe("nnUNetv2_distillation_predict"),
                *common,
                "-o",
                str(self.root / "pred_student_notta"),
                "-m",
                str(self.package),
                "--disable_tta",
            ],
        }
        env = self.env
        # nnU-Net caps torch at nnUNet_def_n_proc threads while predicting; give the teacher every core, as
        # ONNX Runtime gets for the student (pools stay at one process through -npp/-nps)
        self.env = {**env, "nnUNet_def_n_proc": str(os.cpu_count() or 1)}
        try:
            return {name: self.run(argv) for name, argv in runs.items()}
        finally:
            self.env = env

    def predictors(self):
        import nnunetv2.inference.predict_from_raw_data as nnunet_predict
        import torch
        from nnunet_distill.predict import OnnxRuntimePredictor
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        # as in cli_end_to_end: nnU-Net read nnUNet_def_n_proc (1 here) at import and would run the teacher's
        # sliding window on one thread while ONNX Runtime uses them all
        nnunet_predict.default_num_processes = os.cpu_count() or 1
        device = torch.device(self.device_name)
        teacher = nnUNetPredictor(device=device, allow_tqdm=False)
        teacher.initialize_from_trained_model_folder(str(self.teacher_dir), tuple(self.folds))
        student = OnnxRuntimePredictor(device=device, allow_tqdm=False)
        student.initialize_from_package(self.package)
        student_notta = OnnxRuntimePredictor(device=device, allow_tqdm=False, use_mirroring=False)
        student_notta.initialize_from_package(self.package)
        return teacher, student, student_notta

    def in_process_end_to_end(self, predictors, repeats: int) -> dict[str, list[float]]:
        names = ("teacher", "student_tta", "student")
        times: dict[str, list[float]] = {n: [] for n in names}
        cases = [[str(p)] for p in sorted(self.images.glob("*_0000.nii.gz"))]
        teacher = predictors[0]
        preprocessor = teacher.configuration_manager.preprocessor_class(verbose=False)
        data, _, _ = preprocessor.run_case(
            cases[0], None, teacher.plans_manager, teacher.configuration_manager, teacher.dataset_json
        )
        import torch

        times["teacher_window_per_fold"] = []
        for _r in range(repeats):
            t0 = time.perf_counter()  # the teacher's sliding window over all folds, per fold
            teacher.predict_logits_from_preprocessed_data(torch.from_numpy(data))
            times["teacher_window_per_fold"].append((time.perf_counter() - t0) / len(self.folds))
            for name, predictor in zip(
                names, predictors, strict=False
            ):  # interleaved: load drifts hit all equally
                out = self.root / f"seq_{name}"
                out.mkdir(exist_ok=True)
                t0 = time.perf_counter()
                predictor.predict_from_files_sequential(cases, str(out))
                times[name].append(time.perf_counter() - t0)
        return times

    def network_only(self, predictors, repeats: int) -> dict[str, list[float]]:
        """Seconds per patch: what each deployment runs for one sliding-window position."""
        import numpy as np
        import torch

        teacher, student, _ = predictors
        device = torch.device(self.device_name)
        patch = teacher.configuration_manager.patch_size
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, *patch), dtype=np.float32)).to(
            device
        )
        axes = [a + 2 for a in teacher.allowed_mirroring_axes]
        flips = [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        teacher_net = teacher.network.to(device).eval()
        teacher_weights = teacher.list_of_parameters
        from nnunet_distill.trained_student import load_student

        student_torch = load_student(
            self.student_dir / "fold_0", "checkpoint_final.pth", CONFIGURATION
        ).network
        student_torch = student_torch.to(device).eval()
        onnx_net = student.network
        x_np = x.cpu().numpy()

        def ensemble():  # nnU-Net's own procedure: per fold, load the weights, then 8 mirrored passes
            out = 0
            for weights in teacher_weights:
                teacher_net.load_state_dict(weights)
                for f in flips:
                    y = teacher_net(torch.flip(x, f) if f else x)
                    out = out + (torch.flip(y, f) if f else y)
            return out

        runs = {
            "teacher_ensemble": ensemble,
            "teacher_1pass": lambda: teacher_net(x),
            "student_torch_1pass": lambda: student_torch(x),
            "student_onnx_1pass": lambda: onnx_net.session.run(None, {onnx_net.input_name: x_np}),
        }
        times: dict[str, list[float]] = {n: [] for n in runs}
        with torch.inference_mode():
            for fn in runs.values():  # warm-up
                fn()
            for _ in range(repeats):
                for name, fn in runs.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
        return times

    def dice(self, folder: Path) -> dict[str, float]:
        import numpy as np
        import SimpleITK as sitk

        labels = json.loads((self.ws.raw / self.dataset / "dataset.json").read_text())["labels"]
        scores: dict[str, list[float]] = {k: [] for k, v in labels.items() if v != 0}
        for ref_file in sorted(self.labels.glob("*.nii.gz")):
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / ref_file.name)))
            for name, value in labels.items():
                if value == 0:
                    continue
                a, b = ref == value, pred == value
                denominator = a.sum() + b.sum()
                scores[name].append(1.0 if denominator == 0 else float(2 * (a & b).sum() / denominator))
        out = {k: float(np.mean(v)) for k, v in scores.items()}
        out["mean"] = float(np.mean(list(out.values())))
        return out

    @staticmethod
    def say(text: str) -> None:
        print(text, flush=True)


def _report(bench: Bench, cli: dict, seq: dict, net: dict, dice_teacher: dict, dice_student: dict) -> None:
    k = len(bench.folds)
    scale = TARGET_FOLDS / k
    med = {n: statistics.median(v) for n, v in {**seq, **{f"net_{n}": v for n, v in net.items()}}.items()}
    extrapolated = "" if k == TARGET_FOLDS else f" (extrapolated from {k} trained folds x{scale:.1f})"
    rows = [
        (
            "end to end, command line (s)",
            f"teacher {k} folds + TTA",
            cli["teacher"],
            "student ONNX, no TTA",
            cli["student"],
        ),
        ("", f"teacher {k} folds + TTA", cli["teacher"], "student ONNX + TTA", cli["student_tta"]),
        (
            "end to end, in process (s, median)",
            f"teacher {k} folds + TTA",
            med["teacher"],
            "student ONNX, no TTA",
            med["student"],
        ),
        ("", f"teacher {k} folds + TTA", med["teacher"], "student ONNX + TTA", med["student_tta"]),
        (
            "network per patch (s, median)",
            f"ensemble {k} folds x 8",
            med["net_teacher_ensemble"],
            "student ONNX x 1",
            med["net_student_onnx_1pass"],
        ),
        (
            "",
            "teacher torch x 1",
            med["net_teacher_1pass"],
            "student torch x 1",
            med["net_student_torch_1pass"],
        ),
        (
            "",
            "student torch x 1",
            med["net_student_torch_1pass"],
            "student ONNX x 1",
            med["net_student_onnx_1pass"],
        ),
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\ndevice: {bench.device_name}; same held-out case(s) for every row; {os.cpu_count()} CPU threads "
        f"for torch and ONNX Runtime alike; load average {load} (timings on a shared CPU vary 3-4x)"
    )
    print(f"{'measure':36} {'baseline':26} {'seconds':>9}   {'ours':22} {'seconds':>9} {'speed-up':>9}")
    for label, base_name, base, ours_name, ours in rows:
        print(f"{label:36} {base_name:26} {base:9.3f}   {ours_name:22} {ours:9.3f} {base / ours:8.1f}x")

    # 5-fold figures: only the teacher's sliding window grows with the fold count; reading, preprocessing,
    # resampling and writing are paid once per case whatever the number of folds
    net5 = med["net_teacher_ensemble"] * scale
    e2e5 = med["teacher"] + (TARGET_FOLDS - k) * med["teacher_window_per_fold"]
    print(f"\n5-fold teacher ensemble{extrapolated}:")
    print(
        f"  network per patch: {net5:.3f} s vs student ONNX {med['net_student_onnx_1pass']:.4f} s -> "
        f"{net5 / med['net_student_onnx_1pass']:.0f}x (goal >= 100x)"
    )
    print(
        f"  end to end in process: {e2e5:.2f} s (measured {k}-fold pipeline + {TARGET_FOLDS - k} x "
        f"{med['teacher_window_per_fold']:.2f} s sliding window per extra fold) vs student ONNX no TTA "
        f"{med['student']:.2f} s -> {e2e5 / med['student']:.1f}x (goal >= 30x)"
    )
    print(
        "  architecture alone (one torch pass each): "
        f"{med['net_teacher_1pass'] / med['net_student_torch_1pass']:.1f}x; "
        f"ONNX Runtime vs torch for the student: "
        f"{med['net_student_torch_1pass'] / med['net_student_onnx_1pass']:.1f}x"
    )
    print(
        "\nDice against the held-out labels (tiny CPU training budgets: a smoke check, not a quality claim):"
    )
    print(f"  {'label':10} {'teacher ensemble':>17} {'student (ONNX+TTA)':>19}")
    for key, teacher_value in dice_teacher.items():
        print(f"  {key:10} {teacher_value:17.3f} {dice_student[key]:19.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_inference", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--folds", type=int, default=2, help="teacher folds to train (default 2; 5 is the goal's)"
    )
    parser.add_argument("--cases", type=int, default=10, help="synthetic training cases (default 10)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=[48, 48, 48],
        help="training case size x y z (default 48 48 48, which becomes the patch size)",
    )
    parser.add_argument(
        "--heldout-size",
        type=int,
        nargs=3,
        default=[64, 64, 64],
        help="held-out case size x y z (default 64 64 64: 8 sliding-window positions)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the workspace in this folder; a folder kept earlier is reused (no retraining)",
    )
    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] if __name__ == "__main__" else []))
    if not 2 <= args.folds <= TARGET_FOLDS:
        parser.error(f"--folds must be in 2..{TARGET_FOLDS} (the student is validated on fold 0 of them)")

    from nnunet_distill.nnunet_env import select_device

    device = select_device(args.device).type
    for key, value in {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}.items():
        os.environ.setdefault(key, value)
    root = Path(tempfile.mkdtemp(prefix="bench_inference_")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(root, args.folds, device)
        for key, value in bench.env.items():
            if key.startswith("nnUNet"):
                os.environ[key] = value
        bench.build(args.cases, args.size, args.heldout_size)
        cli = bench.cli_end_to_end()
        predictors = bench.predictors()
        seq = bench.in_process_end_to_end(predictors, max(1, min(2, args.repeats)))
        net = bench.network_only(predictors, args.repeats)
        _report(bench, cli, seq, net, bench.dice(root / "pred_teacher"), bench.dice(root / "pred_student"))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
