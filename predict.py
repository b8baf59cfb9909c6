"""Segment your own fundus photographs.

    python predict.py photo.jpg scans/ "more/*.tif"        # files, folders, globs
    python predict.py --checkpoint runs/unet/model.pt --rle masks.csv scans/
    python predict.py --checkpoint weights/drive_s2d.pt scans/   # 1.5-2x faster, ~0.003 less F1

Inputs: image files (TIFF, PNG, JPEG, PPM, BMP, GIF; any size; colour or grayscale),
folders (their image files, not recursive) and glob patterns (quoted ones too).
For each photograph ID (its file stem; PARENT_STEM or a counter when stems repeat)
--out receives:
  ID_mask.png     binary vessel mask, 0/255, zero outside the field of view (FOV)
  ID_prob.png     vessel probability p as 255*sqrt(p) (p = (value/255)^2), zero outside the FOV
  ID_overlay.png  the photograph with vessels tinted green and the FOV outlined
The FOV is the bright disc of the photograph, found automatically (or given with
--fov). Photographs are rescaled so that the FOV is about --target-fov pixels wide,
the scale the network was trained at (times --fov-angle / 45 for a camera whose angle
of view is not DRIVE's 45 degrees), and the results are mapped back to the original
size; a noisy photograph is denoised first, as in training (--no-denoise).
Unreadable files are reported and skipped; the exit code is then 1.
"""
import argparse
import collections
import csv
import glob
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from preprocess import normalize_image, zoom_photo
from utils import (SHIPPED_WEIGHTS, HelpFormatter, UserError, add_inference_args, atomic_path, create_dir,
                   encode_probs, fov_box, inference_device, inference_options, load_model, predict_probs,
                   read_image, read_mask, rle_encode, run_main, save_png, scale_box, to_tensor_image)

IMAGE_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif")
DRIVE_SIZE = (565, 584)  # (W, H) of DRIVE photographs, the scale --target-fov refers to
DRIVE_ANGLE = 45.0  # degrees: the angle of view of DRIVE's camera (Canon CR5 non-mydriatic 3CCD)
RESCALE_TOLERANCE = 0.10  # FOVs within 10% of the target are used as they are
VESSEL_TINT = np.array([60, 255, 60], np.float32)  # bright green
FOV_OUTLINE = (0, 170, 255)


def parse_threshold(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"threshold must be between 0 and 1, got {text}")
    return value


def parse_tile(text):
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"tile must be at least 32 pixels, got {text}")
    return value


def parse_target(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"target FOV must be >= 0, got {text}")
    return value


def parse_angle(text):
    value = float(text)
    if not 5 <= value <= 200:
        raise argparse.ArgumentTypeError(f"angle of view must be between 5 and 200 degrees, got {text}")
    return value


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="PATH",
                   help="image files, folders of images, or glob patterns")
    p.add_argument("--checkpoint", default=SHIPPED_WEIGHTS,
                   help="model to segment with (default: the shipped weights, weights/drive_unet.pt "
                        "in this repo, the plain U-Net; weights/drive_s2d.pt, the space-to-depth "
                        "U-Net, is 1.5-2x faster for ~0.003 less F1)")
    p.add_argument("--out", default="predictions", help="folder for the masks, probabilities and overlays")
    p.add_argument("--threshold", type=parse_threshold, default=None,
                   help="probability threshold (default: the one chosen on the training images, stored in "
                        "the checkpoint, else 0.5)")
    add_inference_args(p)
    p.add_argument("--fov", default=None, metavar="MASK",
                   help="FOV mask file (white = inside) used for every input instead of the automatic "
                        "estimate; it must have each image's size")
    p.add_argument("--rle", default=None, metavar="FILE.csv",
                   help="also write the masks run-length encoded, one row per image with columns "
                        "id,height,width,runs; runs are 'start length' pairs over the pixels in "
                        "row-major order with 1-based starts (utils.rle_decode reads them)")
    p.add_argument("--target-fov", type=parse_target, default=540.0, metavar="PIXELS",
                   help="FOV diameter the network was trained at (DRIVE's native scale; scaled along "
                        "when the checkpoint was trained on resized images); 0 keeps each "
                        "photograph's own scale")
    p.add_argument("--fov-angle", type=parse_angle, default=DRIVE_ANGLE, metavar="DEGREES",
                   help="the camera's angle of view: the FOV is brought to --target-fov x DEGREES / 45 "
                        "pixels, so that vessels are as many pixels wide as in DRIVE, whose camera has 45; "
                        "e.g. 30 for CHASE_DB1's, 35 for STARE's (README: Your own photographs)")
    p.add_argument("--tile", type=parse_tile, default=1024,
                   help="largest side run through the network at once; bigger images are tiled")
    args = p.parse_args(argv)
    if args.target_fov == 0 and args.fov_angle != DRIVE_ANGLE:
        p.error("--fov-angle rescales to --target-fov, which is 0 (each photograph's own scale)")
    return args


# ---------------------------------------------------------------- finding the inputs
def expand(pattern):
    """Image paths named by one argument: a file, a folder, or a glob pattern."""
    if os.path.isdir(pattern):
        names = sorted(n for n in os.listdir(pattern)
                       if not n.startswith(".") and n.lower().endswith(IMAGE_EXT))
        return [p for p in (os.path.join(pattern, n) for n in names) if os.path.isfile(p)]
    if os.path.exists(pattern):  # an explicit file is tried whatever its extension
        return [pattern]
    found = []
    for path in sorted(glob.glob(pattern)):
        if os.path.isdir(path):
            found += expand(path)
        elif path.lower().endswith(IMAGE_EXT):
            found.append(path)
    return found


def collect_inputs(patterns):
    """All image paths, in argument order, each once; UserError naming what found nothing."""
    paths, seen, empty = [], set(), []
    for pattern in patterns:
        found = expand(pattern)
        if not found:
            empty.append(pattern)
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    if empty:
        raise UserError(f"no images found for {', '.join(empty)} (expected image files "
                        f"{'/'.join(IMAGE_EXT)}, folders holding them, or glob patterns)")
    return paths


def output_ids(paths):
    """One unique output name per path: its stem, or PARENT_STEM (then _2, _3...) when
    several inputs share a stem. A made-up name never equals another input's stem."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = collections.Counter(stems)
    ids, used = [], set()
    for path, stem in zip(paths, stems):
        if counts[stem] == 1:
            name = stem
        else:
            base = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{stem}"
            name, k = base, 2
            while name in used or name in counts:
                name, k = f"{base}_{k}", k + 1
        used.add(name)
        ids.append(name)
    return ids


# ---------------------------------------------------------------- field of view and scale
def fill_holes(mask):
    """uint8 (H,W) in {0,1} -> the same with enclosed background set to 1."""
    padded = np.pad(mask, 1)  # a border of background all around, so (0, 0) is outside
    outside = padded.copy()
    cv2.floodFill(outside, np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8), (0, 0), 1)
    return (padded | (1 - outside))[1:-1, 1:-1]


def estimate_fov(rgb):
    """The field of view of a fundus photograph: bool (H,W) from uint8 (H,W,3).

    The FOV is a bright disc on a near-black background. The brightest channel
    (red in colour photographs, the only one in grayscale) is smoothed against noise
    and thresholded at 20% of the way from the background level to the bright level;
    the largest bright region is kept, its holes (dark lesions, vessels) filled and
    its outline smoothed. Photographs without a dark background are all FOV.
    """
    h, w = rgb.shape[:2]
    bright = cv2.GaussianBlur(rgb.max(axis=2).astype(np.float32), (0, 0), max(1.0, min(h, w) / 300))
    lo, hi = np.percentile(bright, [0.5, 99])
    if hi <= 0 or lo > 0.15 * hi:  # blank, or no near-black background anywhere
        return np.ones((h, w), bool)
    fg = (bright > lo + 0.2 * (hi - lo)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < 0.01 * h * w:  # no disc worth the name
        return np.ones((h, w), bool)
    fov = fill_holes((labels == largest).astype(np.uint8))
    r = max(1, round(min(h, w) / 150))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    fov = cv2.morphologyEx(fov, cv2.MORPH_CLOSE, kernel)
    return cv2.morphologyEx(fov, cv2.MORPH_OPEN, kernel).astype(bool)


def fov_diameter(fov):
    """FOV diameter in pixels: the larger side of its bounding box, which stays right
    when the camera cut the top and bottom of the disc off."""
    ys, xs = np.nonzero(fov)
    if xs.size == 0:
        return float(max(fov.shape))
    return float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))


def rescale_factor(fov, target):
    """Factor bringing the FOV to `target` pixels across; 1 when already within 10%.

    The result is capped so the rescaled image is at most 4 target diameters on its
    longer side, which bounds memory when the FOV estimate is implausibly small.
    """
    if target <= 0:
        return 1.0
    factor = min(target / fov_diameter(fov), 4 * target / max(fov.shape))
    return 1.0 if abs(factor - 1) <= RESCALE_TOLERANCE else factor


def training_target(args, cfg):
    """--target-fov refers to DRIVE's native size; a checkpoint trained on DRIVE resized
    to input_size (W, H) saw FOVs scaled by the same factor (geometric mean of the axes). A camera
    with a narrower angle of view than DRIVE's shows the same vessels wider at the same FOV size,
    so its FOV is brought to a proportionally smaller diameter (--fov-angle)."""
    target = args.target_fov * args.fov_angle / DRIVE_ANGLE
    size = cfg.get("input_size")
    if not size:
        return target
    return target * float(np.sqrt(size[0] / DRIVE_SIZE[0] * size[1] / DRIVE_SIZE[1]))


# ---------------------------------------------------------------- segmentation
def segment(model, rgb, fov, norm, target, args, device, options):
    """Vessel probabilities float32 (H,W) in [0,1], zero outside fov, for uint8 (H,W,3)."""
    h, w = rgb.shape[:2]
    factor = rescale_factor(fov, target)
    rgb, net_fov = zoom_photo(rgb, fov, factor)  # (h', w', 3), (h', w')
    # normalise at the network's scale, as in training: CLAHE tiles depend on the size
    x = to_tensor_image(normalize_image(rgb, norm, args.denoise, net_fov)).to(device)  # (3, h', w')
    tta, bf16 = options
    box = scale_box(fov_box(fov), factor, factor)  # the FOV's box at the network's scale
    probs = predict_probs(model, x, tta=tta, tile=args.tile, overlap=min(64, args.tile // 4), bf16=bf16,
                          box=box)
    if factor != 1.0:
        probs = F.interpolate(probs[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return probs.clamp(0, 1).cpu().numpy() * fov


def overlay(rgb, mask, fov):
    """uint8 (H,W,3): the photograph, vessels blended towards green, the FOV outlined."""
    out = rgb.astype(np.float32)
    out[mask] = 0.35 * out[mask] + 0.65 * VESSEL_TINT
    out = out.round().astype(np.uint8)
    contours, _ = cv2.findContours(fov.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, FOV_OUTLINE, max(1, min(rgb.shape[:2]) // 400))
    return out


def load_fov(path):
    """The --fov mask as bool (H,W), or None."""
    return None if path is None else read_mask(path)


def image_fov(rgb, given, given_path, image_path):
    """The FOV of one image: the --fov mask (checked for size) or the estimate."""
    if given is None:
        return estimate_fov(rgb)
    if given.shape != rgb.shape[:2]:
        raise UserError(f"{given_path}: FOV mask is {given.shape[1]}x{given.shape[0]} but "
                        f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]}")
    return given


def process(path, sid, model, ckpt, given_fov, args, device, options):
    """Segment one photograph and write its three PNGs; returns the mask, bool (H,W)."""
    rgb = read_image(path, "RGB")  # grayscale comes back replicated to (H,W,3)
    fov = image_fov(rgb, given_fov, args.fov, path)
    threshold = args.threshold if args.threshold is not None else ckpt.get("threshold", 0.5)
    probs = segment(model, rgb, fov, ckpt["config"]["norm"], training_target(args, ckpt["config"]),
                    args, device, options)
    mask = (probs >= threshold) & fov
    save_png(os.path.join(args.out, f"{sid}_mask.png"), mask.astype(np.uint8) * 255)
    save_png(os.path.join(args.out, f"{sid}_prob.png"), encode_probs(probs))
    save_png(os.path.join(args.out, f"{sid}_overlay.png"), overlay(rgb, mask, fov))
    return mask


def write_rle(path, rows):
    """rows: [(id, mask bool (H,W))] -> CSV id,height,width,runs, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "height", "width", "runs"])
            for sid, mask in rows:
                writer.writerow([sid, mask.shape[0], mask.shape[1], rle_encode(mask)])


def main(argv=None):
    args = get_args(argv)
    # everything that can fail for the whole run fails before --out is touched
    paths = collect_inputs(args.inputs)
    given_fov = load_fov(args.fov)
    device = inference_device(args)
    model, ckpt = load_model(args.checkpoint, device, args.precision)
    options = inference_options(args, ckpt, device)  # (tta, bf16)
    create_dir(args.out)
    rows, failed = [], []
    for path, sid in zip(tqdm(paths, desc="segmenting", unit="img"), output_ids(paths)):
        try:
            rows.append((sid, process(path, sid, model, ckpt, given_fov, args, device, options)))
        except UserError as e:  # one bad photograph must not cost the others
            tqdm.write(f"error: {e}; skipped", file=sys.stderr)
            failed.append(path)
    if args.rle:
        write_rle(args.rle, rows)
    print(f"wrote {len(rows)} of {len(paths)} images to {args.out}/ (_mask, _prob, _overlay .png)"
          + (f" and {args.rle}" if args.rle else ""))
    if failed:
        print(f"error: {len(failed)} of {len(paths)} images failed and were skipped: "
              f"{', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
