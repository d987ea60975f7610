"""3x3 convolutions on maps of at most 2x2 pixels, as one matrix product.

At 28 px the ImageNet stem leaves 2x2 maps in a ResNet's layer3 and 1x1 maps in layer4. The CPU
convolution kernels handle such maps badly: on a 2-core AVX2 CPU these layers ran 2 to 15 times
slower than the same products written as one matrix multiplication (docs/speed.md).

With stride s and zero padding 1, output pixel q sees input pixel p through kernel tap
p - s * q + 1 (per axis), and on a map of at most 2x2 pixels that tap exists for every pair
(p, q): each output pixel is a linear function of the whole map. ``SmallMapConv2d`` gathers the
taps into that (outputs x inputs) matrix and multiplies once; the taps that meet only padding
never enter it, and their gradient is zero, as the full convolution's is. On larger maps it is
an ordinary ``nn.Conv2d``. It keeps the full 3x3 weight, so checkpoints and exports see a plain
ResNet.
"""

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = ((1, 1), (2, 2))
# The largest map side on which every (input, output) pixel pair meets through a tap, for
# stride 1 and 2 alike (a side of 3 at stride 2 has an output pixel out of reach of input 0).
MAX_SIDE = 2


def _eligible(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride in STRIDES
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


@cache
def _tap_of_pair(height: int, width: int, stride: int) -> tuple[tuple[int, ...], int, int]:
    """For every (output pixel, input pixel) pair in row-major order, the index (3 * row + col)
    of the kernel tap that joins them; and the output's height and width. Plain integers, so
    the cache holds nothing of its first caller's device or mode (a tensor made under
    ``torch.inference_mode`` could not be saved for a later backward)."""
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    tap = tuple(
        3 * (pi - stride * qi + 1) + (pj - stride * qj + 1)
        for qi in range(out_h)
        for qj in range(out_w)
        for pi in range(height)
        for pj in range(width)
    )
    return tap, out_h, out_w


@cache
def _tap_index(height: int, width: int, stride: int, device: torch.device) -> torch.Tensor:
    """``_tap_of_pair``'s taps as an index tensor on ``device``, made once per map size: a step
    on a GPU then copies no indices from the host. Made outside inference mode whatever the
    caller's mode, so a first call under ``torch.inference_mode`` cannot leave an index that a
    later training step's backward refuses to save."""
    with torch.inference_mode(False):
        return torch.tensor(_tap_of_pair(height, width, stride)[0], device=device)


class SmallMapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1 or 2, zero padding 1, no groups or dilation) that computes
    its output on maps of at most 2x2 pixels as one matrix product."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not _eligible(self):
            raise ValueError(
                f"SmallMapConv2d is a 3x3 convolution with stride 1 or 2 and padding 1: {self}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or max(x.shape[-2:]) > MAX_SIDE:
            return super().forward(x)
        n, channels, height, width = x.shape
        _, out_h, out_w = _tap_of_pair(height, width, self.stride[0])
        outputs, inputs = out_h * out_w, height * width
        # taps[t] = weight[:, :, t // 3, t % 3]: a view for NCHW and NHWC weights alike.
        taps = self.weight.permute(2, 3, 0, 1).flatten(0, 1)
        matrix = (
            taps.index_select(0, _tap_index(height, width, self.stride[0], taps.device))
            .view(outputs, inputs, self.out_channels, channels)  # (out, in) pairs x O x C
            .permute(0, 2, 1, 3)
            .reshape(outputs * self.out_channels, inputs * channels)
        )
        bias = None if self.bias is None else self.bias.repeat(outputs)
        flat = x.permute(0, 2, 3, 1).reshape(n, inputs * channels)  # a view when NHWC
        out = F.linear(flat, matrix, bias).view(n, out_h, out_w, self.out_channels)
        out = out.permute(0, 3, 1, 2)  # NHWC in memory
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()  # the layout the input came in
        return out


def use_small_map_convs(net: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns every eligible 3x3 convolution of ``net`` into a ``SmallMapConv2d`` holding the
    same weight tensors, in place, and returns ``net``; ``enabled=False`` turns them back into
    plain ``nn.Conv2d`` (the benchmark's ``floor_plain_convs``). Draws no random numbers: the new
    modules are made on the meta device and given the old ones' parameters."""
    wanted, cls = (nn.Conv2d, SmallMapConv2d) if enabled else (SmallMapConv2d, nn.Conv2d)
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
