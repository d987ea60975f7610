"""Choices that depend on the machine: the fastest safe precision."""

import torch

from moco.encoders import SMALL_IMAGE_MAX_SIZE, resolve_stem
from moco.errors import ConfigError


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16).

    Without them bf16 autocast is emulated and far slower than fp32 (docs/speed.md).
    """
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(
    precision: str | int, accelerator: str, stem: str = "auto", image_size: int = 224
) -> str:
    """``auto`` -> bf16-mixed where the hardware runs it fast, 16-mixed on older GPUs, else 32.

    On a CPU, bf16 also needs convolutions big enough to pay for the casts around them: the
    ImageNet stem on images of at most SMALL_IMAGE_MAX_SIZE px leaves maps of 16x16 and less,
    where bf16 autocast ran slower than fp32 even with AMX (docs/speed.md).
    """
    if str(precision) != "auto":
        return str(precision)
    uses_cuda = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if uses_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto"):
        tiny_maps = (
            resolve_stem(stem, image_size) == "imagenet" and image_size <= SMALL_IMAGE_MAX_SIZE
        )
        return "bf16-mixed" if cpu_has_fast_bf16() and not tiny_maps else "32-true"
    return "32-true"


def precision_for(cfg) -> str:
    """The precision a composed pretraining config runs with: its trainer's choice, auto resolved
    for its model (pretraining and the benchmark both ask here)."""
    trainer, model = cfg.trainer, cfg.model
    return resolve_precision(trainer.precision, trainer.accelerator, model.stem, model.image_size)


MALLOC_MODES = ("default", "no-mmap")


def configure_malloc(mode: str) -> bool:
    """``no-mmap``: glibc serves every allocation from its heap and keeps freed memory.

    By default glibc maps each allocation above 32 MB afresh (mmap) and unmaps it when freed, so
    every such tensor of every CPU training step (a ResNet-18 activation at batch 256 and 28 px is
    51 MB, the N x (1+K) logits 64 MB) pays page faults and zeroing again, for a few hundred MB
    more resident memory (docs/speed.md, scripts/benchmark.py --malloc). Same as starting Python
    with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647; data-loader workers forked later
    inherit it.

    Returns whether the setting took effect: False on ``default`` and where there is no glibc
    (macOS, Windows, musl), where the allocator is left as it is.
    """
    if mode not in MALLOC_MODES:
        raise ConfigError(f"malloc={mode} is unknown: use one of {list(MALLOC_MODES)}")
    if mode == "default":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1))
