"""moco.small_map_conv: 3x3 convolutions on 1x1 and 2x2 maps multiply only by the taps that meet
the input, with the full convolution's outputs and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from moco.encoders import build_backbone
from moco.small_map_conv import SmallMapConv2d, use_small_map_convs


@pytest.mark.parametrize("side", [(1, 1), (2, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_on_small_maps_it_is_the_full_convolution(side, bias, channels_last):
    torch.manual_seed(0)
    conv = SmallMapConv2d(8, 5, 3, padding=1, bias=bias).double()
    nn.init.normal_(conv.weight)  # every tap non-zero: a tap in the wrong place would show
    x = torch.randn(4, 8, *side, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = conv(x)
    full = F.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(out, full)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last or side == (1, 1)
    grad = torch.randn_like(full)
    inputs = [x, conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(full, inputs, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    if side == (1, 1):  # only the centre tap meets a 1x1 map
        assert got[1][:, :, 1, 1].abs().sum() > 0 and got[1][:, :, 0, 0].abs().sum() == 0


def test_on_larger_maps_and_unbatched_input_it_is_an_ordinary_convolution():
    conv = SmallMapConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 3, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(
        conv(x[0, :, :2, :2]), F.conv2d(x[0, :, :2, :2], conv.weight, conv.bias, padding=1)
    )


@pytest.mark.parametrize(
    "settings", [{"stride": 2}, {"padding": 0}, {"dilation": 2}, {"groups": 3}]
)
def test_it_refuses_the_convolutions_it_does_not_compute(settings):
    with pytest.raises(ValueError, match="3x3 stride-1"):
        SmallMapConv2d(3, 6, 3, **{"padding": 1, **settings})


def test_only_3x3_stride_1_padded_convolutions_change_and_the_weights_keep_their_names():
    net = torchvision.models.resnet18(weights=None)
    before = dict(net.named_parameters())
    rng = torch.random.get_rng_state()
    use_small_map_convs(net)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded runs draw as before
    after = dict(net.named_parameters())
    assert list(after) == list(before)  # a plain ResNet to checkpoints and exports
    assert all(after[name] is before[name] for name in before)  # the same tensors
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            plain_3x3 = module.kernel_size == (3, 3) and module.stride == (1, 1)
            assert isinstance(module, SmallMapConv2d) == plain_3x3, name
    assert type(net.conv1) is nn.Conv2d and type(net.layer4[0].conv1) is nn.Conv2d  # stride 2
    use_small_map_convs(net, enabled=False)
    assert not any(isinstance(m, SmallMapConv2d) for m in net.modules())


@pytest.mark.parametrize("stem", ["imagenet", "small_pool"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_28px_backbone_trains_as_with_plain_convolutions(stem, channels_last):
    # At 28 px the ImageNet stem leaves 2x2 maps in layer3 and 1x1 in layer4, small_pool 2x2 in
    # layer4. In float64: float32's rounding, amplified through the BatchNorms of a batch of 6,
    # would hide what the check is for.
    torch.manual_seed(0)
    fast = build_backbone("resnet18", 1, 28, stem=stem).double()
    plain = use_small_map_convs(copy.deepcopy(fast), enabled=False)
    assert isinstance(fast.layer4[1].conv2, SmallMapConv2d)
    images = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    if channels_last:
        fast, plain = (m.to(memory_format=torch.channels_last) for m in (fast, plain))
        images = images.contiguous(memory_format=torch.channels_last)
    out_fast, out_plain = fast(images), plain(images)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-10, atol=1e-12)
    out_fast.square().sum().backward()
    out_plain.square().sum().backward()
    for (name, p_fast), p_plain in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-9, atol=1e-12, msg=name)
