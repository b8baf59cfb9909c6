"""Bad input: one line on stderr naming the file, non-zero exit, nothing half-written."""
import os
import shutil

import pytest
import torch

from conftest import SMALL, run_script


@pytest.fixture
def drive_copy(synthetic, tmp_path):
    root = tmp_path / "DRIVE"
    shutil.copytree(synthetic / "synthetic_DRIVE", root)
    return root


def fails_cleanly(r, *words, out=None):
    assert r.returncode != 0
    # progress bars also write to stderr; the error is one line, the last
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and sum(ln.startswith("error:") for ln in lines) == 1
    for w in words:
        assert str(w) in lines[-1], lines[-1]
    if out is not None:
        assert not os.path.exists(out)
    return lines[-1]


def prepare(root, tmp_path):
    return run_script("dataset.py", "--drive", root, "--out", tmp_path / "data", "--val-count", 2,
                      cwd=tmp_path)


def test_missing_drive_folder(tmp_path):
    fails_cleanly(run_script("dataset.py", "--drive", tmp_path / "nope", cwd=tmp_path),
                  "nope", "download", out=tmp_path / "data")


def test_missing_file(drive_copy, tmp_path):
    victim = drive_copy / "training" / "mask" / "23_training_mask.gif"
    victim.unlink()
    fails_cleanly(prepare(drive_copy, tmp_path), "mask", "23", out=tmp_path / "data")


def test_extra_file(drive_copy, tmp_path):
    manual = drive_copy / "test" / "1st_manual"
    shutil.copy(manual / "01_manual1.gif", manual / "07_manual1.gif")
    fails_cleanly(prepare(drive_copy, tmp_path), "07_manual1.gif", out=tmp_path / "data")


def test_corrupt_image(drive_copy, tmp_path):
    (drive_copy / "training" / "images" / "22_training.tif").write_bytes(b"not a tiff at all")
    fails_cleanly(prepare(drive_copy, tmp_path), "22_training.tif", "cannot read", out=tmp_path / "data")


def test_size_mismatch(drive_copy, tmp_path):
    from PIL import Image
    path = drive_copy / "test" / "1st_manual" / "02_manual1.gif"
    Image.open(path).convert("L").resize((50, 50)).save(path)
    fails_cleanly(prepare(drive_copy, tmp_path), "02_manual1.gif", "50x50", out=tmp_path / "data")


def test_existing_data_untouched_on_failure(drive_copy, tmp_path):
    assert prepare(drive_copy, tmp_path).returncode == 0
    before = sorted(os.listdir(tmp_path / "data" / "train" / "images"))
    (drive_copy / "training" / "images" / "22_training.tif").write_bytes(b"junk")
    fails_cleanly(prepare(drive_copy, tmp_path), "22_training.tif")
    assert sorted(os.listdir(tmp_path / "data" / "train" / "images")) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_empty_data(tmp_path):
    (tmp_path / "data").mkdir()
    fails_cleanly(run_script("train.py", "--max-steps", 1, cwd=tmp_path), "split.json", "dataset.py",
                  out=tmp_path / "runs")


def test_checkpoint_from_another_model(synthetic, tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"model": {"conv.weight": torch.zeros(3)}, "config": {"base": 8}}, bad)
    fails_cleanly(run_script("test.py", "--checkpoint", bad, "--data", synthetic / "data",
                             "--out", tmp_path / "res", cwd=tmp_path), "other.pt", out=tmp_path / "res")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    fails_cleanly(run_script("test.py", "--checkpoint", tmp_path / "junk.pt", "--data", synthetic / "data",
                             "--out", tmp_path / "res", cwd=tmp_path), "junk.pt", out=tmp_path / "res")


def test_missing_checkpoint(synthetic, tmp_path):
    fails_cleanly(run_script("test.py", "--checkpoint", tmp_path / "none.pt", "--data", synthetic / "data",
                             "--out", tmp_path / "res", cwd=tmp_path), "none.pt", "not found")


def test_bad_cli_values(tmp_path):
    r = run_script("train.py", "--arch", "unet", "--crop", 100, cwd=tmp_path)
    assert r.returncode != 0 and "--crop must be a positive multiple of 16" in r.stderr
    r = run_script("train.py", "--arch", "s2d", "--depth", 4, "--crop", 48, cwd=tmp_path)
    assert r.returncode != 0 and "--crop must be a positive multiple of 32 for --arch s2d" in r.stderr
    r = run_script("train.py", "--arch", "unet", "--refine", 8, cwd=tmp_path)
    assert r.returncode != 0 and "--refine must be 0 or more and is for --arch s2d" in r.stderr
    r = run_script("train.py", "--degrade", 2, cwd=tmp_path)
    assert r.returncode != 0 and "--degrade is a fraction" in r.stderr
    r = run_script("train.py", "--beta2", 1, cwd=tmp_path)
    assert r.returncode != 0 and "--beta2 must lie between 0 and 1" in r.stderr
    r = run_script("train.py", "--skeleton-recall", -1, cwd=tmp_path)
    assert r.returncode != 0 and "--skeleton-recall is a loss weight, 0 or more; got -1.0" in r.stderr
    r = run_script("train.py", "--elastic", -3, cwd=tmp_path)
    assert r.returncode != 0 and "--elastic is a displacement in pixels and must be 0 or more" in r.stderr
    r = run_script("train.py", "--scale", 1.2, 0.9, cwd=tmp_path)
    assert r.returncode != 0 and "--scale needs 0 < MIN <= MAX, got 1.2 0.9" in r.stderr
    r = run_script("test.py", "--zoom", 0, cwd=tmp_path)
    assert r.returncode != 0 and "--zoom: must be between 0.1 and 10, got 0" in r.stderr
    r = run_script("dataset.py", "--synthetic", "--synthetic-size", "big", cwd=tmp_path)
    assert r.returncode != 0 and "WIDTHxHEIGHT" in r.stderr


def test_synthetic_small_is_valid(tmp_path):
    assert run_script("dataset.py", "--synthetic", *SMALL, cwd=tmp_path).returncode == 0


def test_resume_from_bad_checkpoint(synthetic, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    fails_cleanly(run_script("train.py", "--data", synthetic / "data", "--resume", tmp_path / "junk.pt",
                             "--out", tmp_path / "run", cwd=tmp_path), "junk.pt", "not a readable checkpoint")
    fails_cleanly(run_script("train.py", "--data", synthetic / "data", "--resume", "--out", tmp_path / "none",
                             cwd=tmp_path), "last.pt", "no checkpoint to resume from")
