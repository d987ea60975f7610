"""The composed Hydra configs, validate_pretrain and resolve_precision."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR
from omegaconf import OmegaConf

import moco.hardware as hardware
from moco.config import validate_pretrain
from moco.errors import ConfigError


# ------------------------------------------------------------------------ composed experiments
def test_default_config_is_valid_and_has_every_documented_key(compose):
    cfg = compose()
    validate_pretrain(cfg)
    for key in (
        "model.queue_size",
        "model.momentum",
        "model.temperature",
        "model.dim",
        "model.bn_splits",
        "data.root",
        "data.batch_size",
        "data.num_workers",
        "trainer.max_epochs",
        "trainer.max_steps",
        "trainer.precision",
        "trainer.accelerator",
        "trainer.devices",
        "seed",
    ):
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
    # Interpolations resolve: the model is built for the data it will see.
    assert cfg.model.in_channels == cfg.data.channels
    assert cfg.model.image_size == cfg.data.image_size
    assert cfg.model.batch_size == cfg.data.batch_size
    assert cfg.model.backbone == "resnet18"
    assert cfg.model.optimizer.lr == cfg.optimizer.lr
    assert cfg.model.scheduler.name == cfg.scheduler.name


def test_moco_v2_experiment(compose):
    cfg = compose(["+experiment=moco_v2", "recipe=none"])  # the paper's values
    assert cfg.model.head == "mlp"
    assert cfg.model.temperature == pytest.approx(0.2)
    assert cfg.augment.name == "v2"
    assert cfg.scheduler.name == "cosine" and cfg.model.scheduler.name == "cosine"
    assert cfg.data.name == "fashion_mnist" and cfg.data.image_size == 28
    validate_pretrain(cfg)


def test_moco_v1_experiment(compose):
    cfg = compose(["+experiment=moco_v1", "recipe=none"])
    assert cfg.model.head == "linear"
    assert cfg.model.temperature == pytest.approx(0.07)
    assert cfg.augment.name == "v1"
    assert cfg.scheduler.name == "step" and list(cfg.scheduler.milestones) == [0.6, 0.8]
    assert cfg.model.scheduler.name == "step"
    validate_pretrain(cfg)


def test_moco_v2_imagenet_experiment_needs_data_root(compose):
    cfg = compose(["+experiment=moco_v2_imagenet"])
    assert cfg.model.backbone == "resnet50"
    assert cfg.model.queue_size == 65536
    assert cfg.model.momentum == pytest.approx(0.999)
    assert cfg.trainer.max_epochs == 200
    assert cfg.model.head == "mlp" and cfg.model.temperature == pytest.approx(0.2)  # from moco_v2
    assert cfg.data.name == "imagefolder" and cfg.data.image_size == 224
    assert OmegaConf.is_missing(cfg.data, "root")
    with pytest.raises(ConfigError, match=r"data\.root") as info:
        validate_pretrain(cfg)
    assert "\n" not in str(info.value)
    validate_pretrain(compose(["+experiment=moco_v2_imagenet", "data.root=/somewhere"]))


# ----------------------------------------------------------------------------- validation
def test_overrides_through_hydra_and_through_merge_agree(compose, default_with):
    """The validation tests below change values by merging into the composed default (fast);
    check once that this gives the same config as composing with the overrides."""
    overrides = [
        "model.queue_size=63",
        "model.symmetric=true",
        "trainer.precision=17",
        "trainer.max_epochs=null",
    ]
    assert compose(overrides) == default_with(*overrides)


def assert_rejected(cfg, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate_pretrain(cfg)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["data.batch_size=64", "model.queue_size=63", "model.bn_splits=8"], ["model.queue_size"]),
        (
            [
                "data.batch_size=64",
                "model.queue_size=127",
                "model.symmetric=true",
                "model.bn_splits=8",
            ],
            ["model.queue_size", "symmetric"],
        ),
        (
            [
                "data.batch_size=64",
                "model.queue_size=100",
                "trainer.devices=2",
                "model.bn_splits=8",
            ],
            ["model.queue_size", "128"],
        ),
        (["model.temperature=0"], ["model.temperature"]),
        (["model.temperature=-0.1"], ["model.temperature"]),
        (["model.momentum=1.0"], ["model.momentum"]),
        (["model.momentum=-0.1"], ["model.momentum"]),
        (["data.batch_size=64", "model.bn_splits=6"], ["model.bn_splits", "data.batch_size"]),
        (["data.batch_size=8", "model.bn_splits=8"], ["model.bn_splits"]),  # 1 sample per split
        (["trainer.precision=17"], ["trainer.precision"]),
        (["trainer.precision=fp8"], ["trainer.precision"]),
        (["model.head=deep"], ["model.head"]),
        (["model.stem=tiny"], ["backbone.stem=tiny"]),
        (["model.momentum_schedule=linear"], ["model.momentum_schedule"]),
        (["augment.batched=sometimes"], ["augment.batched='sometimes'", "auto, true or false"]),
        (["scheduler.name=poly"], ["scheduler.name"]),
        (["data.batch_size=0"], ["data.batch_size"]),
        (["optimizer.lr=0"], ["optimizer.lr"]),
        (["trainer.max_epochs=0", "trainer.max_steps=-1"], ["max_epochs"]),
    ],
)
def test_invalid_values_are_rejected_with_one_line(default_with, overrides, fragments):
    assert_rejected(default_with(*overrides), *fragments)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.batch_size=64", "model.queue_size=64", "model.bn_splits=8"],
        ["data.batch_size=64", "model.queue_size=128", "model.symmetric=true", "model.bn_splits=8"],
        ["model.momentum=0", "model.temperature=0.01"],
        ["model.bn_splits=1"],
        ["trainer.precision=bf16-mixed"],
        ["trainer.precision=32"],
        ["augment.batched=false"],
        ["augment.batched=true"],
        ["trainer.max_epochs=-1", "trainer.max_steps=100"],
    ],
)
def test_edge_values_that_are_valid_pass(default_with, overrides):
    validate_pretrain(default_with(*overrides))


# ------------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    "value,expected",
    [
        ("32-true", "32-true"),
        ("bf16-mixed", "bf16-mixed"),
        ("16-mixed", "16-mixed"),
        (32, "32"),
        ("64", "64"),
    ],
)
@pytest.mark.parametrize("accelerator", ["cpu", "gpu", "auto"])
def test_explicit_precision_passes_through(value, expected, accelerator):
    assert hardware.resolve_precision(value, accelerator) == expected


@pytest.mark.parametrize("fast_bf16,expected", [(True, "bf16-mixed"), (False, "32-true")])
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_auto_precision_on_cpu_follows_bf16_support(monkeypatch, fast_bf16, expected, accelerator):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_precision("auto", accelerator) == expected


def test_auto_precision_on_this_machine_is_consistent():
    expected = "bf16-mixed" if hardware.cpu_has_fast_bf16() else "32-true"
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert isinstance(hardware.cpu_has_fast_bf16(), bool)


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert hardware.resolve_precision("auto", "gpu") == expected


def test_null_max_epochs_with_max_steps_is_handled(default_with):
    validate_pretrain(default_with("trainer.max_epochs=null", "trainer.max_steps=100"))


def test_fashion_mnist_recipe_applies_to_fashion_mnist_only(compose):
    recipe = OmegaConf.load(CONF_DIR / "recipe" / "fashion_mnist.yaml")
    tuned = compose(["+experiment=moco_v2"])
    leaves = [f"{group}.{key}" for group, values in recipe.items() for key in values]
    assert len(leaves) >= 4
    for key in leaves:
        assert OmegaConf.select(tuned, key) == OmegaConf.select(recipe, key), key
    # What the model is built from follows (interpolations of the groups above).
    assert tuned.model.stem == recipe.backbone.stem
    assert tuned.model.batch_size == recipe.data.batch_size
    assert tuned.model.head == "mlp"  # the method stays v2, with the recipe's temperature
    assert tuned.model.temperature == recipe.method_tuning.moco_v2.temperature != 0.2
    assert compose(["+experiment=moco_v1"]).model.temperature == 0.07  # tuned for v2 only
    assert compose(["+experiment=moco_v2", "recipe=none"]).model.temperature == 0.2
    assert compose(["+experiment=moco_v2_imagenet"]).model.temperature == 0.2  # no recipe there
    assert compose(["+experiment=moco_v2", "model.temperature=0.3"]).model.temperature == 0.3
    assert compose(["+experiment=moco_v2", "data=cifar10"]).model.stem == "auto"
    plain = compose(["+experiment=moco_v2", "recipe=none"])
    assert plain.model.stem == "auto" and list(plain.augment.crop_scale) == [0.2, 1.0]
    # A command-line value still wins over the recipe.
    assert compose(["+experiment=moco_v2", "backbone.stem=small"]).model.stem == "small"


def test_pretraining_sets_the_allocator(compose):
    assert compose().malloc == "no-mmap"
