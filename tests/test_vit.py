"""Tests of moco.vit: MoCo v3's ViT backbones on torchvision's VisionTransformer, on CPU-sized
models (28 px, 2 blocks) except for the parameter counts of the full ViT-S and ViT-B."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from moco.errors import ConfigError
from moco.optim import LARS
from moco.vit import VIT_SIZES, VITS, build_vit, default_patch_size, sincos_position_table


def tiny(in_channels: int = 1, name: str = "vit_small", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit(name, in_channels, 28, depth=2, **kwargs)


def official_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's build_2d_sincos_position_embedding, transcribed step for step (float32,
    meshgrid with ij indexing as in its torch version)."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])


def test_names_and_sizes():
    assert VITS == ("vit_small", "vit_base")
    assert VIT_SIZES["vit_small"] == (12, 12, 384, 1536)
    assert VIT_SIZES["vit_base"] == (12, 12, 768, 3072)


@pytest.mark.parametrize(
    "image_size,patch", [(224, 16), (96, 12), (64, 8), (32, 4), (28, 4), (14, 2), (8, 1)]
)
def test_default_patch_size(image_size, patch):
    assert default_patch_size(image_size) == patch


def test_images_to_pooled_features_with_feature_dim():
    net = tiny(in_channels=1)
    out = net(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, net.feature_dim) == (5, 384)
    assert net.patch_size == 4 and net.encoder.pos_embedding.shape == (1, 1 + 7 * 7, 384)


def test_the_feature_is_the_class_token_after_the_final_layernorm():
    net = tiny(in_channels=3).eval()
    images = torch.randn(2, 3, 28, 28)
    tokens = net.conv_proj(images).flatten(2).transpose(1, 2)  # N x 49 x D
    tokens = torch.cat([net.class_token.expand(2, -1, -1), tokens], dim=1)  # N x 50 x D
    tokens = tokens + sincos_position_table(7, 384)
    expected = net.encoder.ln(net.encoder.layers(tokens))[:, 0]
    torch.testing.assert_close(net(images), expected)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_in_channels(in_channels):
    net = tiny(in_channels=in_channels)
    assert net.conv_proj.in_channels == in_channels
    assert net(torch.randn(2, in_channels, 28, 28)).shape == (2, 384)


def test_the_position_table_is_moco_v3s_and_a_buffer_not_a_parameter():
    net = tiny()
    table = net.encoder.pos_embedding
    torch.testing.assert_close(table[0], official_sincos(7, 384), atol=1e-6, rtol=0)
    assert torch.equal(table[0, 0], torch.zeros(384))  # the class token has no position
    names = {name for name, _ in net.named_parameters()}
    assert "encoder.pos_embedding" not in names
    assert "encoder.pos_embedding" in net.state_dict()  # saved and loaded with the weights
    # At 224 px with patch 16, the 14 x 14 table of ViT-/16.
    torch.testing.assert_close(
        sincos_position_table(14, 768), official_sincos(14, 768), atol=1e-6, rtol=0
    )


def test_the_patch_projection_is_frozen_and_an_optimizer_step_leaves_it():
    net = tiny()
    proj = [net.conv_proj.weight, net.conv_proj.bias]
    assert not any(p.requires_grad for p in proj)
    frozen = [p.detach().clone() for p in proj]
    table = net.encoder.pos_embedding.clone()
    others = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    # AdamW with weight decay over every parameter, as MoCo v3 builds it: decay would move a
    # frozen tensor that had a gradient, so this also shows it has none.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    net(torch.randn(4, 1, 28, 28)).pow(2).sum().backward()
    assert all(p.grad is None for p in proj)
    opt.step()
    for p, before in zip(proj, frozen, strict=True):
        assert torch.equal(p, before)
    assert torch.equal(net.encoder.pos_embedding, table)
    moved = [
        n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, others[n])
    ]
    assert len(moved) == len(others)  # every trainable tensor did move


def test_forward_backward_and_a_lars_step_of_a_small_vit():
    net = tiny(in_channels=3, name="vit_base")
    opt = LARS(net.parameters(), lr=0.1, weight_decay=1e-6)
    loss = net(torch.randn(3, 3, 28, 28)).square().mean()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_moco_v3_initialisation():
    net = tiny(in_channels=1)
    dim = 384
    qkv = net.encoder.layers[0].self_attention.in_proj_weight  # 3D x D
    bound = math.sqrt(6.0 / (dim + dim))  # one of q, k, v, not the stacked matrix
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    fc = net.encoder.layers[0].mlp[0]
    assert fc.weight.abs().max() <= math.sqrt(6.0 / (dim + 1536))
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    patch_bound = math.sqrt(6.0 / (1 * 4 * 4 + dim))
    assert net.conv_proj.weight.abs().max() <= patch_bound
    assert torch.equal(net.conv_proj.bias, torch.zeros(dim))
    assert 0 < net.class_token.abs().max() < 1e-4


def test_a_patch_size_that_does_not_divide_the_image_is_one_line():
    with pytest.raises(ConfigError, match="28-px image cannot be cut into 5-px patches"):
        build_vit("vit_small", 1, 28, patch_size=5)
    with pytest.raises(ConfigError, match="unknown ViT"):
        build_vit("vit_huge", 3, 224)


def test_an_explicit_patch_size():
    net = build_vit("vit_small", 1, 28, patch_size=7, depth=1)
    assert net.encoder.pos_embedding.shape == (1, 1 + 4 * 4, 384)
    assert net(torch.randn(1, 1, 28, 28)).shape == (1, 384)


def test_parameter_counts_of_the_full_models():
    # ViT-S/16 at 224 px without classifier: 21,665,664 numbers, the published ~21.7M (DeiT-S's
    # 22.05M includes a 1000-class head of 385,000). Here 75,648 of them are the fixed position
    # table (a buffer) and 295,296 the frozen patch projection, so 21,294,720 are trained.
    small = build_vit("vit_small", 3, 224)
    params = sum(p.numel() for p in small.parameters())
    table = small.encoder.pos_embedding.numel()
    trained = sum(p.numel() for p in small.parameters() if p.requires_grad)
    assert (params + table, table, trained) == (21_665_664, 75_648, 21_294_720)
    # ViT-B/16: 85,798,656 without its head (86.6M with the 1000-class head).
    base = build_vit("vit_base", 3, 224)
    count = sum(p.numel() for p in base.parameters()) + base.encoder.pos_embedding.numel()
    assert count == 85_798_656


def test_state_dict_keys_are_torchvisions_without_the_classifier():
    # So torchvision ViT-B/16 weights load by name (the head dropped).
    ours = build_vit("vit_base", 3, 224).state_dict()
    reference = torchvision.models.vit_b_16(weights=None).state_dict()
    assert set(reference) - set(ours) == {"heads.head.weight", "heads.head.bias"}
    assert set(ours) <= set(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)
