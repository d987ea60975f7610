"""A reference for the ViT tests: MoCo v3's official ViT (timm's VisionTransformer as
moco-v3's vits.py builds it) computed from its timm-named tensors, written from timm's
definition rather than from torchvision's, and a way to make every tensor of a module matter."""

import torch
import torch.nn.functional as F
from torch import nn


def randomise(module: nn.Module) -> nn.Module:
    """Every floating tensor of ``module`` random (LayerNorms, biases, positions, running
    statistics too), so that any two tensors put in each other's place change the output."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                low = 0.5 if name.endswith("running_var") else -0.5
                tensor.uniform_(low, low + 1.0)
    return module


def timm_vit_features(state: dict, images: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """The class token of moco-v3's vits.py model (timm's VisionTransformer: pre-norm blocks,
    LayerNorm eps 1e-6, q, k, v stacked in qkv, GELU MLP, final norm), computed from its
    timm-named tensors: the reference the name table is checked against, written from timm's
    definition rather than from torchvision's."""

    def norm(x, name):
        return F.layer_norm(
            x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6
        )

    def linear(x, name):
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    side = state["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(
        images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=side
    )
    x = x.flatten(2).transpose(1, 2)  # N x grid^2 x D
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    n, tokens, width = x.shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        block = f"blocks.{i}"
        qkv = linear(norm(x, f"{block}.norm1"), f"{block}.attn.qkv")  # N x T x 3D
        q, k, v = qkv.reshape(n, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(n, tokens, width)  # N x T x D
        x = x + linear(mixed, f"{block}.attn.proj")
        hidden = F.gelu(linear(norm(x, f"{block}.norm2"), f"{block}.mlp.fc1"))
        x = x + linear(hidden, f"{block}.mlp.fc2")
    return norm(x, "norm")[:, 0]
