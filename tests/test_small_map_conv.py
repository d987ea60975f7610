"""moco.small_map_conv: 3x3 convolutions on maps of at most 2x2 pixels as one matrix product,
with the full convolution's outputs and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from moco.encoders import build_backbone
from moco.small_map_conv import SmallMapConv2d, _tap_index, _tap_of_pair, use_small_map_convs

# (input side, stride): every map it takes as a matrix product
SMALL_MAPS = [(side, stride) for side in ((1, 1), (1, 2), (2, 1), (2, 2)) for stride in (1, 2)]


@pytest.mark.parametrize("side,stride", SMALL_MAPS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_small_map_gives_the_full_convolution(side, stride, bias, channels_last):
    torch.manual_seed(0)
    conv = SmallMapConv2d(8, 5, 3, stride=stride, padding=1, bias=bias).double()
    nn.init.normal_(conv.weight)  # every tap non-zero: a tap in the wrong place would show
    x = torch.randn(4, 8, *side, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = conv(x)
    full = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    assert out.shape == full.shape
    torch.testing.assert_close(out, full)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)  # the layout the input came in
    grad = torch.randn_like(full)
    inputs = [x, conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(full, inputs, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    if side == (1, 1):  # only the centre tap meets the input
        assert got[1][:, :, 1, 1].abs().sum() > 0 and got[1][:, :, 0, 0].abs().sum() == 0


def test_a_tap_shared_by_several_pixel_pairs_sums_their_gradients():
    # Stride 1 on 2x2: the centre tap joins each pixel to itself (4 pairs), a corner tap one
    # pair; a gather that kept one pair per tap would pass the centre check of the test above.
    conv = SmallMapConv2d(1, 1, 3, padding=1, bias=False).double()
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    conv(x).sum().backward()
    want = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(conv.weight.grad[0, 0], want)


def test_a_first_call_in_inference_mode_leaves_training_working():
    # The tap indices are cached per map size: nothing of the first caller's mode may stick.
    _tap_of_pair.cache_clear()
    _tap_index.cache_clear()
    conv = SmallMapConv2d(4, 3, 3, padding=1)
    with torch.inference_mode():
        conv(torch.randn(2, 4, 2, 2))
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    conv(x).square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("side,stride", [((3, 3), 1), ((3, 3), 2), ((3, 5), 1), ((4, 4), 2)])
def test_larger_maps_and_unbatched_input_are_ordinary_convolutions(side, stride):
    conv = SmallMapConv2d(3, 4, 3, stride=stride, padding=1)
    x = torch.randn(2, 3, *side)
    torch.testing.assert_close(
        conv(x), F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    )
    one = x[0, :, :1, :1]  # C x 1 x 1, no batch dimension
    torch.testing.assert_close(
        conv(one), F.conv2d(one, conv.weight, conv.bias, stride=stride, padding=1)
    )


@pytest.mark.parametrize(
    "settings", [{"stride": 3}, {"padding": 0}, {"dilation": 2}, {"groups": 3}]
)
def test_it_refuses_the_convolutions_it_does_not_compute(settings):
    with pytest.raises(ValueError, match="3x3 convolution with stride 1 or 2"):
        SmallMapConv2d(3, 6, 3, **{"padding": 1, **settings})


def test_only_padded_3x3_convolutions_change_and_keep_their_weights_and_names():
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
            assert isinstance(module, SmallMapConv2d) == (module.kernel_size == (3, 3)), name
    assert net.layer4[0].conv1.stride == (2, 2)  # the stride-2 convolutions keep their stride
    assert type(net.conv1) is nn.Conv2d and type(net.layer4[0].downsample[0]) is nn.Conv2d
    use_small_map_convs(net, enabled=False)
    assert not any(isinstance(m, SmallMapConv2d) for m in net.modules())


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_28px_imagenet_stem_backbone_trains_as_with_plain_convolutions(channels_last):
    # At 28 px the ImageNet stem leaves 2x2 maps in layer3 and takes layer4 from 2x2 to 1x1.
    # In float64: float32's rounding, amplified through the BatchNorms of a batch of 6, would
    # hide what is checked.
    torch.manual_seed(0)
    fast = build_backbone("resnet18", 1, 28, stem="imagenet").double()
    plain = use_small_map_convs(copy.deepcopy(fast), enabled=False)
    assert isinstance(fast.layer4[0].conv1, SmallMapConv2d)
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
