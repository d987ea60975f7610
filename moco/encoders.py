"""Encoders: a torchvision ResNet backbone plus a projection head.

Two layouts of the same pieces: ``Encoder`` holds ``backbone`` and ``head`` side by side (MoCo
v1/v2: keys ``backbone.*``, ``head.*``); MoCo v3 puts the projector into the backbone's own last
slot (a ResNet's ``fc``), as the official code does, so its keys are the network's (``conv1.*``
... ``fc.*``). ``head_in_slot`` makes the second from the first, ``slot_view`` gives it the
``Encoder`` interface back, and ``slot_to_encoder_keys`` renames weights between the two.
"""

import copy
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torchvision
from torch import nn

from moco.batchnorm import SplitBatchNorm, SplitBatchNorm1d
from moco.errors import ConfigError
from moco.final_relu import drop_final_relu
from moco.small_map_conv import use_small_map_convs
from moco.vit import VITS, build_vit

BACKBONES = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
# Every backbone a config may name: the ResNets above (which the weight readers and exports know
# by their torchvision layout) and MoCo v3's ViTs (moco/vit.py: pretraining and evaluation of
# this project's own checkpoints).
ALL_BACKBONES = (*BACKBONES, *VITS)
# MoCo v1 and v2 (model.head), and v2's MLP with a BatchNorm in its hidden layer (as SimCLR's and
# MoCo v3's heads have; the key side's BN splits like the backbone's, for shuffle-BN).
HEADS = ("linear", "mlp", "mlp_bn")
# MoCo v3: the projector (BN in every layer, the last without affine). Not among model.head's
# choices: MoCoV3 always builds it, with model.mlp_dim hidden units.
V3_HEAD = "v3_mlp"
ALL_HEADS = (*HEADS, V3_HEAD)
# The attribute of a backbone network that held its classifier: where MoCo v3 puts the
# projector (torchvision's ViT calls it heads; the official timm-based code, head).
SLOTS = {"resnet18": "fc", "resnet50": "fc"} | {name: "heads" for name in VITS}
# Linear layers of the v3 projector: 2 for ResNets, 3 for ViTs (the paper, Sec. 4).
V3_PROJECTOR_LAYERS = {"resnet18": 2, "resnet50": 2} | {name: 3 for name in VITS}
# The layers before the first residual block, as changes to torchvision's ImageNet ResNet (the
# one table that building, reading and exporting weights all go by):
# - small: 3x3 stride-1 conv, no max-pool (the MoCo CIFAR demo): full resolution in layer1;
# - small_pool: the same conv, then torchvision's 3x3 stride-2 max-pool: layer1 runs at half the
#   side, so the blocks cost about 4x less (docs/speed.md);
# - imagenet: torchvision's 7x7 stride-2 conv and max-pool, a 4x downsampling;
# - late_pool: the ImageNet stem's conv without its max-pool, which moves to the end of layer1:
#   layer1 runs at small_pool's resolution and the later layers at the ImageNet stem's, for
#   about 1.7x the ImageNet stem's compute instead of small_pool's 4x. Same weights as the
#   ImageNet-stem ResNet, but not the same network: torchvision must move the pool to rebuild it;
# - auto: small up to SMALL_IMAGE_MAX_SIZE px, imagenet above. Inputs this small lose too much
#   resolution to the ImageNet stem.
POOL_PLACES = ("after_conv1", "end_of_layer1")  # where torchvision's max-pool may sit; or None


@dataclass(frozen=True)
class StemLayout:
    conv1_kernel: int  # 3: stride 1; 7: torchvision's stride 2 (padding kernel // 2 for both)
    pool: str | None  # one of POOL_PLACES; None: no max-pool

    @property
    def conv1_stride(self) -> int:
        return 1 if self.conv1_kernel == 3 else 2

    @property
    def halvings_before_layer2(self) -> int:
        """How often the stem (with a max-pool at the end of layer1) halves the side."""
        return (self.conv1_stride == 2) + (self.pool is not None)


STEM_LAYOUTS = {
    "small": StemLayout(3, None),
    "small_pool": StemLayout(3, "after_conv1"),
    "imagenet": StemLayout(7, "after_conv1"),
    "late_pool": StemLayout(7, "end_of_layer1"),
}
STEMS = ("auto", *STEM_LAYOUTS)
SMALL_IMAGE_MAX_SIZE = 64


def pool_place(after_conv1: bool, end_of_layer1: bool) -> str | None:
    """Where the max-pool sits (one of POOL_PLACES; None: no max-pool) by the two flags that
    exports write (``has_maxpool``, ``pool_after_layer1``). ValueError if both are set: no stem
    has two max-pools."""
    if after_conv1 and end_of_layer1:
        raise ValueError("a max-pool in two places")
    first, last = POOL_PLACES
    return first if after_conv1 else last if end_of_layer1 else None


def stem_with(conv1_kernel: int, pool: str | None) -> str | None:
    """The name of the stem with this conv1 and max-pool; None when no stem has them."""
    wanted = StemLayout(conv1_kernel, pool)
    return next((name for name, layout in STEM_LAYOUTS.items() if layout == wanted), None)


def resolve_stem(stem: str, image_size: int) -> str:
    if stem not in STEMS:
        raise ConfigError(f"backbone.stem={stem} is unknown: use one of {list(STEMS)}")
    if stem != "auto":
        return stem
    return "small" if image_size <= SMALL_IMAGE_MAX_SIZE else "imagenet"


def strided_block_inputs(stem: str, image_size: int) -> list[int]:
    """The side of the maps entering layer2, layer3 and layer4 of a ResNet, each of which starts
    with a 3x3 stride-2 convolution (padding 1, so ceil(side / 2) comes out)."""
    side = image_size
    for _ in range(STEM_LAYOUTS[resolve_stem(stem, image_size)].halvings_before_layer2):
        side = math.ceil(side / 2)
    return [side, math.ceil(side / 2), math.ceil(side / 4)]


def build_backbone(
    name: str,
    in_channels: int,
    image_size: int,
    bn_splits: int = 1,
    stem: str = "auto",
    final_relu: bool = True,
) -> nn.Module:
    """A torchvision ResNet (or a ViT of moco/vit.py, which has no stem and no BatchNorm)
    without its classifier: images (N x C x H x W) to features (N x D). ``final_relu=False``
    removes the last block's ReLU (moco/final_relu.py); ViTs have none and ignore it."""
    if name in VITS:
        return build_vit(name, in_channels, image_size)
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}': choose one of {sorted(ALL_BACKBONES)}")
    norm_layer = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    net = BACKBONES[name](weights=None, norm_layer=norm_layer)
    stem = STEM_LAYOUTS[resolve_stem(stem, image_size)]
    if stem.conv1_kernel != 7 or in_channels != 3:
        k = stem.conv1_kernel
        net.conv1 = nn.Conv2d(
            in_channels, 64, kernel_size=k, stride=stem.conv1_stride, padding=k // 2, bias=False
        )
    if stem.pool == "end_of_layer1":  # a parameter-free module: the state dict keeps its keys
        net.layer1.append(net.maxpool)
    if stem.pool != "after_conv1":
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if not final_relu:
        drop_final_relu(net)
    # Exact; with the ImageNet stem at 28 px, layer3 (2x2 maps) and layer4 (1x1) run several
    # times faster.
    return use_small_map_convs(net)


def zero_init_residual(net: nn.Module) -> None:
    """Zero the scale of each residual block's last BatchNorm, so every block starts as the
    identity (torchvision's ``zero_init_residual=True``, which the official MoCo v3 uses)."""
    for block in net.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(block.bn3.weight)
        elif isinstance(block, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(block.bn2.weight)


def build_head(
    kind: str,
    in_dim: int,
    out_dim: int,
    mlp_dim: int | None = None,
    layers: int = 2,
    bn_splits: int = 1,
) -> nn.Module:
    """MoCo v1: one linear layer. MoCo v2: a 2-layer MLP, hidden layer as wide as the input;
    ``mlp_bn`` adds a BatchNorm (in ``bn_splits`` groups) to that layer, whose bias it replaces.
    MoCo v3: ``v3_mlp``, the projector of ``v3_mlp`` with ``layers`` layers of ``mlp_dim``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim)
        )
    if kind == "mlp_bn":
        norm = SplitBatchNorm1d(in_dim, bn_splits) if bn_splits > 1 else nn.BatchNorm1d(in_dim)
        return nn.Sequential(
            nn.Linear(in_dim, in_dim, bias=False),
            norm,
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, out_dim),
        )
    if kind == V3_HEAD:
        if mlp_dim is None:
            raise ConfigError(f"head {V3_HEAD} needs mlp_dim, the width of its hidden layers")
        return v3_mlp(layers, in_dim, mlp_dim, out_dim, last_bn=True)
    raise ConfigError(f"unknown head '{kind}': choose one of {list(ALL_HEADS)}")


def v3_mlp(layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """The MLP of MoCo v3's projector and predictor: Linear (no bias: a BatchNorm follows, whose
    shift makes a bias redundant), BatchNorm1d and ReLU between layers, and after the last layer
    a BatchNorm1d without affine parameters (as SimCLR, without its scale) if ``last_bn``.
    The indices of the Sequential are those of the official code, so its weights load as they
    are: 2 layers -> 0 Linear, 1 BN, 2 ReLU, 3 Linear[, 4 BN]."""
    parts: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        width_in, width_out = in_dim if i == 0 else mlp_dim, out_dim if last else mlp_dim
        parts.append(nn.Linear(width_in, width_out, bias=False))
        if not last:
            parts += [nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            parts.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*parts)


def build_predictor(backbone: str, dim: int, mlp_dim: int) -> nn.Sequential:
    """MoCo v3's predictor (base encoder only): 2 layers, dim -> mlp_dim -> dim; its output has
    no BatchNorm for ResNets, and one without affine for ViTs (the official code)."""
    resnet = SLOTS.get(backbone) == "fc"
    return v3_mlp(2, dim, mlp_dim, dim, last_bn=not resnet)


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


def head_in_slot(encoder: Encoder, slot: str) -> nn.Module:
    """The backbone network of ``encoder`` with the head in its ``slot`` (MoCo v3's layout): one
    module whose forward gives the embedding and whose keys are the network's own. Shares its
    modules with ``encoder``."""
    net = encoder.backbone
    setattr(net, slot, encoder.head)
    return net


def slot_view(net: nn.Module, slot: str, channels_last: bool = False) -> Encoder:
    """``net`` (the head in its ``slot``) as an ``Encoder``: the same modules, so the same
    weights, seen as ``backbone`` (the network with an empty slot) and ``head``.

    Built anew on every call from ``net``'s current modules, so it stays right after modules of
    ``net`` were replaced (SyncBatchNorm). Its ``backbone`` is a shallow copy of ``net`` with its
    own table of sub-modules: the network's forward, minus the slot."""
    backbone = copy.copy(net)
    backbone._modules = OrderedDict(net._modules)
    setattr(backbone, slot, nn.Identity())
    view = Encoder(backbone, getattr(net, slot))
    # Set after construction: Encoder would otherwise convert the (shared) weights once more.
    view.channels_last = channels_last
    return view


def slot_to_encoder_keys(state: dict, slot: str) -> dict:
    """Weights of the slot layout (``conv1.weight``, ``fc.0.weight``) under ``Encoder``'s names
    (``backbone.conv1.weight``, ``head.0.weight``)."""
    prefix = f"{slot}."
    return {
        f"head.{k[len(prefix) :]}" if k.startswith(prefix) else f"backbone.{k}": v
        for k, v in state.items()
    }


@dataclass(frozen=True)
class EncoderSpec:
    """What fixes an encoder's architecture. Every checkpoint carries one (``encoder_spec``), and
    every evaluation and export builds the encoder from it."""

    backbone: str  # a key of BACKBONES
    stem: str  # one of STEMS (auto is resolved against image_size when built)
    in_channels: int
    image_size: int
    head: str  # one of ALL_HEADS
    dim: int  # output of the head: the embedding (MoCo) or the classes (supervised)
    channels_last: bool = False
    mlp_dim: int | None = None  # hidden width of the v3 projector (None for the other heads)
    final_relu: bool = True  # False: the last residual block ends without ReLU (ResNets only)

    def build(self, bn_splits: int = 1) -> "Encoder":
        net = build_backbone(
            self.backbone, self.in_channels, self.image_size, bn_splits, self.stem, self.final_relu
        )
        layers = V3_PROJECTOR_LAYERS.get(self.backbone, 2)
        head = build_head(self.head, net.feature_dim, self.dim, self.mlp_dim, layers, bn_splits)
        return Encoder(net, head, self.channels_last)

    @property
    def slot(self) -> str | None:
        """Where the head sits in the trained module's weights: the backbone's slot (MoCo v3's
        layout), or None for ``Encoder``'s own (``backbone.*``, ``head.*``)."""
        return SLOTS.get(self.backbone, "head") if self.head == V3_HEAD else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EncoderSpec":
        """The spec of a dict that holds its keys (others are ignored); files written before
        ``stem``, ``channels_last`` and ``final_relu`` existed get their values of that time."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in known}
        return cls(**{"stem": "auto", **given})
