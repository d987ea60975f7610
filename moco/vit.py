"""Vision Transformer backbones for MoCo v3: torchvision's ``VisionTransformer`` set up as in
MoCo v3 (Chen, Xie and He 2021): a frozen random patch projection, fixed 2-D sine-cosine position
embeddings, MoCo v3's initialisation, and no classifier, so the module maps images (N x C x H x W)
to the class token's final features (N x D), like the ResNets of ``moco.encoders``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from moco.errors import ConfigError


class VitSize(NamedTuple):
    depth: int  # transformer blocks
    heads: int
    dim: int  # token width, and the feature dimension
    mlp_dim: int


# ViT-S has 12 heads here, not DeiT's 6: MoCo v3's released vits.py uses 12, and its checkpoints
# compute the same function only with the same split. The head count changes no parameter shape,
# so a 6-head model would load those weights silently and compute something else.
VIT_SIZES = {
    "vit_small": VitSize(depth=12, heads=12, dim=384, mlp_dim=1536),
    "vit_base": VitSize(depth=12, heads=12, dim=768, mlp_dim=3072),
}
VITS = tuple(VIT_SIZES)

# Default patch side: the largest one up to ViT's 16 that divides the image and leaves at least
# MIN_GRID patches per side. 224 px -> 16 (a 14 x 14 grid, the paper's ViT-/16); 96 px -> 12;
# 32 px -> 4; 28 px (Fashion-MNIST) -> 4, its 7 x 7 grid being where MIN_GRID comes from. Fewer
# tokens than that leave attention little to relate and make each token a large part of the image.
MAX_PATCH = 16
MIN_GRID = 7


def default_patch_size(image_size: int) -> int:
    """The patch side used when none is given (see MAX_PATCH and MIN_GRID)."""
    for patch in range(min(MAX_PATCH, image_size), 0, -1):
        if image_size % patch == 0 and image_size // patch >= MIN_GRID:
            return patch
    return 1  # images under MIN_GRID px: one token per pixel


def sincos_position_table(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed position embeddings of a ``grid`` x ``grid`` patch sequence plus a leading class
    token: (1 + grid^2) x dim, the class token's row all zeros.

    Patch k (row-major, as the patches are flattened) sits at row r = k // grid, column
    c = k % grid; its row is [sin(r w), cos(r w), sin(c w), cos(c w)] with dim/4 frequencies
    w_i = temperature^(-i / (dim/4)). This is the table of MoCo v3's vits.py (its first half
    encodes the row index as laid out there).
    """
    if dim % 4:
        raise ConfigError(
            f"ViT width {dim} cannot hold 2-D sine-cosine positions: use a multiple of 4"
        )
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(grid * grid)
    rows = torch.outer((index // grid).double(), omega)  # grid^2 x dim/4
    cols = torch.outer((index % grid).double(), omega)
    patches = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).float()


def _init_like_moco_v3(net: VisionTransformer, in_channels: int) -> None:
    """MoCo v3's initialisation, which replaces torchvision's: Xavier-uniform for every linear
    layer with zero biases; the attention's joint q/k/v projection as three separate D x D
    matrices (Xavier over one of them, not over the stacked 3D x D); the patch projection
    Xavier-uniform over its C * p * p inputs; the class token near zero."""
    dim = net.hidden_dim
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            bound = math.sqrt(6.0 / (dim + dim))
            nn.init.uniform_(module.in_proj_weight, -bound, bound)
            nn.init.zeros_(module.in_proj_bias)
    patch_inputs = in_channels * net.patch_size * net.patch_size
    bound = math.sqrt(6.0 / (patch_inputs + dim))
    nn.init.uniform_(net.conv_proj.weight, -bound, bound)
    nn.init.zeros_(net.conv_proj.bias)
    nn.init.normal_(net.class_token, std=1e-6)


def build_vit(
    name: str,
    in_channels: int,
    image_size: int,
    patch_size: int | None = None,
    depth: int | None = None,
) -> nn.Module:
    """A MoCo v3 ViT without classifier: images (N x C x H x W) to features (N x D), D in
    ``.feature_dim``. ``patch_size`` None: ``default_patch_size(image_size)``. ``depth``
    overrides the number of blocks (small models for tests)."""
    if name not in VIT_SIZES:
        raise ConfigError(f"unknown ViT '{name}': choose one of {list(VITS)}")
    size = VIT_SIZES[name]
    patch = default_patch_size(image_size) if patch_size is None else patch_size
    if patch < 1 or image_size % patch:
        raise ConfigError(
            f"a {image_size}-px image cannot be cut into {patch}-px patches: use a patch size "
            f"that divides {image_size} (default {default_patch_size(image_size)})"
        )
    net = VisionTransformer(
        image_size=image_size,
        patch_size=patch,
        num_layers=size.depth if depth is None else depth,
        num_heads=size.heads,
        hidden_dim=size.dim,
        mlp_dim=size.mlp_dim,
    )
    # torchvision's projection takes 3 channels; Fashion-MNIST has 1.
    net.conv_proj = nn.Conv2d(in_channels, size.dim, kernel_size=patch, stride=patch)
    _init_like_moco_v3(net, in_channels)
    # MoCo v3's stability fix: the patch projection stays at its random init. Gradient spikes
    # start in this first layer; freezing it avoids the dips in accuracy they cause.
    net.conv_proj.weight.requires_grad_(False)
    net.conv_proj.bias.requires_grad_(False)
    # Fixed positions as a buffer, not a parameter: no optimizer (weight decay included) can
    # move them, and checkpoints still carry them under torchvision's key.
    del net.encoder.pos_embedding
    table = sincos_position_table(image_size // patch, size.dim)
    net.encoder.register_buffer("pos_embedding", table.unsqueeze(0))  # 1 x (1 + grid^2) x D
    # The class token after the final LayerNorm is the feature; MoCo adds its own head.
    net.heads = nn.Identity()
    net.feature_dim = size.dim
    return net
