"""The batched augmentation (moco/data/batch_augment.py) against torchvision, op by op, and as a
whole against the per-image pipeline it replaces."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from moco.data import PretrainDataModule
from moco.data.augment import pretrain_transform, view_recipes
from moco.data.batch_augment import (
    BatchAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine,
    affine_params,
    crop_boxes,
    crop_resize_flip,
    erase,
    erase_boxes,
    gaussian_blur,
    on_chosen,
    solarize,
    two_views,
)
from moco.errors import ConfigError
from moco.run.check import check_pretrain
from moco.run.schema import ViewConfig
from tests.conftest import with_values

# Boxes (top, left, h, w) in a 20 x 20 image: whole, inner, thin, edge-touching, near-whole.
BOXES = torch.tensor(
    [[0, 0, 20, 20], [3, 2, 10, 14], [5, 5, 7, 9], [0, 4, 20, 16], [2, 1, 17, 19], [10, 10, 10, 10]]
).float()


@pytest.mark.parametrize("size", [20, 12, 33], ids=["same", "shrink", "enlarge"])
def test_crop_resize_flip_equals_torchvision_resized_crop_then_hflip(size):
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([False, True, False, True, False, True])
    out = crop_resize_flip(images, BOXES, flip, size)
    for i in range(6):
        top, left, h, w = (int(v) for v in BOXES[i])
        expected = TF.resized_crop(images[i], top, left, h, w, [size, size], antialias=True)
        if flip[i]:
            expected = TF.horizontal_flip(expected)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high"),
    [
        (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        (adjust_hue, TF.adjust_hue, -0.1, 0.1),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
    ids=["brightness", "contrast", "saturation", "hue", "hue-wide"],
)
def test_colour_adjustments_equal_torchvision_with_a_factor_per_image(ours, theirs, low, high):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 10, 10, generator=gen)
    images[0] = 0.5  # grey: no hue, zero chroma
    images[1, :, :2] = torch.tensor([1.0, 1.0, 0.0])[:, None, None]  # ties between maxima
    factors = torch.empty(8).uniform_(low, high, generator=gen)
    out = ours(images, factors)
    for i in range(8):
        torch.testing.assert_close(out[i], theirs(images[i], factors[i].item()), atol=1e-5, rtol=0)


def test_contrast_of_grey_images_blends_with_their_own_mean():
    grey = torch.rand(4, 1, 10, 10)
    factors = torch.tensor([0.6, 0.9, 1.2, 1.4])
    out = adjust_contrast(grey, factors)
    for i in range(4):
        torch.testing.assert_close(out[i], TF.adjust_contrast(grey[i], factors[i].item()))


def test_gaussian_blur_equals_torchvision_with_a_sigma_per_image():
    images = torch.rand(5, 3, 16, 16)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    out = gaussian_blur(images, 9, sigmas)
    for i in range(5):
        expected = TF.gaussian_blur(images[i], [9, 9], [sigmas[i].item()] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_crop_boxes_follow_torchvisions_distribution():
    torch.manual_seed(0)
    n, scale = 20000, (0.2, 1.0)
    boxes = crop_boxes(n, 28, 28, scale)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 28).all() and (left + w <= 28).all()
    assert (boxes == boxes.round()).all()  # whole pixels
    ours = (h * w / 784).sort().values
    image = torch.zeros(1, 28, 28)
    theirs = []
    for _ in range(n):
        _, _, hh, ww = v2.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        theirs.append(hh * ww / 784)
    theirs = torch.tensor(theirs).sort().values
    # Same distribution: the quantiles agree (two-sample Kolmogorov-Smirnov distance < 0.02,
    # about 2x its 1% critical value for 20000 samples each).
    grid = torch.linspace(0, 1.0, 201)
    cdf = lambda s: torch.searchsorted(s, grid, right=True) / n  # noqa: E731
    assert (cdf(ours) - cdf(theirs)).abs().max() < 0.02
    # Aspect ratios inside [3/4, 4/3], give or take the rounding to whole pixels.
    ratio = w / h
    assert ratio.min() > 0.75 * 0.85 and ratio.max() < (4 / 3) / 0.85
    assert ratio.log().mean().abs() < 0.02  # log-uniform: symmetric around 1


def test_crop_boxes_fall_back_to_the_centred_image_when_no_try_fits():
    torch.manual_seed(0)
    boxes = crop_boxes(50, 20, 40, scale=(1.5, 2.0))  # always larger than the image
    # torchvision: the widest box of aspect ratio 4/3 inside the 40 x 20 image, centred.
    _, _, h, w = v2.RandomResizedCrop.get_params(torch.zeros(1, 20, 40), [1.5, 2.0], [3 / 4, 4 / 3])
    assert (boxes[:, 2] == h).all() and (boxes[:, 3] == w).all()
    assert (boxes[:, 0] == (20 - h) // 2).all() and (boxes[:, 1] == (40 - w) // 2).all()


def test_erase_boxes_follow_torchvisions_distribution():
    torch.manual_seed(0)
    n, scale, ratio = 20000, (0.02, 0.33), (0.3, 3.3)
    boxes = erase_boxes(n, 28, 28, scale, ratio)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 28).all() and (left + w <= 28).all()
    assert (boxes == boxes.round()).all()
    reference = v2.RandomErasing(1.0, scale, ratio, value=0)
    image = torch.zeros(1, 28, 28)
    theirs = []
    for _ in range(n):
        params = reference.make_params([image])
        found = params["v"] is not None
        theirs.append([params["i"], params["j"], params["h"] * found, params["w"] * found])
    theirs = torch.tensor(theirs, dtype=torch.float32)
    grid = torch.linspace(0, 1.0, 201)
    # Two-sample Kolmogorov-Smirnov distance of the erased fraction, the top row and the height
    # (about 2x its 1% critical value for 20000 samples each).
    for ours_v, theirs_v, top_v in (
        (h * w, theirs[:, 2] * theirs[:, 3], 784),
        (top, theirs[:, 0], 28),
        (h, theirs[:, 2], 28),
    ):
        a, b = (ours_v / top_v).sort().values, (theirs_v / top_v).sort().values
        cdf = lambda v: torch.searchsorted(v, grid, right=True) / n  # noqa: E731
        assert (cdf(a) - cdf(b)).abs().max() < 0.02


def test_erase_boxes_erase_nothing_when_no_try_fits():
    torch.manual_seed(0)
    boxes = erase_boxes(50, 8, 8, scale=(0.99, 1.0), ratio=(1.0, 1.0))  # 8 x 8 never fits
    assert (boxes[:, 2:] == 0).all()
    images = torch.randn(50, 1, 8, 8)
    assert torch.equal(erase(images, boxes, torch.ones(50, dtype=torch.bool)), images)


def test_erase_equals_torchvision_erase_for_the_chosen_images():
    images = torch.randn(len(BOXES), 3, 20, 20)
    chosen = torch.tensor([True, True, False, True, True, True])
    out = erase(images, BOXES, chosen)
    for i, (top, left, h, w) in enumerate(BOXES.int().tolist()):
        expected = TF.erase(images[i], top, left, h, w, torch.zeros(1)) if chosen[i] else images[i]
        torch.testing.assert_close(out[i], expected, atol=0, rtol=0)


def test_affine_equals_torchvision_affine_per_image():
    torch.manual_seed(0)
    images = torch.rand(5, 2, 20, 17)  # not square: the x and y scales differ
    angle = torch.tensor([0.0, 10.0, -7.5, 45.0, 90.0])
    shift = torch.tensor([[0.0, 0.0], [1, -2], [3, 0], [-1, 1], [0, 0]])
    zoom = torch.tensor([1.0, 0.9, 1.1, 1.3, 0.7])
    out = affine(images, angle, shift, zoom)
    for i in range(len(images)):
        expected = TF.affine(
            images[i],
            angle=float(angle[i]),
            translate=shift[i].tolist(),
            scale=float(zoom[i]),
            shear=[0.0, 0.0],
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=0,
        )
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    # The opposite rotation is another image: the comparison above can fail.
    assert (affine(images, -angle, shift, zoom)[1] - out[1]).abs().max() > 0.1


def test_on_chosen_runs_the_operation_on_the_chosen_rows_only():
    torch.manual_seed(0)
    images, zoom = torch.rand(6, 1, 12, 12), torch.tensor([0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    angle, shift = torch.full((6,), 20.0), torch.tensor([[1.0, -1.0]]).repeat(6, 1)
    chosen = torch.tensor([True, False, True, False, False, True])
    seen = []

    def move(rows, *params):
        seen.append(len(rows))
        return affine(rows, *params)

    out = on_chosen(images, chosen, move, angle, shift, zoom)
    assert seen == [3]
    moved_all = affine(images, angle, shift, zoom)  # each row's move depends on its row alone
    torch.testing.assert_close(out[chosen], moved_all[chosen], atol=1e-6, rtol=0)
    assert torch.equal(out[~chosen], images[~chosen])
    assert (out[chosen] - images[chosen]).abs().max() > 0.1  # the move changed them
    nothing = torch.zeros(6, dtype=torch.bool)
    assert on_chosen(images, nothing, move, angle, shift, zoom) is images and seen == [3]


def test_affine_params_follow_torchvisions_distribution():
    torch.manual_seed(0)
    n, degrees, translate, scale = 20000, 10.0, 0.1, (0.9, 1.1)
    ours = affine_params(n, 28, degrees, translate, scale)
    assert (ours["shift"] == ours["shift"].round()).all()
    reference = v2.RandomAffine(degrees, translate=(translate, translate), scale=scale)
    image = torch.zeros(1, 28, 28)
    theirs = [reference.make_params([image]) for _ in range(n)]
    grid = torch.linspace(0, 1.0, 201)
    for mine, their_values, low, high in (
        (ours["angle"], [p["angle"] for p in theirs], -degrees, degrees),
        (ours["shift"][:, 0], [p["translate"][0] for p in theirs], -3, 3),
        (ours["shift"][:, 1], [p["translate"][1] for p in theirs], -3, 3),
        (ours["zoom"], [p["scale"] for p in theirs], *scale),
    ):
        # Two-sample Kolmogorov-Smirnov distance, on values mapped to [0, 1].
        a = ((mine - low) / (high - low)).sort().values
        b = ((torch.tensor(their_values, dtype=torch.float32) - low) / (high - low)).sort().values
        cdf = lambda v: torch.searchsorted(v, grid, right=True) / n  # noqa: E731
        assert (cdf(a) - cdf(b)).abs().max() < 0.02


def _grey_cfg(compose, *extra):
    grey = ["data=synthetic", "data.image_size=16", "data.channels=1"]
    cfg = compose(grey)
    return with_values(cfg, "data.mean=[0.5]", "data.std=[0.25]", *extra)


def test_jitter_applies_brightness_and_contrast_in_a_random_order_per_image(compose):
    cfg = _grey_cfg(compose, "augment.color_jitter.p=1.0")
    aug = BatchAugment(cfg.augment, cfg.data)
    images = (torch.rand(64, 1, 16, 16) * 255).to(torch.uint8)
    torch.manual_seed(0)
    params = aug.draw(64, 16, 16)
    x = crop_resize_flip(images.float() / 255, params["box"], params["flip"], 16)
    b, c = params["brightness"], params["contrast"]
    brightness_first = adjust_contrast(adjust_brightness(x, b), c)
    contrast_first = adjust_brightness(adjust_contrast(x, c), b)
    out = aug.apply(images, params) * 0.25 + 0.5  # undo the normalisation
    rank = params["order"].argsort(dim=1)  # slot of each part: 0 brightness, 1 contrast
    first = rank[:, 0] < rank[:, 1]
    torch.testing.assert_close(out[first], brightness_first[first], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~first], contrast_first[~first], atol=1e-5, rtol=0)
    assert 10 < int(first.sum()) < 54  # both orders occur


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["augment.solarize_p=0.5"],
        ["augment.erase.p=0.5"],
        [
            "augment.affine.p=0.7",
            "augment.affine.degrees=20",
            "augment.affine.translate=0.1",
            "augment.affine.scale=[0.8,1.2]",
        ],
    ],
    ids=["v2", "solarize", "erase", "affine"],
)
def test_batched_views_match_the_per_image_pipeline_in_distribution(compose, extra):
    """The mean and spread of the views over many draws of one image agree with torchvision's
    per-image pipeline: same ops, same parameter distributions."""
    cfg = _grey_cfg(compose, "augment.crop_scale=[0.4,1.0]", *extra)
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    image[:, 4:12, 2:7] = 200  # an off-centre block: crops, flips and jitter all show
    image[:, 10:14, 9:15] = 90
    n = 6000  # the largest sampling error of a pixel's mean or std is about 0.06 here
    torch.manual_seed(0)
    batched = BatchAugment(cfg.augment, cfg.data).view(image.expand(n, 1, 16, 16))
    per_image = pretrain_transform(cfg.augment, cfg.data)
    reference = torch.stack([per_image(image) for _ in range(n)])
    torch.testing.assert_close(batched.mean(0), reference.mean(0), atol=0.12, rtol=0)
    torch.testing.assert_close(batched.std(0), reference.std(0), atol=0.12, rtol=0)
    # And the check has teeth: without the flip the mean image differs from torchvision's.
    unflipped = BatchAugment(with_values(cfg, "augment.flip_p=0.0").augment, cfg.data)
    far = unflipped.view(image.expand(n, 1, 16, 16)).mean(0)
    assert (far - reference.mean(0)).abs().max() > 0.5


def test_views_are_normalised_float_seeded_by_torch_and_differ(compose):
    cfg = compose(["data=synthetic", "data.image_size=16"])
    first, second = two_views(cfg.augment, cfg.data)
    assert first is second  # one recipe for both views
    images = (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)
    torch.manual_seed(3)
    q, k = first.view(images), second.view(images)
    assert q.shape == k.shape == (8, 3, 16, 16) and q.dtype == torch.float32
    assert not torch.allclose(q, k)
    assert q.min() < 0 < q.max()
    torch.manual_seed(3)
    q2, k2 = first.view(images), second.view(images)
    assert torch.equal(q, q2) and torch.equal(k, k2)


def test_solarize_equals_torchvision_on_every_8_bit_value():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)
    expected = TF.solarize(images, threshold=128).float() / 255
    torch.testing.assert_close(solarize(images.float() / 255), expected, atol=1e-6, rtol=0)
    assert not torch.equal(expected, images.float() / 255)  # the inversion happened at all


def test_v3_views_differ_as_moco_v3s_recipe_says(compose):
    """Blur always on the first view and with p=0.1 on the second, solarisation on the second
    only; everything else the same, in both ways of making views."""
    cfg = compose(["data=synthetic", "data.image_size=64", "augment=v3"])
    check_pretrain(cfg)
    first, second = view_recipes(cfg.augment)
    assert (first.blur.p, first.solarize_p, second.blur.p, second.solarize_p) == (1.0, 0, 0.1, 0.2)
    per_view = [f.name for f in dataclasses.fields(ViewConfig)]  # not name, batched, second_view
    rest = [{k: OmegaConf.to_container(r)[k] for k in per_view} for r in (first, second)]
    for recipe in rest:
        recipe["blur"].pop("p"), recipe.pop("solarize_p")
    assert rest[0] == rest[1]
    batched = two_views(cfg.augment, cfg.data)
    assert [(v.blur_p, v.solarize_p) for v in batched] == [(1.0, 0.0), (0.1, 0.2)]
    per_image = [list(pretrain_transform(r, cfg.data).transforms) for r in (first, second)]
    solarizers = [[op for op in ops if isinstance(op, v2.RandomSolarize)] for ops in per_image]
    assert solarizers[0] == [] and [op.p for op in solarizers[1]] == [0.2]
    blur_p = [[op.p for op in ops if isinstance(op, v2.RandomApply)][-1] for ops in per_image]
    assert blur_p == [1.0, 0.1]  # the last RandomApply of a view is its blur


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-image"])
def test_the_datamodule_makes_the_second_view_after_its_own_recipe(tiny_cfg, batched):
    cfg = tiny_cfg(f"augment.batched={str(batched).lower()}", "augment.second_view.solarize_p=1.0")
    dm = PretrainDataModule(cfg.data, cfg.augment)
    dm.setup("fit")
    if batched:
        assert [view.solarize_p for view in dm.batch_views] == [0.0, 1.0]
    else:
        views = dm.dataset.transform
        ops = [list(views.first.transforms), list(views.second.transforms)]
        solarizers = [[op.p for op in o if isinstance(op, v2.RandomSolarize)] for o in ops]
        assert solarizers == [[], [1.0]]


@pytest.mark.parametrize(
    "op,override",
    [
        ("solarize", "augment.solarize_p=0.5"),
        ("erase", "augment.erase.p=0.5"),
        ("affine", "augment.affine.p=0.5"),
    ],
)
def test_a_recipe_without_an_added_op_draws_what_it_drew_before(compose, op, override):
    """Solarisation's, erasing's and the affine move's draws are made only when a view uses
    them, so the random
    stream of the v1/v2 recipes, and with it every seeded run recorded before, stays as it was."""
    cfg = compose(["data=synthetic", "data.image_size=16"])
    torch.manual_seed(0)
    params = BatchAugment(cfg.augment, cfg.data).draw(4, 16, 16)
    after = torch.rand(1)
    assert op not in params
    using = BatchAugment(with_values(cfg, override).augment, cfg.data)
    torch.manual_seed(0)
    assert op in using.draw(4, 16, 16)
    assert not torch.equal(torch.rand(1), after)  # more draws: the check above can fail


def test_each_rank_takes_its_slice_of_the_global_batchs_parameters(compose):
    cfg = compose(["data=synthetic", "data.image_size=16"])
    aug = BatchAugment(cfg.augment, cfg.data)
    first, second = (torch.rand(2, 4, 3, 16, 16) * 255).to(torch.uint8)
    torch.manual_seed(5)
    whole = aug.view(torch.cat([first, second]))  # one process, global batch of 8
    torch.manual_seed(5)
    rank0 = aug.view(first, rank=0, world_size=2)
    torch.manual_seed(5)
    rank1 = aug.view(second, rank=1, world_size=2)
    torch.testing.assert_close(torch.cat([rank0, rank1]), whole)
    assert not torch.allclose(rank0, aug.view(second, rank=0, world_size=2))


def test_datamodule_picks_the_batched_way_for_in_memory_images_of_the_training_size(tiny_cfg):
    cfg = tiny_cfg("data.num_train=20")
    dm = PretrainDataModule(cfg.data, cfg.augment)
    dm.setup("fit")
    assert dm.batch_views is not None and dm.dataset.transform is None
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 8, 8)  # the workers do nothing
    (view_q, view_k), same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert view_q.shape == view_k.shape == (8, 3, 8, 8) and view_q.dtype == torch.float32
    assert same_labels is labels and not torch.allclose(view_q, view_k)

    per_image = PretrainDataModule(cfg.data, with_values(cfg, "augment.batched=false").augment)
    per_image.setup("fit")
    assert per_image.batch_views is None and per_image.dataset.transform is not None


def test_batched_true_on_images_of_another_size_is_a_config_error(tiny_cfg):
    cfg = with_values(tiny_cfg(), "augment.batched=true")
    loaded = PretrainDataModule(cfg.data, cfg.augment)
    loaded.setup("fit")
    assert loaded.batch_views is not None  # 8 px images, 8 px training size: fine
    other = with_values(cfg, "data.image_size=12")
    dm = PretrainDataModule(other.data, other.augment)
    dm.dataset = loaded.dataset  # 8 px images, 12 px training size
    with pytest.raises(ConfigError, match="augment.batched=true needs"):
        dm._batched()


def test_normalisation_of_the_wrong_length_is_the_same_config_error_as_per_image(compose):
    cfg = compose(["data=synthetic", "data.image_size=16"])
    wrong = with_values(cfg, "data.mean=[0.5,0.5]")  # 3 channels
    for build in (BatchAugment, pretrain_transform):
        with pytest.raises(ConfigError, match="data.mean and data.std need 3 values"):
            build(wrong.augment, wrong.data)


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_both_pipelines_apply_the_same_colour_operations(compose, channels):
    # Saturation, hue and grayscale act on RGB images only; both ways of making views must agree.
    cfg = compose(["data=synthetic", f"data.channels={channels}"])
    cfg = with_values(cfg, f"data.mean={[0.5] * channels}", f"data.std={[0.25] * channels}")
    batched = BatchAugment(cfg.augment, cfg.data)
    per_image = list(pretrain_transform(cfg.augment, cfg.data).transforms)
    jitter = next(op.transforms[0] for op in per_image if isinstance(op, v2.RandomApply))
    for part, strength in batched.strengths.items():
        assert (strength > 0) == (getattr(jitter, part) is not None), part
    grayscale = [op.p for op in per_image if isinstance(op, v2.RandomGrayscale)]
    assert grayscale == ([batched.grayscale_p] if channels == 3 else [])
    # What the rule is: brightness and contrast always; the rest on RGB only.
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast is not None
    rgb_only = (jitter.saturation, jitter.hue, batched.strengths["saturation"], grayscale)
    assert all(rgb_only) if channels == 3 else not any(rgb_only)
