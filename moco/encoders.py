"""Encoders: a torchvision ResNet backbone plus a projection head."""

from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torchvision
from torch import nn

from moco.batchnorm import SplitBatchNorm
from moco.errors import ConfigError

BACKBONES = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
HEADS = ("linear", "mlp")
# The layers before the first residual block:
# - small: 3x3 stride-1 conv, no max-pool (the MoCo CIFAR demo): full resolution in layer1;
# - small_pool: the same conv, then torchvision's 3x3 stride-2 max-pool: layer1 runs at half the
#   side, so the blocks cost about 4x less (docs/speed.md);
# - imagenet: torchvision's 7x7 stride-2 conv and max-pool, a 4x downsampling;
# - auto: small up to SMALL_IMAGE_MAX_SIZE px, imagenet above. Inputs this small lose too much
#   resolution to the ImageNet stem.
STEMS = ("auto", "small", "small_pool", "imagenet")
SMALL_IMAGE_MAX_SIZE = 64


def resolve_stem(stem: str, image_size: int) -> str:
    if stem not in STEMS:
        raise ConfigError(f"backbone.stem={stem} is unknown: use one of {list(STEMS)}")
    if stem != "auto":
        return stem
    return "small" if image_size <= SMALL_IMAGE_MAX_SIZE else "imagenet"


def build_backbone(
    name: str, in_channels: int, image_size: int, bn_splits: int = 1, stem: str = "auto"
) -> nn.Module:
    """A torchvision ResNet without its classifier: images (N x C x H x W) to features (N x D)."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}': choose one of {sorted(BACKBONES)}")
    norm_layer = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    net = BACKBONES[name](weights=None, norm_layer=norm_layer)
    stem = resolve_stem(stem, image_size)
    if stem in ("small", "small_pool"):
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if stem == "small":
            net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """MoCo v1: one linear layer. MoCo v2: a 2-layer MLP, hidden layer as wide as the input."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim)
        )
    raise ConfigError(f"unknown head '{kind}': choose one of {list(HEADS)}")


class Encoder(nn.Module):
    """Backbone followed by projection head: images to un-normalised embeddings (N x dim)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # NHWC lets oneDNN/cuDNN pick faster convolution kernels (tensor cores want it on GPUs;
        # what it gains on CPUs: docs/speed.md).
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))


@dataclass(frozen=True)
class EncoderSpec:
    """What fixes an encoder's architecture. Every checkpoint carries one (``encoder_spec``), and
    every evaluation and export builds the encoder from it."""

    backbone: str  # a key of BACKBONES
    stem: str  # one of STEMS (auto is resolved against image_size when built)
    in_channels: int
    image_size: int
    head: str  # one of HEADS
    dim: int  # output of the head: the embedding (MoCo) or the classes (supervised)
    channels_last: bool = False

    def build(self, bn_splits: int = 1) -> "Encoder":
        net = build_backbone(self.backbone, self.in_channels, self.image_size, bn_splits, self.stem)
        head = build_head(self.head, net.feature_dim, self.dim)
        return Encoder(net, head, self.channels_last)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EncoderSpec":
        """The spec of a dict that holds its keys (others are ignored); files written before
        ``stem`` and ``channels_last`` existed get their values of that time."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in known}
        return cls(**{"stem": "auto", **given})
