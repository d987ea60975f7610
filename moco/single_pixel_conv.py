"""3x3 convolutions whose output is a single pixel, as one matrix product.

At 28 px the ImageNet stem leaves 1x1 maps in a ResNet's layer4: its first convolution (stride 2)
takes a 2x2 map to one pixel, and the three after it (stride 1) take one pixel to one pixel. The
CPU convolution kernels handle such maps badly: on a 2-core AVX2 CPU each of these layers ran 5
to 15 times slower than the same products written as a matrix multiplication (docs/speed.md).
With zero padding 1, the output pixel sees input pixel (a, b) through kernel tap (a + 1, b + 1)
and every other tap multiplies padding, so ``SinglePixelConv2d`` computes only those products.
Its outputs and gradients are those of the full convolution (the taps that meet only padding
get zero from both); on every larger output it is an ordinary ``nn.Conv2d``. It keeps the full
3x3 weight, so checkpoints and exports see a plain ResNet.
"""

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = ((1, 1), (2, 2))


def _eligible(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride in STRIDES
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class SinglePixelConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1 or 2, zero padding 1, no groups or dilation) that computes
    a 1x1 output as a matrix product of the taps that meet the input."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not _eligible(self):
            raise ValueError(
                f"SinglePixelConv2d is a 3x3 convolution with stride 1 or 2 and padding 1: {self}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        stride = self.stride[0]
        if x.dim() != 4 or max(height, width) > stride:  # the output is larger than 1x1
            return super().forward(x)
        n, channels = x.shape[:2]
        # weight[o, c, a + 1, b + 1] for input pixel (a, b), as an O x (H x W x C) matrix.
        taps = self.weight[:, :, 1 : 1 + height, 1 : 1 + width].permute(0, 2, 3, 1)
        flat = x.permute(0, 2, 3, 1).reshape(n, height * width * channels)  # a view when NHWC
        out = F.linear(flat, taps.reshape(self.out_channels, -1), self.bias)
        return out[:, :, None, None]  # both NCHW- and NHWC-contiguous, as a 1x1 map is


def use_single_pixel_convs(net: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns every eligible 3x3 convolution of ``net`` into a ``SinglePixelConv2d`` holding the
    same weight tensors, in place, and returns ``net``; ``enabled=False`` turns them back into
    plain ``nn.Conv2d`` (the benchmark's ``floor_plain_convs``). Draws no random numbers: the new
    modules are made on the meta device and given the old ones' parameters."""
    wanted, cls = (nn.Conv2d, SinglePixelConv2d) if enabled else (SinglePixelConv2d, nn.Conv2d)
    for parent in net.modules():
        for name, child in parent.named_children():
            if type(child) is wanted and _eligible(child):
                conv = cls(
                    child.in_channels,
                    child.out_channels,
                    3,
                    stride=child.stride,
                    padding=1,
                    bias=child.bias is not None,
                    device="meta",
                )
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
    return net
