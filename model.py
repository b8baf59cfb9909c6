"""The reference U-Net (Ronneberger et al., 2015) with a configurable width.

Pure: no I/O, no device choice. With base=64 this is the classic network
(encoder 64-128-256-512, bottleneck 1024, transposed-conv decoder, skip
concatenation, 1x1 head). Smaller bases keep the same shape and train on a CPU.
S2DUNet runs the same U-Net on 2x2 blocks of pixels, a quarter of the work.
Every network has `multiple`: the number its input's height and width must divide by.
"""
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# the input check stays one call when torch.fx traces a network (int8 quantization, utils.py)
torch.fx.wrap("check_input")

DEPTH = 4  # number of 2x down-samplings, so inputs must be multiples of 2**DEPTH
MULTIPLE = 2 ** DEPTH
# the conv blocks' activation: ReLU (the paper's) or SiLU (x * sigmoid(x): smooth, passes a little
# of negative inputs, so no unit's gradient is cut off entirely)
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018), as SA-UNet (Guo et al., 2020) regularises its convolutions
    on DRIVE: in training, zero square blocks of `size` x `size` feature pixels, each channel and
    image its own, so that on average a fraction `rate` of the map is dropped, and scale the rest
    up by the kept fraction; in eval mode, the identity. Plain dropout of single pixels barely
    regularises a convolution, whose neighbours carry the same information. No parameters."""

    def __init__(self, rate, size):
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"DropBlock rate must be in [0, 1), got {rate}")
        if size < 1 or size % 2 == 0:
            raise ValueError(f"DropBlock size must be odd and positive, got {size}")
        self.rate, self.size = rate, size

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        return x * self.mask(x.shape, x.device).to(x.dtype)

    def mask(self, shape, device):
        """A (N, C, H, W) float mask, channels-last in memory (train.py's layout): 0 in the dropped
        blocks, elsewhere 1 / the kept fraction, so the map's mean is kept.

        Each seed drops a block of size**2 pixels (its part inside the map), so round(rate /
        size**2 * N*C*H*W) seeds, drawn with replacement, drop about `rate` of the map (a little
        less where blocks overlap or reach over the border). The blocks' pixels are written into
        the mask by index, not found by max-pooling a map of Bernoulli draws: that draws a random
        number for every pixel and pools every pixel, and cost a training step 40 % more on 2 CPU
        cores."""
        n, c, h, w = shape
        p = self.size // 2
        k = max(1, round(self.rate / self.size ** 2 * n * c * h * w))
        img, row, col, ch = (torch.randint(s, (k, 1, 1), device=device) for s in (n, h, w, c))  # the seeds
        d = torch.arange(-p, p + 1, device=device)
        rows = (row + d[:, None]).clamp_(0, h - 1)  # (k, size, 1); clamped: a block ends at the border
        cols = (col + d[None, :]).clamp_(0, w - 1)  # (k, 1, size)
        flat = ((img * h + rows) * w + cols) * c + ch  # (k, size, size): places in an (N, H, W, C) buffer
        dropped = torch.zeros(n * h * w * c, device=device).index_fill_(0, flat.view(-1), 1)
        kept = (1 - dropped.mean()).clamp(min=1e-6)  # > 0 even where one block covers a whole tiny map
        return dropped.view(n, h, w, c).permute(0, 3, 1, 2).mul_(-1 / kept).add_(1 / kept)


class ConvBlock(nn.Module):
    """Two 3x3 conv -> BN -> ReLU (act: a key of ACTS); keeps the spatial size (padding=1).

    residual=True adds the first ReLU's output (already out_ch wide) to the second BN's output
    before the last ReLU (He et al., 2016): an identity path over the second convolution that
    eases optimisation, for one elementwise add and no parameters. drop=(rate, size) puts a
    DropBlock after each convolution, before its BN (SA-UNet's order); it acts in training only,
    and leaves the parameters and their names as they are."""

    def __init__(self, in_ch, out_ch, residual=False, act="relu", drop=None):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {', '.join(ACTS)}, got {act!r}")
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            ACTS[act](inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            ACTS[act](inplace=True),
        )
        self.residual = residual
        # kept outside body, so that body's indices (the state dict's names) do not depend on it
        self.drop = DropBlock(*drop) if drop and drop[0] > 0 else None

    def forward(self, x):
        dropping = self.drop is not None and self.training
        if not self.residual and not dropping:
            return self.body(x)
        conv1, bn1, relu1, conv2, bn2, relu2 = self.body  # the same modules, named (torch.fx traces them)
        y = conv1(x)  # (N, out_ch, H, W)
        y = relu1(bn1(self.drop(y) if dropping else y))
        z = conv2(y)
        z = bn2(self.drop(z) if dropping else z)
        return relu2(y + z if self.residual else z)


class SpatialGate(nn.Module):
    """CBAM's spatial attention (Woo et al., 2018), as SA-UNet puts it at the bottleneck: each
    pixel's mean and max over the channels, a 7x7 conv and a sigmoid give a (N, 1, H, W) gate
    that scales every channel there. 98 parameters; at the bottleneck (1/16 of the input's size)
    its cost is negligible."""

    def __init__(self, kernel=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (N, 2, H, W)
        return x * torch.sigmoid(self.conv(pooled))


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al., 2018): the block's
    output scaled by a per-channel gate (global mean -> 1x1 -> ReLU -> 1x1 -> sigmoid, (N, C, 1, 1))
    plus the same output scaled by a per-pixel gate (1x1 conv -> sigmoid, (N, 1, H, W))."""

    def __init__(self, ch, reduction=2):
        super().__init__()
        mid = max(1, ch // reduction)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, mid, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(mid, ch, 1), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(ch, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.channel(x) + x * self.spatial(x)


ATTENTIONS = ("none", "sa", "scse")


class Encoder(nn.Module):
    """ConvBlock then 2x2 max-pool; returns (skip, pooled)."""

    def __init__(self, in_ch, out_ch, residual=False, act="relu", drop=None):
        super().__init__()
        self.conv = ConvBlock(in_ch, out_ch, residual, act, drop)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        skip = self.conv(x)
        return skip, self.pool(skip)


class Decoder(nn.Module):
    """2x transposed-conv up-sampling, concatenation with the skip, ConvBlock."""

    def __init__(self, in_ch, out_ch, residual=False, act="relu", scse=False, drop=None):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * out_ch, out_ch, residual, act, drop)
        self.gate = SCSE(out_ch) if scse else nn.Identity()

    def forward(self, x, skip):
        x = self.up(x)
        return self.gate(self.conv(torch.cat([x, skip], dim=1)))


class UNet(nn.Module):
    """U-Net returning logits (N, out_ch, H, W) for input (N, in_ch, H, W).

    H and W must be multiples of 2**depth (16); pad with `pad_to_multiple` first. top: the width
    of the first (finest) level instead of base, the others unchanged (None: base). depth: the
    number of down-samplings (4, the paper's; fewer drop the coarsest levels). residual: every
    conv block residual (ConvBlock). act: the blocks' activation, a key of ACTS. deep: that many
    more 1x1 heads on the decoder's coarser outputs (1/2, 1/4, ... of the input's size) for deep
    supervision in training (forward_all); inference (forward) uses the full-size head alone.
    attention: "sa", a SpatialGate after the bottleneck; "scse", an SCSE gate after each decoder
    block but the full-resolution one; "none". drop: (rate, size) of a DropBlock after every
    3x3 convolution of the conv blocks, in training (ConvBlock); None: none.
    """
    multiple = MULTIPLE  # of the default depth; an instance's own is 2**depth

    def __init__(self, in_ch=3, out_ch=1, base=64, top=None, depth=DEPTH, residual=False, act="relu", deep=0,
                 attention="none", drop=None):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if base < 1 or (top is not None and top < 1):
            raise ValueError(f"widths must be >= 1, got base {base}, top {top}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        w = [base * 2 ** i for i in range(depth + 1)]  # base=64, depth 4: 64,128,256,512,1024
        w[0] = top or base
        self.in_ch = in_ch
        self.multiple = 2 ** depth
        self.encoders = nn.ModuleList(
            Encoder(c_in, c_out, residual, act, drop) for c_in, c_out in zip([in_ch] + w[:depth - 1], w[:depth]))
        self.bottleneck = ConvBlock(w[depth - 1], w[depth], residual, act, drop)
        self.gate = SpatialGate() if attention == "sa" else nn.Identity()
        # scse gates every decoder block but the full-resolution one, whose gates cost the most: on 2
        # CPU cores gates at all four levels made a training step 8-17 % longer, the coarser three 6-7 %
        self.decoders = nn.ModuleList(Decoder(w[i + 1], w[i], residual, act, attention == "scse" and i > 0, drop)
                                      for i in reversed(range(depth)))
        self.head = nn.Conv2d(w[0], out_ch, kernel_size=1)
        if not 0 <= deep < depth:
            raise ValueError(f"deep must be from 0 to depth - 1 ({depth - 1}), got {deep}")
        self.deep = nn.ModuleList(nn.Conv2d(w[i], out_ch, kernel_size=1) for i in range(1, deep + 1))

    def decode(self, x):
        """The decoder's outputs, coarsest first: (N, w[i], H / 2**i, W / 2**i) for i = depth - 1 .. 0."""
        check_input(x, self.in_ch, self.multiple)
        skips, decoded = [], []
        for enc in self.encoders:
            s, x = enc(x)
            skips.append(s)
        x = self.gate(self.bottleneck(x))
        for dec, s in zip(self.decoders, reversed(skips)):
            x = dec(x, s)
            decoded.append(x)
        return decoded

    def forward(self, x):
        return self.head(self.decode(x)[-1])

    def forward_all(self, x):
        """For deep supervision: the logits, then the deep heads' (from 1/2 of the size down), each
        upsampled bilinearly to (N, out_ch, H, W)."""
        decoded = self.decode(x)
        logits = self.head(decoded[-1])
        coarse = [head(decoded[-2 - i]) for i, head in enumerate(self.deep)]
        return (logits, *(F.interpolate(c, size=logits.shape[-2:], mode="bilinear", align_corners=False)
                          for c in coarse))


class S2DUNet(nn.Module):
    """The U-Net on 2x2 pixel blocks (space-to-depth): pixel_unshuffle turns the image
    (N, C, H, W) losslessly into (N, 4C, H/2, W/2); a UNet(4C, 4 * out_ch, base) runs at that
    half resolution (its bottom is at H/32) and predicts the four pixels of every block,
    which pixel_shuffle puts back: logits (N, out_ch, H, W).

    The same widths and parameters as UNet(base), each level at half its resolution: a quarter
    of the operations and no full-resolution stage. On CPUs without native bf16 the narrow
    full-resolution convolutions are most of the U-Net's time, so this trains ~4x and infers
    ~3x faster there, for ~0.007 less validation F1 after the same epochs (README). With a wider
    first level (top=40 at base 16, train.py's default) it scores within 0.002 F1 of the U-Net in about
    half its time on a CPU with native bf16. refine=R adds a full-resolution stage: the net
    ends in 4R maps instead of logits, pixel_shuffle makes them R at full resolution, and one 3x3
    conv block over them (after a ReLU) and the image gives the logits. H and W must be multiples
    of 2**(depth + 1): 32 at the default depth 4. residual, act, drop: the U-Net's blocks' (UNet)."""
    multiple = 2 * MULTIPLE

    def __init__(self, in_ch=3, out_ch=1, base=16, top=None, refine=0, depth=DEPTH, residual=False, act="relu",
                 drop=None):
        super().__init__()
        if refine < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        self.in_ch = in_ch
        # refine > 0: the half-resolution net ends in 4 * refine features instead of logits;
        # pixel_shuffle makes them `refine` channels at full resolution, which one 3x3 block
        # there (with the image beside them) turns into logits: a full-resolution stage
        self.net = UNet(4 * in_ch, 4 * (refine or out_ch), base, top, depth, residual, act, drop=drop)
        self.multiple = 2 * self.net.multiple
        self.refine = nn.Sequential(
            ACTS[act](),
            nn.Conv2d(refine + in_ch, refine, 3, padding=1, bias=False),
            nn.BatchNorm2d(refine),
            ACTS[act](inplace=True),
            nn.Conv2d(refine, out_ch, 1),
        ) if refine else None

    def forward(self, x):
        check_input(x, self.in_ch, self.multiple)
        y = nn.functional.pixel_unshuffle(x, 2)  # (N, 4C, H/2, W/2)
        y = nn.functional.pixel_shuffle(self.net(y), 2)  # (N, 4*out, H/2, W/2) -> (N, out, H, W)
        if self.refine is None:
            return y
        return self.refine(torch.cat([y, x], dim=1))  # (N, refine + C, H, W) -> (N, out, H, W)


class Cascade(nn.Module):
    """Two networks in cascade (Galdran et al., 2022): the second sees the image and the
    first's vessel probabilities, and refines them. Returns the second's logits
    (N, out_ch, H, W); with return_all=True also the first's, to supervise both."""

    def __init__(self, in_ch, first, second):
        super().__init__()
        self.in_ch = in_ch
        self.first = first
        self.second = second

    def forward(self, x, return_all=False):
        first = self.first(x)
        second = self.second(torch.cat([x, torch.sigmoid(first)], dim=1))
        return (first, second) if return_all else second


class WNet(Cascade):
    """The W-Net: two U-Nets of the same width in cascade."""

    multiple = MULTIPLE

    def __init__(self, in_ch=3, out_ch=1, base=8):
        super().__init__(in_ch, UNet(in_ch, out_ch, base), UNet(in_ch + out_ch, out_ch, base))


class S2DWNet(Cascade):
    """The W-Net's cascade with space-to-depth U-Nets: the first as train.py's --arch s2d
    builds it (base, top), the second half as wide (base // 2, its finest level base wide).
    At base 16 a training step costs ~1.34x the first's alone. H and W must be multiples of 32."""

    multiple = S2DUNet.multiple

    def __init__(self, in_ch=3, out_ch=1, base=16, top=None):
        super().__init__(in_ch, S2DUNet(in_ch, out_ch, base, top),
                         S2DUNet(in_ch + out_ch, out_ch, max(1, base // 2), top=base))


@torch.no_grad()
def fold_batchnorm(model):
    """Inference only: fold each BatchNorm2d into the Conv2d before it (with the running
    statistics), so a ConvBlock runs two convolutions and two activations. The same outputs to
    ~1e-5 in fp32, about a tenth less time on CPU. Modifies `model` (in eval mode) in place.
    Every conv-then-BN pair inside an nn.Sequential is folded (the blocks' bodies, s2d's refine stage)."""
    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first")
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            layers = list(seq)
            for i, (conv, bn) in enumerate(zip(layers, layers[1:])):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    seq[i] = nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                    seq[i + 1] = nn.Identity()
    return model


def check_input(x, in_ch, multiple):
    """A clear error for a tensor a network cannot take: (N, in_ch, H, W), H and W multiples."""
    if x.dim() != 4 or x.shape[1] != in_ch:
        raise ValueError(f"expected input (N, {in_ch}, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"input size {h}x{w} is not a multiple of {multiple}; "
                         "pad it first (model.pad_to_multiple)")


def pad_to_multiple(x, multiple=MULTIPLE):
    """Reflect-pad (N, C, H, W) at bottom/right to multiples; returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        # reflect needs pad < size; replicate covers tiny inputs
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
