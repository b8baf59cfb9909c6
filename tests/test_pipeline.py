"""dataset.py -> train.py -> test.py on synthetic data, as a user runs them."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFEREE, run_script


def test_training_outputs_and_loss_goes_down(trained):
    run = trained / "runs" / "unet"
    for name in ("model.pt", "last.pt", "log.csv", "curves.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "best_f1", "threshold", "tta", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["config"]["base"] == 4
    # the final threshold, chosen on all training images with TTA, is the one model.pt carries
    final = torch.load(run / "model.pt", weights_only=False)
    assert 0 < final["threshold"] < 1 and final["threshold"] == ckpt["threshold"]
    assert final["tta"] == 4 and ckpt["tta"] == 4


@pytest.fixture(scope="module")
def tested(trained):
    r = run_script("test.py", cwd=trained)  # default checkpoint: runs/unet/model.pt, its TTA
    assert r.returncode == 0, r.stderr
    assert "runs/unet/model.pt" in r.stdout
    return trained / "results", r.stdout


def test_test_outputs(tested):
    res, stdout = tested
    m = json.load(open(res / "metrics.json"))
    assert m["n_images"] == 3 and m["tta"] == 4 and m["batch_size"] == 1 and m["fps"] > 0
    for k in ("f1", "jaccard", "recall", "precision", "specificity", "accuracy", "auc"):
        assert 0 <= m["pooled"][k] <= 1 and k in m["per_image_mean"]
    assert m["pooled"]["auc"] > 0.5  # a few steps already beat chance
    rows = list(csv.DictReader(open(res / "per_image.csv")))
    assert [r["id"] for r in rows] == ["01", "02", "03"]
    for sid in ("01", "02", "03"):
        pred = np.array(Image.open(res / "pred" / f"{sid}.png"))
        assert pred.shape == (100, 96) and set(np.unique(pred)) <= {0, 255}
        assert np.array(Image.open(res / "prob" / f"{sid}.png")).shape == (100, 96)
        assert np.array(Image.open(res / "side" / f"{sid}.png")).shape == (100, 4 * 96 + 30, 3)
    assert (res / "roc_pr.png").is_file()
    assert "model, pooled" in stdout


@pytest.mark.skipif(not os.path.isfile(REFEREE), reason="referee drive_score.py not beside the checkout")
def test_agrees_with_referee(tested, trained):
    res, _ = tested
    m = json.load(open(res / "metrics.json"))
    gt = str(trained / "synthetic_DRIVE")
    out = subprocess.run([sys.executable, REFEREE, str(res / "pred"), "--gt", gt],
                         capture_output=True, text=True, check=True).stdout
    ref = json.loads(out)
    assert ref["n"] == 3 and not ref["missing"]
    for k in ("f1", "jaccard", "recall", "precision", "specificity", "accuracy"):
        assert abs(ref[k] - m["pooled"][k]) < 1e-4, k
    assert abs(ref["f1_mean"] - m["per_image_mean"]["f1"]) < 1e-4
    pytest.importorskip("sklearn")
    out = subprocess.run([sys.executable, REFEREE, str(res / "prob"), "--gt", gt, "--probs"],
                         capture_output=True, text=True, check=True).stdout
    assert abs(json.loads(out)["auc"] - m["pooled"]["auc"]) < 1e-4


def test_resume_continues_exactly(synthetic, tmp_path):
    common = ["--data", synthetic / "data", "--crop", 32, "--crops-per-image", 2, "--base", 2]
    r = run_script("train.py", *common, "--epochs", 2, "--out", tmp_path / "a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *common, "--epochs", 1, "--out", tmp_path / "b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--data", synthetic / "data", "--epochs", 2, "--out", tmp_path / "b",
                   "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epochs 2..2" in r.stdout
    assert re.search(r"trained epochs 2\.\.2 in \d+m \d\ds", r.stdout), r.stdout
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert b["epoch"] == 2 and len(b["history"]) == 2
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    assert a["history"][1]["train_loss"] == b["history"][1]["train_loss"]


def test_max_steps_smoke_other_options(synthetic, tmp_path):
    """The other model, input and loss options train (the skeleton recall term with soft labels and
    a cascade's two outputs among them), and test.py rebuilds them from the checkpoint."""
    r = run_script("train.py", "--data", synthetic / "data", "--crop", 32, "--base", 2, "--max-steps", 2,
                   "--arch", "wnet", "--norm", "green", "--loss", "bce", "--precision", "fp32", "--no-tta",
                   "--no-train-on-val", "--soft-labels", "--beta2", 0.95, "--affine-first", "--elastic", 2,
                   "--scale", 0.7, 1.4, "--skeleton-recall", 0.5, "--out", tmp_path / "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reached --max-steps 2" in r.stdout and "trained on too" not in r.stdout
    ckpt = torch.load(tmp_path / "s" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["config"]["in_ch"] == 1 and ckpt["tta"] == 1
    assert ckpt["config"]["soft_labels"] is True and ckpt["config"]["affine_first"] is True
    assert ckpt["config"]["elastic"] == 2 and tuple(ckpt["config"]["scale"]) == (0.7, 1.4)
    assert ckpt["config"]["skeleton_recall"] == 0.5
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    r = run_script("test.py", "--checkpoint", tmp_path / "s" / "model.pt", "--data", synthetic / "data",
                   "--out", tmp_path / "res", "--precision", "fp32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / "res" / "metrics.json"))
    assert m["n_images"] == 3 and m["tta"] == 1 and m["precision"] == "fp32"


def test_s2d_trains_and_predicts(synthetic, tmp_path):
    """--arch s2d with a wider finest level trains, and test.py and predict.py rebuild it (inputs
    padded to 32); a threshold chosen with --tta 2 makes 2 flips test.py's default."""
    r = run_script("train.py", "--data", synthetic / "data", "--crop", 32, "--base", 2, "--max-steps", 2,
                   "--arch", "s2d", "--top-width", 4, "--precision", "fp32", "--tta", 2,
                   "--out", tmp_path / "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "space-to-depth U-Net base 2" in r.stdout and "mean of 2 flips" in r.stdout
    assert torch.load(tmp_path / "s" / "model.pt", weights_only=False)["tta"] == 2
    r = run_script("test.py", "--checkpoint", tmp_path / "s" / "model.pt", "--data", synthetic / "data",
                   "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "space-to-depth U-Net base 2, top 4" in r.stdout and "mean of 2 flips" in r.stdout
    assert json.load(open(tmp_path / "res" / "metrics.json"))["tta"] == 2
    image = next((synthetic / "data" / "test" / "images").iterdir())
    r = run_script("predict.py", image, "--checkpoint", tmp_path / "s" / "model.pt",
                   "--out", tmp_path / "pred", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pred" / f"{image.stem}_mask.png").is_file()


def test_default_s2d_is_two_levels_deep(synthetic, tmp_path):
    """s2d by default halves its input twice (--depth 2, crops of 8s): the checkpoint carries the
    depth, and test.py rebuilds the shallower network."""
    r = run_script("train.py", "--data", synthetic / "data", "--arch", "s2d", "--crop", 24, "--base", 2,
                   "--max-steps", 2, "--precision", "fp32", "--no-tta", "--out", tmp_path / "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "depth 2" in r.stdout
    ckpt = torch.load(tmp_path / "s" / "model.pt", weights_only=False)
    assert ckpt["config"]["depth"] == 2 and "net.encoders.1.conv.body.0.weight" in ckpt["model"]
    assert "net.encoders.2.conv.body.0.weight" not in ckpt["model"]
    r = run_script("test.py", "--checkpoint", tmp_path / "s" / "model.pt", "--data", synthetic / "data",
                   "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "space-to-depth U-Net base 2, top 5, depth 2" in r.stdout


def test_residual_s2d_trains_and_tests_in_int8(synthetic, tmp_path):
    """--residual reaches the checkpoint; test.py rebuilds the network, and its int8 form (traced by
    torch.fx through the residual blocks) is calibrated by train.py and runs in test.py."""
    r = run_script("train.py", "--data", synthetic / "data", "--arch", "s2d", "--crop", 24, "--base", 2,
                   "--max-steps", 2, "--residual", "--precision", "fp32", "--no-tta", "--out", tmp_path / "s",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "residual" in r.stdout and "int8 calibrated" in r.stdout
    assert torch.load(tmp_path / "s" / "model.pt", weights_only=False)["config"]["residual"] is True
    r = run_script("test.py", "--checkpoint", tmp_path / "s" / "model.pt", "--data", synthetic / "data",
                   "--precision", "int8", "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "space-to-depth U-Net base 2, top 5, depth 2, residual" in r.stdout
    r = run_script("train.py", "--arch", "wnet", "--residual", cwd=tmp_path)
    assert r.returncode != 0 and "--residual is for --arch unet or s2d" in r.stderr


def test_deep_supervision_trains_and_tests_in_int8(synthetic, tmp_path):
    """--deep-supervision reaches the checkpoint with its heads; test.py rebuilds the network, whose
    int8 form (traced through forward, without the heads) train.py calibrates and test.py runs."""
    r = run_script("train.py", "--data", synthetic / "data", "--crop", 32, "--base", 2, "--max-steps", 2,
                   "--deep-supervision", 2, "--precision", "fp32", "--no-tta", "--out", tmp_path / "u",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "U-Net base 2, deep supervision 2" in r.stdout and "int8 calibrated" in r.stdout
    ckpt = torch.load(tmp_path / "u" / "model.pt", weights_only=False)
    assert ckpt["config"]["deep"] == 2 and "deep.1.weight" in ckpt["model"]
    r = run_script("test.py", "--checkpoint", tmp_path / "u" / "model.pt", "--data", synthetic / "data",
                   "--precision", "int8", "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "U-Net base 2, deep supervision 2" in r.stdout
    for bad in (["--arch", "s2d", "--deep-supervision", "1"], ["--deep-supervision", "4"]):
        r = run_script("train.py", *bad, cwd=tmp_path)
        assert r.returncode != 0 and "--deep-supervision is for --arch unet" in r.stderr


def test_attention_trains_and_tests_in_int8(synthetic, tmp_path):
    """--attention reaches the checkpoint; test.py rebuilds the network and runs its int8 form
    (the gates' pooling, sigmoids and products quantized) from train.py's calibration."""
    r = run_script("train.py", "--data", synthetic / "data", "--crop", 32, "--base", 2, "--max-steps", 2,
                   "--attention", "scse", "--precision", "fp32", "--no-tta", "--out", tmp_path / "u",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "U-Net base 2, attention scse" in r.stdout and "int8 calibrated" in r.stdout
    ckpt = torch.load(tmp_path / "u" / "model.pt", weights_only=False)
    assert ckpt["config"]["attention"] == "scse" and "decoders.0.gate.spatial.0.weight" in ckpt["model"]
    r = run_script("test.py", "--checkpoint", tmp_path / "u" / "model.pt", "--data", synthetic / "data",
                   "--precision", "int8", "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "U-Net base 2, attention scse" in r.stdout
    r = run_script("train.py", "--arch", "s2d", "--attention", "sa", cwd=tmp_path)
    assert r.returncode != 0 and "--attention is for --arch unet" in r.stderr


def test_s2d_cascade_trains_and_tests(synthetic, tmp_path):
    """--arch s2dw (two space-to-depth U-Nets in cascade) trains, and test.py rebuilds it from
    the checkpoint."""
    r = run_script("train.py", "--data", synthetic / "data", "--crop", 32, "--base", 2, "--max-steps", 2,
                   "--arch", "s2dw", "--precision", "fp32", "--no-tta", "--out", tmp_path / "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "s" / "model.pt", weights_only=False)
    assert ckpt["config"]["top"] == 5 and any(k.startswith("second.net.") for k in ckpt["model"])
    r = run_script("test.py", "--checkpoint", tmp_path / "s" / "model.pt", "--data", synthetic / "data",
                   "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "space-to-depth W-Net base 2, top 5" in r.stdout


def test_corrupt_scores_degraded_photographs(tested, trained, tmp_path):
    """test.py --corrupt noise12: the photographs (first panel of side/) are degraded, the truth
    and the FOV are not, and the run is labelled as corrupted."""
    clean, _ = tested
    r = run_script("test.py", "--corrupt", "noise12", "--no-tta", "--out", tmp_path / "res", cwd=trained)
    assert r.returncode == 0, r.stderr
    assert "noise12-corrupted" in r.stdout
    m = json.load(open(tmp_path / "res" / "metrics.json"))
    assert m["corrupt"] == "noise12" and m["tta"] == 1 and m["n_images"] == 3
    assert "noise12-corrupted" in open(tmp_path / "res" / "summary.md").read()
    noisy, plain = (np.array(Image.open(d / "side" / "01.png")).astype(int)
                    for d in (tmp_path / "res", clean))
    assert np.abs(noisy[:, :96] - plain[:, :96]).mean() > 3  # the photograph panel
    assert np.array_equal(noisy[:, 106:202], plain[:, 106:202])  # the truth panel
    assert m["denoise"] is True
    # the noise-12 photographs are denoised by default: without it the probability maps change
    r = run_script("test.py", "--corrupt", "noise12", "--no-tta", "--no-denoise", "--out", tmp_path / "raw",
                   cwd=trained)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "raw" / "metrics.json"))["denoise"] is False
    assert "not denoised" in r.stdout
    raw, smoothed = (np.array(Image.open(d / "prob" / "01.png")).astype(int)
                     for d in (tmp_path / "raw", tmp_path / "res"))
    assert np.abs(raw - smoothed).mean() > 0.3


def test_zoom_scores_at_native_size(tested, trained, tmp_path):
    """test.py --zoom 1.5: the network sees the photographs 1.5x as large, the masks and
    probabilities come back at native size, unlike the plain run's, and the run is labelled."""
    clean, _ = tested
    r = run_script("test.py", "--zoom", 1.5, "--out", tmp_path / "res", cwd=trained)
    assert r.returncode == 0, r.stderr
    assert "zoomed 1.5x" in r.stdout and "zoomed 1.5x" in open(tmp_path / "res" / "summary.md").read()
    m = json.load(open(tmp_path / "res" / "metrics.json"))
    assert m["zoom"] == 1.5 and m["n_images"] == 3 and json.load(open(clean / "metrics.json"))["zoom"] == 1
    zoomed, plain = (np.array(Image.open(d / "prob" / "01.png")).astype(int) for d in (tmp_path / "res", clean))
    assert zoomed.shape == plain.shape and np.abs(zoomed - plain).mean() > 0.3
    fov = np.array(Image.open(trained / "data" / "test" / "fov" / "01.png")) > 0
    assert not zoomed[~fov].any()


@pytest.mark.parametrize("script", ["dataset.py", "train.py", "test.py"])
def test_help(script, tmp_path):
    r = run_script(script, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "default" in r.stdout


def test_eta_counts_only_this_sessions_epochs():
    import train
    # resumed after epoch 1 (whose 999 s came from another machine): mean 90 s x 8 epochs left
    history = [{"epoch": 1, "seconds": 999.0}, {"epoch": 2, "seconds": 60.0}, {"epoch": 3, "seconds": 120.0}]
    assert train.eta(history, 1, 11) == ", ~12m left"
    assert train.eta(history, 1, 119) == ", ~2h54m left"  # 116 x 90 s
    assert train.eta(history, 1, 4) == ", ~2m left"  # 90 s, to the nearest minute
    assert train.eta([{"epoch": 1, "seconds": 20.0}, {"epoch": 2, "seconds": 40.0}], 0, 3) == ", ~30s left"
    assert train.eta(history, 0, 3) == ""  # the last epoch: nothing left


def test_default_recipe_is_the_shipped_unet_and_s2d_keeps_its_own_defaults():
    import train
    args = train.get_args([])  # the shipped weights' recipe: --arch unet --batch-size 4 --epochs 120
    assert (args.arch, args.base, args.top, args.depth, args.batch_size, args.crop) == ("unet", 16, None, 4, 4, 256)
    s2d = ["--arch", "s2d"]
    assert (train.get_args(s2d).top, train.get_args(s2d).depth, train.get_args(s2d).batch_size) == (40, 2, 2)
    assert train.get_args(s2d + ["--base", "4"]).top == 10  # 2.5x --base for s2d
    assert train.get_args(s2d + ["--top-width", "24"]).top == 24
    assert train.get_args(["--arch", "s2dw"]).top == 40  # the cascade's first stage is s2d's network
    assert train.get_args(s2d + ["--crop", "248"]).crop == 248  # s2d at depth 2: multiples of 8
    assert train.get_args(["--arch", "s2dw"]).depth == 4 and train.get_args(["--batch-size", "1"]).batch_size == 1
    assert train.get_args(s2d + ["--depth", "4", "--crop", "224"]).depth == 4
    for bad in (["--arch", "wnet", "--depth", "3"], ["--depth", "0"], s2d + ["--depth", "3", "--crop", "248"],
                s2d + ["--depth", "4", "--crop", "248"], ["--crop", "248"], ["--batch-size", "0"],
                ["--fov-crops", "--affine-first"], ["--dropblock", "1"], ["--arch", "wnet", "--dropblock", "0.1"],
                ["--dropblock-size", "4"]):
        with pytest.raises(SystemExit):
            train.get_args(bad)
    r = run_script("train.py", "--arch", "s2d", "--crop", 250, cwd=".")
    assert r.returncode == 2 and "multiple of 8 for --arch s2d at --depth 2, got 250" in r.stderr, r.stderr


def test_ema_update_known_answers_and_rounding():
    """The foreach moving average: the ramped and the full decay, int64 buffers truncated, and
    bit for bit what d * averaged + (1 - d) * current gives one tensor at a time."""
    import train
    update = train.ema_update(0.99)
    avg, cur = [torch.tensor([1.0, -2.0])], [torch.tensor([3.0, 2.0])]
    update(avg, cur, torch.tensor(1))  # d = 2/11 while ramping up
    assert torch.allclose(avg[0], torch.tensor([2 / 11 + 27 / 11, -4 / 11 + 18 / 11]))
    avg = [torch.tensor([1.0])]
    update(avg, [torch.tensor([3.0])], torch.tensor(10 ** 6))  # d = 0.99
    assert torch.allclose(avg[0], torch.tensor([0.99 + 0.03]))
    counts = [torch.tensor(10, dtype=torch.long)]
    update(counts, [torch.tensor(20, dtype=torch.long)], torch.tensor(1))
    assert counts[0].dtype == torch.long and counts[0].item() == int(2 / 11 * 10 + 9 / 11 * 20)
    gen = torch.Generator().manual_seed(0)
    for count in (torch.tensor(3), torch.tensor(5000)):
        avg = [torch.randn(64, generator=gen), torch.randn(3, 3, generator=gen)]
        cur = [torch.randn_like(a) for a in avg]
        d = min(0.99, (1 + count) / (10 + count))
        expected = [d * a + (1 - d) * c for a, c in zip(avg, cur)]
        update(avg, cur, count)
        assert all(torch.equal(a, e) for a, e in zip(avg, expected))


def test_epochs_in_budget():
    import train
    # 30 min, 50 s gone after 2 epochs of 20 s, 30 s kept for the threshold: 2 + 1720 // 21 = 83
    assert train.epochs_in_budget(1800, 50, 2, 20, 30, 120) == 83
    assert train.epochs_in_budget(1800, 50, 2, 10, 30, 120) == 120  # never more than --epochs
    assert train.epochs_in_budget(60, 50, 2, 20, 30, 120) == 2  # over budget: stop after the warm-up
    assert train.budget_epoch({"warmup": 2}) == 2 and train.budget_epoch({"warmup": 0.5}) == 1


def test_slow_cpu_note_only_for_unbudgeted_unet_on_cpus_without_bf16():
    import train
    assert "fp32" in train.slow_cpu_note("cpu", False, "unet", None)
    assert train.slow_cpu_note("cpu", True, "unet", None) == ""  # native bf16: the README's times
    assert train.slow_cpu_note("cuda", False, "unet", None) == ""
    assert train.slow_cpu_note("cpu", False, "unet", 30) == ""  # --time-budget already fits the run
    assert train.slow_cpu_note("cpu", False, "s2d", None) == ""


def test_typical_epoch_seconds_ignores_a_stall():
    import train
    # 20 s epoch: 10 steps of 1.5 s and 5 s outside them; one stall of 10 s makes it 28.5 s
    steps = [1.5] * 9 + [10.0]
    assert train.typical_epoch_seconds(5 + sum(steps), steps) == pytest.approx(20.0)
    assert train.typical_epoch_seconds(20.0, [1.5] * 10) == pytest.approx(20.0)  # no stall: unchanged
    assert train.typical_epoch_seconds(7.0, []) == 7.0  # no step timed (--max-steps 0)


def test_time_budget_sets_the_epochs(synthetic, tmp_path):
    """A budget already spent ends the run after the warm-up's epochs, with a model and threshold;
    the number is stored, so --resume keeps it."""
    r = run_script("train.py", "--data", synthetic / "data", "--crop", 32, "--crops-per-image", 2,
                   "--base", 2, "--epochs", 5, "--time-budget", 0.001, "--no-tta", "--out", tmp_path / "t",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "-> 2 epochs in all (of at most 5); --epochs 2 repeats this run exactly" in r.stdout
    ckpt = torch.load(tmp_path / "t" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["config"]["epochs"] == 2 and len(ckpt["history"]) == 2
    assert (tmp_path / "t" / "model.pt").is_file()


@pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines,
                    reason="int8 inference needs PyTorch's x86 quantized engine")
def test_int8_inference_scores_like_fp32(tested, trained, tmp_path):
    """train.py stores an int8 calibration; test.py and predict.py --precision int8 use it."""
    assert torch.load(trained / "runs" / "unet" / "model.pt", weights_only=False)["int8"]
    r = run_script("test.py", "--precision", "int8", "--out", tmp_path / "res", cwd=trained)
    assert r.returncode == 0, r.stderr
    assert "int8" in r.stdout and "Warning" not in r.stderr
    m = json.load(open(tmp_path / "res" / "metrics.json"))
    fp = json.load(open(tested[0] / "metrics.json"))
    assert m["precision"] == "int8" and fp["precision"] != "int8"
    assert abs(m["pooled"]["auc"] - fp["pooled"]["auc"]) < 0.01, (m["pooled"], fp["pooled"])
    image = next((trained / "data" / "test" / "images").iterdir())
    r = run_script("predict.py", image, "--precision", "int8", "--out", tmp_path / "pred", cwd=trained)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pred" / f"{image.stem}_mask.png").is_file()


def test_inference_copy_keeps_what_fp16_cannot_hold():
    """model.pt stores weights as fp16, but a BatchNorm variance beyond fp16's range (trained
    networks reach 1e6) stays fp32: as an fp16 infinity it would silence its channel."""
    import train
    from model import S2DUNet
    from utils import inference_model
    torch.manual_seed(0)
    net = S2DUNet(base=2, top=4).eval()
    bn = net.net.decoders[0].conv.body[1]
    bn.running_var[:2] = torch.tensor([1.2e6, 7.0e4])  # a channel with activations of std ~1000
    bn.running_mean[:2] = torch.tensor([300.0, -80.0])
    cfg = {"arch": "s2d", "base": 2, "top": 4, "in_ch": 3}
    copy = train.inference_copy({"model": net.state_dict(), "config": cfg, "epoch": 1, "threshold": 0.5,
                                 "tta": 1, "val_f1": 0.0})
    key = "net.decoders.0.conv.body.1.running_var"
    assert copy["model"][key].dtype == torch.float32 and torch.equal(copy["model"][key], bn.running_var)
    assert copy["model"]["net.head.weight"].dtype == torch.float16
    assert not train.fits_fp16(torch.tensor([65520.0])) and train.fits_fp16(torch.tensor([-65504.0]))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = net(x), inference_model(copy, "model.pt")(x)
    assert torch.allclose(out, ref, atol=1e-2 * ref.std().item()), (out - ref).abs().max()


def test_validation_in_bf16_scores_like_fp32(trained):
    """The per-epoch validation runs in the training arithmetic, on the FOV's window as test.py
    predicts: bf16 must give the fp32 loss and F1 to within rounding, whatever the window cuts."""
    import train
    from loss import DiceBCELoss
    from preprocess import DriveDataset
    from utils import build_model
    ckpt = torch.load(trained / "runs" / "unet" / "last.pt", weights_only=False)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    dataset = DriveDataset(str(trained / "data"), "val", ckpt["config"]["norm"])
    fp32 = train.validate(model, dataset, DiceBCELoss(), torch.device("cpu"), bf16=False)
    bf16 = train.validate(model, dataset, DiceBCELoss(), torch.device("cpu"), bf16=True)
    assert all(np.isfinite(v) for v in fp32 + bf16) and 0 < fp32[2] < 1
    assert abs(fp32[0] - bf16[0]) < 0.01 and abs(fp32[3] - bf16[3]) < 0.02, (fp32, bf16)
    assert ckpt["history"][-1]["val_loss"] == pytest.approx(fp32[0], abs=0.02)  # as train.py logged it
