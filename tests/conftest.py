"""Shared fixtures: a small synthetic DRIVE folder drawn by dataset.py, and a runner
for the scripts as a user would call them (a subprocess in a scratch folder)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
REAL_DRIVE = os.path.join(SHARED, "DRIVE")
REFEREE = os.path.join(SHARED, "tools", "drive_score.py")
sys.path.insert(0, ROOT)

SMALL = ["--synthetic-size", "96x100", "--synthetic-count", "6", "3", "--val-count", "2"]


def run_script(script, *args, cwd):
    """Run one of the repo's scripts; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A scratch folder holding synthetic_DRIVE/ and its prepared data/."""
    work = tmp_path_factory.mktemp("synthetic")
    r = run_script("dataset.py", "--synthetic", *SMALL, cwd=work)
    assert r.returncode == 0, r.stderr
    return work


@pytest.fixture(scope="session")
def trained(synthetic):
    """A few epochs of training on the synthetic set: runs/unet/ in the synthetic folder. The plain
    U-Net: after 3 epochs at base 4 it already responds to its input as the predict tests expect
    (the default s2d's maps barely move yet); s2d's own pipeline is test_s2d_trains_and_predicts."""
    r = run_script("train.py", "--arch", "unet", "--epochs", 3, "--crop", 64, "--crops-per-image", 4,
                   "--base", 4, "--batch-size", 4, cwd=synthetic)
    assert r.returncode == 0, r.stderr
    return synthetic
