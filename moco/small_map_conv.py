"""3x3 convolutions that skip the taps a map of 1x1 or 2x2 never reaches.

At 28 px the ImageNet stem leaves 2x2 maps in a ResNet's layer3 and 1x1 in layer4 (the
``small_pool`` stem: 2x2 in layer4). On such a map a 3x3 stride-1 convolution with zero padding 1
spends most of its multiply-adds on the padding: each output sees the input through the
centre tap alone on a 1x1 map, through 4 of the 9 taps on a 2x2 one. ``SmallMapConv2d`` computes
only the products with real inputs, as one matrix product (16 tap products per image on a 2x2
map instead of 36; 1 instead of 9 on a 1x1 map), and is an ordinary ``nn.Conv2d`` on larger
maps. Its outputs and gradients are those of the full convolution (the taps that only meet the
padding get zero from both), and it keeps the full 3x3 weight, so checkpoints, exports and
torchvision see a plain ResNet.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

LARGEST_SMALL_MAP = 2  # maps of up to this side take the matrix product


@functools.cache
def _taps(height: int, width: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """(rows, columns) of the kernel tap that carries input position q to output position p, as
    two P x P nested tuples (P = height x width, positions in row-major order): the tap's offset
    is q - p, plus 1 for the padding. Every pair has one on maps of side <= 2. Plain integers,
    so that the cache holds nothing of the device, mode or tracer of its first caller."""
    positions = [(i, j) for i in range(height) for j in range(width)]
    rows = tuple(tuple(qi - pi + 1 for qi, _ in positions) for pi, _ in positions)
    cols = tuple(tuple(qj - pj + 1 for _, qj in positions) for _, pj in positions)
    return rows, cols


def _eligible(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class SmallMapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, zero padding 1, no groups or dilation) that, on maps of
    side <= ``LARGEST_SMALL_MAP``, multiplies only by the taps that meet the input."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not _eligible(self):
            raise ValueError(f"SmallMapConv2d is a 3x3 stride-1 convolution with padding 1: {self}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or max(x.shape[-2:]) > LARGEST_SMALL_MAP:
            return super().forward(x)
        n, channels, height, width = x.shape
        positions = height * width
        rows, cols = (torch.tensor(t, device=x.device) for t in _taps(height, width))
        # weight[o, c, rows[p, q], cols[p, q]] -> a (P x O) x (P x C) matrix, rows p-major.
        taps = self.weight[:, :, rows, cols].permute(2, 0, 3, 1)
        taps = taps.reshape(positions * self.out_channels, positions * channels)
        bias = None if self.bias is None else self.bias.repeat(positions)
        flat = x.permute(0, 2, 3, 1).reshape(n, positions * channels)  # a view when NHWC
        out = F.linear(flat, taps, bias).view(n, height, width, self.out_channels)
        out = out.permute(0, 3, 1, 2)  # NCHW sizes, NHWC memory
        if x.is_contiguous(memory_format=torch.channels_last):
            return out
        return out.contiguous()  # the layout nn.Conv2d gives an NCHW input


def use_small_map_convs(net: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns every eligible 3x3 convolution of ``net`` into a ``SmallMapConv2d`` holding the same
    weight tensors, in place, and returns ``net``; ``enabled=False`` turns them back into plain
    ``nn.Conv2d`` (the benchmark's ``floor_plain_convs``). Draws no random numbers: the new
    modules are made on the meta device and given the old ones' parameters."""
    wanted, cls = (nn.Conv2d, SmallMapConv2d) if enabled else (SmallMapConv2d, nn.Conv2d)
    for parent in net.modules():
        for name, child in parent.named_children():
            if type(child) is wanted and _eligible(child):
                conv = cls(
                    child.in_channels,
                    child.out_channels,
                    3,
                    padding=1,
                    bias=child.bias is not None,
                    device="meta",
                )
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
    return net
