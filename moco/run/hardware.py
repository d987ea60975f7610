"""Choices that depend on the machine: the fastest safe precision, and the stem that learns most
per training minute on small images."""

import torch

from moco.errors import ConfigError


def cpu_bf16_kind() -> str | None:
    """``amx`` (AMX tiles), ``avx512_bf16`` (bf16 dot products in AVX-512 only) or None (bf16
    emulated, far slower than fp32: docs/speed.md)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    return cpu_bf16_kind() is not None


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` runs on a CUDA GPU on this machine."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str | int, accelerator: str) -> str:
    """``auto`` -> the fastest measured choice: bf16-mixed where the hardware runs it fast (GPUs
    with bf16; CPUs with AMX or AVX512-BF16), 16-mixed on older GPUs, else 32 (bf16 is emulated
    on other CPUs, far slower). On CPUs, bf16 ran faster than fp32 for every stem measured
    (docs/speed.md), the ImageNet stem at 28 px on AMX included since its 2x2 and 1x1 maps became
    matrix products (moco/small_map_conv.py)."""
    if str(precision) != "auto":
        return str(precision)
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto") and cpu_has_fast_bf16():
        return "bf16-mixed"
    return "32-true"


def precision_for(cfg) -> str:
    """The precision a composed pretraining config runs with: its trainer's choice, auto resolved
    (pretraining and the benchmark both ask here)."""
    return resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)


def stem_for_machine(accelerator: str) -> str:
    """The ResNet stem that gave the best features in an hour of training on small images (the
    Fashion-MNIST experiments' 28 px), by machine kind (docs/results.md, twenty-first and
    twenty-second rounds).

    On CPUs with AMX, ``small_pool`` (14x14 maps in layer1) runs in bf16 at about 0.4 of the
    ImageNet stem's speed and learns more per epoch. There, in bf16 both, two seeds each, its
    hour gave 21-24 epochs and 87.87-87.92 / 90.42-90.44 (kNN / probe), the ImageNet stem's
    40-47 epochs and 88.20-88.28 / 89.57-89.75: a probe 0.7-0.9 ahead for a kNN 0.3-0.4 behind.
    Read without the last block's ReLU (``backbone.final_relu``, twenty-third round), the same
    checkpoints gave ``small_pool`` 0.6-0.8 more kNN and the ImageNet stem none.
    On the other CPUs ``small_pool`` ran at 0.3-0.4 of the ImageNet stem's speed or less, too
    few epochs for the hour, so they keep the ImageNet stem (7x7 maps), as do GPUs, where the
    two were never measured against each other.
    """
    if not uses_cuda(accelerator) and accelerator in ("cpu", "auto") and cpu_bf16_kind() == "amx":
        return "small_pool"
    return "imagenet"


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
