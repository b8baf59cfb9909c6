"""int8 inference: calibration, the ranges a checkpoint stores, and the errors around them."""
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from model import S2DUNet, UNet, fold_batchnorm
from utils import (UserError, inference_device, int8_levels, int8_network, int8_ranges, load_model, quantize_int8,
                   torch_save, upconv_as_conv)

pytestmark = pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines,
                                reason="int8 inference needs PyTorch's x86 quantized engine")


def smooth_images(n, seed, size=64):
    """(1,3,size,size) images with structure at several scales, as photographs have."""
    g = torch.Generator().manual_seed(seed)
    return [F.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=size, mode="bilinear")
            * 0.7 + 0.3 * torch.rand(1, 3, size, size, generator=g) for _ in range(n)]


def trained_like(net, **kw):
    """A network whose BatchNorm statistics come from data (a few batches in train mode),
    eval mode, BatchNorm folded: the form inference quantizes."""
    torch.manual_seed(0)
    model = net(base=4, **kw).train()
    with torch.no_grad():
        for x in smooth_images(4, 1):
            model(x)
        model = fold_batchnorm(model.eval())
        # logits spread around 0 as a trained head's do (a random head's barely vary)
        logits = torch.cat([model(x).flatten() for x in smooth_images(2, 4)])
        head = model.head if isinstance(model, UNet) else model.net.head
        head.weight /= logits.std() / 3
        head.bias.copy_((head.bias - logits.mean()) / (logits.std() / 3))
    return model


@pytest.mark.parametrize("net,kw", [(UNet, {}), (S2DUNet, {"top": 8}), (S2DUNet, {"top": 8, "residual": True}),
                                    (S2DUNet, {"top": 8, "act": "silu"}), (UNet, {"attention": "sa"}),
                                    (UNet, {"attention": "scse"})])
def test_int8_follows_fp32(net, kw):
    model = trained_like(net, **kw)
    quantized = quantize_int8(model, int8_ranges(model, smooth_images(6, 2)))
    x = smooth_images(1, 3)[0]  # not among the calibration images
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # 8-bit activations (VNNI CPUs): errors of a few hundredths of the logits' spread (base 4:
    # ~5%), not another map; 7-bit ones (elsewhere) have twice the step (the U-Net: ~10%)
    bound = 0.1 * 256 / int8_levels()
    assert (out - ref).abs().mean() < bound * ref.std(), ((out - ref).abs().mean(), ref.std())
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_stored_ranges_rebuild_the_calibrated_network():
    """The ranges are all a checkpoint keeps: quantizing twice from them gives the same network
    bit for bit, and 7-bit activations (CPUs without VNNI) stay close to fp32. (8-bit ones are
    not compared with them: without VNNI fbgemm's 16-bit pair sums can saturate on them.)"""
    model = trained_like(S2DUNet, top=8)
    ranges = int8_ranges(model, smooth_images(4, 2))
    assert ranges and all(lo <= 0 <= hi for lo, hi in ranges.values())
    x = smooth_images(1, 3)[0]
    with torch.no_grad():
        ref = model(x)
        a, b = quantize_int8(model, ranges)(x), quantize_int8(model, ranges)(x)
        seven = quantize_int8(model, ranges, levels=128)(x)
    assert torch.equal(a, b)
    assert (seven - ref).abs().mean() < 0.05 * ref.std(), ((seven - ref).abs().mean(), ref.std())


def test_upconv_as_conv_is_the_transposed_convolution():
    """Known answer: the 1x1 convolution and the rearrangement compute ConvTranspose2d(2, stride 2),
    and every output pixel of a 2x2 block comes from its own weights (a one-hot input picks them)."""
    torch.manual_seed(0)
    up = torch.nn.ConvTranspose2d(5, 3, 2, stride=2)
    x = torch.randn(2, 5, 4, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = up(x), upconv_as_conv(up)(x)
        assert out.shape == (2, 3, 8, 12) and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, ref, atol=1e-6)
        one = torch.zeros(1, 5, 1, 1)
        one[0, 2] = 1
        assert torch.allclose(upconv_as_conv(up)(one)[0], up.weight[2] + up.bias[:, None, None])
    with pytest.raises(ValueError, match="2x2 stride-2"):
        upconv_as_conv(torch.nn.ConvTranspose2d(5, 3, 3, stride=2))


@pytest.mark.parametrize("net,kw", [(UNet, {}), (S2DUNet, {"top": 8}), (S2DUNet, {"top": 8, "residual": True})])
def test_int8_network_computes_the_same_map(net, kw):
    """The form int8 quantizes: no transposed convolution and no Identity left, the same outputs."""
    model = trained_like(net, **kw)
    form = int8_network(model)
    kinds = {type(m) for m in form.modules()}
    assert torch.nn.ConvTranspose2d not in kinds and torch.nn.Identity not in kinds
    x = smooth_images(1, 3)[0]
    with torch.no_grad():
        assert torch.allclose(form(x), model(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())  # the model is untouched


def test_ranges_of_another_network_rejected():
    ranges = int8_ranges(trained_like(UNet), smooth_images(2, 2))
    with pytest.raises(UserError, match="does not fit"):
        quantize_int8(trained_like(S2DUNet, top=8), ranges, "other.pt")


def test_calibration_of_the_earlier_int8_form_rejected():
    """Ranges stored before the up-convolutions ran in int8 were numbered by observer; they
    must not be applied to this form's observers, even where their number matches."""
    model = trained_like(UNet)
    ranges = int8_ranges(model, smooth_images(2, 2))
    numbered = {f"activation_post_process_{i}": r for i, r in enumerate(ranges.values())}
    with pytest.raises(UserError, match="before the up-convolutions ran in int8"):
        quantize_int8(model, numbered, "old.pt")


def test_int8_needs_calibration_and_the_cpu(tmp_path):
    model = UNet(base=2)
    path = str(tmp_path / "plain.pt")
    torch_save({"model": model.state_dict(), "config": {"arch": "unet", "base": 2}}, path)
    with pytest.raises(UserError, match="no int8 calibration"):
        load_model(path, torch.device("cpu"), "int8")
    with pytest.raises(UserError, match="runs on the CPU"):
        load_model(path, torch.device("cuda"), "int8")


def test_auto_device_is_the_cpu_for_int8(monkeypatch):
    """--device auto picks CUDA where there is one, but int8 (CPU-only) runs on the CPU unasked;
    an explicit --device cuda with int8 stays an error (load_model)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device(Namespace(device="auto", precision="int8")).type == "cpu"
    assert inference_device(Namespace(device="auto", precision="fp32")).type == "cuda"
    assert inference_device(Namespace(device="cpu", precision="auto")).type == "cpu"
    with pytest.raises(UserError, match="int8 runs on the CPU, not cuda"):
        load_model("unused.pt", torch.device("cuda"), "int8")
