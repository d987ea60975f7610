"""Backbones (small-image and ImageNet stems), projection heads and the encoders of a built MoCo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moco.batchnorm import SplitBatchNorm, SplitBatchNorm1d
from moco.encoders import STEM_LAYOUTS, Encoder, build_backbone, build_head, pool_place, stem_with
from moco.errors import ConfigError


@pytest.mark.parametrize("image_size", [8, 28, 32, 64])
def test_small_image_stem(image_size):
    net = build_backbone("resnet18", in_channels=3, image_size=image_size)
    conv = net.conv1
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert conv.in_channels == 3 and conv.out_channels == 64 and conv.bias is None
    assert isinstance(net.maxpool, nn.Identity)
    assert net.feature_dim == 512
    assert isinstance(net.fc, nn.Identity)


def test_small_stem_grey_input_and_feature_shape():
    net = build_backbone("resnet18", in_channels=1, image_size=8).eval()
    assert net.conv1.in_channels == 1
    with torch.no_grad():
        features = net(torch.randn(2, 1, 8, 8))
    assert features.shape == (2, 512)
    # No downsampling in the stem: layer3 sees 8 / 2 / 2 = 2 px (the ImageNet stem would give 1).
    stem = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3
    )
    with torch.no_grad():
        assert stem(torch.randn(1, 1, 8, 8)).shape[-2:] == (2, 2)


def test_imagenet_stem_for_large_images_grey():
    net = build_backbone("resnet18", in_channels=1, image_size=96).eval()
    conv = net.conv1
    assert conv.in_channels == 1 and conv.out_channels == 64
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
    assert isinstance(net.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 96, 96)).shape == (1, 512)


def test_imagenet_stem_for_large_images_rgb_is_torchvision_default():
    net = build_backbone("resnet18", in_channels=3, image_size=224)
    assert (
        net.conv1.in_channels == 3
        and net.conv1.kernel_size == (7, 7)
        and net.conv1.stride == (2, 2)
    )
    assert isinstance(net.maxpool, nn.MaxPool2d)


def test_resnet50_feature_dim():
    net = build_backbone("resnet50", in_channels=3, image_size=32)
    assert net.feature_dim == 2048
    assert isinstance(net.maxpool, nn.Identity)


def test_unknown_backbone_and_head_raise_config_error():
    with pytest.raises(ConfigError, match="resnet7"):
        build_backbone("resnet7", in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="transformer"):
        build_head("transformer", 512, 128)


def test_linear_head():
    head = build_head("linear", 512, 128)
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (512, 128)


def test_mlp_head_has_hidden_layer_as_wide_as_the_features():
    head = build_head("mlp", 64, 16)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 16)]
    assert any(isinstance(m, nn.ReLU) for m in head.modules())
    # Reference: Linear -> ReLU -> Linear by hand.
    x = torch.randn(3, 64)
    expected = (
        torch.relu(x @ linears[0].weight.T + linears[0].bias) @ linears[1].weight.T
        + linears[1].bias
    )
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)


def test_mlp_bn_head_normalises_its_hidden_layer_before_the_relu():
    head = build_head("mlp_bn", 64, 16).train()
    first, norm, _, last = head
    assert first.bias is None  # the BatchNorm's shift replaces it
    assert isinstance(norm, nn.BatchNorm1d) and not isinstance(norm, SplitBatchNorm1d)
    x = torch.randn(6, 64)
    hidden = x @ first.weight.T
    hidden = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + norm.eps)
    expected = torch.relu(hidden) @ last.weight.T + last.bias
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)


def test_mlp_bn_head_splits_like_the_backbone_and_loads_into_a_plain_one():
    """Training (bn_splits > 1) and evaluation (plain BatchNorm1d) build the same weights."""
    split = build_head("mlp_bn", 64, 16, bn_splits=4)
    assert isinstance(split[1], SplitBatchNorm1d) and split[1].num_splits == 4
    plain = build_head("mlp_bn", 64, 16)
    plain.load_state_dict(split.state_dict())  # strict: same names and shapes
    x = torch.randn(8, 64)
    torch.testing.assert_close(plain.eval()(x), split.eval()(x))


def test_moco_with_mlp_bn_head_splits_the_head_of_both_encoders(tiny_moco):
    model, _ = tiny_moco("model.head=mlp_bn", "model.bn_splits=4")
    for encoder in (model.encoder_q, model.encoder_k):
        norms = [m for m in encoder.head if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 1 and isinstance(norms[0], SplitBatchNorm1d)
        assert norms[0].num_splits == 4


def test_encoder_is_backbone_then_head():
    backbone = build_backbone("resnet18", in_channels=3, image_size=8)
    head = build_head("linear", backbone.feature_dim, 10)
    enc = Encoder(backbone, head).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 10)
        torch.testing.assert_close(out, head(backbone(x)))


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=3, image_size=8)
    plain = Encoder(backbone, build_head("mlp", 512, 16), channels_last=False)
    fast = Encoder(
        build_backbone("resnet18", in_channels=3, image_size=8),
        build_head("mlp", 512, 16),
        channels_last=True,
    )
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        plain.eval(), fast.eval()
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)
        # Train mode (batch statistics) too.
        plain.train(), fast.train()
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)


def test_bn_splits_build_split_batchnorm_everywhere():
    backbone = build_backbone("resnet18", in_channels=3, image_size=8, bn_splits=4)
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 20  # stem + 2 per basic block x 8 + 3 downsample
    assert all(isinstance(m, SplitBatchNorm) and m.num_splits == 4 for m in norms)
    plain = build_backbone("resnet18", in_channels=3, image_size=8, bn_splits=1)
    assert not any(isinstance(m, SplitBatchNorm) for m in plain.modules())


def test_built_moco_key_encoder_starts_as_an_independent_copy(tiny_moco):
    model, _ = tiny_moco()
    q_state, k_state = model.encoder_q.state_dict(), model.encoder_k.state_dict()
    assert list(q_state) == list(k_state)
    assert any(name.startswith("head.") for name in q_state)
    for name in q_state:
        assert torch.equal(q_state[name], k_state[name]), name
        assert q_state[name].data_ptr() != k_state[name].data_ptr(), f"{name} is shared"
    assert all(p.requires_grad for p in model.encoder_q.parameters())
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_built_moco_uses_split_batchnorm_in_both_encoders(tiny_moco):
    model, cfg = tiny_moco("model.bn_splits=4")
    for encoder in (model.encoder_q, model.encoder_k):
        norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 4 for m in norms)
    assert model.encoder_q.backbone.conv1.kernel_size == (3, 3)
    assert model.encoder_q.head[-1].out_features == cfg.model.dim == 16
    assert model.queue.keys.shape == (64, 16)


def test_small_pool_stem_keeps_torchvisions_max_pool_after_the_3x3_conv():
    net = build_backbone("resnet18", in_channels=1, image_size=28, stem="small_pool").eval()
    conv = net.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels == 1
    assert isinstance(net.maxpool, nn.MaxPool2d)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    with torch.no_grad():
        assert stem(torch.randn(1, 1, 28, 28)).shape[-2:] == (14, 14)  # half the side
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 512)


def test_late_pool_stem_runs_layer1_at_half_the_side_and_keeps_torchvisions_weights():
    net = build_backbone("resnet18", in_channels=1, image_size=28, stem="late_pool").eval()
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.layer1[-1], nn.MaxPool2d)
    sides = []
    for block in (*net.layer1, net.layer2):  # two blocks and the pool, then layer2
        block.register_forward_hook(lambda _, __, out: sides.append(out.shape[-1]))
    with torch.no_grad():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 512)
    assert sides == [14, 14, 7, 4]  # layer1's blocks at 14x14, then the pool, then layer2
    imagenet = build_backbone("resnet18", in_channels=1, image_size=28, stem="imagenet")
    shapes = {k: v.shape for k, v in imagenet.state_dict().items()}
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes


@pytest.mark.parametrize(
    "stem,size,kernel,pooled",
    [
        ("auto", 28, 3, False),
        ("auto", 96, 7, True),
        ("small", 96, 3, False),
        ("imagenet", 28, 7, True),
        ("late_pool", 28, 7, False),  # its max-pool moves to the end of layer1
    ],
)
def test_stem_choice_overrides_the_size_rule(stem, size, kernel, pooled):
    net = build_backbone("resnet18", in_channels=3, image_size=size, stem=stem)
    assert net.conv1.kernel_size == (kernel, kernel)
    assert isinstance(net.maxpool, nn.MaxPool2d) == pooled


@pytest.mark.parametrize("stem", list(STEM_LAYOUTS))
def test_every_stem_is_named_back_from_the_module_it_builds(stem):
    # What an export reads off a backbone (conv1's kernel, the two places a max-pool may sit)
    # gives back the stem that built it.
    net = build_backbone("resnet18", in_channels=1, image_size=28, stem=stem)
    after_conv1 = isinstance(net.maxpool, nn.MaxPool2d)
    end_of_layer1 = isinstance(net.layer1[-1], nn.MaxPool2d)
    assert stem_with(net.conv1.kernel_size[0], pool_place(after_conv1, end_of_layer1)) == stem


def test_no_stem_has_a_max_pool_in_two_places():
    with pytest.raises(ValueError, match="two places"):
        pool_place(True, True)


def test_unknown_stem_raises_config_error():
    with pytest.raises(ConfigError, match="backbone.stem=tiny is unknown"):
        build_backbone("resnet18", in_channels=3, image_size=32, stem="tiny")


def test_stem_reaches_the_model_and_its_hyper_parameters(tiny_moco):
    model, _ = tiny_moco("backbone.stem=small_pool")
    assert model.hparams.stem == "small_pool"
    for encoder in (model.encoder_q, model.encoder_k):
        assert isinstance(encoder.backbone.maxpool, nn.MaxPool2d)
