"""predict.py: the FOV estimate against known FOVs (synthetic and, when present, the
official DRIVE masks), and the command line end to end on photographs of several
sizes and formats, a corrupt file, a missing path and a tiled run."""
import csv
import glob
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DRIVE, run_script
from dataset import synthetic_fundus
from predict import estimate_fov, output_ids, rescale_factor
from preprocess import NOISE_FLOOR, noise_sigma
from utils import read_image, read_mask, rle_decode

TRAINED_FOV = 90  # FOV diameter of the 96x100 synthetic images the `trained` model saw


def iou(a, b):
    return np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)


def checkpoint(trained):
    return str(trained / "runs" / "unet" / "model.pt")


def write_synthetic(path, w, h, seed, mode="RGB"):
    """Save a synthetic fundus photograph of w x h at path; returns (H, W)."""
    image = Image.fromarray(synthetic_fundus(np.random.default_rng(seed), w, h)[0])
    image.convert(mode).save(path)
    return h, w


# ---------------------------------------------------------------- FOV estimate
@pytest.mark.parametrize("size", [(96, 100), (300, 280), (565, 584)])
def test_estimate_fov_matches_synthetic_fov(size):
    rng = np.random.default_rng(size[0])
    for _ in range(3):
        image, _, fov = synthetic_fundus(rng, *size)
        for rgb in (image, np.repeat(image.max(axis=2, keepdims=True), 3, axis=2)):  # colour, gray
            estimate = estimate_fov(rgb)
            assert estimate.dtype == bool and estimate.shape == fov.shape
            assert iou(estimate, fov) >= 0.95


def test_estimate_fov_without_dark_background_is_everything():
    rgb = np.full((40, 50, 3), 120, np.uint8)
    assert estimate_fov(rgb).all()


def test_estimate_fov_matches_official_drive_masks():
    if not os.path.isdir(REAL_DRIVE):
        pytest.skip(f"{REAL_DRIVE} not present")
    ious = {}
    for split in ("training", "test"):
        for path in sorted(glob.glob(os.path.join(REAL_DRIVE, split, "images", "*.tif"))):
            sid = os.path.basename(path).split("_")[0]
            (mask_path,) = glob.glob(os.path.join(REAL_DRIVE, split, "mask", f"{sid}_*"))
            ious[os.path.basename(path)] = iou(estimate_fov(read_image(path, "RGB")), read_mask(mask_path))
    assert len(ious) == 40
    low = {k: round(v, 4) for k, v in ious.items() if v < 0.95}
    assert not low, f"FOV IoU below 0.95: {low}"


# ---------------------------------------------------------------- helpers
def test_rescale_factor():
    fov = synthetic_fundus(np.random.default_rng(0), 300, 280)[2]  # diameter about 263
    assert rescale_factor(fov, 263) == 1.0
    assert rescale_factor(fov, 0) == 1.0
    assert rescale_factor(fov, 90) == pytest.approx(90 / 263, rel=0.02)
    assert rescale_factor(fov, 540) == pytest.approx(540 / 263, rel=0.02)


def test_output_ids_are_unique():
    paths = ["x/a.png", "y/a.tif", "x/b.png", "x/x_a.png", "z/x/a.jpg"]
    ids = output_ids(paths)
    assert len(set(ids)) == len(ids)
    assert ids[2] == "b" and ids[3] == "x_a"  # unique stems are kept as they are


# ---------------------------------------------------------------- command line
def check_outputs(out, sid, shape):
    """The three PNGs of one image: sizes, binary mask, zero outside the FOV; returns mask."""
    mask = np.array(Image.open(out / f"{sid}_mask.png"))
    prob = np.array(Image.open(out / f"{sid}_prob.png"))
    over = np.array(Image.open(out / f"{sid}_overlay.png"))
    assert mask.shape == shape and prob.shape == shape and over.shape == shape + (3,)
    assert set(np.unique(mask)) <= {0, 255}
    assert not mask[prob == 0].any()  # prob is zero outside the FOV, so is the mask
    return mask > 127


def test_predict_end_to_end(trained, tmp_path):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    shapes = {
        "a": write_synthetic(photos / "a.tif", 96, 100, 1),
        "b": write_synthetic(photos / "b.png", 300, 280, 2),  # FOV ~263: shrunk to ~90
        "c": write_synthetic(photos / "c.jpg", 120, 110, 3),
        "d": write_synthetic(photos / "d.ppm", 100, 96, 4),
        "gray": write_synthetic(photos / "gray.png", 96, 100, 5, mode="L"),
        "small": write_synthetic(photos / "small.png", 48, 50, 6),  # FOV ~45: enlarged
        "more_a": write_synthetic(photos / "more" / "a.png", 80, 84, 7),  # same stem as a.tif
    }
    shapes["photos_a"] = shapes.pop("a")
    (photos / "bad.png").write_bytes(b"this is not a PNG file at all" * 10)
    (photos / "notes.txt").write_text("not an image; folders only yield image files")
    out, rle = tmp_path / "out", tmp_path / "masks.csv"
    r = run_script("predict.py", photos, str(photos / "more" / "*.png"), "--checkpoint", checkpoint(trained),
                   "--out", out, "--rle", rle, "--target-fov", TRAINED_FOV, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "bad.png" in r.stderr and "notes.txt" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 of 8 images failed")
    masks = {sid: check_outputs(out, sid, shape) for sid, shape in shapes.items()}
    assert not list(out.glob("bad_*"))
    with open(rle, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(row) for row in rows[:1]] == [["id", "height", "width", "runs"]]
    assert sorted(row["id"] for row in rows) == sorted(shapes)
    for row in rows:
        shape = (int(row["height"]), int(row["width"]))
        assert shape == shapes[row["id"]]
        assert np.array_equal(rle_decode(row["runs"], shape), masks[row["id"]])


def test_fov_angle_shrinks_the_target(trained, tmp_path):
    """--fov-angle 30 with --target-fov 90 is --target-fov 60 (90 x 30 / 45): the same maps,
    different from --target-fov 90's; with --target-fov 0 it is refused."""
    photo = tmp_path / "b.png"
    write_synthetic(photo, 300, 280, 2)  # FOV ~263 px
    maps = {}
    for name, flags in (("angle", ("--target-fov", 90, "--fov-angle", 30)), ("60", ("--target-fov", 60)),
                        ("90", ("--target-fov", 90))):
        r = run_script("predict.py", photo, "--checkpoint", checkpoint(trained), "--out", tmp_path / name,
                       "--no-tta", "--device", "cpu", *flags, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        maps[name] = np.array(Image.open(tmp_path / name / "b_prob.png")).astype(int)
    assert np.array_equal(maps["angle"], maps["60"])
    assert np.abs(maps["angle"] - maps["90"]).mean() > 0.3
    r = run_script("predict.py", photo, "--target-fov", 0, "--fov-angle", 30, cwd=tmp_path)
    assert r.returncode != 0 and "--fov-angle rescales to --target-fov, which is 0" in r.stderr


def test_predict_missing_path(trained, tmp_path):
    out = tmp_path / "out"
    r = run_script("predict.py", tmp_path / "nope.png", "--checkpoint", checkpoint(trained),
                   "--out", out, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.png" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_predict_fov_of_wrong_size(trained, tmp_path):
    write_synthetic(tmp_path / "eye.png", 96, 100, 8)
    Image.fromarray(np.full((50, 60), 255, np.uint8)).save(tmp_path / "fov.png")
    r = run_script("predict.py", tmp_path / "eye.png", "--fov", tmp_path / "fov.png", "--checkpoint",
                   checkpoint(trained), "--out", tmp_path / "out", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 1
    assert "fov.png" in r.stderr and "60x50" in r.stderr
    assert not (tmp_path / "out" / "eye_mask.png").exists()


def test_predict_tiled(trained, tmp_path):
    shape = write_synthetic(tmp_path / "wide.png", 200, 180, 9)
    out = tmp_path / "out"
    r = run_script("predict.py", tmp_path / "wide.png", "--tile", 64, "--target-fov", 0, "--tta",
                   "--checkpoint", checkpoint(trained), "--out", out, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_outputs(out, "wide", shape)


def test_predict_denoises_noisy_photographs_only(trained, tmp_path):
    """A photograph with noise std 12 gets other maps with --no-denoise; a clean one (noise
    estimated under the floor) gets the same maps either way."""
    rgb = synthetic_fundus(np.random.default_rng(10), 96, 100)[0].astype(float)
    clean = cv2.GaussianBlur(rgb, (0, 0), 1.0).round().astype(np.uint8)  # its std-4 noise smoothed away
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 12, rgb.shape), 0, 255).round().astype(np.uint8)
    assert noise_sigma(clean) < NOISE_FLOOR < noise_sigma(noisy)
    for name, image in (("clean", clean), ("noisy", noisy)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    probs = {}
    for flag in ("--denoise", "--no-denoise"):
        out = tmp_path / flag
        r = run_script("predict.py", tmp_path / "clean.png", tmp_path / "noisy.png", flag, "--checkpoint",
                       checkpoint(trained), "--out", out, "--target-fov", TRAINED_FOV, "--device", "cpu",
                       cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        probs[flag] = {n: np.array(Image.open(out / f"{n}_prob.png")).astype(int) for n in ("clean", "noisy")}
    assert np.array_equal(probs["--denoise"]["clean"], probs["--no-denoise"]["clean"])
    assert np.abs(probs["--denoise"]["noisy"] - probs["--no-denoise"]["noisy"]).mean() > 0.3
