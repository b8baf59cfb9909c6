"""Helpers shared by the scripts: seeding, dirs, timing, devices, safe writes,
image reading, metrics, inference and run-length encoding of masks."""
import argparse
import contextlib
import copy
import math
import os
import pickle
import random
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from model import DEPTH, S2DUNet, S2DWNet, UNet, WNet, fold_batchnorm, pad_to_multiple

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_WEIGHTS = os.path.join(HERE, "weights", "drive_unet.pt")  # the plain U-Net (--arch unet)
SHIPPED_S2D = os.path.join(HERE, "weights", "drive_s2d.pt")  # the space-to-depth U-Net (train.py --arch s2d)


UMASK = os.umask(0o022)  # read it (only settable): os.umask returns the previous mask
os.umask(UMASK)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help for every script: '(default: X)' after each option that has a value, and
    the description and epilog laid out as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default:" in (action.help or ""):
            return action.help  # the help text says what happens without the option
        return super()._get_help_string(action)


# ---------------------------------------------------------------- seeding, dirs, time
def seeding(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_dir(path):
    os.makedirs(path, exist_ok=True)
    return path


def epoch_time(start, end):
    """Seconds between two time.time() stamps as (minutes, seconds)."""
    elapsed = end - start
    return int(elapsed // 60), int(elapsed % 60)


def get_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags as Linux lists them (x86 "flags", Arm "Features"), or None
    where the file is absent (macOS, Windows)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    return None


def bf16_native(device):
    """Whether `device` runs bfloat16 convolutions natively (CUDA with bf16 support, or
    a CPU with AVX512-BF16/AMX through oneDNN); elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return cpu_bf16_native(bool(check and check()), cpu_flags())


def cpu_bf16_native(onednn_bf16, flags):
    """oneDNN also reports bf16 on AVX-512 CPUs without its instructions (Skylake, Cascade
    Lake), where it converts in software: a training step there takes 2.1x fp32's time. So on
    such a CPU the flags must show them; elsewhere (Arm, no /proc/cpuinfo) oneDNN decides."""
    if not onednn_bf16:
        return False
    if flags is None or "avx512f" not in flags:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Context manager measuring wall time of a block, device-synchronised."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        if self.device is not None:
            sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device is not None:
            sync(self.device)
        self.seconds = time.perf_counter() - self._t


# ---------------------------------------------------------------- safe writes
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename it onto `path` only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    create_dir(folder)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temp folder beside `path`; it replaces `path` only on success."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    create_dir(parent)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(os.path.abspath(path)) + "-", dir=parent)
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tmp + ".old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def save_png(path, array):
    """Write a uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------- image reading
def read_image(path, mode):
    """Read an image file as a uint8 array; mode 'RGB' -> (H,W,3), 'L' -> (H,W)."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "RGB" and im.mode in ("I;16", "I;16B", "I"):
                im = Image.fromarray((np.array(im, dtype=np.float64) / 257).astype(np.uint8))
            return np.array(im.convert(mode))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except UnidentifiedImageError:
        raise UserError(f"{path}: cannot read image (not a known image format, or corrupt); "
                        "re-download or replace this file")
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read image ({e.__class__.__name__}: {e}); "
                        "re-download or replace this file")


def read_mask(path):
    """Read a binary mask (vessels or FOV) as bool (H,W): > 127 is foreground."""
    return read_image(path, "L") > 127


# ---------------------------------------------------------------- checkpoints and inference
def read_checkpoint(path, device, needs):
    """A checkpoint dict of this repo holding the entries `needs`, or a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; train one with train.py or pass --checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({e.__class__.__name__})")
    if not isinstance(ckpt, dict) or not set(needs) <= set(ckpt):
        raise UserError(f"{path}: not a checkpoint of this repo for this use (needs the entries "
                        f"{', '.join(needs)})")
    return ckpt


def load_model(path, device, precision="auto"):
    """Rebuild the model for inference from a checkpoint alone; returns (model, checkpoint dict).
    precision "int8": the network quantized with the checkpoint's calibration (CPU only)."""
    if precision == "int8" and device.type != "cpu":
        raise UserError(f"--precision int8 runs on the CPU, not {device.type}; add --device cpu")
    ckpt = read_checkpoint(path, device, ("model", "config"))
    model = inference_model(ckpt, path)
    if precision == "int8":
        if not ckpt.get("int8"):
            raise UserError(f"{path}: no int8 calibration in this checkpoint (train.py stores one for "
                            "--arch unet and s2d); use --precision fp32")
        return quantize_int8(model, ckpt["int8"], path), ckpt
    # channels_last: the layout the small convolutions of this net run fastest in (CPU and cuDNN)
    return model.to(device, memory_format=torch.channels_last), ckpt


def inference_model(ckpt, path):
    """The network of a checkpoint, on the CPU, ready for inference."""
    cfg = ckpt["config"]
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit {type(model).__name__}(base={cfg['base']}): {first}")
    return fold_batchnorm(model.eval().cpu())  # inference only: BatchNorm folded into the convs


ARCHS = {"unet": UNet, "s2d": S2DUNet, "wnet": WNet, "s2dw": S2DWNet}  # train.py --arch -> network class


def build_model(cfg):
    """The network a config describes (train.py's resolved arguments)."""
    kwargs = {"top": cfg["top"]} if cfg.get("top") else {}  # WNet has no top width
    if cfg.get("refine"):  # s2d only; older checkpoints have no such key
        kwargs["refine"] = cfg["refine"]
    if cfg.get("depth", DEPTH) != DEPTH:  # unet and s2d; older checkpoints have no such key
        kwargs["depth"] = cfg["depth"]
    if cfg.get("residual"):  # unet and s2d; older checkpoints have no such key
        kwargs["residual"] = True
    if cfg.get("act", "relu") != "relu":  # unet and s2d; older checkpoints have no such key
        kwargs["act"] = cfg["act"]
    if cfg.get("deep"):  # unet only; older checkpoints have no such key
        kwargs["deep"] = cfg["deep"]
    if cfg.get("attention", "none") != "none":  # unet only; older checkpoints have no such key
        kwargs["attention"] = cfg["attention"]
    if cfg.get("dropblock"):  # unet and s2d, training only; older checkpoints have no such key
        kwargs["drop"] = (cfg["dropblock"], cfg["dropblock_size"])
    return ARCHS[cfg.get("arch", "unet")](in_ch=cfg.get("in_ch", 3), out_ch=1, base=cfg["base"], **kwargs)


ARCH_NAMES = {"unet": "U-Net", "s2d": "space-to-depth U-Net", "wnet": "W-Net", "s2dw": "space-to-depth W-Net"}


def network_text(cfg):
    """The network a config describes, in words: 'U-Net base 16', then what departs from the
    paper's U-Net ('space-to-depth U-Net base 16, top 40, depth 2')."""
    options = [f"top {cfg['top']}" if cfg.get("top") else "", f"refine {cfg['refine']}" if cfg.get("refine") else "",
               f"depth {cfg['depth']}" if cfg.get("depth", DEPTH) != DEPTH else "",
               "residual" if cfg.get("residual") else "", cfg["act"] if cfg.get("act", "relu") != "relu" else "",
               f"deep supervision {cfg['deep']}" if cfg.get("deep") else "",
               f"attention {cfg['attention']}" if cfg.get("attention", "none") != "none" else "",
               f"DropBlock {cfg['dropblock']:g} of {cfg['dropblock_size']}x{cfg['dropblock_size']}"
               if cfg.get("dropblock") else ""]
    return ", ".join([f"{ARCH_NAMES[cfg.get('arch', 'unet')]} base {cfg['base']}"] + [o for o in options if o])


@torch.no_grad()
def predict_probs(model, image, tta=1, size=None, tile=1024, overlap=64, bf16=False, box=None):
    """Vessel probabilities for one image.

    image: float tensor (C, H, W) in [0, 1] on the model's device.
    tta: how many flips of the image to average: 1 (none), 2 (identity, horizontal) or 4
    (and vertical, both); True and False, as older checkpoints store it, mean 4 and 1.
    size: (W, H) the model was trained at when data was resized (dataset.py --resize);
    the image is resized to it and the probabilities back to (H, W).
    bf16: run the network in bfloat16 autocast (about 2x faster where native, the same
    scores to 4 decimals on DRIVE). box: (y0, y1, x0, x1), the pixels that matter (the
    FOV's bounding box, see fov_box); only a window around it, grown to multiples of
    model.multiple with the image's own pixels, goes through the network (DRIVE: 544x544 instead of 592x576,
    ~20% faster) and the rest is 0. Returns float tensor (H, W) in [0, 1]. Images larger
    than `tile` are cut into overlapping tiles so memory stays bounded whatever the size.
    """
    h, w = image.shape[-2:]
    if size is not None and tuple(size) != (w, h):
        resized = F.interpolate(image[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)
        if box is not None:  # the same box in the resized image's pixels
            box = scale_box(box, size[1] / h, size[0] / w)
        probs = predict_probs(model, resized[0], tta, None, tile, overlap, bf16, box)
        return F.interpolate(probs[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    if box is not None:
        y0, y1, x0, x1 = grown_box(box, h, w, model.multiple)
        if (y1 - y0, x1 - x0) != (h, w):
            out = torch.zeros(h, w, device=image.device)
            out[y0:y1, x0:x1] = predict_probs(model, image[:, y0:y1, x0:x1], tta, None, tile, overlap, bf16)
            return out
    if h <= tile and w <= tile:
        return _predict_whole(model, image[None], tta, bf16)[0, 0]
    out = torch.zeros(h, w, device=image.device)
    weight = torch.zeros(h, w, device=image.device)
    step = tile - overlap
    for y0 in range(0, max(h - overlap, 1), step):
        for x0 in range(0, max(w - overlap, 1), step):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            out[y0:y1, x0:x1] += _predict_whole(model, image[None, :, y0:y1, x0:x1], tta, bf16)[0, 0]
            weight[y0:y1, x0:x1] += 1
    return out / weight


def fov_box(fov):
    """Bounding box (y0, y1, x0, x1) of the True pixels of a bool (H, W) array; the whole
    array when it has none."""
    ys, xs = np.nonzero(fov)
    if not len(ys):
        return 0, fov.shape[0], 0, fov.shape[1]
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def scale_box(box, sy, sx, margin=2):
    """box (y0, y1, x0, x1) in the pixels of an image resized by (sy, sx), `margin` pixels
    wider: bilinear resizing back reads a pixel beyond. grow_span clips it to the image."""
    return (int(box[0] * sy) - margin, math.ceil(box[1] * sy) + margin,
            int(box[2] * sx) - margin, math.ceil(box[3] * sx) + margin)


def grown_box(box, h, w, multiple):
    """The box (y0, y1, x0, x1) grown to multiples inside an (h, w) image (grow_span per axis)."""
    return (*grow_span(box[0], box[1], h, multiple), *grow_span(box[2], box[3], w, multiple))


def grow_span(lo, hi, n, multiple):
    """[lo, hi) grown evenly on both sides to a multiple of `multiple` inside [0, n), or to
    all of it when that is shorter: the network then sees real pixels around the box
    rather than padding."""
    lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
    length = min(n, max(multiple, -(-(hi - lo) // multiple) * multiple))
    lo = max(0, min(lo - (length - (hi - lo)) // 2, n - length))
    return lo, lo + length


FLIPS = ((), (3,), (2,), (2, 3))  # identity, horizontal, vertical, both (= rotation by 180)
TTA_VIEWS = (1, 2, 4)  # flips averaged: the first 1, 2 or all 4 of FLIPS


def network_window(image, box, multiple):
    """What predict_probs(image, box=box) puts through a network of `multiple` (one view):
    the FOV box grown to multiples, padded where it cannot grow; (C,H,W) -> (1,C,H',W')."""
    y0, y1, x0, x1 = grown_box(box, *image.shape[-2:], multiple)
    return pad_to_multiple(image[None, :, y0:y1, x0:x1], multiple)[0]


def tta_views(tta):
    """The number of flips to average, 1, 2 or 4, from an int or a bool (older checkpoints: True
    meant the four flips). bool is tested first because True == 1 in Python."""
    views = (4 if tta else 1) if isinstance(tta, bool) else tta
    if views not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {TTA_VIEWS} (or a bool), got {tta!r}")
    return views


def tta_text(tta):
    """', mean of N flips' for a report line ('' for one view)."""
    views = tta_views(tta)
    return f", mean of {views} flips" if views > 1 else ""


def _predict_whole(model, x, tta, bf16):
    """x: (N,C,H,W) -> probabilities (N,1,H,W); pads to model.multiple and crops back."""
    xp, (h, w) = pad_to_multiple(x, model.multiple)
    xp = xp.contiguous(memory_format=torch.channels_last)
    views = FLIPS[:tta_views(tta)]
    probs = 0
    # one view at a time: on CPU a batch of 4 views runs slower per view than 4 batches of 1
    for dims in views:
        view = xp.flip(dims) if dims else xp
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(view)  # (N,1,H',W')
        p = torch.sigmoid(logits.float())
        probs = probs + (p.flip(dims) if dims else p)
    return (probs / len(views))[..., :h, :w]


def add_tta_args(parser, default, help):
    """--tta [N] (N flips averaged, 1, 2 or 4; bare --tta is 4) and --no-tta (the same as --tta 1)."""
    parser.add_argument("--tta", type=int, nargs="?", const=4, choices=TTA_VIEWS, default=default,
                        metavar="N", help=help)
    parser.add_argument("--no-tta", dest="tta", action="store_const", const=1, help="the same as --tta 1")


def add_inference_args(parser):
    """--tta, --device and --precision, shared by test.py and predict.py."""
    add_tta_args(parser, None, "average the predictions for N flips of each image: 1 (none), 2 (and the "
                               "left-right mirror) or 4 (and the upside-down ones); bare --tta is 4 "
                               "(default: as the checkpoint's threshold was chosen, see train.py --tta)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto: CUDA where there is one, except for --precision "
                             "int8, which runs on the CPU)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                        help="network arithmetic: auto is bf16 where the device runs it natively (about "
                             "2x faster on CPU, the same F1, AUC and accuracy to 4 decimals on DRIVE), "
                             "else fp32; int8 (CPU, x86) quantizes the network with the checkpoint's "
                             "calibration: 2.5-3.6x fp32's speed on an AVX-512 Xeon, F1 within 0.0005 (README)")
    parser.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                        help="smooth a photograph whose estimated sensor noise is 2 grey levels or "
                             "more, before contrast normalisation would amplify it "
                             "(preprocess.denoise_photo, as in training); DRIVE's photographs "
                             "estimate 0.6-1.35 and pass unchanged")


def inference_device(args):
    """test.py and predict.py's device: --device, where auto means the CPU for --precision int8
    (PyTorch's quantized engine is CPU-only), so int8 works unasked on a machine with a GPU."""
    return get_device("cpu" if args.device == "auto" and args.precision == "int8" else args.device)


def inference_options(args, ckpt, device):
    """(tta, bf16) for test.py and predict.py, tta the number of flips averaged. It defaults
    to what the checkpoint's threshold was chosen with (a threshold fits the probabilities it
    was chosen on); --precision auto runs bf16 where the device has it natively."""
    tta = tta_views(ckpt.get("tta", 1) if args.tta is None else args.tta)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_native(device))
    return tta, bf16


# ---------------------------------------------------------------- int8 inference (CPU)
# Post-training static quantization (torch.ao.quantization, FX graph mode): weights int8 per
# output channel, activations uint8 per tensor over ranges calibrated on the training images
# and stored in the checkpoint ("int8": {name: [lo, hi]}). About 3x faster than fp32 on an
# AVX-512 CPU with VNNI, F1 and AUC within 0.0005 of fp32 held out (README). PyTorch marks this
# API deprecated in favour of torchao but ships it in the pinned 2.13.
def _silence_quantization_notices():
    """Process-wide, for the scripts that asked for int8 (a catch_warnings around every call
    made each ~1.5x slower): torch.ao's deprecation notices, and the notice that cat's inputs
    differ in scale (the skip connections do; quantized cat requantizes them, as measured)."""
    warnings.filterwarnings("ignore", message="(?s).*(deprecat|reduce_range|same quantization param)")


def _int8_mapping(observer, levels=256):
    """How a network is quantized; `levels`: activation steps (128 where the CPU lacks VNNI:
    fbgemm then sums pairs of products in 16 bits, which full-range uint8 can saturate)."""
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import PerChannelMinMaxObserver
    qconfig = QConfig(activation=observer.with_args(dtype=torch.quint8, quant_min=0, quant_max=levels - 1),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                                qscheme=torch.per_channel_symmetric))
    return get_default_qconfig_mapping("x86").set_global(qconfig)


def int8_network(model):
    """A copy of `model` (eval, BatchNorm folded, CPU) computing the same map in the form int8
    quantizes best. Each 2x2 stride-2 up-convolution becomes a 1x1 convolution to 4x the channels
    and a rearrangement (upconv_as_conv): fbgemm quantizes a transposed convolution's weights per
    tensor only, which alone changed 8.5% of the mask pixels of the weights shipped at the time
    on training images, so those ran in fp32 (0.13%), a quarter of the network's time on a Zen 4
    CPU; a 1x1 convolution's weights go per output channel (0.061% of the shipped U-Net's mask
    pixels, in ~0.8x the time). And the Identity that fold_batchnorm leaves between each
    convolution and its ReLU is dropped, so the two fuse."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, up in list(parent.named_children()):
            if isinstance(up, torch.nn.ConvTranspose2d):
                setattr(parent, name, upconv_as_conv(up))
    graph = torch.fx.symbolic_trace(model)
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and isinstance(graph.get_submodule(node.target), torch.nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.delete_all_unused_submodules()
    graph.recompile()
    graph.in_ch, graph.multiple = model.in_ch, model.multiple
    return graph


def upconv_as_conv(up):
    """nn.ConvTranspose2d(C, D, 2, stride=2) as the same map in two steps: a 1x1 convolution
    (N,C,H,W) -> (N,4D,H,W), whose output channel (2a+b)D+d is pixel (a, b) of each 2x2 block of
    channel d, and UpConv's rearrangement of those into (N,D,2H,2W)."""
    if up.kernel_size != (2, 2) or up.stride != (2, 2) or up.padding != (0, 0) or up.groups != 1:
        raise ValueError(f"only 2x2 stride-2 up-convolutions, got {up}")
    c, d = up.weight.shape[:2]  # ConvTranspose2d weight: (C, D, 2, 2)
    conv = torch.nn.Conv2d(c, 4 * d, 1, bias=up.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(up.weight.permute(2, 3, 1, 0).reshape(4 * d, c, 1, 1))
        if up.bias is not None:
            conv.bias.copy_(up.bias.repeat(4))
    return UpConv(conv)


class UpConv(torch.nn.Module):
    """upconv_as_conv's two steps. The 1x1 convolution's output is channels-last, (N,H,W,4D) in
    memory with the 4D as (a, b, D); one copy of it as (N,H,a,W,b,D) is (N,2H,2W,D): the result
    in channels-last, the layout of the skip it is concatenated with (pixel_shuffle on int8
    tensors copies twice, and cat of mixed layouts falls back to fp32)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        y = self.conv(x)  # (N,4D,H,W)
        n, c4, h, w = y.shape
        y = y.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c4 // 4)  # (N,H,W,a,b,D)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c4 // 4)  # (N,2H,2W,D), copied
        return y.permute(0, 3, 1, 2)  # (N,D,2H,2W), channels-last


def int8_ranges(model, inputs):
    """Calibrate int8 inference: the range each activation of `model` (eval, BatchNorm folded,
    CPU) is quantized over, chosen from its histogram over `inputs` ((1,C,H,W) tensors, the
    network's inputs) to minimise the rounding error. Returns {name: [lo, hi]}, named by the
    output each range quantizes (a node of int8_network's graph, e.g. "encoders_0_pool")."""
    from torch.ao.quantization.observer import HistogramObserver
    from torch.ao.quantization.quantize_fx import prepare_fx
    _silence_quantization_notices()
    with torch.no_grad():
        observed = prepare_fx(int8_network(model), _int8_mapping(HistogramObserver), (inputs[0],))
        for x in inputs:
            observed(x)
        ranges = {}
        for name, observer in _observers(observed, HistogramObserver).items():
            scale, zero = (float(v) for v in observer.calculate_qparams())
            ranges[name] = [-zero * scale, (255 - zero) * scale]  # what uint8 0..255 spans
    return ranges


def _observers(observed, kind):
    """{name: observer} of a prepare_fx network, each observer named by the first output it
    observes (a node of int8_network's graph; reshapes and cat share their input's observer).
    Named so, a calibration made for another form of the network (before the up-convolutions
    ran in int8 its ranges were numbered, activation_post_process_N) cannot pass for this one's."""
    found = {}
    for node in observed.graph.nodes:
        observer = observed.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(observer, kind) and all(o is not observer for o in found.values()):
            if node.args[0].name in found:
                raise ValueError(f"two observers of {node.args[0].name}")
            found[node.args[0].name] = observer
    return found


def int8_levels():
    """Activation steps for int8 on this CPU: 256 with VNNI, else 128 (see _int8_mapping)."""
    return 256 if {"avx512_vnni", "avx_vnni"} & (cpu_flags() or set()) else 128


def quantize_int8(model, ranges, path="checkpoint", levels=None):
    """`model` (eval, BatchNorm folded, CPU) quantized to int8 over the calibrated `ranges`."""
    from torch.ao.quantization.observer import MinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    if "x86" not in torch.backends.quantized.supported_engines:
        raise UserError("--precision int8 needs an x86 CPU (PyTorch's x86 quantized engine); use fp32")
    torch.backends.quantized.engine = "x86"
    if levels is None:
        levels = int8_levels()
    example = torch.zeros(1, model.in_ch, model.multiple, model.multiple)
    _silence_quantization_notices()
    observed = prepare_fx(int8_network(model), _int8_mapping(MinMaxObserver, levels), (example,))
    observers = _observers(observed, MinMaxObserver)
    if set(observers) != set(ranges):
        raise UserError(f"{path}: its int8 calibration does not fit this network (calibrations made before "
                        "the up-convolutions ran in int8 do not; train.py makes a new one); use --precision fp32")
    for name, (lo, hi) in ranges.items():
        observers[name].min_val.fill_(lo)  # min/max observers then give uint8 exactly [lo, hi]
        observers[name].max_val.fill_(hi)
    quantized = convert_fx(observed)  # called as the network was (CPU tensors)
    quantized.multiple = model.multiple  # what predict_probs pads to
    return quantized


def to_tensor_image(image):
    """uint8 (H,W,C) -> float tensor (C,H,W) in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0


def encode_probs(probs):
    """Probabilities float (H,W) in [0,1] -> uint8 (H,W) as round(255 * sqrt(p)).

    AUC ranks pixels, and most of them have p close to 0: a linear 8-bit map (255 * p)
    would merge everything below 0.002 into one tie and cost DRIVE ~0.005 of AUC.
    The square root spreads the small probabilities over more levels (p = 1e-4 -> 3)
    and keeps the ranking of the float map (its AUC within ~1e-4). decode_probs inverts it.
    """
    return np.round(np.sqrt(np.clip(probs, 0, 1)) * 255).astype(np.uint8)


def decode_probs(values):
    """uint8 map written by encode_probs -> float probabilities (H,W) in [0,1]."""
    return (np.asarray(values, np.float64) / 255) ** 2


# ---------------------------------------------------------------- metrics
def confusion(pred, truth, fov=None):
    """Counts (tp, fp, fn, tn) of bool arrays, only where fov is True."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if fov is not None:
        fov = np.asarray(fov, bool)
        pred, truth = pred[fov], truth[fov]
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(pred.size - tp - fp - fn)
    return tp, fp, fn, tn


def scores(tp, fp, fn, tn):
    """Jaccard, F1 (Dice), recall, precision, specificity, accuracy from counts."""
    def div(a, b):
        return a / b if b else 0.0
    return {
        "jaccard": div(tp, tp + fp + fn),
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "recall": div(tp, tp + fn),
        "precision": div(tp, tp + fp),
        "specificity": div(tn, tn + fp),
        "accuracy": div(tp + tn, tp + fp + fn + tn),
    }


def best_threshold(probs, truth, grid=None):
    """Threshold in `grid` maximising pooled F1; probs float array, truth bool array.

    Uses a 256-bin histogram (p rounded to k/255) so the sweep is one pass over the
    pixels. Bin k >= K holds exactly the p >= (K - 0.5)/255, which is the threshold
    returned, so `probs >= threshold` reproduces the F1. Returns (threshold, f1).
    """
    bins = np.clip((np.asarray(probs) * 255).round().astype(np.int64), 0, 255)
    truth = np.asarray(truth, bool)
    pos = np.bincount(bins[truth], minlength=256)
    neg = np.bincount(bins[~truth], minlength=256)
    # predicted positive = bins >= k: cumulative sums from the top
    tp = pos[::-1].cumsum()[::-1]
    fp = neg[::-1].cumsum()[::-1]
    fn = pos.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    ks = np.arange(256) if grid is None else np.asarray(grid)
    k = ks[np.argmax(f1[ks])]
    return float(max(0.0, (k - 0.5) / 255)), float(f1[k])


# ---------------------------------------------------------------- run-length encoding
def rle_encode(mask):
    """Run-length encode a 2-D mask: pixels in row-major (C) order, 1-based starts.

    Returns a string "start length start length ..." ('' for an empty mask).
    """
    flat = np.asarray(mask, bool).ravel(order="C")
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-based positions of changes
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def rle_decode(runs, shape):
    """Inverse of rle_encode: runs string, (H, W) -> bool mask."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    values = [int(v) for v in runs.split()]
    if len(values) % 2:
        raise ValueError("run-length string has an odd number of values")
    for start, length in zip(values[0::2], values[1::2]):
        if start < 1 or length < 0 or start - 1 + length > flat.size:
            raise ValueError(f"run {start} {length} falls outside a mask of {shape}")
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(shape)


def run_main(main):
    """Run a script's main(): user errors become one line on stderr and exit 1."""
    import sys
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
