"""A ResNet whose last residual block ends without its ReLU (``backbone.final_relu: false``).

torchvision's blocks end in ReLU(residual + shortcut), so the pooled features a kNN vote and a
probe read are never negative: they share one large common direction, their cosine similarities
crowd together, and a vote over 200 neighbours at T=0.1 weighs near and far ones almost alike.
Without that last ReLU the pooled features are the residual stream itself, signed. The weights
and their names do not change; only where the activation sits (exports record it).
"""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class BasicBlockNoFinalReLU(BasicBlock):
    """torchvision's BasicBlock, returning the sum before the block's last activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + shortcut


class BottleneckNoFinalReLU(Bottleneck):
    """torchvision's Bottleneck, returning the sum before the block's last activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + shortcut


_WITHOUT_FINAL_RELU = {BasicBlock: BasicBlockNoFinalReLU, Bottleneck: BottleneckNoFinalReLU}

# For exports: one line that gives a stock torchvision model (named ``model``) the forward above,
# with nothing but torchvision.
_SHORTCUT = "(x if b.downsample is None else b.downsample(x))"
_REBUILD = {
    BasicBlockNoFinalReLU: "b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))",
    BottleneckNoFinalReLU: "b.bn3(b.conv3(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))))",
}


def drop_final_relu(resnet: nn.Module) -> nn.Module:
    """``resnet`` (a torchvision ResNet) with its last block's final ReLU removed, in place. The
    block keeps its modules and state-dict names; only its class, and so its forward, changes."""
    block = resnet.layer4[-1]
    without = _WITHOUT_FINAL_RELU.get(type(block))
    if without is None:
        raise TypeError(f"no version of {type(block).__name__} without its final ReLU")
    block.__class__ = without
    return resnet


def has_final_relu(resnet: nn.Module) -> bool:
    """False when ``drop_final_relu`` removed the last block's ReLU."""
    return type(resnet.layer4[-1]) not in _WITHOUT_FINAL_RELU.values()


def rebuild_line(resnet: nn.Module) -> str:
    """The Python line that makes a stock torchvision ``model`` compute what ``resnet`` (with its
    final ReLU dropped) computes."""
    residual = _REBUILD[type(resnet.layer4[-1])]
    return f"b = model.layer4[-1]; b.forward = lambda x, b=b: {residual} + {_SHORTCUT}"
