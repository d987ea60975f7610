"""Choices that depend on the machine: the fastest safe precision, and the stem that learns most
per training minute on small images."""

import torch

from moco.encoders import SMALL_IMAGE_MAX_SIZE, resolve_stem
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


def resolve_precision(
    precision: str | int, accelerator: str, stem: str = "auto", image_size: int = 224
) -> str:
    """``auto`` -> the fastest measured choice: bf16-mixed where the hardware runs it fast,
    16-mixed on older GPUs, else 32.

    One exception on CPUs, measured (docs/speed.md): with AMX, the ImageNet stem on images of at
    most SMALL_IMAGE_MAX_SIZE px (maps of 16x16 and less) ran slower in bf16 than in fp32, the
    casts around each small convolution costing more than AMX saves. With AVX512-BF16 alone the
    same model ran faster in bf16, as every other stem does on both kinds (``late_pool``, whose
    layer2-4 have the ImageNet stem's small maps, is unmeasured on AMX and gets bf16). Measured
    before the small-map convolutions (moco/small_map_conv.py) made layer3 and layer4 cheaper at
    28 px.
    """
    if str(precision) != "auto":
        return str(precision)
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto"):
        kind = cpu_bf16_kind()
        tiny_maps = (
            resolve_stem(stem, image_size) == "imagenet" and image_size <= SMALL_IMAGE_MAX_SIZE
        )
        if kind == "amx" and tiny_maps:
            return "32-true"
        return "bf16-mixed" if kind is not None else "32-true"
    return "32-true"


def precision_for(cfg) -> str:
    """The precision a composed pretraining config runs with: its trainer's choice, auto resolved
    for its model (pretraining and the benchmark both ask here)."""
    trainer, model = cfg.trainer, cfg.model
    return resolve_precision(trainer.precision, trainer.accelerator, model.stem, model.image_size)


def stem_for_machine(accelerator: str) -> str:
    """The ResNet stem that gave the best features in an hour of training on small images (the
    Fashion-MNIST experiments' 28 px), by machine kind (docs/results.md, twelfth round).

    On CPUs with AMX, ``small_pool`` (14x14 maps in layer1) runs in bf16 at half the ImageNet
    stem's speed and learns more per epoch: its hour ended ahead in the probe and level in kNN.
    On the other CPUs it ran at 0.3-0.4 of that speed or less, too few epochs for the hour, so
    they keep the ImageNet stem (7x7 maps), as do GPUs, where it was never measured against it.
    These speeds predate the small-map convolutions (moco/small_map_conv.py), which make the
    ImageNet stem's layer3 and layer4 several times cheaper: the rule awaits new runs.
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
