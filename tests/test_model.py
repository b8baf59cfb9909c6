import argparse
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (SCSE, ConvBlock, DropBlock, S2DUNet, S2DWNet, SpatialGate, UNet, WNet, count_parameters,
                   fold_batchnorm, pad_to_multiple)
from utils import add_tta_args, build_model, fov_box, grow_span, predict_probs, tta_views


def test_reference_shape_512():
    model = UNet(base=4).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 512, 512))
    assert out.shape == (2, 1, 512, 512)


def test_reference_widths():
    """base=64 is the paper's network: 64-128-256-512 encoder, 1024 bottleneck."""
    model = UNet(base=64)
    widths = [enc.conv.body[0].out_channels for enc in model.encoders]
    assert widths == [64, 128, 256, 512]
    assert model.bottleneck.body[0].out_channels == 1024
    assert [d.up.out_channels for d in model.decoders] == [512, 256, 128, 64]
    assert isinstance(model.decoders[0].up, torch.nn.ConvTranspose2d)
    assert model.head.kernel_size == (1, 1) and model.head.out_channels == 1
    assert 31_000_000 < count_parameters(model) < 32_000_000


def test_top_width_changes_only_the_finest_level():
    model = UNet(base=16, top=32)
    assert [enc.conv.body[0].out_channels for enc in model.encoders] == [32, 32, 64, 128]
    assert model.bottleneck.body[0].out_channels == 256
    assert [d.up.out_channels for d in model.decoders] == [128, 64, 32, 32]
    assert model.head.in_channels == 32
    s2d = S2DUNet(base=16, top=32)
    assert s2d.net.encoders[0].conv.body[0].out_channels == 32
    assert s2d(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="widths must be >= 1"):
        UNet(base=16, top=0)


def test_s2d_refine_adds_a_full_resolution_block():
    """refine=R: the half-resolution net ends in 4R maps, shuffled to R at full resolution,
    then a 3x3 conv over those R and the 3 image channels, and a 1x1 to the logits."""
    torch.manual_seed(0)
    model = S2DUNet(base=4, top=8, refine=6).eval()
    assert model.net.head.out_channels == 4 * 6
    conv = model.refine[1]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (6 + 3, 6, (3, 3))
    assert model.refine[-1].out_channels == 1
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 1, 64, 96)
    # with the half-resolution net silenced, only the full-resolution block sees the image:
    # a change to one pixel moves the logits in its 3x3 neighbourhood and nowhere else
    torch.nn.init.zeros_(model.net.head.weight)
    torch.nn.init.zeros_(model.net.head.bias)
    # a large BatchNorm shift keeps every channel above the ReLU, which would otherwise, for
    # some random weights, zero the pixel's change (the test then depended on the seed)
    torch.nn.init.constant_(model.refine[2].bias, 100.0)
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[0, :, 10, 11] += 0.5
    with torch.no_grad():
        diff = (model(x) - model(y)).abs()[0, 0]
    assert diff[10, 11] > 0 and diff[9:12, 10:13].sum() == diff.sum()
    assert S2DUNet(base=4, top=8).refine is None
    with pytest.raises(ValueError, match="refine must be >= 0"):
        S2DUNet(base=4, refine=-1)


@pytest.mark.parametrize("h,w", [(100, 100), (584, 565), (17, 33)])
def test_odd_size_rejected_with_message(h, w):
    with pytest.raises(ValueError, match=f"{h}x{w} is not a multiple of 16"):
        UNet(base=2)(torch.rand(1, 3, h, w))


def test_wrong_channels_rejected():
    with pytest.raises(ValueError, match=r"expected input \(N, 3, H, W\)"):
        UNet(base=2)(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize("h,w", [(584, 565), (37, 61), (8, 8)])
def test_padded_prediction_matches_input_size(h, w):
    x, (oh, ow) = pad_to_multiple(torch.rand(1, 3, h, w))
    assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0 and (oh, ow) == (h, w)
    probs = predict_probs(UNet(base=2).eval(), torch.rand(3, h, w), tta=True)
    assert probs.shape == (h, w)
    assert 0 <= probs.min() and probs.max() <= 1


def test_tta_views_known_answers():
    """Older checkpoints store a bool (True: the four flips); True == 1 must not mean one view."""
    assert [tta_views(v) for v in (True, False, 1, 2, 4)] == [4, 1, 1, 2, 4]
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_views(3)


class _Directional(torch.nn.Module):
    """A 'network' that sees direction: each pixel less its left and upper neighbours (wrapping)."""
    multiple = 1

    def forward(self, x):
        return 2 * x[:, :1] - x[:, :1].roll(1, dims=3) - 0.5 * x[:, :1].roll(1, dims=2)


def test_tta_views_are_the_first_flips():
    """tta=2 averages the image and its left-right mirror; 4 adds the two upside-down flips."""
    x, net = torch.rand(3, 8, 12), _Directional()

    def view(dims):  # the probabilities of one flipped view, flipped back: (H, W)
        if not dims:
            return torch.sigmoid(net(x[None]))[0, 0]
        return torch.sigmoid(net(x[None].flip(dims))).flip(dims)[0, 0]
    expected = {1: view(()), 2: (view(()) + view((3,))) / 2,
                4: (view(()) + view((3,)) + view((2,)) + view((2, 3))) / 4}
    for n, probs in expected.items():
        assert torch.allclose(predict_probs(net, x, tta=n), probs, atol=1e-6), n
    assert not torch.allclose(expected[1], expected[2]) and not torch.allclose(expected[2], expected[4])


def test_tta_flags():
    """--tta N takes 1, 2 or 4; bare --tta is 4; --no-tta is 1; absent keeps the default."""
    p = argparse.ArgumentParser()
    add_tta_args(p, None, "flips")
    parsed = [p.parse_args(a).tta for a in ([], ["--tta"], ["--tta", "2"], ["--no-tta"], ["--tta", "1"])]
    assert parsed == [None, 4, 2, 1, 1]
    with pytest.raises(SystemExit):
        p.parse_args(["--tta", "3"])


def test_tiled_prediction_matches_whole():
    """Tiles overlap and are averaged: a fully-convolutional net gives nearly the same map."""
    torch.manual_seed(0)
    model = UNet(base=2).eval()
    x = torch.rand(3, 96, 160)
    whole = predict_probs(model, x, tile=1024)
    tiled = predict_probs(model, x, tile=64, overlap=32)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.05



def test_fov_box_and_grow_span_known_answers():
    fov = np.zeros((584, 565), bool)
    fov[31:564, 16:551] = True  # the box of DRIVE test image 01's FOV
    assert fov_box(fov) == (31, 564, 16, 551)
    assert fov_box(np.zeros((5, 7), bool)) == (0, 5, 0, 7)  # no FOV: the whole image
    assert grow_span(31, 564, 584, 16) == (26, 570)  # 533 -> 544: 5 more before, 6 after
    assert grow_span(16, 551, 565, 16) == (12, 556)  # 535 -> 544: 4 before, 5 after
    assert grow_span(0, 10, 584, 16) == (0, 16)  # cannot start before 0
    assert grow_span(570, 584, 584, 16) == (568, 584)  # nor end after the image
    assert grow_span(0, 30, 30, 16) == (0, 30)  # longer than the image: all of it (padded later)


def test_boxed_prediction_is_the_window_prediction():
    """With a box the network sees only the grown window; outside it the map is 0."""
    torch.manual_seed(0)
    model = UNet(base=2).eval()
    x = torch.rand(3, 100, 90)
    probs = predict_probs(model, x, box=(20, 50, 10, 40))  # 30x30 grows to 32x32
    (y0, y1), (x0, x1) = grow_span(20, 50, 100, 16), grow_span(10, 40, 90, 16)
    assert (y0, y1, x0, x1) == (19, 51, 9, 41)
    window = predict_probs(model, x[:, y0:y1, x0:x1])
    assert torch.allclose(probs[y0:y1, x0:x1], window)
    outside = torch.ones(100, 90, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert probs[outside].abs().max() == 0
    resized = predict_probs(model, x, size=(45, 50), box=(20, 50, 10, 40))  # box scaled with the image
    assert resized.shape == (100, 90)

def test_wnet_cascade_shapes():
    from model import WNet
    model = WNet(in_ch=1, base=2).eval()
    x = torch.rand(2, 1, 64, 48)
    first, second = model(x, return_all=True)
    assert first.shape == second.shape == (2, 1, 64, 48)
    assert torch.equal(model(x), second)
    assert model.second.in_ch == 2  # the image and the first stage's probabilities


def test_s2d_wnet_cascade_stages():
    torch.manual_seed(0)
    model = S2DWNet(base=4, top=10).eval()
    assert (model.first.net.encoders[0].conv.body[0].out_channels, model.first.net.bottleneck.body[0].out_channels,
            model.second.net.encoders[0].conv.body[0].out_channels, model.second.net.bottleneck.body[0].out_channels) \
        == (10, 64, 4, 32)  # the first as --arch s2d builds it; the second half as wide, its finest level base wide
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        first, second = model(x, return_all=True)
        assert first.shape == second.shape == (2, 1, 64, 96)
        assert torch.equal(model(x), second)
        assert torch.equal(first, model.first(x))  # the first stage is the plain network
        assert torch.equal(second, model.second(torch.cat([x, torch.sigmoid(first)], dim=1)))
    with pytest.raises(ValueError, match="48x48 is not a multiple of 32"):
        model(torch.rand(1, 3, 48, 48))


def test_s2d_unet_shapes_and_errors():
    model = S2DUNet(base=4).eval()
    assert model.net.in_ch == 12 and model.net.head.out_channels == 4  # 2x2 blocks of 3 channels
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 96)).shape == (2, 1, 64, 96)
    with pytest.raises(ValueError, match="48x48 is not a multiple of 32"):
        model(torch.rand(1, 3, 48, 48))
    # inference pads to 32 and crops back, with a box too
    probs = predict_probs(model, torch.rand(3, 70, 50), tta=True, box=(5, 60, 3, 40))
    assert probs.shape == (70, 50) and 0 <= probs.min() and probs.max() <= 1


def test_s2d_unet_outputs_pixel_blocks():
    """Output pixel (2i+a, 2j+b) is channel 2a+b of the half-resolution net at (i, j)."""
    torch.manual_seed(0)
    model = S2DUNet(base=2).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)  # (1,1,64,64)
        half = model.net(torch.nn.functional.pixel_unshuffle(x, 2))  # (1,4,32,32)
    for a in (0, 1):
        for b in (0, 1):
            assert torch.equal(out[0, 0, a::2, b::2], half[0, 2 * a + b])


@pytest.mark.parametrize("net", [UNet, S2DUNet, WNet, S2DWNet, partial(S2DUNet, residual=True),
                                 partial(S2DUNet, act="silu", refine=2)])
def test_fold_batchnorm_keeps_outputs(net):
    torch.manual_seed(0)
    model = net(base=4)
    model.train()
    with torch.no_grad():  # a few batches give the running statistics non-trivial values
        for _ in range(3):
            model(torch.rand(2, 3, 32, 32) * 2 + 0.5)
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()


def test_residual_blocks_add_their_input():
    plain, res = UNet(base=4, top=6, depth=2), UNet(base=4, top=6, depth=2, residual=True)
    assert count_parameters(res) == count_parameters(plain)  # an identity path, no parameters
    block = ConvBlock(3, 4, residual=True).eval()
    for p in block.body[3:5].parameters():  # a second convolution and BN that output 0
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = block.body[:3](x)
        assert first.abs().sum() > 0 and torch.equal(block(x), first)  # relu(first + 0) = first
        block.body[4].bias.fill_(-1e3)  # the second BN's output far below zero: the sum is clipped
        assert torch.equal(block(x), torch.zeros_like(first))
    out = S2DUNet(base=4, top=8, depth=2, residual=True)(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_silu_blocks():
    """act="silu" puts x * sigmoid(x) wherever the blocks (and s2d's refine stage) had ReLU: the same
    parameters, negative activations kept in part; build_model reads it from a config."""
    block = ConvBlock(3, 4, act="silu").eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        pre = block.body[:2](x)
        assert torch.allclose(block.body[:3](x), pre * torch.sigmoid(pre))
    relu, silu = S2DUNet(base=4, top=8, depth=2, refine=2), S2DUNet(base=4, top=8, depth=2, refine=2, act="silu")
    assert count_parameters(silu) == count_parameters(relu)
    assert not any(isinstance(m, torch.nn.ReLU) for m in silu.modules())
    cfg = {"arch": "s2d", "base": 4, "top": 8, "depth": 2, "act": "silu"}
    assert any(isinstance(m, torch.nn.SiLU) for m in build_model(cfg).modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in build_model(dict(cfg, act="relu")).modules())
    with pytest.raises(ValueError, match="act must be one of relu, silu"):
        ConvBlock(3, 4, act="gelu")


def test_dropblock_drops_square_blocks_at_about_its_rate():
    """In training: about `rate` of the map zeroed (a little less where blocks overlap), in
    size x size squares, each channel its own, the rest scaled so the mean stays; in eval: x."""
    torch.manual_seed(0)
    drop = DropBlock(0.15, 5).train()
    x = torch.ones(2, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    y = drop(x)
    dropped = (y == 0).float()
    assert 0.12 < dropped.mean() < 0.15
    assert torch.allclose(y.mean(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / (1 - dropped.mean().item())), rtol=1e-5)
    assert not torch.equal(dropped[:, 0], dropped[:, 1])  # channels and images drop their own blocks
    # every zero lies in a fully zeroed 5x5 square (the map's border aside): blocks, not pixels
    eroded = -F.max_pool2d(-dropped, 5, stride=1, padding=2)  # 1 where a 5x5 square around is all zero
    covered = F.max_pool2d(eroded, 5, stride=1, padding=2)[..., 2:-2, 2:-2]
    assert torch.equal(covered, dropped[..., 2:-2, 2:-2])
    one = DropBlock(1e-4, 3).train().mask((1, 1, 9, 9), "cpu")  # a single seed: one 3x3 block
    assert int((one == 0).sum()) in (4, 6, 9)  # 4 or 6 where the block reaches over a corner or side
    assert torch.equal(drop.eval()(x), x)
    tiny = DropBlock(0.5, 5).train()(torch.ones(1, 1, 2, 2))  # one block covers the whole map
    assert torch.equal(tiny, torch.zeros_like(tiny))  # zeros, not NaN
    for rate, size in ((1.0, 3), (-0.1, 3), (0.1, 4), (0.1, 0)):
        with pytest.raises(ValueError, match="DropBlock"):
            DropBlock(rate, size)


def test_dropblock_in_the_blocks_leaves_the_weights_and_inference_alone():
    """drop puts DropBlock in every conv block of the U-Net and the space-to-depth U-Net: the same
    parameters under the same names, the same outputs in eval mode, random ones in training;
    build_model reads it from a config, and int8's BN folding still applies."""
    torch.manual_seed(0)
    for cls, kw in ((UNet, {"base": 4, "depth": 2}), (S2DUNet, {"base": 4, "top": 8, "depth": 2})):
        plain, dropped = cls(**kw), cls(**kw, drop=(0.2, 3))
        assert list(plain.state_dict()) == list(dropped.state_dict())
        dropped.load_state_dict(plain.state_dict())
        assert sum(isinstance(m, DropBlock) for m in dropped.modules()) == 2 * kw["depth"] + 1  # every block
        x = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x), dropped.eval()(x))
            dropped.train()
            assert not torch.equal(dropped(x), dropped(x))
            dropped.load_state_dict(plain.state_dict())  # training moved BN's running statistics
            assert torch.allclose(fold_batchnorm(dropped.eval())(x), plain(x), atol=1e-5)
    cfg = {"arch": "s2d", "base": 4, "top": 8, "depth": 2, "dropblock": 0.1, "dropblock_size": 5}
    blocks = [m for m in build_model(cfg).modules() if isinstance(m, DropBlock)]
    assert blocks and all((b.rate, b.size) == (0.1, 5) for b in blocks)
    assert not any(isinstance(m, DropBlock) for m in build_model(dict(cfg, dropblock=0.0)).modules())


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match="model.eval"):
        fold_batchnorm(UNet(base=2).train())


@pytest.mark.parametrize("depth", [2, 3])
def test_shallower_unets_drop_the_coarsest_levels(depth):
    """depth: how many times the U-Net halves the resolution; inputs are multiples of 2**depth
    (twice that for the space-to-depth U-Net), and the widths stop at base * 2**depth."""
    unet, s2d = UNet(base=4, depth=depth), S2DUNet(base=4, top=10, depth=depth)
    assert (unet.multiple, s2d.multiple) == (2 ** depth, 2 ** (depth + 1))
    assert len(unet.encoders) == len(unet.decoders) == depth
    assert unet.bottleneck.body[0].out_channels == 4 * 2 ** depth
    assert count_parameters(S2DUNet(base=16, top=40, depth=depth)) < count_parameters(S2DUNet(base=16, top=40))
    size = 2 ** (depth + 1) * 3
    with torch.no_grad():
        assert unet(torch.rand(1, 3, size, size)).shape == (1, 1, size, size)
        assert s2d.eval()(torch.rand(1, 3, size, 2 * size)).shape == (1, 1, size, 2 * size)
    with pytest.raises(ValueError, match=f"not a multiple of {2 ** (depth + 1)}"):
        s2d(torch.rand(1, 3, 2 ** depth * 3, size))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        UNet(base=4, depth=0)


def test_deep_supervision_heads():
    """deep=K adds K 1x1 heads on the decoder's outputs at 1/2, 1/4, ... of the size: forward_all
    returns the full-size logits (forward's) and theirs, upsampled to the input's size; forward
    and the weights of the other layers are the plain U-Net's."""
    torch.manual_seed(0)
    plain = UNet(base=2).eval()
    deep = UNet(base=2, deep=2).eval()
    assert [h.in_channels for h in deep.deep] == [4, 8]  # widths at 1/2 and 1/4: base*2, base*4
    assert set(plain.state_dict()) == {k for k in deep.state_dict() if not k.startswith("deep.")}
    deep.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        outputs = deep.forward_all(x)
        assert len(outputs) == 3 and all(o.shape == (1, 1, 32, 48) for o in outputs)
        assert torch.equal(outputs[0], deep(x)) and torch.equal(deep(x), plain(x))
        assert not torch.allclose(outputs[1], outputs[2])
        # the 1/4-size head's map, upsampled: smooth at the scale of 4 pixels
        assert outputs[2].diff(dim=-1).abs().mean() < outputs[0].diff(dim=-1).abs().mean()
        assert len(plain.forward_all(x)) == 1
    with pytest.raises(ValueError, match="deep must be from 0 to depth - 1"):
        UNet(base=2, depth=2, deep=2)


def test_attention_gates_known_answers():
    """Gates whose last layer is zero are sigmoid(0) = 0.5 everywhere: the spatial gate halves
    its input; scSE's two halves add back up to the input. A spatial gate that reads the channel
    max alone passes the pixels where some channel is large and damps those where all are small."""
    x = torch.rand(2, 6, 8, 8)
    gate = SpatialGate()
    nn.init.zeros_(gate.conv.weight)
    assert torch.allclose(gate(x), x / 2)
    scse = SCSE(6)
    for layer in (scse.channel[3], scse.spatial[0]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    assert torch.allclose(scse(x), x)
    with torch.no_grad():
        gate.conv.weight[0, 1, 3, 3] = 50.0  # centre tap on the channel max
    y = torch.zeros(1, 3, 8, 8)
    y[0, 1, 2, 5] = 1.0  # one bright pixel in one channel
    y[0, :, 6, 1] = 0.01  # a dim pixel in every channel
    out = gate(y)
    assert torch.isclose(out[0, 1, 2, 5], torch.tensor(1.0), atol=1e-6)
    assert torch.isclose(out[0, 0, 6, 1], torch.tensor(0.01 * torch.sigmoid(torch.tensor(0.5)).item()))


def test_attention_adds_modules_and_keeps_shapes():
    """attention="sa" adds a gate after the bottleneck and "scse" one after each decoder block but the
    full-resolution one; the other weights are the plain U-Net's (the same names), and the output
    shape is unchanged."""
    plain = UNet(base=2)
    x = torch.rand(1, 3, 32, 48)
    for attention, prefix in (("sa", "gate."), ("scse", "decoders.")):
        net = UNet(base=2, attention=attention)
        added = set(net.state_dict()) - set(plain.state_dict())
        assert added and all(k.startswith(prefix) for k in added)
        assert set(plain.state_dict()) <= set(net.state_dict())
        assert net(x).shape == (1, 1, 32, 48)
    gated = [i for i, d in enumerate(UNet(base=2, attention="scse").decoders) if isinstance(d.gate, SCSE)]
    assert gated == [0, 1, 2]  # decoders run coarsest first; the last, at full resolution, has none
    with pytest.raises(ValueError, match="attention must be one of none, sa, scse"):
        UNet(base=2, attention="cbam")
