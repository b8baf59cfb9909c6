"""The torch Dataset over data/<split>/ and the image normalisation shared by
training and inference."""
import json
import os

# albumentations asks PyPI for a newer version at import; this repo makes no network calls
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from utils import UserError, read_image, read_mask, to_tensor_image  # noqa: E402

NORMS = {"rgb": 3, "clahe": 3, "green": 1, "clahe-fill": 3}  # normalisation -> channels it feeds the network


NOISE_FLOOR = 2.0  # grey levels; DRIVE's photographs estimate 0.6-1.35 (noise_sigma) and pass unchanged
# Immerkaer's 3x3 kernel: the difference of two Laplacians, zero on any locally linear image
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(rgb):
    """Std, in grey levels, of the white noise in a uint8 (H,W,3) photograph (Immerkaer, 1996):
    for noise of std s the kernel's response has mean |r| = 6 s sqrt(2/pi), and smooth image
    content gives ~0. Green channel, over the fundus (some channel above 20, eroded 9x9 so
    the disc's rim stays out); 0.0 when the image has no fundus."""
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    response = np.abs(cv2.filter2D(g, cv2.CV_32F, _NOISE_KERNEL, borderType=cv2.BORDER_REFLECT))
    fundus = cv2.erode((cv2.max(cv2.max(r, g), b) > 20).astype(np.uint8), np.ones((9, 9), np.uint8))
    if not cv2.countNonZero(fundus):
        return 0.0
    return float(np.sqrt(np.pi / 2) * cv2.mean(response, mask=fundus)[0] / 6)


def denoise_photo(rgb):
    """A photograph whose noise_sigma is at least NOISE_FLOOR, smoothed by a bilateral filter
    (5x5, spatial std 2 px) that only averages colours within 3 noise stds, so vessel edges
    (tens of grey levels) stay sharp; others are returned unchanged. Without it, contrast
    normalisation amplifies sensor noise into vessel-like texture: the shipped weights fall
    from F1 0.83 to 0.39 at noise std 12 (README, Other cameras)."""
    sigma = noise_sigma(rgb)
    if sigma < NOISE_FLOOR:
        return rgb
    return cv2.bilateralFilter(np.ascontiguousarray(rgb), 5, 3 * sigma, 2)


def fill_outside(rgb, fov, levels=6):
    """uint8 (H,W,3): the photograph with everything outside the FOV (H,W) replaced by a smooth
    continuation of the fundus, so the FOV's rim is no longer a bright-to-black edge that contrast
    normalisation sharpens into a vessel-like curve. Push-pull: FOV-weighted Gaussian pyramids
    (levels deep), then coarse to fine each level keeps its own weighted mean where the FOV
    covers enough of its window and takes the coarser level's elsewhere. The FOV is eroded by
    2 px first, as the rim's last pixels are half dark."""
    inside = cv2.erode(fov.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    num = rgb.astype(np.float32) * inside[..., None]  # (H,W,3)
    den = inside.astype(np.float32)  # (H,W): the fraction of each Gaussian window inside
    pyramid = [(num, den)]
    for _ in range(levels):
        num, den = cv2.pyrDown(num), cv2.pyrDown(den)
        pyramid.append((num, den))
    est = num / np.maximum(den, 1e-6)[..., None]
    for num, den in reversed(pyramid[:-1]):
        up = cv2.pyrUp(est, dstsize=(num.shape[1], num.shape[0]))
        weight = np.clip(2 * den, 0, 1)[..., None]
        est = weight * num / np.maximum(den, 1e-6)[..., None] + (1 - weight) * up
    return np.where(inside[..., None], rgb, np.clip(est, 0, 255).round().astype(np.uint8))


def normalize_image(rgb, norm, denoise=True, fov=None):
    """Contrast normalisation applied before the network, in training and inference.

    rgb: uint8 (H,W,3) -> uint8 (H,W,NORMS[norm]). 'clahe' equalises local contrast
    of the lightness channel, which evens out illumination and camera differences while
    keeping colour; 'green' keeps only the green channel (where vessels contrast most),
    contrast-equalised the same way; 'clahe-fill' is 'clahe' after fill_outside, and needs the
    FOV mask fov (H,W). With `denoise`, a noisy photograph is smoothed first (denoise_photo).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; expected one of {tuple(NORMS)}")
    if denoise:
        rgb = denoise_photo(rgb)
    if norm == "clahe-fill":
        if fov is None:
            raise ValueError("normalisation 'clahe-fill' needs the FOV mask")
        rgb, norm = fill_outside(rgb, fov), "clahe"
    if norm == "rgb":
        return rgb
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    if norm == "green":
        return clahe.apply(np.ascontiguousarray(rgb[..., 1]))[..., None]
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def mask_interpolation(soft):
    """How the masks of a warped crop are resampled: bilinearly (soft labels) or to the nearest pixel."""
    return cv2.INTER_LINEAR if soft else cv2.INTER_NEAREST


def keep_channels(out, img):
    """OpenCV's warps return (H, W) for an (H, W, 1) image: give it back its channel axis."""
    return out[..., None] if img.ndim == 3 and out.ndim == 2 else out


class RotatedCrop(A.DualTransform):
    """A random crop of crop x crop pixels, rotated and scaled (with probability p_affine) about
    its centre, cut in one warp from the whole photograph: every pixel comes from the
    photograph, and only pixels beyond its edge (black, like the outside of the FOV) are filled.
    The crop centres are RandomCrop's; the angle and the two axes' scales are Affine's."""

    def __init__(self, crop, scale=(0.8, 1.25), rotate=(-180, 180), p_affine=0.7, soft=False):
        super().__init__(p=1.0)
        self.crop, self.scale, self.rotate, self.p_affine = crop, scale, rotate, p_affine
        self.mask_interpolation = mask_interpolation(soft)

    def _offset(self, size):
        """Left (or top) edge of an unrotated crop: RandomCrop's after PadIfNeeded's centred padding."""
        return self.py_random.randint(0, size - self.crop) if size >= self.crop else (size - self.crop) // 2

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        centre = np.array([self._offset(w), self._offset(h)]) + (self.crop - 1) / 2  # (x, y)
        a = np.eye(2)
        if self.py_random.random() < self.p_affine:
            t = np.deg2rad(self.py_random.uniform(*self.rotate))
            sx, sy = self.py_random.uniform(*self.scale), self.py_random.uniform(*self.scale)
            a = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ np.diag([sx, sy])
        # photograph -> crop: the centre goes to the crop's centre, turned and scaled about it
        return {"matrix": np.hstack([a, ((self.crop - 1) / 2 - a @ centre)[:, None]])}

    def _warp(self, img, matrix, interpolation):
        return keep_channels(cv2.warpAffine(img, matrix, (self.crop, self.crop), flags=interpolation,
                                            borderMode=cv2.BORDER_CONSTANT, borderValue=0), img)

    def apply(self, img, matrix, **params):
        return self._warp(img, matrix, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask, matrix, **params):
        return self._warp(mask, matrix, self.mask_interpolation)


class FovCrop(A.DualTransform):
    """A random crop x crop window that holds a random FOV pixel: the pixel is drawn uniformly
    from the FOV (masks[fov_index], by rejection from the whole frame), its place in the window
    uniformly, and the window is then shifted inside the photograph. RandomCrop's windows cover a
    pixel less often the nearer it lies to the photograph's edge: on DRIVE's 565x584 frames with
    256-pixel crops, the FOV's outer 25 pixels are seen 0.3-0.4x as often as its average pixel and
    its centre 1.6x; anchored on FOV pixels, 0.55-0.6x and 1.35x. Screened held out, it scored
    level (README), so train.py uses it only when asked (--fov-crops). The photograph must be at
    least crop x crop (train_transform pads it first with PadIfNeeded)."""

    def __init__(self, crop, fov_index=1):
        super().__init__(p=1.0)
        self.crop, self.fov_index = crop, fov_index

    def get_params_dependent_on_data(self, params, data):
        fov = data["masks"][self.fov_index]
        h, w = fov.shape[:2]
        if not fov.any():
            raise ValueError("FovCrop: the FOV mask is empty")
        while True:  # DRIVE's FOV is ~70 % of the frame: ~1.5 draws on average
            y, x = self.py_random.randrange(h), self.py_random.randrange(w)
            if fov[y, x]:
                break
        top = min(max(y - self.py_random.randrange(self.crop), 0), h - self.crop)
        left = min(max(x - self.py_random.randrange(self.crop), 0), w - self.crop)
        return {"top": top, "left": left}

    def apply(self, img, top, left, **params):
        return img[top:top + self.crop, left:left + self.crop]

    def apply_to_mask(self, mask, top, left, **params):
        return self.apply(mask, top, left)


class Bend(A.DualTransform):
    """Elastic deformation: every pixel moves by a smooth random field, cubic between control
    points `spacing` pixels apart whose x and y displacements are normal with standard deviation
    `sigma` pixels. At sigma 4 and spacing 64 vessels bend gently; the strain (the field's
    gradient) stays small, so thin vessels neither break nor fold. Borders are reflected."""

    def __init__(self, sigma, spacing=64, soft=False, p=1.0):
        super().__init__(p=p)
        self.sigma, self.spacing = sigma, spacing
        self.mask_interpolation = mask_interpolation(soft)
        self.grids = {}  # (h, w) -> interpolation weights and pixel coordinates, computed once

    def _grid(self, h, w):
        """Cubic weights (h, rows) and (w, cols) from control points to pixels, as cv2.resize
        by `spacing` weighs them (the resize of an identity matrix), and the pixels' x and y."""
        if (h, w) not in self.grids:
            def weights(size):
                n = -(-size // self.spacing) + 1  # control points, `spacing` apart, covering size
                eye = np.eye(n, dtype=np.float32)
                return cv2.resize(eye, (n, n * self.spacing), interpolation=cv2.INTER_CUBIC)[:size]
            y, x = np.mgrid[:h, :w].astype(np.float32)
            self.grids[h, w] = weights(h), weights(w), x, y
        return self.grids[h, w]

    def get_params_dependent_on_data(self, params, data):
        wy, wx, x, y = self._grid(*params["shape"][:2])
        rng = np.random.default_rng(self.py_random.getrandbits(64))
        field = rng.normal(0, self.sigma, (2, wy.shape[1], wx.shape[1])).astype(np.float32)
        dx, dy = (wy @ f @ wx.T for f in field)  # (h, w) displacements, cubic between control points
        # cv2.remap's source x and y of every pixel, in fixed point: converted once, not per target.
        # Nearest-pixel masks need their own, rounded, map: the bilinear one's integer part is the floor
        sx, sy = x + dx, y + dy
        nearest = self.mask_interpolation == cv2.INTER_NEAREST
        return {"maps": cv2.convertMaps(sx, sy, cv2.CV_16SC2),
                "mask_maps": (cv2.convertMaps(sx, sy, cv2.CV_16SC2, nninterpolation=True)[0], None)
                if nearest else None}

    def _warp(self, img, maps, interpolation):
        return keep_channels(cv2.remap(img, *maps, interpolation, borderMode=cv2.BORDER_REFLECT_101), img)

    def apply(self, img, maps, **params):
        return self._warp(img, maps, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask, maps, mask_maps=None, **params):
        return self._warp(mask, mask_maps or maps, self.mask_interpolation)


SCALE_RANGE = (0.8, 1.25)  # each axis' scale factor of the rotated training crops (train.py --scale)


def skeletonize(mask):
    """Guo-Hall thinning of a binary (H, W) mask: the 1-pixel-wide, 8-connected centre lines of
    its vessels, bool (H, W). Each pass removes, in two half-steps (south-east borders, then
    north-west ones), the border pixels whose removal keeps their neighbourhood connected and
    that are not line ends. Unlike Zhang-Suen's conditions, Guo-Hall's keep 2-pixel-thick diagonal
    lines, which DRIVE's thin vessels often are."""
    img = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for half in (0, 1):
            # neighbours P2..P9 clockwise from north, each (H+2, W+2) with a zero border
            p2, p3, p4, p5, p6, p7, p8, p9 = (np.roll(img, shift, axis=(0, 1)) for shift in
                                              ((1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)))
            # C: 8-connected pieces of the ring that the pixel joins; N: its "thickness" count
            c = sum((~a & (b | d)).astype(np.uint8) for a, b, d in
                    ((p2, p3, p4), (p4, p5, p6), (p6, p7, p8), (p8, p9, p2)))
            n1 = sum((a | b).astype(np.uint8) for a, b in ((p9, p2), (p3, p4), (p5, p6), (p7, p8)))
            n2 = sum((a | b).astype(np.uint8) for a, b in ((p2, p3), (p4, p5), (p6, p7), (p8, p9)))
            n = np.minimum(n1, n2)
            side = ((p2 | p3 | ~p5) & p4) if half == 0 else ((p6 | p7 | ~p9) & p8)
            drop = img & (c == 1) & (n >= 2) & (n <= 3) & ~side
            if drop.any():
                img, changed = img & ~drop, True
        if not changed:
            return img[1:-1, 1:-1]


def tubed_skeleton(mask):
    """The skeleton widened by one pixel to each side (a 3x3 cross) within the vessels, uint8 (H, W)
    in {0, 1}: the target of the skeleton recall loss (Kirchhoff et al., 2024), thick enough to
    survive the nearest-pixel resampling of rotated crops. Kept inside the mask so that the recall
    term never asks for vessel beside a 1-pixel vessel."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return cv2.dilate(skeletonize(mask).astype(np.uint8), cross) & (mask > 0).astype(np.uint8)


def train_transform(crop, channels=3, soft=False, affine_first=False, elastic=0.0, scale=SCALE_RANGE,
                    fov_crops=False):
    """Online augmentation: random native-resolution crop, flips, rotation/scale,
    and photometric changes (brightness, contrast, gamma, and colour when there is any).

    soft: resample the masks of a rotated or scaled crop bilinearly (the fraction of each
    pixel a vessel covers; the masks must then be float) rather than to the nearest pixel,
    whose staircase edges no photograph has.
    affine_first: cut the rotated and scaled crop from the photograph (RotatedCrop). By default
    the crop is cut first and then rotated, so up to half its pixels (its corners, at 45
    degrees) are mirror images of its own border, with vessels that fold back at the seam.
    elastic: bend every crop, after the rotation, by a smooth field of that many pixels (Bend).
    scale: (min, max) of each axis' scale factor of the rotated crops (vessels that many times
    as wide).
    fov_crops: windows anchored on uniformly drawn FOV pixels (FovCrop; the masks' second is the
    FOV) instead of RandomCrop's, which see the FOV's rim less often than its centre."""
    colour = [A.HueSaturationValue(10, 20, 10, p=0.5)] if channels == 3 else []
    if affine_first:
        cut, affine = [RotatedCrop(crop, scale=scale, soft=soft)], []
    else:
        cut = [A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
               FovCrop(crop) if fov_crops else A.RandomCrop(crop, crop)]
        affine = [A.Affine(scale=scale, rotate=(-180, 180), border_mode=cv2.BORDER_REFLECT_101, p=0.7,
                           mask_interpolation=mask_interpolation(soft))]
    return A.Compose([
        *cut,
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *affine,
        *([Bend(elastic, soft=soft)] if elastic else []),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.7),
        A.RandomGamma((70, 150), p=0.5),
        *colour,
    ])


def degrade_transform():
    """What other cameras and files do to a photograph, applied to the raw RGB image before
    contrast normalisation (which amplifies such artefacts, as it does in inference):
    JPEG compression, defocus blur, a low resolution scaled up, or sensor noise."""
    return A.OneOf([
        A.ImageCompression(quality_range=(30, 95)),
        A.GaussianBlur(sigma_limit=(0.3, 1.5)),
        A.Downscale(scale_range=(0.5, 0.9),
                    interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}),
        A.GaussNoise(std_range=(0.01, 0.04), p=1.0),  # std 2.5-10 grey levels
    ], p=1.0)


def _jpeg(rgb, quality):
    _, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


def _gamma(rgb, gamma):
    return (255 * (rgb / 255.0) ** gamma).round().astype(np.uint8)


def _gain(rgb, gains):
    """rgb (H,W,3) times gains that broadcast against it: (3,) per channel, (H,W,1) per pixel."""
    return np.clip(rgb * np.asarray(gains, np.float64), 0, 255).round().astype(np.uint8)


def _lowres(rgb, factor):
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _ramp(rgb, low):
    """Brightness falling linearly from 1 at the right edge to `low` at the left: a camera
    aimed off-centre, one side of the fundus in shadow."""
    w = rgb.shape[1]
    gain = np.broadcast_to(np.linspace(low, 1.0, w), rgb.shape[:2])
    return _gain(rgb, gain[..., None])


def _vignette(rgb, rim):
    """Brightness falling from 1 at the centre to `rim` at half the shorter side (the FOV's rim in
    DRIVE), quadratically in the radius, and on beyond it: a small pupil's vignetting."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (min(h, w) / 2) ** 2
    return _gain(rgb, np.clip(1 - (1 - rim) * r2, 0, 1)[..., None])


def _noise(rgb, sigma, seed):
    noisy = rgb + np.random.default_rng(seed).normal(0, sigma, rgb.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def zoom_photo(rgb, fov, factor):
    """The photograph (H,W,3) uint8 and its FOV mask (H,W) bool resized by `factor`, unchanged at 1:
    predict.py brings a photograph to the network's scale so; test.py --zoom shows vessels `factor`
    times as wide, as a camera with a narrower (factor > 1) or wider (< 1) angle of view does once
    its FOV is brought to DRIVE's size. Area averaging when shrinking, so thin vessels fade as a
    coarser sensor would render them; the mask to the nearest pixel."""
    if factor == 1:
        return rgb, fov
    h, w = fov.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    return rgb, cv2.resize(fov.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


# Fixed, reproducible stand-ins for other cameras and files (test.py --corrupt): each maps a uint8
# RGB photograph (H,W,3) and a seed (used by the noise alone) to a photograph of the same size.
CORRUPTIONS = {
    "gamma0.6": lambda rgb, seed: _gamma(rgb, 0.6),  # overexposed
    "gamma1.6": lambda rgb, seed: _gamma(rgb, 1.6),  # underexposed
    "dim0.6": lambda rgb, seed: _gain(rgb, (0.6, 0.6, 0.6)),
    "cast": lambda rgb, seed: _gain(rgb, (1.25, 1.0, 0.7)),  # warmer white balance
    "jpeg40": lambda rgb, seed: _jpeg(rgb, 40),
    "blur1": lambda rgb, seed: cv2.GaussianBlur(rgb, (0, 0), 1.0),  # defocus
    "lowres0.6": lambda rgb, seed: _lowres(rgb, 0.6),  # a 0.6x sensor, scaled back up
    "noise6": lambda rgb, seed: _noise(rgb, 6, seed),  # Gaussian, std in grey levels
    "noise12": lambda rgb, seed: _noise(rgb, 12, seed),
    "ramp0.5": lambda rgb, seed: _ramp(rgb, 0.5),  # uneven illumination, left half in shadow
    "vignette0.5": lambda rgb, seed: _vignette(rgb, 0.5),  # darker towards the rim
}


def read_split_meta(data_dir):
    """data/split.json as a dict, with a clear error when data/ was not prepared."""
    path = os.path.join(data_dir, "split.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; run 'python dataset.py --drive DRIVE' first "
                        f"(or --synthetic) to prepare {data_dir}/")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); prepare {data_dir}/ again with dataset.py")


def read_split(data_dir, split):
    """Ids of one split from data/split.json."""
    path = os.path.join(data_dir, "split.json")
    ids = read_split_meta(data_dir).get(split, [])
    if not ids:
        raise UserError(f"{path}: split '{split}' is empty; prepare {data_dir}/ again with dataset.py")
    return ids


class DriveDataset(Dataset):
    """Samples of data/<split> (or of several splits, split a tuple): image (C,H,W) float in [0,1]
    (C = NORMS[norm]), mask (1,H,W) in {0,1}, fov (1,H,W) in {0,1}, and the id. With `crop`,
    returns augmented crops, a `degrade` fraction of them from a degraded photograph
    (degrade_transform); with `soft_labels`, the masks of rotated or scaled crops are in [0, 1]
    (train_transform's soft); `affine_first`, `elastic`, `scale` and `fov_crops`: train_transform's
    (rotated crops cut from the photograph; bent crops; the range of scale factors; crops anchored
    on FOV pixels). With `skeleton`, mask is (2,H,W): the vessels and their tubed skeleton
    (tubed_skeleton), warped alike."""

    def __init__(self, data_dir, split, norm="clahe", crop=None, repeats=1, degrade=0.0, soft_labels=False,
                 affine_first=False, elastic=0.0, scale=SCALE_RANGE, skeleton=False, fov_crops=False):
        splits = (split,) if isinstance(split, str) else tuple(split)
        self.items = [(os.path.join(data_dir, s), sid) for s in splits for sid in read_split(data_dir, s)]
        self.ids = [sid for _, sid in self.items]
        self.norm = norm
        self.repeats = repeats  # random crops drawn from each image per epoch
        self.soft_labels = bool(soft_labels and crop)
        self.transform = train_transform(crop, NORMS[norm], self.soft_labels, affine_first, elastic,
                                         tuple(scale), fov_crops) if crop else None
        self.degrade = degrade if crop else 0.0
        self.degrader = degrade_transform()
        self.skeleton = skeleton
        self.seed = 0
        self.cache, self.raw, self.skeletons = {}, {}, {}

    def __len__(self):
        return len(self.ids) * self.repeats

    def reseed(self, seed):
        """Make the augmentation stream a function of `seed` (exact --resume)."""
        self.seed = seed
        if self.transform is not None:
            self.transform.set_random_seed(seed)
            self.degrader.set_random_seed(seed)

    def load(self, item):
        """Normalised uint8 image (H,W,C), vessel and FOV masks (H,W) uint8 of (root, id); cached."""
        if item not in self.cache:
            root, sid = item
            image, mask, fov = (os.path.join(root, kind, f"{sid}.png") for kind in ("images", "masks", "fov"))
            rgb, fov = read_image(image, "RGB"), read_mask(fov).astype(np.uint8)
            if self.degrade:
                self.raw[item] = rgb
            self.cache[item] = (normalize_image(rgb, self.norm, fov=fov), read_mask(mask).astype(np.uint8), fov)
        return self.cache[item]

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        item = self.items[index % len(self.items)]
        image, mask, fov = self.load(item)
        masks = [mask, fov]
        if self.skeleton:
            if item not in self.skeletons:
                self.skeletons[item] = tubed_skeleton(mask)
            masks.append(self.skeletons[item])
        # whether to degrade: a function of (seed, index) alone, whatever the worker
        if self.degrade and np.random.default_rng([self.seed, index]).random() < self.degrade:
            image = normalize_image(self.degrader(image=self.raw[item])["image"], self.norm, fov=fov)
        if self.soft_labels:  # uint8 0/1 would round the bilinear fractions back to 0 or 1
            masks = [m.astype(np.float32) for m in masks]
        if self.transform is not None:
            out = self.transform(image=image, masks=masks)
            image, masks = out["image"], out["masks"]
        mask, fov = np.stack(masks[:1] + masks[2:]), masks[1][None]  # (1 or 2,H,W), (1,H,W)
        return (to_tensor_image(image),
                torch.from_numpy(np.ascontiguousarray(mask)).float(),
                torch.from_numpy(np.ascontiguousarray(fov)).float(),
                item[1])
