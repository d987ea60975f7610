"""A small, deterministic, labelled image set made in code, for tests and benchmarks.

Each class is a pattern family (stripes at an angle, checkerboards, rings, blobs, ...) drawn with a
random frequency, phase, position, contrast and noise per image, so that a class is recognisable
by shape and texture but no two images are equal: kNN and linear-probe accuracies mean something.
"""

import math

import torch

NUM_PATTERNS = 10


def _pattern(kind: int, yy: torch.Tensor, xx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One H x W pattern in [-1, 1] of family ``kind``; yy, xx are coordinates in [-1, 1]."""

    def rand(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    freq, phase = rand(3.0, 6.0), rand(0.0, 2 * math.pi)
    cy, cx = rand(-0.4, 0.4), rand(-0.4, 0.4)
    r = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if kind < 4:  # stripes at 0, 45, 90 and 135 degrees
        angle = kind * math.pi / 4 + rand(-0.15, 0.15)
        return torch.sin(freq * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    if kind == 4:  # checkerboard
        return torch.sign(torch.sin(freq * math.pi * xx + phase) * torch.sin(freq * math.pi * yy))
    if kind == 5:  # concentric rings
        return torch.sin(2 * freq * math.pi * r + phase)
    if kind == 6:  # one filled disc
        return torch.where(r < rand(0.3, 0.6), 1.0, -1.0)
    if kind == 7:  # filled square
        half = rand(0.25, 0.5)
        return torch.where(((yy - cy).abs() < half) & ((xx - cx).abs() < half), 1.0, -1.0)
    if kind == 8:  # cross
        width = rand(0.08, 0.18)
        return torch.where(((yy - cy).abs() < width) | ((xx - cx).abs() < width), 1.0, -1.0)
    return torch.tanh(3 * (torch.sin(freq * xx + phase) + torch.cos(freq * yy)))  # smooth blobs


def make_synthetic(
    num_images: int, image_size: int, channels: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` uint8 images (N x channels x S x S) and their labels (N), balanced classes."""
    if not 1 <= num_classes <= NUM_PATTERNS:
        raise ValueError(f"synthetic data has 1 to {NUM_PATTERNS} classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, image_size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    labels = torch.arange(num_images) % num_classes
    images = torch.empty(num_images, channels, image_size, image_size, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        pattern = _pattern(label, yy, xx, g) * (0.5 + 0.5 * torch.rand((), generator=g))
        tint = 0.6 + 0.4 * torch.rand(channels, 1, 1, generator=g)  # per-image colour cast
        noisy = pattern * tint + 0.25 * torch.randn(channels, image_size, image_size, generator=g)
        images[i] = ((noisy.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images, labels
