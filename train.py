"""Train a U-Net on data/ (prepared by dataset.py); writes the final model and its threshold.

    python train.py                      # the shipped weights' recipe: the U-Net, base 16
    python train.py --arch s2d           # the space-to-depth U-Net: about half the time
    python train.py --resume             # continue runs/unet/last.pt exactly
    python train.py --max-steps 5        # smoke test

Each epoch draws random native-resolution crops from all 20 training images (the 4
validation images included, see --train-on-val), then scores the full validation
images inside their FOV (log.csv, curves.png). The model is the moving average of the
weights at the end of the cosine schedule: no epoch is picked (held out, the F1 of
four validation images is flat within its noise after the first ~20 epochs). Its
threshold is the one maximising F1 over all training images with the inference
test.py and predict.py run (--tta), stored in model.pt with it. The test set is
never read.
"""
import argparse
import csv
import math
import os
import statistics
import time

import matplotlib
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loss import BCELoss, DiceBCELoss, DiceLoss, SkeletonRecallLoss  # noqa: E402
from model import ACTS, ATTENTIONS, DEPTH, Cascade, count_parameters, pad_to_multiple  # noqa: E402
from preprocess import NORMS, SCALE_RANGE, DriveDataset, read_split_meta  # noqa: E402
from utils import (ARCHS, HelpFormatter, UserError, add_tta_args, atomic_path, best_threshold,  # noqa: E402
                   bf16_native, build_model, confusion, create_dir, epoch_time, fov_box, get_device, grown_box,
                   inference_model, int8_ranges, network_text, network_window, predict_probs, read_checkpoint, run_main,
                   scores, seeding, torch_save, tta_text, tta_views)

INT8_ARCHS = ("unet", "s2d")  # --precision int8 was measured on these, not on the W-Net
STARTED = time.time()  # --time-budget counts from here: data loading included, imports (~2 s) not
# --batch-size and --epochs by --arch: the plain U-Net (the shipped weights' recipe) takes 4 crops a
# step for 120 epochs; the others 2 a step for 108, which passed the held-out screens against 4 for
# 120 with s2d, each epoch ~1.1x the time (README, Two crops a step). For the U-Net 2 a step passed
# held out too, but 108 epochs took 30.8 min where 4 a step for 120 take 29.5 (README)
STEPS = {"unet": (4, 120), "s2d": (2, 108), "wnet": (2, 108), "s2dw": (2, 108)}
# s2d's default finest width as a multiple of --base: 40 at base 16 scored above the U-Net's
# validation F1 and AUC over 3 held-out seeds, in about half its CPU time (README)
S2D_TOP = 2.5
# s2d's default depth: halving its (already half-resolution) input twice instead of four times scored
# above depth 4 held out on two seeds, in 0.8x the time per epoch, with 0.18 M parameters (README)
S2D_DEPTH = 2
LOSSES = {"dicebce": DiceBCELoss, "dice": DiceLoss, "bce": BCELoss}
LOG_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_f1", "val_f1_best", "threshold",
              "seconds"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", default="data", help="prepared data folder (dataset.py --out)")
    p.add_argument("--out", default="runs/unet",
                   help="run folder: model.pt (the final model and threshold, for test.py and "
                        "predict.py), last.pt (everything, for --resume), log.csv, curves.png")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs to train in all (default: {STEPS['unet'][1]} for unet, {STEPS['s2d'][1]} for "
                        "the others; with --resume, the checkpoint's)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                   help="fit the whole command into MIN minutes of this machine: the number of "
                        "epochs (at most --epochs) is set from the time of the warm-up's epochs, and "
                        "the cosine schedule spans it (README: what 30 minutes buy on different CPUs)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"crops per optimizer step (default: {STEPS['unet'][0]} for unet, {STEPS['s2d'][0]} "
                        "for the others, where it passed the held-out screens against 4 for s2d; README)")
    p.add_argument("--crop", type=int, default=256,
                   help="side of the random training crops: a multiple of 2**D at --depth D, of 2**(D+1) "
                        "for --arch s2d and s2dw (16 for the default unet, 8 for s2d at its depth 2, 32 for s2dw)")
    p.add_argument("--crops-per-image", type=int, default=13,
                   help="crops drawn from each training image per epoch")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="AdamW weight decay; 0.05, held out over 3 seeds, scored level with 1e-4 "
                        "on the validation images (README)")
    p.add_argument("--beta2", type=float, default=0.999,
                   help="AdamW's second-moment decay (its averaging horizon is 1/(1-beta2) steps); 0.99, "
                        "screened held out over 2 seeds, scored level with 0.999 (README)")
    p.add_argument("--sched", choices=("cosine", "plateau"), default="cosine",
                   help="cosine with linear warm-up (per step), or the blog's ReduceLROnPlateau "
                        "on the validation loss")
    p.add_argument("--warmup", type=float, default=2, help="warm-up epochs for --sched cosine")
    p.add_argument("--degrade", type=float, default=0.3,
                   help="fraction of training crops cut from a photograph first JPEG-compressed, "
                        "blurred, downscaled or made noisy (then denoised, as inference would), as "
                        "other cameras deliver them: it makes the U-Net markedly more robust to such "
                        "photographs (held out, 3 seeds: F1 +0.023 under JPEG, blur, low resolution) "
                        "for 0.003 less F1 on DRIVE's unchanged validation images (README, Other "
                        "cameras); 0 turns it off")
    p.add_argument("--soft-labels", action=argparse.BooleanOptionalAction, default=False,
                   help="resample the vessel and FOV masks of rotated or scaled crops bilinearly "
                        "(soft targets at vessel edges) instead of to the nearest pixel; held out "
                        "over 3 seeds it cost ~0.001 F1 and ~0.002 AUC on the validation images "
                        "(README)")
    p.add_argument("--affine-first", action=argparse.BooleanOptionalAction, default=False,
                   help="cut each rotated, scaled training crop from the whole photograph in one warp, "
                        "instead of rotating the cut crop, whose corners are then mirror images of its "
                        "border; screened held out over 2 seeds, level, not kept (README)")
    p.add_argument("--fov-crops", action=argparse.BooleanOptionalAction, default=False,
                   help="place each training crop around a FOV pixel drawn uniformly, instead of "
                        "uniformly in the photograph, which shows the FOV's rim a fifth as often as its "
                        "centre; screened held out over 2 seeds, +0.0002 AUC, not kept (README); not with "
                        "--affine-first")
    p.add_argument("--elastic", type=float, default=0.0, metavar="PX",
                   help="bend each training crop (elastic deformation) by a smooth random displacement, "
                        "normal with this standard deviation (pixels) at control points 64 pixels apart, "
                        "cubic between them; 0: none. 4, screened held out over 2 seeds, scored 0.0001 "
                        "AUC and 0.0010 F1 lower, not kept (README)")
    p.add_argument("--scale", type=float, nargs=2, default=SCALE_RANGE, metavar=("MIN", "MAX"),
                   help="range of the random scale factor of each axis of the 70 %% of training crops "
                        "that are rotated and scaled (vessels MIN to MAX times as wide as in the "
                        "photograph); 0.67 1.5, screened held out, scored 0.0007 AUC lower at native "
                        "size and gained only on photographs shown 1.5x as large, not kept (README)")
    p.add_argument("--loss", choices=tuple(LOSSES), default="dicebce",
                   help="training loss: Dice + BCE, Dice or BCE alone, each inside the FOV. bce, screened "
                        "held out for the U-Net, came out level (+0.0001 AUC, -0.0003 F1), not kept (README)")
    p.add_argument("--skeleton-recall", type=float, default=0.0, metavar="W",
                   help="weight of a skeleton recall term added to the training loss (Kirchhoff et al., "
                        "2024): 1 - the mean probability over the vessels' centre lines widened to 3 "
                        "pixels, which weighs thin vessels per unit length as much as wide ones; 0: none. 1, "
                        "screened held out, scored 0.0019 AUC and 0.0054 F1 lower, not kept (README)")
    p.add_argument("--arch", choices=tuple(ARCHS), default="unet",
                   help="the U-Net (the shipped weights' network); the U-Net on 2x2 pixel blocks (s2d, "
                        "space-to-depth: every level at half the U-Net's resolution, its finest level "
                        "wider, about half the training time, 0.003 lower F1 on the test set; README); "
                        "two U-Nets in cascade (wnet: the second refines the first); or two space-"
                        "to-depth U-Nets in cascade (s2dw: s2d's network, then one half as wide; 1.34x "
                        "the training time, it scored below s2d at equal time held out, README)")
    p.add_argument("--base", type=int, default=16, help="U-Net base width (64 is the paper's)")
    p.add_argument("--top-width", type=int, default=None, dest="top",
                   help="width of the finest level instead of --base (unet, s2d, s2dw's first stage) "
                        f"(default: for s2d and s2dw {S2D_TOP} x --base, so 40 at base 16; for unet --base)")
    p.add_argument("--refine", type=int, default=0, metavar="R",
                   help="s2d: end in R feature maps at full resolution (pixel-shuffled from the half-"
                        "resolution net) that one 3x3 block, with the image beside them, turns into "
                        "the logits: a full-resolution stage for thin vessels; 0: none. --top-width 32 "
                        "--refine 8, screened against s2d's defaults, did not gain (README)")
    p.add_argument("--depth", type=int, default=None,
                   help="down-samplings of the U-Net (unet, s2d): 4 is the paper's; fewer drop its "
                        f"coarsest levels (default: {S2D_DEPTH} for s2d, which scored above 4 held out "
                        f"in less time (README), and 3 lower at top width 16; {DEPTH} for the others; for unet, "
                        "3 scored level with 4 "
                        "held out on two seeds in 0.83x the step time and level on the test set over three "
                        "seeds: `--depth 3 --time-budget 30` for a CPU slower than the AMX Xeon, README)")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=False,
                   help="unet, s2d: residual conv blocks (the first ReLU's output added to the second "
                        "BN's output, before the last ReLU); screened held out over 2 seeds, +0.0002 AUC, "
                        "not kept (README)")
    p.add_argument("--deep-supervision", dest="deep", type=int, default=0, metavar="K",
                   help="unet: K more 1x1 heads on the decoder's outputs at 1/2, 1/4, ... of the size, "
                        "upsampled and trained with the same loss, weighted 1/2, 1/4, ...; inference uses "
                        "the full-size head alone; 2, screened held out, scored level (AUC -0.0002), not "
                        "kept (README) (default: 0, none)")
    p.add_argument("--attention", choices=ATTENTIONS, default="none",
                   help="unet: sa, a spatial attention gate after the bottleneck (CBAM's, as in SA-UNet); "
                        "scse, spatial and channel squeeze-and-excitation after the decoder blocks below "
                        "full resolution; both screened held out, AUC -0.0006 and -0.0012, not kept (README) "
                        "(default: none)")
    p.add_argument("--dropblock", type=float, default=0.0, metavar="RATE",
                   help="unet, s2d: DropBlock after every 3x3 convolution in training (SA-UNet's "
                        "regulariser on DRIVE): square blocks of --dropblock-size feature pixels zeroed, "
                        "about this fraction of each map; 0: none. 0.1 with --dropblock-size 5, screened held "
                        "out on the 16-wide s2d, scored 0.0010 AUC and 0.0072 F1 lower, not kept (README) "
                        "(default: 0.0)")
    p.add_argument("--dropblock-size", type=int, default=7, metavar="PX",
                   help="side of the dropped blocks, in the feature maps' pixels (odd; s2d's finest "
                        "level is at half resolution) (default: 7)")
    p.add_argument("--act", choices=tuple(ACTS), default="relu",
                   help="unet, s2d: the conv blocks' activation (silu: x * sigmoid(x), smooth); silu screened "
                        "held out over 2 seeds, +0.0002-0.0004 AUC for 6-9 %% longer epochs, not kept (README)")
    p.add_argument("--norm", choices=tuple(NORMS), default="clahe",
                   help="image contrast normalisation (default: clahe; clahe-fill: clahe after the outside "
                        "of the FOV is filled with a smooth continuation of the fundus; screened held out "
                        "and not kept; green: the green channel alone, screened held out over 2 seeds, "
                        "level AUC and 0.0024 lower F1, not kept; rgb: no equalisation, screened held out, "
                        "+0.0003 AUC and +0.0012 F1, under the rule, not kept; README)")
    p.add_argument("--ema", type=float, default=0.99,
                   help="decay of the moving average of the weights that is validated and saved "
                        "(0 turns it off)")
    p.add_argument("--train-on-val", action=argparse.BooleanOptionalAction, default=True,
                   help="train on the validation images too, so on all 20 DRIVE training images; "
                        "they then only trace the fit in log.csv and curves.png. Nothing is "
                        "selected on them either way: the model is the last epoch's and the "
                        "threshold is chosen on all training images. --no-train-on-val holds them "
                        "out, for an unbiased curve")
    add_tta_args(p, 4, "choose the threshold for the mean prediction over N flips of each image "
                       "(1, 2 or 4; see test.py --tta), and make that test.py's and predict.py's default")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training arithmetic: bf16 mixed precision (about 1.8x faster where the "
                        "device runs it natively), fp32, or auto (bf16 when native, else fp32); "
                        "the per-epoch validation runs in it too, the final threshold's inference as "
                        "test.py's default does (bf16 where native)")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue from a checkpoint (no value: OUT/last.pt)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in all (smoke test)")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.time_budget is not None and args.time_budget <= 0:
        p.error(f"--time-budget is in minutes and must be positive, got {args.time_budget}")
    if not 0 < args.beta2 < 1:
        p.error(f"--beta2 must lie between 0 and 1, got {args.beta2}")
    if not 0 <= args.degrade <= 1:
        p.error(f"--degrade is a fraction of the crops, from 0 to 1; got {args.degrade}")
    if args.fov_crops and args.affine_first:
        p.error("--fov-crops places the crops that are cut first; --affine-first cuts rotated ones: use one")
    if args.skeleton_recall < 0:
        p.error(f"--skeleton-recall is a loss weight, 0 or more; got {args.skeleton_recall}")
    if args.top is not None and (args.arch == "wnet" or args.top < 1):
        p.error(f"--top-width must be positive and is for --arch unet, s2d or s2dw, got {args.top} for {args.arch}")
    if args.refine < 0 or (args.refine and args.arch != "s2d"):
        p.error(f"--refine must be 0 or more and is for --arch s2d, got {args.refine} for {args.arch}")
    if args.residual and args.arch not in ("unet", "s2d"):
        p.error(f"--residual is for --arch unet or s2d, got {args.arch}")
    if args.deep and (args.arch != "unet" or not 0 < args.deep < (args.depth or DEPTH)):
        p.error(f"--deep-supervision is for --arch unet, from 1 to --depth - 1; got {args.deep} for {args.arch}")
    if args.attention != "none" and args.arch != "unet":
        p.error(f"--attention is for --arch unet, got {args.arch}")
    if not 0 <= args.dropblock < 1 or (args.dropblock and args.arch not in ("unet", "s2d")):
        p.error(f"--dropblock is a fraction in [0, 1) for --arch unet or s2d, got {args.dropblock:g} for {args.arch}")
    if args.dropblock_size < 1 or args.dropblock_size % 2 == 0:
        p.error(f"--dropblock-size must be odd and positive, got {args.dropblock_size}")
    if args.act != "relu" and args.arch not in ("unet", "s2d"):
        p.error(f"--act is for --arch unet or s2d, got {args.arch}")
    if args.elastic < 0:
        p.error(f"--elastic is a displacement in pixels and must be 0 or more, got {args.elastic}")
    if not 0 < args.scale[0] <= args.scale[1]:
        p.error(f"--scale needs 0 < MIN <= MAX, got {args.scale[0]:g} {args.scale[1]:g}")
    if args.top is None and args.arch in ("s2d", "s2dw"):
        args.top = round(S2D_TOP * args.base)
    if args.depth is None:
        args.depth = S2D_DEPTH if args.arch == "s2d" else DEPTH
    if args.batch_size is None:
        args.batch_size = STEPS[args.arch][0]
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.depth < 1 or (args.depth != DEPTH and args.arch not in ("unet", "s2d")):
        p.error(f"--depth must be at least 1 and is for --arch unet or s2d, got {args.depth} for {args.arch}")
    multiple = ARCHS[args.arch].multiple * 2 ** args.depth // 2 ** DEPTH  # the class's is at DEPTH
    if args.crop % multiple or args.crop < multiple:
        p.error(f"--crop must be a positive multiple of {multiple} for --arch {args.arch} at --depth "
                f"{args.depth}, got {args.crop}")
    return args


# ---------------------------------------------------------------- state
def build(cfg, device, steps_per_epoch):
    # channels_last runs the small convolutions of this net ~1.4x faster on CPU, and suits cuDNN
    model = build_model(cfg).to(device, memory_format=torch.channels_last)
    # the average of the weights over the last ~1/(1-decay) steps, BN statistics included:
    # it scores steadier on validation than the weights of the last step
    ema = AveragedModel(model, multi_avg_fn=ema_update(cfg["ema"]), use_buffers=True) if cfg["ema"] else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  betas=(0.9, cfg["beta2"]))
    if cfg["sched"] == "cosine":
        warm = max(1, int(cfg["warmup"] * steps_per_epoch))

        def factor(step):  # linear warm-up, then cosine down to 1% of the peak
            if step < warm:
                return (step + 1) / warm
            total = cfg["epochs"] * steps_per_epoch  # read now: --time-budget sets it after warm-up
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                               patience=5)
    loss_fn = LOSSES[cfg["loss"]]()
    return model, ema, optimizer, scheduler, loss_fn


def ema_update(decay):
    """Moving-average step over lists of same-dtype tensors (AveragedModel groups them); the
    decay ramps up from 0.1 over the first steps (as in TensorFlow's ExponentialMovingAverage),
    so short runs are not stuck at the initial weights. Each tensor gets d * averaged +
    (1 - d) * current, rounded as when computed one tensor at a time, but in a few foreach
    calls instead of some 500 small ops per step."""
    def update(averaged, current, count):  # count: updates so far (>= 1), a tensor
        d = min(decay, (1 + count) / (10 + count))  # float, or a float32 tensor while ramping
        keep, take = (d.item(), (1 - d).item()) if torch.is_tensor(d) else (d, 1 - d)
        if averaged[0].is_floating_point():
            torch._foreach_mul_(averaged, keep)
            torch._foreach_add_(averaged, torch._foreach_mul(current, take))
        else:  # BatchNorm's num_batches_tracked (int64): averaged in float, truncated back
            for a, c in zip(averaged, current):
                a.copy_(d * a + (1 - d) * c)
    return update


def inference_copy(state):
    """The part of a checkpoint that test.py and predict.py need, weights stored as fp16 where
    fp16 holds them: an eighth of last.pt's size (no optimizer, no second copy). A tensor with
    values beyond fp16's range (65504) stays fp32: BatchNorm's running variances reach 1e6 in
    the deep layers, and as fp16 infinities they would silence their channels."""
    weights = {k: v.half() if v.is_floating_point() and fits_fp16(v) else v for k, v in state["model"].items()}
    return {"model": weights, **{k: state[k] for k in ("config", "epoch", "threshold", "tta", "val_f1")}}


def fits_fp16(tensor):
    """Whether every value of a floating-point tensor is within fp16's finite range."""
    return bool(tensor.abs().max() <= torch.finfo(torch.float16).max) if tensor.numel() else True


# ---------------------------------------------------------------- one epoch
def train_epoch(model, ema, loader, optimizer, scheduler, loss_fn, device, bf16, step, max_steps, epoch,
                skeleton_weight=0.0):
    model.train()
    skeleton_loss = SkeletonRecallLoss()
    total, count, step_s = 0.0, 0, []
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False)
    tick = time.perf_counter()
    for image, mask, fov, _ in bar:
        if max_steps is not None and step >= max_steps:
            break
        image = image.to(device).contiguous(memory_format=torch.channels_last)  # (N,C,crop,crop)
        mask, fov = mask.to(device), fov.to(device)  # (N,1,crop,crop); mask (N,2,..) with a skeleton
        mask, skeleton = mask[:, :1], mask[:, 1:]  # skeleton: (N,0,crop,crop) without --skeleton-recall
        optimizer.zero_grad(set_to_none=True)
        # logits (N,1,crop,crop); a cascade is supervised at both stages, deep supervision at
        # every head (weights 1, 1/2, 1/4, ... from the full-size one)
        deep = bool(getattr(model, "deep", None))  # UNet's deep heads (an empty ModuleList: none)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(image, return_all=True) if isinstance(model, Cascade) else \
                model.forward_all(image) if deep else (model(image),)
        weights = [0.5 ** i if deep else 1.0 for i in range(len(outputs))]
        loss = sum(w * loss_fn(logits.float(), mask, fov) for w, logits in zip(weights, outputs))
        if skeleton_weight:
            loss = loss + skeleton_weight * sum(w * skeleton_loss(logits.float(), skeleton)
                                                for w, logits in zip(weights, outputs))
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.step()
        step += 1
        total, count = total + loss.item(), count + 1  # .item() waits for the device: honest step times
        bar.set_postfix(loss=f"{total / count:.4f}")
        step_s.append(time.perf_counter() - tick)  # this batch's loading and step
        tick = time.perf_counter()
    return total / max(count, 1), step, step_s


@torch.no_grad()
def validate(model, dataset, loss_fn, device, bf16):
    """Validation images at native size: mean loss, F1 at 0.5, best threshold and its F1.

    Predicted as test.py predicts them (one view): only the FOV's window, grown to the network's
    multiple, goes through the network, in bf16 when `bf16`. These numbers only trace the fit:
    nothing is chosen on them, and computing them leaves the weights alone."""
    model.eval()
    losses, probs, truths = [], [], []
    for i in range(len(dataset)):
        image, mask, fov, _ = dataset[i]
        y0, y1, x0, x1 = grown_box(fov_box(fov[0].bool().numpy()), *image.shape[-2:], model.multiple)
        image, mask, fov = (t[:, y0:y1, x0:x1] for t in (image, mask, fov))  # (C|1, h, w): FOV inside
        x, (h, w) = pad_to_multiple(image[None].to(device), model.multiple)  # (1,C,H',W')
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x.contiguous(memory_format=torch.channels_last))[..., :h, :w].float()  # (1,1,h,w)
        losses.append(loss_fn(logits, mask[None].to(device), fov[None].to(device)).item())
        inside = fov[0].bool().numpy()
        probs.append(torch.sigmoid(logits)[0, 0].cpu().numpy()[inside])
        truths.append(mask[0].bool().numpy()[inside])
    probs, truths = np.concatenate(probs), np.concatenate(truths)
    f1_half = scores(*confusion(probs >= 0.5, truths))["f1"]
    threshold, f1_best = best_threshold(probs, truths)
    return float(np.mean(losses)), f1_half, threshold, f1_best


@torch.no_grad()
def choose_threshold(model, dataset, tta, bf16):
    """F1-maximising threshold over the FOV pixels of the whole images of `dataset`, with
    the probabilities test.py and predict.py make (`tta` flips, bf16 when asked).

    All training images rather than four held-out ones: per-image optima spread from ~0.1
    to ~0.7, and one pathological image (DRIVE 34) drags a four-image pool far below the
    rest. Fitted images give nearly the threshold held-out ones do here (EMA weights,
    heavy augmentation): 0.43-0.46 from 16 fitted images alone, 0.42-0.46 from those
    and 4 held out (three seeds, without TTA)."""
    model.eval()
    device = next(model.parameters()).device
    probs, truths = [], []
    for i in range(len(dataset)):
        image, mask, fov, _ = dataset[i]
        inside = fov[0].bool().numpy()
        p = predict_probs(model, image.to(device), tta=tta, bf16=bf16, box=fov_box(inside))  # (H,W)
        probs.append(p.cpu().numpy()[inside])
        truths.append(mask[0].bool().numpy()[inside])
    return best_threshold(np.concatenate(probs), np.concatenate(truths))


def calibrate_int8(inference, dataset, path):
    """The activation ranges for test.py's and predict.py's --precision int8, from the
    network as they load it (`inference`: inference_copy's weights) over what it sees of the
    whole images of `dataset` (the FOV's window, one view each)."""
    model = inference_model(inference, path)
    inputs = []
    for i in range(len(dataset)):
        image, _, fov, _ = dataset[i]
        inputs.append(network_window(image, fov_box(fov[0].bool().numpy()), model.multiple))
    return int8_ranges(model, inputs)


# ---------------------------------------------------------------- log and curves
def write_log(out, history, loss_name, val_name="validation"):
    with atomic_path(os.path.join(out, "log.csv")) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(history)
    plot_curves(os.path.join(out, "curves.png"), history, loss_name, val_name)


def plot_curves(path, history, loss_name, val_name):
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], label=val_name)
    ax1.set(xlabel="epoch", ylabel=f"{loss_name} loss", title="loss")
    ax1.legend()
    ax2.plot(epochs, [r["val_f1"] for r in history], label="F1 at 0.5")
    ax2.plot(epochs, [r["val_f1_best"] for r in history], label="F1 at best threshold")
    ax2.set(xlabel="epoch", ylabel="F1 inside FOV", title=f"{val_name} F1")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- main
# settings of runs begun before their options existed: what those runs trained with
RESUME_DEFAULTS = {"train_on_val": False, "degrade": 0.0, "soft_labels": False, "time_budget": None,
                   "beta2": 0.999, "residual": False, "act": "relu", "affine_first": False, "fov_crops": False,
                   "elastic": 0.0, "scale": SCALE_RANGE, "deep": 0, "attention": "none", "skeleton_recall": 0.0,
                   "dropblock": 0.0, "dropblock_size": 7}


def resume_config(args, device):
    """(checkpoint, config) of the run --resume continues: its own config, with this command's
    --epochs (when given), --device, --max-steps and --out."""
    path = os.path.join(args.out, "last.pt") if args.resume == "last" else args.resume
    if not os.path.isfile(path):
        raise UserError(f"{path}: no checkpoint to resume from; drop --resume to start a new run")
    ckpt = read_checkpoint(path, device, ("model", "train_model", "optimizer", "scheduler", "config"))
    cfg = dict(RESUME_DEFAULTS, **ckpt["config"])
    cfg.update(epochs=args.epochs or cfg["epochs"], device=args.device, max_steps=args.max_steps, out=args.out)
    cfg["tta"] = tta_views(cfg.get("tta", args.tta))  # True meant 4 flips before --tta took a number
    return ckpt, cfg


def restore(ckpt, model, ema, optimizer, scheduler):
    """Load a last.pt into the training objects; returns (epoch, step, best F1, history)."""
    model.load_state_dict(ckpt["train_model"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["model"])
        ema.n_averaged.fill_(ckpt["step"])  # > 0: keep averaging rather than copy
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["epoch"], ckpt["step"], ckpt["best_f1"], ckpt["history"]


def describe(cfg, train_ds, val_ds, start):
    """The run's one-line header: network, data, epochs."""
    return (f"{network_text(cfg)} ({cfg['parameters']:,} parameters) | {len(train_ds.ids)} train images x "
            f"{cfg['crops_per_image']} crops of {cfg['crop']}, {len(val_ds.ids)} val"
            f"{' (trained on too)' if cfg['train_on_val'] else ''} | epochs {start + 1}..{cfg['epochs']}")


def main(argv=None):
    args = get_args(argv)
    device = get_device(args.device)
    ckpt, cfg = resume_config(args, device) if args.resume else \
        (None, dict(vars(args), epochs=args.epochs or STEPS[args.arch][1]))
    seeding(cfg["seed"])
    fitted = ("train", "val") if cfg["train_on_val"] else "train"
    train_ds = DriveDataset(cfg["data"], fitted, cfg["norm"], crop=cfg["crop"],
                            repeats=cfg["crops_per_image"], degrade=cfg["degrade"],
                            soft_labels=cfg["soft_labels"], affine_first=cfg["affine_first"],
                            elastic=cfg["elastic"], scale=cfg["scale"], skeleton=cfg["skeleton_recall"] > 0,
                            fov_crops=cfg["fov_crops"])
    val_ds = DriveDataset(cfg["data"], "val", cfg["norm"])
    steps_per_epoch = math.ceil(len(train_ds) / cfg["batch_size"])
    cfg["in_ch"] = NORMS[cfg["norm"]]
    model, ema, optimizer, scheduler, loss_fn = build(cfg, device, steps_per_epoch)
    scored = ema.module if ema is not None else model  # the weights validated and saved as "model"
    cfg["parameters"] = count_parameters(model)
    cfg["input_size"] = read_split_meta(cfg["data"]).get("size")  # (W, H) when dataset.py --resize
    start, step, best, history = 0, 0, -1.0, []
    if ckpt is not None:
        start, step, best, history = restore(ckpt, model, ema, optimizer, scheduler)
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and bf16_native(device))
    create_dir(cfg["out"])
    print(f"device {device} {'bf16' if bf16 else 'fp32'} | {describe(cfg, train_ds, val_ds, start)}")
    if note := slow_cpu_note(device.type, bf16_native(device), cfg.get("arch", "unet"), cfg.get("time_budget")):
        print(note)

    run_start, epoch, save_s = time.time(), start, 0.0
    while epoch < cfg["epochs"]:  # --time-budget may lower cfg["epochs"] after the warm-up
        epoch += 1
        t0 = time.time()
        # augmentation and order depend on (seed, epoch) alone, so --resume repeats them exactly
        train_ds.reseed(cfg["seed"] * 1000 + epoch)
        loader = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=True, drop_last=False,
                            num_workers=cfg["workers"],
                            generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        train_loss, step, step_s = train_epoch(model, ema, loader, optimizer, scheduler, loss_fn, device,
                                               bf16, step, cfg["max_steps"], epoch, cfg["skeleton_recall"])
        t_val = time.time()
        val_loss, val_f1, threshold, val_f1_best = validate(scored, val_ds, loss_fn, device, bf16)
        t_val = time.time() - t_val
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
               "val_f1": round(val_f1, 5), "val_f1_best": round(val_f1_best, 5),
               "threshold": round(threshold, 4), "seconds": round(time.time() - t0, 1)}
        history.append(row)
        if cfg["time_budget"] and epoch == budget_epoch(cfg):
            # before last.pt is written, so that --resume continues with the epochs decided here
            set_budget_epochs(cfg, epoch, typical_epoch_seconds(time.time() - t0 + save_s, step_s), t_val)
        improved = val_f1_best > best
        best = max(best, val_f1_best)
        # "threshold" is the validation one until the run ends (then: all training images)
        state = {"model": scored.state_dict(), "train_model": model.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                 "best_f1": best, "threshold": threshold, "tta": 1, "val_f1": val_f1_best,
                 "config": cfg, "history": history}
        t_save = time.time()
        torch_save(state, os.path.join(cfg["out"], "last.pt"))
        write_log(cfg["out"], history, cfg["loss"],
                  "validation (also trained on)" if cfg["train_on_val"] else "validation")
        save_s = time.time() - t_save
        print(f"epoch {epoch:3d}/{cfg['epochs']} | train loss {train_loss:.4f} | val loss {val_loss:.4f} "
              f"| val F1 {val_f1:.4f} (best thr {threshold:.2f}: {val_f1_best:.4f})"
              f"{' *' if improved else ''} | {row['seconds']:.0f}s{eta(history, start, cfg['epochs'])}",
              flush=True)
        if cfg["max_steps"] is not None and step >= cfg["max_steps"]:
            print(f"reached --max-steps {cfg['max_steps']}")
            break
    minutes, seconds = epoch_time(run_start, time.time())
    if epoch > start:
        print(f"trained epochs {start + 1}..{epoch} in {minutes}m {seconds:02d}s (with validation)")
    finish(scored, cfg, device)


def budget_epoch(cfg):
    """The epoch after which --time-budget fixes the number of epochs: the last whole epoch of
    the warm-up (at most the 2nd), as the cosine that the number shapes begins after it; the
    1st epoch alone runs slower (first calls of each kernel)."""
    return max(1, min(2, int(cfg["warmup"])))


def epochs_in_budget(budget_s, elapsed_s, done, epoch_s, reserve_s, most):
    """Epochs in all for a run whose whole command must end within budget_s: `done` epochs
    after elapsed_s, epoch_s per further epoch (validation and saving included), reserve_s at
    the end (the threshold); at least `done`, at most `most`."""
    # 5% to spare: later epochs ran up to ~4% slower than the warm-up's on a quiet machine
    fit = done + int((budget_s - elapsed_s - reserve_s) // (1.05 * epoch_s))
    return max(done, min(most, fit))


def typical_epoch_seconds(epoch_s, step_s):
    """An epoch's seconds with its steps' sum (step_s: one wall time per batch) replaced by their
    count times their median: a stall of the machine during the timed epoch (seen on a shared Zen 4:
    31 s for an epoch whose neighbours took 18) would otherwise cut a --time-budget run by a third."""
    if not step_s:
        return epoch_s
    return epoch_s - sum(step_s) + len(step_s) * statistics.median(step_s)


def set_budget_epochs(cfg, done, epoch_s, val_s):
    """Set cfg["epochs"] from the measured epoch time so the run ends within --time-budget."""
    # the threshold is chosen on 20 whole images with tta flips, validation scores 4 with one;
    # the int8 calibration then takes ~7 views' time per image (1 s per image, 20 s, on a 2-core
    # AVX-512 Xeon for s2d; on the CPU also after GPU training, inside the 5% spare there)
    reserve = 5 * (cfg["tta"] + (7 if cfg["arch"] in INT8_ARCHS else 0)) * val_s
    elapsed = time.time() - STARTED
    epochs = epochs_in_budget(60 * cfg["time_budget"], elapsed, done, epoch_s, reserve, cfg["epochs"])
    print(f"time budget {cfg['time_budget']:g} min: {elapsed:.0f} s so far, {epoch_s:.1f} s per epoch "
          f"(at the median step) -> {epochs} epochs in all (of at most {cfg['epochs']})"
          # the schedule is the same as --epochs N's when the cosine has not begun yet
          f"{f'; --epochs {epochs} repeats this run exactly' if cfg['warmup'] >= 1 else ''}", flush=True)
    cfg["epochs"] = epochs


def slow_cpu_note(device_type, native_bf16, arch, time_budget):
    """A line for CPUs without native bf16 (AVX2-only, or AVX-512 without its bf16 instructions):
    they train in fp32, about 4x the README's times, so the U-Net's 120 epochs take 105-110 min
    on 2 AVX2 cores. '' where that does not apply or the run is already budgeted."""
    if device_type != "cpu" or native_bf16 or time_budget or arch != "unet":
        return ""
    return ("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so training runs in fp32 and takes about "
            "4x the README's times; for about 30 minutes here: --arch s2d --top-width 16 (5x faster inference "
            "too), or --time-budget 30 (README, Train)")


def eta(history, start, epochs):
    """', ~Xm left' (or ~XhYYm, ~Xs) from this session's mean epoch time; '' on the last epoch.
    The time per epoch varies ~4x between CPUs (native bf16 or not), so the README's figure may
    not be this machine's."""
    done = history[start:]
    left = (epochs - done[-1]["epoch"]) * sum(r["seconds"] for r in done) / len(done)
    m = round(left / 60)
    text = f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m" if m else f"{left:.0f}s"
    return f", ~{text} left" if left > 0 else ""


def finish(scored, cfg, device):
    """Choose the final threshold on all training images and calibrate int8 inference there;
    write both into last.pt and model.pt. Inference runs as test.py's default does: bf16 where
    native, TTA as --tta says."""
    path = os.path.join(cfg["out"], "last.pt")
    state = torch.load(path, map_location=device, weights_only=False)
    full = DriveDataset(cfg["data"], ("train", "val"), cfg["norm"])  # whole images, no augmentation
    threshold, f1 = choose_threshold(scored, full, cfg["tta"], bf16_native(device))
    state.update(threshold=threshold, tta=cfg["tta"])
    inference = inference_copy(state)
    if cfg["arch"] in INT8_ARCHS:
        state["int8"] = inference["int8"] = calibrate_int8(inference, full, path)
    torch_save(state, path)
    torch_save(inference, os.path.join(cfg["out"], "model.pt"))
    history = state["history"]
    print(f"last epoch {state['epoch']}: val F1 {history[-1]['val_f1_best']:.4f} (best epoch "
          f"{max(history, key=lambda r: r['val_f1_best'])['epoch']}: {state['best_f1']:.4f}); "
          f"threshold {threshold:.3f} on all {len(full)} training images"
          f"{tta_text(cfg['tta'])} (F1 there {f1:.4f}){'; int8 calibrated there' if 'int8' in state else ''}")
    print(f"wrote {cfg['out']}/model.pt (final weights and threshold, for test.py and predict.py), "
          "last.pt (for --resume), log.csv, curves.png")


if __name__ == "__main__":
    run_main(main)
