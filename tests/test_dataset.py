import glob
import json
import os
from functools import partial

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_DRIVE
from preprocess import (CORRUPTIONS, NOISE_FLOOR, NORMS, Bend, DriveDataset, FovCrop, RotatedCrop, denoise_photo,
                        fill_outside, noise_sigma, normalize_image, skeletonize, train_transform, tubed_skeleton,
                        zoom_photo)


def check_prepared(data, n_train, n_val, n_test, size):
    split = json.load(open(os.path.join(data, "split.json")))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (n_train, n_val, n_test)
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert not set(split["train"]) & set(split["val"])
    for name in ("train", "val", "test"):
        for sid in split[name]:
            for kind in ("images", "masks", "fov"):
                a = np.array(Image.open(os.path.join(data, name, kind, f"{sid}.png")))
                assert a.shape[:2] == (size[1], size[0])
                if kind == "images":
                    assert a.shape == (size[1], size[0], 3) and a.dtype == np.uint8
                else:
                    assert set(np.unique(a)) <= {0, 255}
    return split


def test_synthetic_prepared(synthetic):
    split = check_prepared(synthetic / "data", 4, 2, 3, (96, 100))
    assert split["test"] == ["01", "02", "03"]
    assert all(s.startswith(("2", "3")) for s in split["train"] + split["val"])


def test_synthetic_has_drive_layout(synthetic):
    root = synthetic / "synthetic_DRIVE"
    assert (root / "training" / "images" / "21_training.tif").is_file()
    assert (root / "training" / "1st_manual" / "21_manual1.gif").is_file()
    assert (root / "test" / "mask" / "01_test_mask.gif").is_file()
    vessel = np.array(Image.open(root / "test" / "1st_manual" / "01_manual1.gif").convert("L")) > 127
    fov = np.array(Image.open(root / "test" / "mask" / "01_test_mask.gif").convert("L")) > 127
    assert 0.02 < vessel.mean() < 0.3 and not (vessel & ~fov).any()


def test_dataset_items(synthetic):
    ds = DriveDataset(str(synthetic / "data"), "train", crop=64, repeats=3)
    assert len(ds) == 12
    image, mask, fov, sid = ds[5]
    assert image.shape == (3, 64, 64) and mask.shape == fov.shape == (1, 64, 64)
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    full = DriveDataset(str(synthetic / "data"), "test")
    assert full[0][0].shape == (3, 100, 96)
    with pytest.raises(IndexError):
        full[len(full)]


def test_dataset_of_two_splits(synthetic):
    data = str(synthetic / "data")
    train, val = DriveDataset(data, "train"), DriveDataset(data, "val")
    both = DriveDataset(data, ("train", "val"))
    assert both.ids == train.ids + val.ids and len(both) == len(train) + len(val)
    for i, ds, j in ((0, train, 0), (len(train), val, 0)):  # each image read from its own split
        assert both[i][3] == ds[j][3] and torch.equal(both[i][1], ds[j][1])


def test_green_input_has_one_channel(synthetic):
    ds = DriveDataset(str(synthetic / "data"), "train", norm="green", crop=64)
    image, mask, _, _ = ds[0]
    assert image.shape == (1, 64, 64) and mask.shape == (1, 64, 64)


def test_augmentation_reseed_repeats(synthetic):
    ds = DriveDataset(str(synthetic / "data"), "train", crop=64)
    ds.reseed(7)
    a = ds[0][0]
    ds.reseed(7)
    assert torch.equal(a, ds[0][0])



def test_degraded_crops_differ_and_repeat(synthetic):
    """--degrade 1: every crop comes from a degraded photograph, the same for the same seed;
    masks are untouched, and crops differ from the undegraded ones."""
    data = str(synthetic / "data")
    plain, degraded = (DriveDataset(data, "train", crop=64, degrade=d) for d in (0.0, 1.0))
    for ds in (plain, degraded):
        ds.reseed(7)
    (a, mask_a, _, _), (b, mask_b, _, _) = plain[0], degraded[0]
    assert torch.equal(mask_a, mask_b) and not torch.equal(a, b)
    degraded.reseed(7)
    assert torch.equal(b, degraded[0][0])


def test_soft_labels_keep_the_crops_and_soften_only_edges(synthetic):
    """--soft-labels: the same image crops as without it; masks in [0, 1] whose fractions
    sit on vessel edges and which round to nearly the nearest-pixel mask, with the same area."""
    data = str(synthetic / "data")
    hard, soft = (DriveDataset(data, "train", crop=64, repeats=8, soft_labels=s) for s in (False, True))
    hard.reseed(3)
    soft.reseed(3)
    fractional = 0
    for i in range(len(hard)):
        (a, mask_a, _, _), (b, mask_b, fov_b, _) = hard[i], soft[i]
        assert torch.equal(a, b) and mask_b.dtype == torch.float32
        assert 0 <= mask_b.min() and mask_b.max() <= 1 and 0 <= fov_b.min() and fov_b.max() <= 1
        assert ((mask_b > 0.5).float() != mask_a).float().mean() < 0.05
        assert abs(mask_b.sum() - mask_a.sum()) <= 0.05 * mask_a.sum() + 10
        fractional += ((mask_b > 0) & (mask_b < 1)).sum().item()
    assert fractional > 0  # some of the 32 crops were rotated or scaled


def test_skeletonize_known_answers():
    """A 5-pixel-wide bar thins to its middle row (its ends shortened by the thinning); a
    1-pixel line and a lone pixel stay as they are; a filled square thins to a point or a
    short segment at its centre, not to nothing."""
    bar = np.zeros((20, 30), bool)
    bar[5:10, 3:27] = True
    skel = skeletonize(bar)
    assert np.array_equal(np.nonzero(skel.any(1))[0], [7])  # only the middle row
    assert 15 <= skel.sum() <= 24 and not (skel & ~bar).any()
    line = np.zeros((9, 9), bool)
    line[4, 1:8] = True
    line[0, 0] = True
    assert np.array_equal(skeletonize(line), line)
    square = np.zeros((11, 11), bool)
    square[2:9, 2:9] = True
    centre = np.argwhere(skeletonize(square))
    assert 1 <= len(centre) <= 3 and np.abs(centre - 5).max() <= 1


def test_skeletonize_keeps_branches_connected():
    """A Y of 3-pixel-wide strokes thins to one 8-connected tree that reaches all three arms."""
    y = np.zeros((40, 40), np.uint8)
    for end in ((2, 2), (2, 37), (37, 20)):
        cv2.line(y, end, (20, 20), 1, 3)
    skel = skeletonize(y).astype(np.uint8)
    assert cv2.connectedComponents(skel, connectivity=8)[0] == 2  # background + one piece
    for row, col in ((2, 2), (37, 2), (20, 37)):  # the arms' ends (cv2 draws at (x, y))
        assert skel[max(row - 5, 0):row + 6, max(col - 5, 0):col + 6].any()


def test_tubed_skeleton_stays_inside_the_vessels():
    """The tube is the centre line widened by one pixel, cut to the mask: all of a 3-wide
    vessel, the middle 3 rows of a 7-wide one, and nothing beside a 1-wide one."""
    mask = np.zeros((30, 40), np.uint8)
    mask[3:6, 5:35] = 1  # 3 wide
    mask[12:19, 5:35] = 1  # 7 wide
    mask[25, 5:35] = 1  # 1 wide
    tube = tubed_skeleton(mask)
    assert tube.dtype == np.uint8 and not (tube & (1 - mask)).any()
    assert tube[3:6, 10:30].all() and tube[14:17, 10:30].all()
    assert not tube[12:14, 10:30].any() and not tube[17:19, 10:30].any()
    assert tube[25, 10:30].all()


def test_skeleton_dataset_adds_a_mask_channel(synthetic):
    """skeleton=True: the same image, vessel mask and FOV crops, and a second mask channel,
    the tubed skeleton warped alike: inside the vessels, and present where they are."""
    data = str(synthetic / "data")
    plain, skel = (DriveDataset(data, "train", crop=64, repeats=4, skeleton=s) for s in (False, True))
    plain.reseed(5)
    skel.reseed(5)
    for i in range(len(plain)):
        (a, mask_a, fov_a, _), (b, mask_b, fov_b, _) = plain[i], skel[i]
        assert mask_a.shape == (1, 64, 64) and mask_b.shape == (2, 64, 64)
        assert torch.equal(a, b) and torch.equal(mask_a, mask_b[:1]) and torch.equal(fov_a, fov_b)
        assert not (mask_b[1] > mask_b[0]).any()
        assert (mask_b[1].sum() > 0) == (mask_b[0].sum() > 20)


def rotated_crops(image, crop, n, **kwargs):
    """n crops of RotatedCrop(crop, **kwargs) of an (H, W) or (H, W, C) array, image and mask alike."""
    t = RotatedCrop(crop, **kwargs)
    t.set_random_seed(0)
    return [t(image=image, masks=[image[..., 0] if image.ndim == 3 else image]) for _ in range(n)]


def test_rotated_crop_unrotated_is_a_slice():
    """p_affine 0: every crop is the photograph's pixels at RandomCrop's offsets, unchanged."""
    yx = np.arange(30 * 40, dtype=np.float32).reshape(30, 40)  # each pixel holds its own index
    offsets = set()
    for out in rotated_crops(yx, 8, 50, p_affine=0):
        crop, (mask,) = out["image"], out["masks"]
        y0, x0 = divmod(int(crop[0, 0]), 40)
        assert np.array_equal(crop, yx[y0:y0 + 8, x0:x0 + 8]) and np.array_equal(mask, crop)
        offsets.add((y0, x0))
    assert len(offsets) > 40 and max(o[0] for o in offsets) <= 22 and max(o[1] for o in offsets) <= 32


def test_rotated_crop_quarter_turn_is_exact():
    """A quarter turn at scale 1 maps pixels onto pixels: the crop is np.rot90 of a slice."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for out in rotated_crops(image, 10, 20, rotate=(90, 90), scale=(1, 1), p_affine=1):
        crop = out["image"]
        hits = [(y, x) for y in range(31) for x in range(41)
                if any(np.array_equal(crop, np.rot90(image[y:y + 10, x:x + 10], k)) for k in (1, 3))]
        assert len(hits) == 1  # one slice of the photograph, turned by 90 degrees
        assert np.array_equal(out["masks"][0], crop[..., 0])


def test_rotated_crop_fills_only_beyond_the_photograph():
    """Rotated and scaled crops of an all-white photograph: black only where the warp leaves it
    (at a corner, never in the middle), no reflected copies; nearest-pixel masks stay binary."""
    white = np.full((64, 64), 255, np.uint8)
    outs = rotated_crops(white, 48, 40, p_affine=1)
    assert all(o["image"][24, 24] == 255 for o in outs)
    assert any((o["image"] == 0).any() for o in outs)  # rotated crops reach past the photograph's edge
    assert all(set(np.unique(o["masks"][0])) <= {0, 255} for o in outs)


def test_bend_field_is_smooth_and_sized():
    """Bend on a photograph whose pixels hold their x coordinate: the output minus the input is
    the field's x displacement, spread about its standard deviation and smooth (neighbours within
    a fraction of a pixel); a nearest-pixel mask stays binary."""
    ramp = np.tile(np.arange(128, dtype=np.float32), (128, 1))
    mask = (np.arange(128)[None, :] % 8 < 2).repeat(128, 0).astype(np.uint8)  # stripes, like vessels
    t = Bend(2.0)
    t.set_random_seed(0)
    spread = []
    for _ in range(10):
        out = t(image=ramp, masks=[mask])
        dx = (out["image"] - ramp)[8:-8, 8:-8]  # away from the reflected border
        assert np.abs(np.diff(dx, axis=1)).max() < 0.5 and np.abs(np.diff(dx, axis=0)).max() < 0.5
        assert set(np.unique(out["masks"][0])) == {0, 1}
        spread.append(dx.std())
    assert 1.0 < np.mean(spread) < 3.0


@pytest.mark.parametrize("warp", [partial(RotatedCrop, 96, p_affine=1), partial(Bend, 4.0)])
def test_warped_masks_stay_on_their_images(warp):
    """A mask warped as a mask (nearest pixel) covers what the same mask warped as an image
    (bilinear) shows: no shift between the two, as a floor instead of rounding would give."""
    yy, xx = np.mgrid[:128, :128]
    mask = ((np.sin(xx / 5.0) + np.cos(yy / 7.0)) > 1.2).astype(np.uint8)  # blobs 2-8 px across
    t = warp()
    t.set_random_seed(0)
    for _ in range(5):
        out = t(image=np.repeat(mask[..., None] * 255, 3, 2), masks=[mask])
        seen, warped = out["image"][..., 0] > 127, out["masks"][0] > 0
        assert (seen & warped).sum() / (seen | warped).sum() > 0.9


@pytest.mark.parametrize("affine_first,elastic,norm", [(True, 0.0, "clahe"), (False, 4.0, "clahe"),
                                                       (True, 4.0, "clahe"), (True, 4.0, "green")])
def test_affine_first_and_elastic_crops(synthetic, affine_first, elastic, norm):
    """--affine-first, --elastic: crops of the same shapes (one channel too: OpenCV's warps drop
    it) and value ranges, binary masks, other crops than the default's, and the same crops again
    after reseeding."""
    data = str(synthetic / "data")
    ds = DriveDataset(data, "train", norm, crop=64, repeats=4, affine_first=affine_first, elastic=elastic)
    default = DriveDataset(data, "train", norm, crop=64, repeats=4)
    ds.reseed(5)
    default.reseed(5)
    first = [ds[i] for i in range(len(ds))]
    differ = 0
    for (image, mask, fov, _), (other, *_) in zip(first, (default[i] for i in range(len(ds)))):
        assert image.shape == (NORMS[norm], 64, 64) and mask.shape == fov.shape == (1, 64, 64)
        assert 0 <= image.min() and image.max() <= 1
        assert set(mask.unique().tolist()) <= {0, 1} and set(fov.unique().tolist()) <= {0, 1}
        differ += not torch.equal(image, other)
    assert differ > 0
    ds.reseed(5)
    again = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))


def test_fov_crops_hold_a_fov_pixel():
    """FovCrop: every window holds a FOV pixel, however near the edge the FOV lies (a uniform
    window in a 100x120 frame holds the corner pixel 1 time in 69 * 89); image and masks are cut
    alike; train_transform pads a frame smaller than the crop first; an empty FOV is an error."""
    image = np.arange(100 * 120 * 3, dtype=np.uint32).reshape(100, 120, 3).astype(np.uint8)
    vessels, fov = np.zeros((100, 120), np.uint8), np.zeros((100, 120), np.uint8)
    fov[0, 0] = vessels[0, 0] = 1
    t = FovCrop(32)
    for seed in range(20):
        t.set_random_seed(seed)
        out = t(image=image, masks=[vessels, fov])
        assert out["image"].shape == (32, 32, 3) and [m.shape for m in out["masks"]] == [(32, 32)] * 2
        assert out["masks"][1].sum() == 1 and out["masks"][0].sum() == 1
        assert out["image"][0, 0].tolist() == image[0, 0].tolist()  # the window is clipped to the frame's corner
    cut = A.Compose(train_transform(32, fov_crops=True).transforms[:2])  # PadIfNeeded, then FovCrop
    small = cut(image=image[:20, :30], masks=[vessels[:20, :30], np.ones((20, 30), np.uint8)])
    assert small["image"].shape == (32, 32, 3) and small["masks"][1].sum() == 20 * 30
    with pytest.raises(ValueError, match="FOV mask is empty"):
        t(image=image, masks=[vessels, np.zeros_like(fov)])


def test_fov_crops_from_the_dataset(synthetic):
    """DriveDataset(fov_crops=True): crops of the usual shapes, each holding FOV pixels, the same
    crops again after reseeding."""
    ds = DriveDataset(str(synthetic / "data"), "train", crop=48, repeats=3, fov_crops=True)
    ds.reseed(3)
    first = [ds[i] for i in range(len(ds))]
    for image, mask, fov, _ in first:
        assert image.shape == (3, 48, 48) and mask.shape == fov.shape == (1, 48, 48) and fov.sum() > 0
    ds.reseed(3)
    assert all(torch.equal(a[0], ds[i][0]) for i, a in enumerate(first))


def test_fov_crops_see_the_rim_more_often():
    """On a disc-shaped FOV filling a frame, FOV-anchored windows cover the disc's outer ring more
    often relative to its centre than RandomCrop's windows do (the reason for --fov-crops)."""
    h = w = 128
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 63.5, xx - 63.5)
    fov = (r < 62).astype(np.uint8)
    ring, centre = (r >= 52) & (r < 62), r < 20
    ratios = []
    for fov_crops in (False, True):
        t = train_transform(48, fov_crops=fov_crops)
        t.set_random_seed(0)
        cut = t.transforms[1]  # the crop alone (after PadIfNeeded), before flips and warps
        seen = np.zeros((h, w))
        for _ in range(400):
            marker = np.arange(h * w, dtype=np.int32).reshape(h, w)
            out = cut(image=np.zeros((h, w, 3), np.uint8), masks=[marker, fov])
            seen.flat[np.unique(out["masks"][0])] += 1
        ratios.append(seen[ring].mean() / seen[centre].mean())
    assert ratios[1] > 1.3 * ratios[0]


def test_offline_augment_and_resize(synthetic, tmp_path):
    from conftest import run_script
    r = run_script("dataset.py", "--drive", synthetic / "synthetic_DRIVE", "--out", tmp_path / "d",
                   "--augment", "--resize", "64x64", "--val-count", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    split = json.load(open(tmp_path / "d" / "split.json"))
    assert len(split["train"]) == 4 * 4 and split["size"] == [64, 64]
    assert Image.open(tmp_path / "d" / "train" / "images" / f"{split['train'][1]}.png").size == (64, 64)
    # the test split always keeps native size
    assert Image.open(tmp_path / "d" / "test" / "images" / "01.png").size == (96, 100)


@pytest.mark.skipif(not os.path.isdir(REAL_DRIVE), reason="DRIVE not beside the checkout")
def test_real_drive(tmp_path):
    from conftest import run_script
    r = run_script("dataset.py", "--drive", REAL_DRIVE, "--out", tmp_path / "data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    split = check_prepared(tmp_path / "data", 16, 4, 20, (565, 584))
    assert split["test"] == [f"{i:02d}" for i in range(1, 21)]
    assert sorted(split["train"] + split["val"]) == [str(i) for i in range(21, 41)]
    assert len(os.listdir(tmp_path / "data" / "test" / "manual2")) == 20
    ds = DriveDataset(str(tmp_path / "data"), "val")
    image, mask, fov, _ = ds[0]
    assert image.shape == (3, 584, 565)
    assert 0.05 < mask.mean() < 0.2 and 0.6 < fov.mean() < 0.8


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_shape_and_repeat(name):
    """test.py --corrupt: each corruption returns a uint8 photograph of the same shape, changed,
    and the same one for the same seed (noise is drawn from it)."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 48, 3)) * 200 + 30).astype(np.uint8)
    out = CORRUPTIONS[name](rgb, 3)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not np.array_equal(out, rgb)
    assert np.array_equal(out, CORRUPTIONS[name](rgb, 3))


def edges_per_vessel_pixel(mask):
    """Vessel/background transitions along rows and columns per vessel pixel: halves when the
    vessels are twice as wide."""
    m = mask.astype(int)
    return (np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum()) / max(m.sum(), 1)


@pytest.mark.parametrize("affine_first", [False, True])
def test_scale_range_widens_vessels(affine_first):
    """train.py --scale: crops drawn with scale 2 show vessels twice as wide as with scale 1 (70 %
    of crops are scaled, so the mean edge density falls to about 0.3 + 0.7 / 2 of scale 1's)."""
    stripes = np.zeros((256, 256), np.uint8)
    stripes[:, (np.arange(256) % 8) < 2] = 1  # vertical vessels 2 px wide, 8 px apart
    rgb = np.repeat(stripes[..., None] * 200, 3, axis=2).astype(np.uint8)
    density = {}
    for scale in (1.0, 2.0):
        t = train_transform(64, scale=(scale, scale), affine_first=affine_first)
        t.set_random_seed(0)
        density[scale] = np.mean([edges_per_vessel_pixel(t(image=rgb, mask=stripes)["mask"]) for _ in range(60)])
    assert 0.5 < density[2.0] / density[1.0] < 0.8, density


def test_zoom_photo_scales_photograph_and_fov():
    """test.py --zoom: the photograph and its FOV are resized together; a 4 px vessel becomes
    6 px wide at 1.5x and 2 px at 0.5x; the FOV stays a bool mask."""
    rgb = np.zeros((40, 48, 3), np.uint8)
    rgb[:, 20:24] = 255
    fov = np.zeros((40, 48), bool)
    fov[4:36, 4:44] = True
    big, big_fov = zoom_photo(rgb, fov, 1.5)
    assert big.shape == (60, 72, 3) and big_fov.shape == (60, 72) and big_fov.dtype == bool
    assert (big[30, :, 0] > 127).sum() == 6 and big_fov.mean() == pytest.approx(fov.mean(), abs=0.02)
    small, small_fov = zoom_photo(rgb, fov, 0.5)
    assert small.shape == (20, 24, 3) and (small[10, :, 0] > 127).sum() == 2


def test_corruption_levels():
    """Known answers: gamma 1.6 darkens mid-grey 128 to 85; gains scale the channels; the ramp
    halves the left edge, the vignette the rim; noise has the std named; blur and low resolution
    flatten a checkerboard."""
    grey = np.full((64, 64, 3), 128, np.uint8)
    assert CORRUPTIONS["gamma1.6"](grey, 0)[0, 0, 0] == round(255 * (128 / 255) ** 1.6) == 85
    assert tuple(CORRUPTIONS["cast"](grey, 0)[0, 0]) == (160, 128, 90)
    assert tuple(CORRUPTIONS["dim0.6"](grey, 0)[0, 0]) == (77, 77, 77)
    for name, std in (("noise6", 6), ("noise12", 12)):
        assert abs(float(CORRUPTIONS[name](grey, 0).astype(float).std()) - std) < 0.3
    ramp = CORRUPTIONS["ramp0.5"](grey, 0)  # gain 0.5 at the left edge, 1 at the right
    assert ramp[5, 0, 1] == 64 and ramp[5, -1, 1] == 128 and np.all(np.diff(ramp[5, :, 1].astype(int)) >= 0)
    odd = np.full((65, 65, 3), 128, np.uint8)  # a centre pixel; the rim at radius 32.5
    vignette = CORRUPTIONS["vignette0.5"](odd, 0)
    assert vignette[32, 32, 0] == 128 and vignette[32, 0, 0] == round(128 * (1 - 0.5 * (32 / 32.5) ** 2))
    assert vignette[0, 0, 0] < vignette[32, 0, 0] < vignette[32, 16, 0] < 128  # corners darkest
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    for name in ("blur1", "lowres0.6"):
        assert CORRUPTIONS[name](board, 0).std() < 0.3 * board.std(), name


def ramp_photo():
    """A smooth fundus-like colour ramp (120,130,3) float, no edges."""
    yy, xx = np.mgrid[0:120, 0:130]
    return np.stack([120 + 0.5 * xx, 60 + 0.3 * yy, 30 + 0.1 * xx], axis=-1)


def test_noise_sigma_known_answers():
    """Immerkaer's estimate: the std of added Gaussian noise, ~0 on smooth content, and dark
    pixels (outside a fundus) left out."""
    ramp = ramp_photo()
    assert noise_sigma(ramp.round().astype(np.uint8)) < 0.5
    rng = np.random.default_rng(0)
    for std in (3, 8):
        noisy = np.clip(ramp + rng.normal(0, std, ramp.shape), 0, 255).round().astype(np.uint8)
        assert abs(noise_sigma(noisy) - std) < 0.05 * std, std
    framed = np.zeros((160, 170, 3), np.uint8)
    framed[20:140, 20:150] = np.clip(ramp + rng.normal(0, 5, ramp.shape), 0, 255).round()
    assert abs(noise_sigma(framed) - 5) < 0.25  # the black frame and the rim do not count
    assert noise_sigma(np.zeros((30, 30, 3), np.uint8)) == 0.0


def test_denoise_photo_smooths_noise_keeps_edges_and_clean_photographs():
    """Noise std 8 on two flat halves (grey 70 | 170): the filter removes most of it and keeps
    the 100-level edge within a pixel; a photograph under NOISE_FLOOR comes back as it was."""
    clean = np.full((80, 80, 3), 70.0)
    clean[:, 40:] = 170
    noisy = clean + np.random.default_rng(1).normal(0, 8, clean.shape)
    noisy = np.clip(noisy, 0, 255).round().astype(np.uint8)
    out = denoise_photo(noisy).astype(float)
    assert out[:, 5:35].std() < 0.5 * noisy[:, 5:35].astype(float).std()
    assert out[:, :39].mean() < 75 and out[:, 41:].mean() > 165  # no blur across the edge
    smooth = ramp_photo().round().astype(np.uint8)
    assert noise_sigma(smooth) < NOISE_FLOOR and denoise_photo(smooth) is smooth
    assert not np.array_equal(normalize_image(noisy, "clahe"), normalize_image(noisy, "clahe", denoise=False))


@pytest.mark.skipif(not os.path.isdir(REAL_DRIVE), reason="DRIVE not beside the checkout")
def test_drive_photographs_are_not_denoised():
    """All 40 DRIVE photographs estimate under NOISE_FLOOR, so denoising changes nothing there:
    not the training of the shipped weights, not their test scores."""
    from utils import read_image
    paths = sorted(glob.glob(os.path.join(REAL_DRIVE, "*", "images", "*.tif")))
    assert len(paths) == 40
    sigmas = [noise_sigma(read_image(path, "RGB")) for path in paths]
    assert 0.3 < min(sigmas) and max(sigmas) < NOISE_FLOOR


def disc_photo(size=96, radius=40):
    """A fundus-like uint8 (size,size,3) photograph: a disc of colour (150, 80, 40) with a dark
    vertical vessel through it, black outside; and its FOV mask (size,size) of 0/1."""
    yy, xx = np.mgrid[:size, :size]
    fov = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2).astype(np.uint8)
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[fov.astype(bool)] = (150, 80, 40)
    rgb[fov.astype(bool) & (abs(xx - size // 2) < 2)] = (90, 40, 20)
    return rgb, fov


def test_fill_outside_continues_the_fundus():
    """Known answer: inside the FOV (3 px in from its rim) the photograph is untouched; outside,
    far from the vessel, the fill is the fundus colour instead of black."""
    rgb, fov = disc_photo()
    out = fill_outside(rgb, fov)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    yy, xx = np.mgrid[:96, :96]
    kept = (yy - 48) ** 2 + (xx - 48) ** 2 < 37 ** 2  # the FOV 3 px in from its rim
    assert np.array_equal(out[kept], rgb[kept])
    corner = out[:10, :10].reshape(-1, 3).astype(float)
    assert np.abs(corner - (150, 80, 40)).max() <= 3


def test_clahe_fill_normalisation():
    """'clahe-fill' needs the FOV; it changes the image only by what the fill changes, so a
    photograph whose outside is already the fill normalises the same with either."""
    rgb, fov = disc_photo()
    with pytest.raises(ValueError, match="FOV"):
        normalize_image(rgb, "clahe-fill")
    filled = fill_outside(rgb, fov)
    assert np.array_equal(normalize_image(rgb, "clahe-fill", fov=fov), normalize_image(filled, "clahe"))
    assert not np.array_equal(normalize_image(rgb, "clahe-fill", fov=fov), normalize_image(rgb, "clahe"))
