"""The augmentation recipes of moco/data/augment.py, applied to a whole batch at once.

torchvision's transforms work one image at a time, in the loader workers. On 28-px images that is
almost all Python overhead, and on a CPU the loader worker takes its time from the model
(docs/speed.md compares the two). Here every random choice is still drawn per image, from the
distributions torchvision draws from, but each operation runs once for the batch as tensor
arithmetic, on the device that trains.

Same operations, order and parameters as the per-image pipeline: random resized crop, affine
moves, colour jitter (its four parts in a random order per image), random grayscale, Gaussian blur,
solarisation, horizontal flip, normalisation, random erasing. Two differences, neither of
which changes the views' distribution beyond the 8-bit resolution of the data:
- values stay in float from start to end, where torchvision rounds to uint8 after the crop and
  after each jitter step;
- the flip is folded into the crop's resampling (mirrored sampling positions), which is exact
  because every later step treats columns alike, except the affine move: a mirrored move is the
  move with the opposite angle and horizontal shift, which are drawn as often, so the views
  come out with the same distribution.

The random parameters come from torch's global CPU generator, which checkpoints save and resume
restores (moco.run.checkpointing.RandomStates). Under DDP every rank draws the parameters of the
whole global batch, identically, and keeps its own slice: ranks never share augmentations, and a
run on N processes draws what one process with the global batch would.
"""

import math

import torch
import torch.nn.functional as F

from moco.data.augment import (
    SOLARIZE_THRESHOLD,
    blur_kernel_size,
    colour_strengths,
    mean_and_std,
    small_crop_recipe,
    view_recipes,
)

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default
BOX_TRIES = 10  # random boxes tried per image, as torchvision's RandomResizedCrop and RandomErasing


# ------------------------------------------------------------------------- crop + flip
def box_tries(n: int, area: int, scale, ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10 tries per image (n x 10) of torchvision's RandomResizedCrop and RandomErasing: a
    target area of ``scale`` times ``area`` and a log aspect ratio, both uniform, rounded to the
    sides sqrt(area * ratio) and sqrt(area / ratio)."""
    target = area * torch.empty(n, BOX_TRIES).uniform_(scale[0], scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(torch.empty(n, BOX_TRIES).uniform_(*log_ratio))
    return torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))


def first_fit(fits: torch.Tensor, *sides: torch.Tensor) -> list[torch.Tensor]:
    """Each image's ``sides`` at its first try that ``fits`` (the first try where none fits)."""
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    return [side.gather(1, first).squeeze(1) for side in sides]


def crop_boxes(n: int, height: int, width: int, scale, ratio=CROP_RATIO) -> torch.Tensor:
    """Boxes (n x 4: top, left, h, w) drawn as torchvision's RandomResizedCrop.get_params:
    area fraction uniform in ``scale``, log aspect ratio uniform, first of 10 tries that fits,
    else the largest centred box with an aspect ratio inside ``ratio``."""
    w, h = box_tries(n, height * width, scale, ratio)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    w, h = first_fit(fits, w, h)
    top = torch.floor(torch.rand(n) * (height - h + 1))
    left = torch.floor(torch.rand(n) * (width - w + 1))

    # torchvision's fallback: the whole image, trimmed to the nearest allowed aspect ratio.
    image_ratio = width / height
    fall_w, fall_h = width, height
    if image_ratio < min(ratio):
        fall_h = int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        fall_w = int(round(height * max(ratio)))
    none_fit = ~fits.any(dim=1)
    h = torch.where(none_fit, float(fall_h), h)
    w = torch.where(none_fit, float(fall_w), w)
    top = torch.where(none_fit, float((height - fall_h) // 2), top)
    left = torch.where(none_fit, float((width - fall_w) // 2), left)
    return torch.stack([top, left, h, w], dim=1)


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, source: int):
    """Rows of the linear map that resizes the segments [start, start + length) of a line of
    ``source`` pixels to ``size`` pixels (n x size x source).

    The triangle filter of torch's bilinear interpolation with antialias=True: plain bilinear
    (half-pixel centres, the segment's edge pixels repeated) when enlarging, a filter widened by
    the shrink factor when shrinking, so no aliasing.
    """
    on = {"device": start.device, "dtype": start.dtype}
    factor = (length / size)[:, None, None]  # source pixels per output pixel
    centre = start[:, None, None] + (torch.arange(size, **on)[None, :, None] + 0.5) * factor
    pixel = torch.arange(source, **on)[None, None, :] + 0.5  # source pixel centres
    support = factor.clamp(min=1.0)
    weight = (1 - (pixel - centre).abs() / support).clamp(min=0)
    # Only the segment's own pixels take part; near its edges the weights are renormalised,
    # which is the same as repeating the edge pixel.
    inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
    # Centres within half a pixel of the segment edge give weight 0 to the outer neighbour
    # and some to the edge pixel, so no row sums to 0.
    weight = weight * inside
    return weight / weight.sum(dim=2, keepdim=True)


def crop_resize_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int):
    """Crops ``boxes`` out of ``images`` (n x C x H x W, float), resizes them to size x size and
    mirrors those where ``flip`` is true; one pair of matrix products for the whole batch."""
    height, width = images.shape[-2:]
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, height)  # n x size x H
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, width)  # n x size x W
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)  # mirrored sampling positions
    rows, cols = rows.to(images), cols.to(images)
    return rows[:, None] @ images @ cols[:, None].transpose(-1, -2)


# ------------------------------------------------------------------------ affine moves
def affine_params(n: int, size: int, degrees: float, translate: float, scale) -> dict:
    """Angles (degrees), shifts (n x 2: x, y, whole pixels) and zooms drawn as torchvision's
    RandomAffine.make_params without shear: angle uniform in +-``degrees``, each shift the
    rounded uniform in +-``translate`` of the side, zoom uniform in ``scale``."""
    most = translate * size
    return {
        "angle": _uniform(n, -degrees, degrees),
        "shift": torch.round(torch.empty(n, 2).uniform_(-most, most)),
        "zoom": _uniform(n, *scale),
    }


def affine(images: torch.Tensor, angle, shift, zoom) -> torch.Tensor:
    """``images`` (n x C x H x W) rotated by ``angle`` degrees about their centre, zoomed and
    shifted, as torchvision's affine with bilinear sampling and a black border (fill 0)."""
    n, _, height, width = images.shape
    on = {"device": images.device, "dtype": images.dtype}
    turn = torch.deg2rad(angle.to(**on))
    cos, sin = torch.cos(turn), torch.sin(turn)
    zoom, (tx, ty) = zoom.to(**on), shift.to(**on).unbind(1)
    # Where each output pixel comes from: the inverse move, in pixels from the image centre.
    inverse = torch.stack([cos, sin, -sin, cos], dim=1).reshape(n, 2, 2) / zoom[:, None, None]
    offset = -(inverse @ torch.stack([tx, ty], dim=1)[:, :, None])
    x = torch.arange(width, **on) - (width - 1) / 2
    y = torch.arange(height, **on) - (height - 1) / 2
    out = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)  # H x W x 2
    source = out @ inverse.transpose(1, 2)[:, None] + offset.transpose(1, 2)[:, None]
    grid = source / torch.tensor([width / 2, height / 2], **on)  # grid_sample's [-1, 1]
    # torchvision samples a channel of ones with the image and multiplies by it, which darkens
    # the pixels that straddle the border a second time; so does this.
    ones = torch.ones(n, 1, height, width, **on)
    moved = F.grid_sample(
        torch.cat([images, ones], dim=1), grid, mode="bilinear", align_corners=False
    )
    return moved[:, :-1] * moved[:, -1:]


# ---------------------------------------------------------------------------- colour
def to_grey(images: torch.Tensor) -> torch.Tensor:
    """Luma (n x 1 x H x W) of RGB images; grey images are returned as they are."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights[None, :, None, None]).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor[:, None, None, None]
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images, factor):
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images, factor):
    return _blend(images, to_grey(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images, factor):
    return _blend(images, to_grey(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the hue of RGB images by ``shift`` turns (-0.5..0.5), keeping value and
    saturation: the HSV round trip of torchvision's adjust_hue, per image."""
    r, g, b = images.unbind(dim=1)
    high, _ = images.max(dim=1)
    low, _ = images.min(dim=1)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        high == r,
        ((g - b) / safe) % 6,
        torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift[:, None, None]) % 1.0
    # HSV -> RGB with the closed form f(n) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6.
    channels = []
    for n in (5, 3, 1):
        k = (n + hue * 6) % 6
        channels.append(high - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, dim=1)


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high)


# ------------------------------------------------------------------------------ blur
def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per image and reflected borders, as torchvision's
    GaussianBlur."""
    n, channels, height, width = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None, :] / sigma.to(images)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    flat = images.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * channels)  # along rows
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * channels)  # along columns
    return flat.reshape(n, channels, height, width)


# ----------------------------------------------------------------------------- erasing
def erase_boxes(n: int, height: int, width: int, scale, ratio) -> torch.Tensor:
    """Rectangles (n x 4: top, left, h, w) drawn as torchvision's RandomErasing.make_params: area
    fraction uniform in ``scale``, log aspect ratio uniform, the first of 10 tries that fits
    strictly inside the image; h = w = 0 (nothing erased) where none fits."""
    h, w = box_tries(n, height * width, scale, ratio)
    fits = (h < height) & (w < width)
    found = fits.any(dim=1)
    h, w = (torch.where(found, side, 0.0) for side in first_fit(fits, h, w))
    top = torch.floor(torch.rand(n) * (height - h + 1))
    left = torch.floor(torch.rand(n) * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1)


def erase(images: torch.Tensor, boxes: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``images`` with the box of each chosen image set to 0 (all channels)."""
    rows = torch.arange(images.shape[-2], device=images.device)[None, :, None]
    cols = torch.arange(images.shape[-1], device=images.device)[None, None, :]
    top, left, h, w = (v[:, None, None] for v in boxes.unbind(1))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return images.masked_fill((inside & chosen[:, None, None])[:, None], 0.0)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] at or above SOLARIZE_THRESHOLD inverted, as torchvision's solarize."""
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


# ------------------------------------------------------------------ chosen images only
def on_chosen(images: torch.Tensor, chosen: torch.Tensor, operation, *per_image: torch.Tensor):
    """``images`` with each row that ``chosen`` marks replaced by ``operation`` of it, which is
    given the same rows of each ``per_image`` tensor too: a costly step runs on those rows only."""
    rows = chosen.nonzero().squeeze(1)
    if len(rows) == 0:
        return images
    return images.index_copy(0, rows, operation(images[rows], *(t[rows] for t in per_image)))


# ---------------------------------------------------------------------------- the view
class BatchAugment:
    """One random view of every image of a uint8 batch (n x C x H x W), as a normalised float
    batch of ``size`` px (default ``data_cfg.image_size``), after one view's recipe
    (``pretrain_views`` for all views of pretraining)."""

    def __init__(self, aug_cfg, data_cfg, size: int | None = None) -> None:
        self.size, self.channels = size or data_cfg.image_size, data_cfg.channels
        self.scale = tuple(aug_cfg.crop_scale)
        move = aug_cfg.affine
        self.affine_p, self.degrees, self.translate = move.p, move.degrees, move.translate
        self.zoom = tuple(move.scale)
        self.jitter = aug_cfg.color_jitter
        # The per-image pipeline's rules: no saturation, hue or grayscale on grey images, ...
        self.strengths, self.grayscale_p = colour_strengths(aug_cfg, self.channels)
        # ... no blur on small images, the same kernel size.
        self.blur_kernel = blur_kernel_size(aug_cfg, self.size)
        self.blur_p = aug_cfg.blur.p if self.blur_kernel is not None else 0.0
        self.blur_sigma = tuple(aug_cfg.blur.sigma)
        self.solarize_p = aug_cfg.solarize_p
        self.flip_p = aug_cfg.flip_p
        self.erase_p, self.erase_scale = aug_cfg.erase.p, tuple(aug_cfg.erase.scale)
        self.erase_ratio = tuple(aug_cfg.erase.ratio)
        mean, std = mean_and_std(data_cfg)
        self.mean = torch.tensor(mean)[None, :, None, None]
        self.std = torch.tensor(std)[None, :, None, None]

    def view(self, images: torch.Tensor, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The view of ``images`` after this recipe. Under DDP (``world_size`` > 1) the random
        parameters are drawn for the global batch and this rank keeps its slice."""
        n = images.shape[0]
        params = self.draw(n * world_size, images.shape[-2], images.shape[-1])
        mine = slice(rank * n, (rank + 1) * n)
        params = {name: value[mine].to(images.device) for name, value in params.items()}
        return self.apply(images, params)

    def draw(self, n: int, height: int, width: int) -> dict:
        """All random choices for ``n`` images, drawn on the CPU from torch's global generator."""
        j = self.strengths  # ranges as torchvision's ColorJitter draws them
        params = {
            "box": crop_boxes(n, height, width, self.scale),
            "jitter": torch.rand(n) < self.jitter.p,
            # Each image's own order of brightness, contrast, saturation, hue (torch.randperm(4)
            # in torchvision), as ranks of four uniform numbers.
            "order": torch.rand(n, 4).argsort(dim=1),
            "brightness": _uniform(n, max(0.0, 1 - j["brightness"]), 1 + j["brightness"]),
            "contrast": _uniform(n, max(0.0, 1 - j["contrast"]), 1 + j["contrast"]),
            "saturation": _uniform(n, max(0.0, 1 - j["saturation"]), 1 + j["saturation"]),
            "hue": _uniform(n, -j["hue"], j["hue"]),
            "grayscale": torch.rand(n) < self.grayscale_p,
            "blur": torch.rand(n) < self.blur_p,
            "sigma": _uniform(n, *self.blur_sigma),
            "flip": torch.rand(n) < self.flip_p,
        }
        if self.solarize_p > 0:  # drawn only when used: recipes without it keep their stream
            params["solarize"] = torch.rand(n) < self.solarize_p
        if self.affine_p > 0:  # the same
            params["affine"] = torch.rand(n) < self.affine_p
            params.update(affine_params(n, self.size, self.degrees, self.translate, self.zoom))
        if self.erase_p > 0:
            params["erase"] = torch.rand(n) < self.erase_p
            params["erase_box"] = erase_boxes(
                n, self.size, self.size, self.erase_scale, self.erase_ratio
            )
        return params

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """The view that the parameters ``p`` (from ``draw``, on the images' device) describe."""
        x = images.float() / 255
        x = crop_resize_flip(x, p["box"], p["flip"], self.size)
        if self.affine_p > 0:
            x = on_chosen(x, p["affine"], affine, p["angle"], p["shift"], p["zoom"])
        if self.jitter.p > 0:
            x = self._jitter(x, p)
        if self.grayscale_p > 0:
            x = torch.where(p["grayscale"][:, None, None, None], to_grey(x).expand_as(x), x)
        if self.blur_p > 0:
            kernel = self.blur_kernel
            x = on_chosen(
                x, p["blur"], lambda y, sigma: gaussian_blur(y, kernel, sigma), p["sigma"]
            )
        if self.solarize_p > 0:
            x = torch.where(p["solarize"][:, None, None, None], solarize(x), x)
        x = (x - self.mean.to(x)) / self.std.to(x)
        if self.erase_p > 0:
            x = erase(x, p["erase_box"], p["erase"])
        return x

    def _jitter(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        s = self.strengths
        parts = [
            (s["brightness"] > 0, lambda v: adjust_brightness(v, p["brightness"])),
            (s["contrast"] > 0, lambda v: adjust_contrast(v, p["contrast"])),
            (s["saturation"] > 0, lambda v: adjust_saturation(v, p["saturation"])),
            (s["hue"] > 0, lambda v: adjust_hue(v, p["hue"])),
        ]
        # No check whether any image chose a part for a slot: in a batch of dozens nearly every
        # slot has every part, and on a GPU the check would cost a host sync each time.
        for slot in range(4):
            for part, (enabled, adjust) in enumerate(parts):
                if enabled:
                    chosen = p["jitter"] & (p["order"][:, slot] == part)
                    x = torch.where(chosen[:, None, None, None], adjust(x), x)
        return x


def two_views(aug_cfg, data_cfg) -> tuple[BatchAugment, BatchAugment]:
    """The batched recipes of the first and the second view (moco.data.augment.view_recipes)."""
    first, second = view_recipes(aug_cfg)
    one = BatchAugment(first, data_cfg)
    return one, (one if second is first else BatchAugment(second, data_cfg))


def pretrain_views(aug_cfg, data_cfg) -> tuple[BatchAugment, ...]:
    """The batched recipes of every view of a pretraining step: the two views, then
    ``augment.small_crops.count`` small crops (each draws its own random choices)."""
    small = aug_cfg.small_crops
    crops = (BatchAugment(small_crop_recipe(aug_cfg), data_cfg, small.size),) if small.count else ()
    return two_views(aug_cfg, data_cfg) + crops * small.count
