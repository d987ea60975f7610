"""Small crops (augment.small_crops): extra queries of each image against its key, never keys."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moco.data.augment import small_crop_recipe
from moco.data.datamodule import PretrainDataModule
from moco.encoders import build_backbone, strided_block_inputs
from moco.errors import ConfigError
from moco.run.check import check_pretrain
from tests.test_momentum import images, perturb, reference_loss, shuffled_keys
from tests.test_pretrain_script import TINY_RUN, epoch_losses, run_pretrain

SMALL = ("augment.small_crops.count=2", "augment.small_crops.size=6")


def test_each_small_crop_is_a_query_against_its_images_key(tiny_moco):
    model, cfg = tiny_moco("model.momentum=0.9")
    model.train()
    t = cfg.model.temperature
    perturb(model.encoder_q, seed=0)
    queue_before = model.queue.keys.clone()
    view_q, view_k = images(1), images(2)
    crops = [images(3, size=4), images(4, size=4)]
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    loss = model.training_step(((view_q, view_k, *crops), torch.zeros(8, dtype=torch.long)), 0)

    # Only the key view's keys enter the queue: the small crops are queries alone.
    assert int(model.queue.ptr) == 8
    k = shuffled_keys(model.encoder_k, view_k, rng)
    torch.testing.assert_close(model.queue.keys[:8], k, atol=1e-5, rtol=1e-4)
    assert torch.equal(model.queue.keys[8:], queue_before[8:])

    # Every query weighs the same: (first view's loss + 2 x the crops' loss) / 3, where the two
    # crops of all images pass the query encoder together (one BatchNorm batch) against the
    # same image's key, repeated.
    main = reference_loss(F.normalize(model.encoder_q(view_q), dim=1), k, queue_before, t)
    q_crops = F.normalize(model.encoder_q(torch.cat(crops)), dim=1)
    of_crops = reference_loss(q_crops, k.repeat(2, 1), queue_before, t)
    torch.testing.assert_close(loss, (main + 2 * of_crops) / 3, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loss, main, atol=1e-3)  # the crops did count

    loss.backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_the_small_crops_follow_the_first_views_recipe_with_their_scale_and_no_erasing(tiny_cfg):
    cfg = tiny_cfg(*SMALL, "augment.small_crops.scale=[0.3,0.6]", "augment.erase.p=0.5")
    check_pretrain(cfg)
    recipe = OmegaConf.to_container(small_crop_recipe(cfg.augment))
    first = OmegaConf.to_container(cfg.augment)
    assert recipe["crop_scale"] == [0.3, 0.6] and recipe["erase"]["p"] == 0.0
    for key in ("crop_scale", "erase"):
        recipe.pop(key), first.pop(key)
    assert recipe == first


def test_the_datamodule_hands_over_both_views_then_the_small_crops(tiny_cfg):
    cfg = tiny_cfg(*SMALL)
    dm = PretrainDataModule(cfg.data, cfg.augment)
    dm.setup("fit")
    assert [view.size for view in dm.batch_views] == [8, 8, 6, 6]
    batch = next(iter(dm.train_dataloader()))
    views, labels = dm.on_after_batch_transfer(batch, 0)
    assert [tuple(v.shape) for v in views] == [(8, 3, 8, 8)] * 2 + [(8, 3, 6, 6)] * 2
    assert not torch.equal(views[2], views[3])  # each crop draws its own boxes
    assert labels.shape == (8,)


def test_small_crops_need_the_batched_views(tiny_cfg):
    cfg = tiny_cfg(*SMALL, "augment.batched=false")
    with pytest.raises(ConfigError, match="augment.small_crops.count=2 needs the batched views"):
        PretrainDataModule(cfg.data, cfg.augment).setup("fit")


@pytest.mark.parametrize("experiment", ["supervised", "moco_v3_fashion_mnist"])
def test_models_without_a_queue_refuse_small_crops(compose, experiment):
    cfg = compose([f"+experiment={experiment}", "augment.small_crops.count=2"])
    with pytest.raises(ConfigError, match="augment.small_crops.count=2 adds queries"):
        check_pretrain(cfg)


@pytest.mark.slow
def test_a_run_with_small_crops_trains_and_lowers_the_loss(tmp_path):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, *TINY_RUN, "augment.small_crops.count=2",
                          "augment.small_crops.size=8", "eval.enabled=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = epoch_losses(run_dir / "logs" / "metrics.csv")
    assert len(losses) == 2 and losses[1] < losses[0], losses


@pytest.mark.parametrize(
    ("stem", "size", "sides"),
    [("imagenet", 28, [7, 4, 2]), ("imagenet", 14, [4, 2, 1]), ("imagenet", 18, [5, 3, 2]),
     ("small_pool", 28, [14, 7, 4]), ("small", 8, [8, 4, 2]), ("late_pool", 28, [7, 4, 2])],
)  # fmt: skip
def test_the_maps_entering_the_strided_resnet_blocks(stem, size, sides):
    assert strided_block_inputs(stem, size) == sides
    net = build_backbone("resnet18", 3, size, stem=stem).eval()
    seen = []
    for layer in (net.layer2, net.layer3, net.layer4):
        layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-1]))
    net(torch.zeros(1, 3, size, size))
    assert seen == sides


@pytest.mark.parametrize("precision", ["bf16-mixed", "32"])
def test_small_crops_that_shrink_to_one_pixel_are_refused_in_bf16_on_a_cpu(compose, precision):
    # The ImageNet stem (moco_v2's on CPUs without AMX) leaves 1x1 maps before layer4 at 14 px.
    cfg = compose(["+experiment=moco_v2", "backbone.stem=imagenet", *SMALL[:1],
                   "augment.small_crops.size=14", f"trainer.precision={precision}",
                   "trainer.accelerator=cpu"])  # fmt: skip
    if precision == "32":
        check_pretrain(cfg)
        return
    with pytest.raises(ConfigError, match=r"size=14 px leaves 1x1 maps.*size=17 or more"):
        check_pretrain(cfg)
