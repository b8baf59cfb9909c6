"""Score a checkpoint on the DRIVE test split at native resolution, inside the FOV.

    python test.py                                   # runs/unet/model.pt, else the shipped weights
    python test.py --checkpoint weights/drive_unet.pt --no-tta
    python test.py --checkpoint weights/drive_s2d.pt      # the shipped space-to-depth U-Net: 1.5-2x faster
    python test.py --corrupt jpeg40 --out results_jpeg    # robustness: degraded test photographs
    python test.py --zoom 1.5 --out results_zoom1.5       # robustness: vessels 1.5x as wide

Writes to --out: metrics.json (pooled over all test pixels, per-image mean/std, the
second annotator, FPS), per_image.csv, summary.md (a Markdown table), pred/ID.png (binary masks), prob/ID.png
(probability p stored as 255*sqrt(p), see utils.encode_probs), side/ID.png
(image | truth | prediction | error map) and roc_pr.png. Error maps: white = vessel
found, red = false positive, blue = missed.
"""
import argparse
import csv
import json
import os

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from preprocess import CORRUPTIONS, normalize_image, read_split, zoom_photo  # noqa: E402
from utils import (SHIPPED_WEIGHTS, HelpFormatter, Timer, add_inference_args, atomic_dir,  # noqa: E402
                   atomic_path, confusion, encode_probs, fov_box, inference_device, inference_options, load_model,
                   network_text, predict_probs, read_image, read_mask, run_main, save_png, scores, to_tensor_image,
                   tta_text)

METRICS = ["f1", "jaccard", "recall", "precision", "specificity", "accuracy"]
TRAINED = os.path.join("runs", "unet", "model.pt")


def zoom_factor(text):
    value = float(text)
    if not 0.1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 10, got {text}")
    return value


def default_checkpoint():
    return TRAINED if os.path.isfile(TRAINED) else SHIPPED_WEIGHTS


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help=f"model to score (default: {TRAINED} if it exists, else the shipped weights, "
                        "weights/drive_unet.pt in this repo: the plain U-Net; weights/drive_s2d.pt is "
                        "the space-to-depth U-Net, 1.5-2x faster)")
    p.add_argument("--data", default="data", help="prepared data folder (dataset.py --out)")
    p.add_argument("--split", default="test", help="split of --data to score")
    p.add_argument("--out", default="results", help="folder for metrics, masks and pictures")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the one chosen on the training images, stored in "
                        "the checkpoint)")
    p.add_argument("--corrupt", choices=tuple(CORRUPTIONS), default=None,
                   help="change every test photograph before it is normalised, as another camera or file "
                        "might: gamma 0.6 or 1.6, brightness x0.6, a colour cast (R x1.25, B x0.7), JPEG "
                        "quality 40, Gaussian blur sigma 1, a 0.6x resolution scaled back up, or Gaussian "
                        "noise of std 6 or 12 grey levels (seeded), or uneven light: brightness falling to 0.5 across "
                        "the image (ramp) or towards the FOV's rim (vignette); truth, FOV and threshold are unchanged "
                        "(default: none)")
    p.add_argument("--zoom", type=zoom_factor, default=1.0, metavar="S",
                   help="resize every test photograph by S before it is normalised (vessels S times as wide, "
                        "as a camera with a narrower, S > 1, or wider, S < 1, angle of view shows them at "
                        "the same FOV size) and the probabilities back; scored at native size against the "
                        "unchanged truth and FOV")
    add_inference_args(p)
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or default_checkpoint()
    return args


# ---------------------------------------------------------------- pictures
def error_map(pred, truth, fov):
    """RGB uint8: TP white, FP red, FN blue, FOV rim grey, rest black."""
    out = np.zeros(pred.shape + (3,), np.uint8)
    out[fov] = (40, 40, 40)
    out[pred & truth] = (255, 255, 255)
    out[pred & ~truth] = (255, 40, 40)
    out[~pred & truth] = (40, 110, 255)
    return out


def side_by_side(image, truth, pred, errors):
    """(H, 4W+30, 3): image | truth | prediction | error map, 10-px grey gaps."""
    gap = np.full((image.shape[0], 10, 3), 128, np.uint8)
    truth, pred = (np.repeat(m[..., None].astype(np.uint8) * 255, 3, axis=2) for m in (truth, pred))
    return np.concatenate([image, gap, truth, gap, pred, gap, errors], axis=1)


def plot_curves(path, truth, probs, model, human=None):
    """ROC and precision-recall curves of the pooled FOV pixels, with the model's operating
    point (its threshold) and, when given, the second human annotator's as dots."""
    fpr, tpr, _ = roc_curve(truth, probs)
    precision, recall, _ = precision_recall_curve(truth, probs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax1.plot(fpr, tpr, label=f"model (AUC {model['auc']:.4f})")
    ax2.plot(recall, precision, label="model")
    points = [("model at its threshold", model, "o")]
    if human:
        points.append(("2nd human annotator", human, "s"))
    for name, d, marker in points:
        ax1.plot(1 - d["specificity"], d["recall"], marker, label=name)
        ax2.plot(d["recall"], d["precision"], marker, label=f"{name} (F1 {d['f1']:.3f})")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (inside FOV)",
            xlim=(0, 0.3), ylim=(0.5, 1.0))  # the corner where the curves differ
    ax2.set(xlabel="recall", ylabel="precision", title="precision-recall (inside FOV)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax1 else "lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- scoring
def summarise(rows):
    """Mean and std over images of each metric in rows."""
    keys = METRICS + ["auc"]
    return ({k: float(np.mean([r[k] for r in rows])) for k in keys},
            {k: float(np.std([r[k] for r in rows])) for k in keys})


def second_annotator(root, ids):
    """Pooled scores of DRIVE's 2nd_manual against 1st_manual, or None if absent."""
    folder = os.path.join(root, "manual2")
    if not os.path.isdir(folder):
        return None
    counts = np.zeros(4, np.int64)
    for sid in ids:
        counts += confusion(read_mask(os.path.join(folder, f"{sid}.png")),
                            read_mask(os.path.join(root, "masks", f"{sid}.png")),
                            read_mask(os.path.join(root, "fov", f"{sid}.png")))
    return scores(*counts)


def evaluate(model, ckpt, args, device, out):
    cfg = ckpt["config"]
    threshold = args.threshold if args.threshold is not None else ckpt.get("threshold", 0.5)
    tta, bf16 = inference_options(args, ckpt, device)
    root = os.path.join(args.data, args.split)
    ids = read_split(args.data, args.split)
    counts, rows, all_truth, all_probs, seconds = np.zeros(4, np.int64), [], [], [], 0.0
    size = cfg.get("input_size")  # (W, H) of a checkpoint trained on resized photographs, zoomed along
    size = size and (round(size[0] * args.zoom), round(size[1] * args.zoom))
    for k, sid in enumerate(tqdm(ids, desc="testing", unit="img")):
        image = read_image(os.path.join(root, "images", f"{sid}.png"), "RGB")
        if args.corrupt:
            image = CORRUPTIONS[args.corrupt](image, k)  # (H,W,3) uint8, seeded by the image's index
        truth = read_mask(os.path.join(root, "masks", f"{sid}.png"))
        fov = read_mask(os.path.join(root, "fov", f"{sid}.png"))
        view, view_fov = zoom_photo(image, fov, args.zoom)
        x = to_tensor_image(normalize_image(view, cfg["norm"], args.denoise, view_fov)).to(device)
        box = fov_box(view_fov)  # only the FOV's surroundings go through the network
        if k == 0:  # warm-up: first calls allocate and pick kernels
            for _ in range(2):
                predict_probs(model, x, tta=tta, size=size, bf16=bf16, box=box)
        with Timer(device) as t:
            probs = predict_probs(model, x, tta=tta, size=size, bf16=bf16, box=box)  # (h, w) of the view
        seconds += t.seconds
        if args.zoom != 1:  # back to the photograph's (H, W)
            probs = F.interpolate(probs[None, None], size=fov.shape, mode="bilinear", align_corners=False)[0, 0]
        probs = probs.cpu().numpy() * fov  # zero outside the FOV
        prob8 = encode_probs(probs)  # what prob/ID.png stores; AUC is computed from it too
        pred = (probs >= threshold) & fov
        c = confusion(pred, truth, fov)
        counts += c
        rows.append({"id": sid, **scores(*c), "auc": float(roc_auc_score(truth[fov], prob8[fov]))})
        all_truth.append(truth[fov])
        all_probs.append(prob8[fov])
        save_png(os.path.join(out, "pred", f"{sid}.png"), pred.astype(np.uint8) * 255)
        save_png(os.path.join(out, "prob", f"{sid}.png"), prob8)
        save_png(os.path.join(out, "side", f"{sid}.png"),
                 side_by_side(image, truth, pred, error_map(pred, truth, fov)))
    all_truth, all_probs = np.concatenate(all_truth), np.concatenate(all_probs)
    pooled = dict(scores(*counts), auc=float(roc_auc_score(all_truth, all_probs)))
    mean, std = summarise(rows)
    human = second_annotator(root, ids)
    plot_curves(os.path.join(out, "roc_pr.png"), all_truth, all_probs, pooled, human)
    return {"checkpoint": args.checkpoint, "split": args.split, "n_images": len(ids),
            "corrupt": args.corrupt, "zoom": args.zoom, "denoise": args.denoise, "threshold": threshold, "tta": tta,
            "precision": "int8" if args.precision == "int8" else "bf16" if bf16 else "fp32", "pooled": pooled,
            "per_image_mean": mean, "per_image_std": std, "second_annotator": human,
            "device": str(device), "batch_size": 1, "seconds_per_image": seconds / len(ids),
            "fps": len(ids) / seconds}, rows


def write_outputs(out, metrics, rows):
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(out, "per_image.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id"] + METRICS + ["auc"])
        writer.writeheader()
        writer.writerows({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
                         for r in rows)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown_table(metrics))


def markdown_table(m):
    """The pooled scores as a Markdown table (for README), the second annotator beside them."""
    cols = ["f1", "auc", "accuracy", "jaccard", "recall", "precision", "specificity"]
    rows = [("model, pooled", m["pooled"]), ("model, per-image mean", m["per_image_mean"])]
    if m["second_annotator"]:
        rows.append(("2nd human annotator", m["second_annotator"]))
    corrupt = f", {m['corrupt']}-corrupted" if m.get("corrupt") else ""
    corrupt += f", zoomed {m['zoom']:g}x" if m.get("zoom", 1) != 1 else ""
    corrupt += ", not denoised" if m.get("denoise") is False else ""
    lines = [f"| {m['split']} split, {m['n_images']} images{corrupt} | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{d[k]:.4f}" if k in d else "–" for k in cols) + " |"
              for name, d in rows]
    return "\n".join(lines) + "\n"


def report_line(name, d):
    return f"{name:24s}" + "".join(f"{d[k]:12.4f}" if k in d else f"{'-':>12s}" for k in METRICS + ["auc"])


def report(m):
    lines = [f"{'':24s}" + "".join(f"{k:>12s}" for k in METRICS + ["auc"])]
    lines.append(report_line("model, pooled", m["pooled"]))
    lines.append(report_line("model, per-image mean", m["per_image_mean"]))
    lines.append(report_line("  per-image std", m["per_image_std"]))
    if m["second_annotator"]:
        lines.append(report_line("2nd human annotator", m["second_annotator"]))
    corrupt = f" ({m['corrupt']}-corrupted)" if m.get("corrupt") else ""
    corrupt += f" (zoomed {m['zoom']:g}x)" if m.get("zoom", 1) != 1 else ""
    corrupt += " (not denoised)" if m.get("denoise") is False else ""
    lines.append(f"{m['n_images']} images{corrupt}, threshold {m['threshold']:.3f}{tta_text(m['tta'])}; "
                 f"{m['seconds_per_image']:.3f} s/image ({m['fps']:.1f} FPS, batch 1, {m['device']}, "
                 f"{m['precision']})")
    return "\n".join(lines)


def main(argv=None):
    args = get_args(argv)
    device = inference_device(args)
    model, ckpt = load_model(args.checkpoint, device, args.precision)
    print(f"checkpoint {args.checkpoint} ({network_text(ckpt['config'])}, "
          f"epoch {ckpt.get('epoch', '?')}, val F1 {ckpt.get('val_f1', float('nan')):.4f})")
    with atomic_dir(args.out) as tmp:
        metrics, rows = evaluate(model, ckpt, args, device, tmp)
        write_outputs(tmp, metrics, rows)
    print(report(metrics))
    print(f"wrote {args.out}/ (metrics.json, per_image.csv, summary.md, pred/, prob/, side/, roc_pr.png)")


if __name__ == "__main__":
    with torch.inference_mode():
        run_main(main)
