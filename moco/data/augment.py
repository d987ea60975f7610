"""Augmentation recipes of MoCo v1, v2 ("aug+") and v3, sized by the data set.

The recipe (conf/augment/) says which operations the paper uses; the data config says the image
size and channel count, and the rules below drop what makes no sense for the data:
- on grey images (1 channel) saturation, hue and random grayscale do nothing, so they are left
  out; brightness and contrast jitter still apply;
- Gaussian blur is left out below ``blur_min_size`` px: on 28-32 px images a blur kernel of ~10%
  of the side erases most of the detail (SimCLR and the MoCo CIFAR demo skip it too).

Two operations are off in the papers' recipes: small affine moves (``affine``: rotation, shift,
zoom) right after the crop, and random erasing (``erase``), which comes last, after
normalisation, so that an erased rectangle holds the data set's mean.

Both views follow one recipe unless ``augment.second_view`` changes some of its values for the
second: MoCo v3's views are asymmetric (BYOL's recipe: blur always on the first, rarely on the
second, solarisation on the second only). ``augment.small_crops`` adds smaller, lower-resolution
crops after the first view's recipe (``small_crop_recipe``), each one more query of the image.
"""

import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2

from moco.errors import ConfigError

# Solarisation inverts the values at or above half the range: PIL's ImageOps.solarize default
# (128 of 255), which MoCo v3 and BYOL use.
SOLARIZE_THRESHOLD_8BIT = 128
SOLARIZE_THRESHOLD = SOLARIZE_THRESHOLD_8BIT / 255  # the same on values in [0, 1]


def view_recipes(aug_cfg) -> tuple:
    """The recipes of the first and the second view: the second is the first with the values
    set in ``aug_cfg.second_view`` (None: the first view's) put over it."""
    changes = _values_set(aug_cfg.get("second_view"))
    if not changes:
        return aug_cfg, aug_cfg
    return aug_cfg, OmegaConf.merge(aug_cfg, changes)


def small_crop_recipe(aug_cfg):
    """The recipe of the small crops: the first view's, with the crop scale of
    ``aug_cfg.small_crops`` and no erasing (a small crop already leaves most of the item out)."""
    first, _ = view_recipes(aug_cfg)
    return OmegaConf.merge(first, {"crop_scale": aug_cfg.small_crops.scale, "erase": {"p": 0.0}})


def _values_set(node) -> dict:
    """The values of ``node`` that are not None, as a nested dict (empty: none)."""
    if node is None:
        return {}
    found = {}
    for key, value in node.items():
        if OmegaConf.is_dict(value):
            value = _values_set(value)
        if value is not None and value != {}:
            found[key] = value
    return found


def probabilities(aug_cfg) -> dict[str, float]:
    """Every probability of a view's recipe, by its config name."""
    return {
        "color_jitter.p": aug_cfg.color_jitter.p,
        "grayscale_p": aug_cfg.grayscale_p,
        "blur.p": aug_cfg.blur.p,
        "solarize_p": aug_cfg.solarize_p,
        "flip_p": aug_cfg.flip_p,
        "erase.p": aug_cfg.erase.p,
        "affine.p": aug_cfg.affine.p,
    }


def mean_and_std(data_cfg) -> tuple[list[float], list[float]]:
    """The data config's per-channel normalisation, checked against its channel count."""
    mean, std = list(data_cfg.mean), list(data_cfg.std)
    if len(mean) != data_cfg.channels or len(std) != data_cfg.channels:
        raise ConfigError(f"data.mean and data.std need {data_cfg.channels} values (data.channels)")
    return mean, std


def blur_kernel_size(aug_cfg, size: int) -> int | None:
    """The odd blur kernel, about 10% of the side, or None where the recipe leaves blur out."""
    if aug_cfg.blur.p <= 0 or size < aug_cfg.blur.min_size:
        return None
    return 2 * int(0.05 * size) + 1


def colour_strengths(aug_cfg, channels: int) -> tuple[dict[str, float], float]:
    """The colour-jitter strengths and the random-grayscale p that act on images of ``channels``
    channels: on grey images saturation, hue and grayscale do nothing, so they are 0. Without
    jitter (p = 0) the strengths are 0 and need not be in the config (conf/probe/)."""
    jitter, grey = aug_cfg.color_jitter, channels == 1
    grayscale_p = 0.0 if grey else aug_cfg.grayscale_p
    if jitter.p <= 0:
        return dict.fromkeys(("brightness", "contrast", "saturation", "hue"), 0.0), grayscale_p
    strengths = {
        "brightness": jitter.brightness,
        "contrast": jitter.contrast,
        "saturation": 0.0 if grey else jitter.saturation,
        "hue": 0.0 if grey else jitter.hue,
    }
    return strengths, grayscale_p


def random_affine(affine) -> v2.RandomAffine:
    """torchvision's RandomAffine for the recipe's ``affine`` values: no shear, bilinear, the
    uncovered border black."""
    shift = affine.translate
    return v2.RandomAffine(
        affine.degrees,
        translate=(shift, shift) if shift > 0 else None,
        scale=tuple(affine.scale),
        interpolation=v2.InterpolationMode.BILINEAR,
        fill=0,
    )


def _normalize(data_cfg) -> list:
    mean, std = mean_and_std(data_cfg)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def pretrain_transform(aug_cfg, data_cfg) -> v2.Compose:
    """One random view of a uint8 image tensor (C x H x W) for contrastive pretraining."""
    size = data_cfg.image_size
    ops = [v2.RandomResizedCrop(size, scale=tuple(aug_cfg.crop_scale), antialias=True)]
    if aug_cfg.affine.p > 0:
        ops.append(v2.RandomApply([random_affine(aug_cfg.affine)], p=aug_cfg.affine.p))
    strengths, grayscale_p = colour_strengths(aug_cfg, data_cfg.channels)
    if aug_cfg.color_jitter.p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(**strengths)], p=aug_cfg.color_jitter.p))
    if grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=grayscale_p))
    kernel = blur_kernel_size(aug_cfg, size)
    if kernel is not None:
        ops.append(
            v2.RandomApply(
                [v2.GaussianBlur(kernel, sigma=tuple(aug_cfg.blur.sigma))], p=aug_cfg.blur.p
            )
        )
    if aug_cfg.solarize_p > 0:  # on the uint8 image: the threshold in its 0-255 range
        ops.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD_8BIT, p=aug_cfg.solarize_p))
    if aug_cfg.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=aug_cfg.flip_p))
    ops += _normalize(data_cfg)
    if aug_cfg.erase.p > 0:  # after normalisation: the erased pixels get the data set's mean
        erase = aug_cfg.erase
        ops.append(v2.RandomErasing(erase.p, tuple(erase.scale), tuple(erase.ratio), value=0))
    return v2.Compose(ops)


def eval_transform(data_cfg) -> v2.Compose:
    """Un-augmented images for feature extraction: resized to the training size, normalised."""
    return v2.Compose(
        [
            v2.Resize(data_cfg.image_size, antialias=True),
            v2.CenterCrop(data_cfg.image_size),
            *_normalize(data_cfg),
        ]
    )


class TwoViews:
    """The two views of an image: ``first`` and ``second`` (default: ``first`` again) applied
    independently."""

    def __init__(self, first, second=None) -> None:
        self.first, self.second = first, first if second is None else second

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)
