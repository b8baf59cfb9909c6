"""Read DRIVE (or draw a synthetic DRIVE) and write the prepared splits into data/.

    python dataset.py --drive path/to/DRIVE      # real data
    python dataset.py --synthetic                # procedurally drawn, no download

data/ holds train/ val/ test/, each with images/ masks/ fov/ (PNG, named by id),
test/manual2/ when DRIVE's second annotator is present, and split.json. Validation
images come out of the training images; the test split is never used to pick anything.
"""
import argparse
import json
import os
import re

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import HelpFormatter, UserError, atomic_dir, create_dir, read_image, read_mask, run_main

IMAGE_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".ppm", ".gif", ".bmp")
SPLITS = {"training": ("images", "1st_manual", "mask"), "test": ("images", "1st_manual", "mask")}


# ---------------------------------------------------------------- reading DRIVE
def list_by_id(folder):
    """{id: path} for the image files of a folder; ids are the leading digits."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: folder missing; is --drive the DRIVE root "
                        "(with training/ and test/ inside)?")
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        m = re.match(r"(\d+)_", name)
        if not m or not name.lower().endswith(IMAGE_EXT):
            raise UserError(f"{path}: unexpected file (expected names like 21_training.tif, "
                            "21_manual1.gif, 21_training_mask.gif); remove it")
        if m.group(1) in found:
            raise UserError(f"{path}: second file for id {m.group(1)} (also {found[m.group(1)]})")
        found[m.group(1)] = path
    if not found:
        raise UserError(f"{folder}: no images found")
    return found


def pair_split(root, split, optional=("2nd_manual",)):
    """Pair images, vessel and FOV masks of one split by id: [(id, {kind: path})]."""
    folders = {k: os.path.join(root, split, k) for k in SPLITS[split]}
    for k in optional:
        if os.path.isdir(os.path.join(root, split, k)):
            folders[k] = os.path.join(root, split, k)
    files = {k: list_by_id(f) for k, f in folders.items()}
    ids = sorted(files["images"])
    for kind, by_id in files.items():
        for i in sorted(set(ids) - set(by_id)):
            raise UserError(f"{folders[kind]}: no file for image id {i} "
                            f"({files['images'][i]}); restore it from the DRIVE download")
        for i in sorted(set(by_id) - set(ids)):
            raise UserError(f"{by_id[i]}: no image with id {i} in {folders['images']}; remove it")
    return [(i, {k: files[k][i] for k in files}) for i in ids]


def load_sample(paths):
    """Read one sample; checks that every mask has the image's size."""
    sample = {"images": read_image(paths["images"], "RGB")}
    h, w = sample["images"].shape[:2]
    for kind, path in paths.items():
        if kind == "images":
            continue
        sample[kind] = read_mask(path)
        if sample[kind].shape != (h, w):
            mh, mw = sample[kind].shape
            raise UserError(f"{path}: is {mw}x{mh} but its image {paths['images']} is {w}x{h}")
    return sample


# ---------------------------------------------------------------- writing data/
def save_sample(out_split, sid, sample):
    names = {"images": "images", "1st_manual": "masks", "mask": "fov", "2nd_manual": "manual2"}
    for kind, array in sample.items():
        folder = create_dir(os.path.join(out_split, names[kind]))
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        Image.fromarray(array).save(os.path.join(folder, f"{sid}.png"))


def resize_sample(sample, size):
    w, h = size
    out = {"images": cv2.resize(sample["images"], (w, h), interpolation=cv2.INTER_AREA)}
    for k, v in sample.items():
        if k != "images":
            out[k] = cv2.resize(v.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return out


def offline_augment(sample, rng):
    """The blog's offline copies: horizontal flip, vertical flip, rotation up to 45 deg."""
    yield "hflip", {k: np.ascontiguousarray(v[:, ::-1]) for k, v in sample.items()}
    yield "vflip", {k: np.ascontiguousarray(v[::-1]) for k, v in sample.items()}
    h, w = sample["images"].shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-45, 45)), 1.0)
    out = {}
    for k, v in sample.items():
        interp = cv2.INTER_LINEAR if k == "images" else cv2.INTER_NEAREST
        r = cv2.warpAffine(v.astype(np.uint8), rot, (w, h), flags=interp,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[k] = r if k == "images" else r > 0
    yield "rot", out


def prepare(drive, out, val_count, seed, augment, size):
    if not os.path.isdir(drive):
        raise UserError(f"{drive}: DRIVE folder not found; download DRIVE and pass --drive, "
                        "or run 'python dataset.py --synthetic' for a demo set")
    train_pairs = pair_split(drive, "training")
    test_pairs = pair_split(drive, "test")
    if not 0 < val_count < len(train_pairs):
        raise UserError(f"--val-count {val_count} must be between 1 and {len(train_pairs) - 1} "
                        f"({len(train_pairs)} training images in {drive})")
    rng = np.random.default_rng(seed)
    val_ids = sorted(rng.choice([i for i, _ in train_pairs], size=val_count, replace=False).tolist())
    split = {"train": [], "val": val_ids, "test": [i for i, _ in test_pairs],
             "seed": seed, "source": os.path.abspath(drive), "augment": augment,
             "size": list(size) if size else None}
    jobs = [("val" if i in val_ids else "train", i, p) for i, p in train_pairs]
    jobs += [("test", i, p) for i, p in test_pairs]
    with atomic_dir(out) as tmp:
        for name, sid, paths in tqdm(jobs, desc="preparing", unit="img"):
            sample = load_sample(paths)
            # the test split keeps native size so that it is always scored honestly
            if size and name != "test":
                sample = resize_sample(sample, size)
            save_sample(os.path.join(tmp, name), sid, sample)
            if name == "train":
                split["train"].append(sid)
                if augment:
                    for tag, aug in offline_augment(sample, rng):
                        save_sample(os.path.join(tmp, name), f"{sid}_{tag}", aug)
                        split["train"].append(f"{sid}_{tag}")
        with open(os.path.join(tmp, "split.json"), "w") as f:
            json.dump(split, f, indent=1)
    return split


# ---------------------------------------------------------------- synthetic DRIVE
def draw_tree(canvas, rng, start, angle, length, width, depth, scale):
    """Recursively draw one vessel branch as a wobbly polyline into canvas (uint8)."""
    x, y = start
    for _ in range(int(rng.integers(4, 8))):
        angle += rng.normal(0, 0.25)
        nx, ny = x + np.cos(angle) * length / 5, y + np.sin(angle) * length / 5
        cv2.line(canvas, (int(x), int(y)), (int(nx), int(ny)), 255,
                 max(1, int(round(width))), lineType=cv2.LINE_8)
        x, y = nx, ny
    if depth == 0 or width < 1.2 * scale:
        return
    for sign in (-1, 1):
        draw_tree(canvas, rng, (x, y), angle + sign * rng.uniform(0.3, 0.8),
                  length * rng.uniform(0.6, 0.85), width * rng.uniform(0.65, 0.85), depth - 1, scale)


def synthetic_fundus(rng, w, h):
    """One fundus-like RGB image (h,w,3) uint8, its vessel mask and FOV mask (bool)."""
    scale = w / 565
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = w / 2, h / 2, 0.47 * min(w, h)
    fov = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    side = rng.choice([-1, 1])
    disc = (cx + side * 0.55 * r, cy + rng.uniform(-0.1, 0.1) * r)
    vessels = np.zeros((h, w), np.uint8)
    for k in range(int(rng.integers(5, 8))):
        ang = rng.uniform(0, 2 * np.pi)
        draw_tree(vessels, rng, disc, ang, 0.45 * r, rng.uniform(3.5, 6.5) * scale, 4, scale)
    vessel = (vessels > 0) & fov
    # reddish background with vignetting, a bright optic disc and darker vessels
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    base = np.array([rng.uniform(150, 210), rng.uniform(60, 100), rng.uniform(20, 45)])
    shade = 1.0 - 0.45 * dist ** 2
    img = base[None, None] * shade[..., None]
    d_disc = np.sqrt((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (0.16 * r)
    img += np.clip(1 - d_disc, 0, 1)[..., None] * np.array([70, 90, 60])
    darken = cv2.GaussianBlur(vessel.astype(np.float32), (0, 0), 0.8 * max(scale, 0.3))
    img *= (1 - 0.45 * np.clip(darken * 1.5, 0, 1))[..., None]
    img += rng.normal(0, 4, img.shape)
    img = np.clip(img, 0, 255) * fov[..., None]
    return img.astype(np.uint8), vessel, fov


def write_synthetic(root, n_train, n_test, size, seed):
    """A DRIVE-format folder: training ids 21.., test ids 01.., TIFF + GIF files."""
    rng = np.random.default_rng(seed)
    w, h = size
    plan = [("training", 21 + k) for k in range(n_train)] + [("test", 1 + k) for k in range(n_test)]
    with atomic_dir(root) as tmp:
        for split, i in tqdm(plan, desc="drawing synthetic DRIVE", unit="img"):
            img, vessel, fov = synthetic_fundus(rng, w, h)
            d = {k: create_dir(os.path.join(tmp, split, k)) for k in SPLITS[split]}
            Image.fromarray(img).save(os.path.join(d["images"], f"{i:02d}_{split}.tif"))
            Image.fromarray(vessel.astype(np.uint8) * 255).save(
                os.path.join(d["1st_manual"], f"{i:02d}_manual1.gif"))
            Image.fromarray(fov.astype(np.uint8) * 255).save(
                os.path.join(d["mask"], f"{i:02d}_{split}_mask.gif"))


# ---------------------------------------------------------------- command line
def parse_size(text):
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m.group(1)) < 16 or int(m.group(2)) < 16:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (each >= 16), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--drive", default=None,
                   help="DRIVE root with training/ and test/ (default: DRIVE/, or "
                        "synthetic_DRIVE/ with --synthetic)")
    p.add_argument("--out", default="data", help="where the prepared splits go")
    p.add_argument("--val-count", type=int, default=4,
                   help="training images held out for validation")
    p.add_argument("--seed", type=int, default=42, help="seed of the validation split and augmentation")
    p.add_argument("--augment", action="store_true",
                   help="also write the blog's offline copies of each training image "
                        "(h-flip, v-flip, rotation up to 45 deg)")
    p.add_argument("--resize", type=parse_size, default=None, metavar="WxH",
                   help="resize train/val to WxH (e.g. 512x512); test always stays native")
    p.add_argument("--synthetic", action="store_true",
                   help="first draw a synthetic DRIVE-format folder at --drive, then prepare it")
    p.add_argument("--synthetic-size", type=parse_size, default=(565, 584), metavar="WxH",
                   help="image size of the synthetic set")
    p.add_argument("--synthetic-count", type=int, nargs=2, default=(12, 4), metavar=("TRAIN", "TEST"),
                   help="number of synthetic training and test images")
    args = p.parse_args(argv)
    if args.drive is None:
        args.drive = "synthetic_DRIVE" if args.synthetic else "DRIVE"
    return args


def main(argv=None):
    args = get_args(argv)
    if args.synthetic:
        write_synthetic(args.drive, *args.synthetic_count, args.synthetic_size, args.seed)
    split = prepare(args.drive, args.out, args.val_count, args.seed, args.augment, args.resize)
    print(f"wrote {args.out}/: {len(split['train'])} train, {len(split['val'])} val "
          f"(ids {' '.join(split['val'])}), {len(split['test'])} test")


if __name__ == "__main__":
    run_main(main)
