"""The composed Hydra configs, check_pretrain and resolve_precision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR
from omegaconf import DictConfig, OmegaConf

import moco.run.hardware as hardware
from moco.errors import ConfigError
from moco.run.check import check_pretrain
from moco.run.schema import ViewChanges, ViewConfig


# ------------------------------------------------------------------------ composed experiments
def test_default_config_is_valid_and_has_every_documented_key(compose):
    cfg = compose()
    check_pretrain(cfg)
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


def test_without_an_experiment_the_group_defaults_are_moco_v2_as_in_the_paper(compose):
    cfg = compose()
    assert cfg.model.head == "mlp" and cfg.model.temperature == pytest.approx(0.2)
    assert cfg.augment.name == "v2" and list(cfg.augment.crop_scale) == [0.2, 1.0]
    assert cfg.scheduler.name == "cosine" and cfg.model.stem == "auto"
    assert cfg.data.batch_size == 256 and cfg.model.bn_splits == 8


def test_moco_v2_experiment(compose):
    cfg = compose(["+experiment=moco_v2"])  # the headline command: tuned for Fashion-MNIST
    assert cfg.model.head == "mlp"
    assert cfg.model.temperature == pytest.approx(0.1)
    assert cfg.augment.name == "v2"
    assert cfg.scheduler.name == "cosine" and cfg.model.scheduler.name == "cosine"
    assert cfg.data.name == "fashion_mnist" and cfg.data.image_size == 28
    check_pretrain(cfg)


def test_moco_v1_experiment(compose):
    cfg = compose(["+experiment=moco_v1"])
    assert cfg.model.head == "linear"
    assert cfg.model.temperature == pytest.approx(0.07)
    assert cfg.augment.name == "v1"
    assert cfg.scheduler.name == "step" and list(cfg.scheduler.milestones) == [0.6, 0.8]
    assert cfg.model.scheduler.name == "step"
    check_pretrain(cfg)


def test_moco_v2_imagenet_experiment_needs_data_root(compose):
    cfg = compose(["+experiment=moco_v2_imagenet"])
    assert cfg.model.backbone == "resnet50"
    assert cfg.model.queue_size == 65536
    assert cfg.model.momentum == pytest.approx(0.999)
    assert cfg.trainer.max_epochs == 200
    assert cfg.model.head == "mlp" and cfg.model.temperature == pytest.approx(0.2)  # the paper's
    assert cfg.data.name == "imagefolder" and cfg.data.image_size == 224
    assert OmegaConf.is_missing(cfg.data, "root")
    with pytest.raises(ConfigError, match=r"data\.root") as info:
        check_pretrain(cfg)
    assert "\n" not in str(info.value)
    check_pretrain(compose(["+experiment=moco_v2_imagenet", "data.root=/somewhere"]))


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


def assert_rejected(make_cfg, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:  # by the schema while merging, or by the check
        check_pretrain(make_cfg())
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
        (["backbone.stem=tiny"], ["backbone.stem=tiny"]),
        (["model.momentum_schedule=linear"], ["model.momentum_schedule"]),
        (["augment.batched=sometimes"], ["augment.batched='sometimes'", "auto, true or false"]),
        (["augment.solarize_p=1.5"], ["augment.solarize_p=1.5", "[0, 1]"]),
        (["augment.erase.p=2"], ["augment.erase.p=2", "[0, 1]"]),
        (["augment.erase.scale=[0.3,0.1]"], ["augment.erase.scale", "low <= high"]),
        (["augment.erase.scale=[0.1,1.5]"], ["augment.erase.scale=[0.1, 1.5]", "high <= 1"]),
        (["augment.affine.scale=[0.9]"], ["augment.affine.scale=[0.9]", "[low, high]"]),
        (["augment.second_view.erase.ratio=[0,1]"], ["augment.second_view.erase.ratio"]),
        (["augment.affine.p=1.5"], ["augment.affine.p=1.5", "[0, 1]"]),
        (["augment.affine.degrees=-5"], ["augment.affine.degrees=-5", "[0, 180]"]),
        (["augment.affine.translate=2"], ["augment.affine.translate=2", "[0, 1]"]),
        (["augment.second_view.affine.scale=[1.2,0.9]"], ["augment.second_view.affine.scale"]),
        (["augment.second_view=0.2"], ["ViewChanges", "0.2"]),
        (["augment.second_view={batched: false}"], ["augment.second_view.batched"]),
        (["augment.second_view={blur: {size: 3}}"], ["augment.second_view.blur.size"]),
        (["augment.second_view.solarize_p=abc"], ["augment.second_view.solarize_p"]),
        (["augment.second_view={blur: {p: -0.1}}"], ["augment.second_view.blur.p=-0.1"]),
        (["augment.small_crops.count=-1"], ["augment.small_crops.count=-1", ">= 0"]),
        (["augment.small_crops.size=0"], ["augment.small_crops.size=0", ">= 1"]),
        (["augment.small_crops.scale=[0.5,0.2]"], ["augment.small_crops.scale", "low <= high"]),
        (["scheduler.name=poly"], ["scheduler.name"]),
        (["data.batch_size=0"], ["data.batch_size"]),
        (["optimizer.lr=0"], ["optimizer.lr"]),
        (["trainer.max_epochs=0", "trainer.max_steps=-1"], ["max_epochs"]),
    ],
)
def test_invalid_values_are_rejected_with_one_line(default_with, overrides, fragments):
    assert_rejected(lambda: default_with(*overrides), *fragments)


def test_the_second_view_can_set_every_value_of_a_view_and_nothing_else():
    def names(cls) -> set:
        return set(_flat(OmegaConf.to_container(OmegaConf.structured(cls))))

    assert names(ViewChanges) == names(ViewConfig)


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
        ["augment.second_view={flip_p: 0.0}"],
        ["augment.second_view.solarize_p=0.3"],
        ["augment.small_crops.count=2", "augment.small_crops.scale=[1.0,1.0]"],
        ["trainer.max_epochs=-1", "trainer.max_steps=100"],
    ],
)
def test_edge_values_that_are_valid_pass(default_with, overrides):
    check_pretrain(default_with(*overrides))


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


@pytest.mark.parametrize(
    "kind,expected", [("amx", "bf16-mixed"), ("avx512_bf16", "bf16-mixed"), (None, "32-true")]
)
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_auto_precision_on_cpu_follows_bf16_support(monkeypatch, kind, expected, accelerator):
    monkeypatch.setattr(hardware, "cpu_bf16_kind", lambda: kind)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_precision("auto", accelerator) == expected


def test_auto_precision_on_this_machine_is_consistent():
    expected = "bf16-mixed" if hardware.cpu_has_fast_bf16() else "32-true"
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.cpu_bf16_kind() in ("amx", "avx512_bf16", None)


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert hardware.resolve_precision("auto", "gpu") == expected


def test_null_max_epochs_with_max_steps_is_handled(default_with):
    check_pretrain(default_with("trainer.max_epochs=null", "trainer.max_steps=100"))


FASHION_MNIST_EXPERIMENTS = ("moco_v1", "moco_v2", "supervised")
# Every experiment on the Fashion-MNIST recipe (v3's came after the typed configs).
ON_THE_RECIPE = (*FASHION_MNIST_EXPERIMENTS, "moco_v3_fashion_mnist")
# Recipe values an experiment sets for itself, in its own file: a v3 step costs twice a v2 step,
# so fewer epochs fill the hour (docs/results.md).
# MoCo v2's crops were tuned again for itself, and its stem per machine (docs/results.md).
OWN_VALUES = {
    "moco_v3_fashion_mnist": {"trainer.max_epochs": 4},
    "moco_v2": {
        "augment.crop_scale": [0.85, 1.0],
        "backbone.stem": hardware.stem_for_machine("auto"),
    },
}


@pytest.mark.parametrize("experiment", ON_THE_RECIPE)
def test_fashion_mnist_experiments_apply_the_recipe_after_the_method(compose, experiment):
    recipe = OmegaConf.load(CONF_DIR / "recipe" / "fashion_mnist.yaml")
    tuned = compose([f"+experiment={experiment}"])
    leaves = [
        f"{group}.{key}" if isinstance(values, DictConfig) else group
        for group, values in recipe.items()
        for key in (values if isinstance(values, DictConfig) else [None])
    ]
    assert len(leaves) >= 6 and "time_budget_minutes" in leaves
    own = OWN_VALUES.get(experiment, {})
    assert set(own) <= set(leaves)
    for key in leaves:
        expected = own[key] if key in own else OmegaConf.select(recipe, key)
        assert OmegaConf.select(tuned, key) == expected, key
    # What the model is built from follows (interpolations of the groups above).
    assert tuned.model.stem == tuned.backbone.stem
    assert tuned.model.batch_size == recipe.data.batch_size
    # A command-line value still wins over the recipe.
    assert compose([f"+experiment={experiment}", "backbone.stem=small"]).model.stem == "small"
    # The recipe names no hardware choice: precision stays the hardware's.
    assert tuned.trainer.precision == "auto" and "precision" not in recipe.get("trainer", {})


def test_the_recipe_is_listed_by_the_experiments_not_picked_by_the_data_name(compose):
    for name in ON_THE_RECIPE:
        text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert "/recipe/fashion_mnist" in text, name
    defaults = OmegaConf.load(CONF_DIR / "pretrain.yaml").defaults
    assert not any("recipe" in str(entry) for entry in defaults)
    imagenet = compose(["+experiment=moco_v2_imagenet"])
    assert imagenet.model.temperature == 0.2 and imagenet.data.batch_size == 256
    assert list(imagenet.augment.crop_scale) == [0.2, 1.0]  # no Fashion-MNIST values
    assert compose().model.stem == "auto"  # nor in the group defaults


def test_cfg_job_shows_values_not_resolver_expressions():
    """The model section that `--cfg job` prints holds plain values or references to other
    groups (${backbone.name}), no resolver call such as ${oc.select:...}."""
    result = subprocess.run(
        [sys.executable, str(CONF_DIR.parent / "scripts" / "pretrain.py"), "+experiment=moco_v2",
         "--cfg", "job"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    model = result.stdout.split("\nmodel:\n")[1].split("\noptimizer:")[0]
    assert "temperature: 0.1" in model
    assert "oc.select" not in result.stdout and "method_tuning" not in result.stdout


# Values that reached the model, data, views, optimizer, schedule and trainer of each experiment
# before the configs were typed (composed then, stored in tests/data). Each difference since is
# intended and listed here.
BEFORE = json.loads(
    (Path(__file__).parent / "data" / "experiments_before_typed_configs.json").read_text()
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_FINAL_RELU_KEYS = ("backbone.final_relu", "model.final_relu")

INTENDED = {
    # The recipe no longer sets a hardware choice: auto resolves it (next test).
    **{(name, "trainer.precision"): ("32", "auto") for name in FASHION_MNIST_EXPERIMENTS},
    # Recipe values added later, at defaults that change nothing (MoCo v3's views).
    **{(name, "augment.solarize_p"): ("<absent>", "0.0") for name in BEFORE},
    # Random erasing, added later, off.
    **{(name, "augment.erase.p"): ("<absent>", "0.0") for name in BEFORE},
    **{(name, "augment.erase.scale"): ("<absent>", "[0.02, 0.33]") for name in BEFORE},
    **{(name, "augment.erase.ratio"): ("<absent>", "[0.3, 3.3]") for name in BEFORE},
    # Small affine moves, added later, off.
    **{(name, "augment.affine.p"): ("<absent>", "0.0") for name in BEFORE},
    **{(name, "augment.affine.degrees"): ("<absent>", "0.0") for name in BEFORE},
    **{(name, "augment.affine.translate"): ("<absent>", "0.0") for name in BEFORE},
    **{(name, "augment.affine.scale"): ("<absent>", "[1.0, 1.0]") for name in BEFORE},
    # Small crops, added later, none.
    **{(name, "augment.small_crops.count"): ("<absent>", "0") for name in BEFORE},
    **{(name, "augment.small_crops.size"): ("<absent>", "18") for name in BEFORE},
    **{(name, "augment.small_crops.scale"): ("<absent>", "[0.2, 0.5]") for name in BEFORE},
    # Positives from the queue's nearest neighbours, added later, off (the v1/v2 model config).
    **{
        (name, "model.neighbour_weight"): ("<absent>", "0.0")
        for name in BEFORE
        if "model" in BEFORE[name] and "queue_size" in BEFORE[name]["model"]
    },
    # The last block's final ReLU, made optional later, kept (torchvision's ResNet).
    **{
        (name, key): ("<absent>", str(name != "moco_v2"))
        for name in BEFORE
        for key in _FINAL_RELU_KEYS
    },  # MoCo v2 on Fashion-MNIST drops it (docs/results.md, twenty-third round)
    # MoCo v2 tuned again (docs/results.md): 4x the lr with a warm-up epoch, mild crops with
    # erasing, 10x the paper's weight decay.
    ("moco_v2", "augment.crop_scale"): ("[0.4, 1.0]", "[0.85, 1.0]"),
    ("moco_v2", "augment.erase.p"): ("<absent>", "0.5"),
    ("moco_v2", "optimizer.lr"): ("0.03", "0.12"),
    ("moco_v2", "scheduler.warmup_epochs"): ("0", "1.0"),
    ("moco_v2", "model.optimizer.lr"): ("0.03", "0.12"),
    ("moco_v2", "model.scheduler.warmup_epochs"): ("0", "1.0"),
    ("moco_v2", "optimizer.weight_decay"): ("0.0001", "0.001"),
    ("moco_v2", "model.optimizer.weight_decay"): ("0.0001", "0.001"),
    # The recipe's time budget plans the epochs that fit the hour; max_epochs is the most it may.
    **{(name, "trainer.max_epochs"): ("20", "60") for name in FASHION_MNIST_EXPERIMENTS},
    **{
        (name, f"augment.second_view.{key}"): ("<absent>", "None")
        for name in BEFORE
        for key in _flat(OmegaConf.to_container(OmegaConf.structured(ViewChanges)))
    },
    # The supervised reference has its own model config, without MoCo's keys.
    **{
        ("supervised", f"model.{key}"): "removed"
        for key in (
            "head",
            "dim",
            "queue_size",
            "momentum",
            "momentum_schedule",
            "temperature",
            "bn_splits",
            "shuffle_bn",
            "symmetric",
        )
    },  # fmt: skip
}


@pytest.mark.parametrize("experiment", sorted(BEFORE))
def test_experiments_compose_the_values_they_did_before_typed_configs(
    monkeypatch, compose, experiment
):
    monkeypatch.setattr(hardware, "cpu_bf16_kind", lambda: None)  # the CPU they were recorded on
    extra = ["data.root=/data/imagenet"] if experiment == "moco_v2_imagenet" else []
    cfg = OmegaConf.to_container(
        compose([f"+experiment={experiment}", *extra]), resolve=True, enum_to_str=True
    )
    after = _flat({group: cfg[group] for group in BEFORE[experiment]})
    before = _flat(BEFORE[experiment])
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key, "<absent>"), after.get(key, "<absent>")
        intended = INTENDED.get((experiment, key))
        if intended == "removed":
            assert now == "<absent>", key
        elif intended is not None:
            assert (str(was), str(now)) == intended, key
        else:
            assert now == was, (key, was, now)


@pytest.mark.parametrize(
    "kind,expected", [("amx", "bf16-mixed"), ("avx512_bf16", "bf16-mixed"), (None, "32-true")]
)
@pytest.mark.parametrize("stem", ["imagenet", "small_pool"])
def test_auto_precision_of_the_fashion_mnist_recipe_is_bf16_wherever_the_cpu_has_it(
    monkeypatch, kind, expected, stem, compose
):
    """Every stem at 28 px, the ImageNet stem's 2x2 and 1x1 maps included, ran faster in bf16
    than in fp32 on CPUs with AMX or AVX512-BF16 (docs/speed.md)."""
    monkeypatch.setattr(hardware, "cpu_bf16_kind", lambda: kind)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    cfg = compose(["+experiment=moco_v1", f"backbone.stem={stem}"])
    assert (cfg.model.stem, cfg.model.image_size) == (stem, 28)
    assert hardware.precision_for(cfg) == expected


@pytest.mark.parametrize(
    "kind,accelerator,stem,precision",
    [
        ("amx", "auto", "small_pool", "bf16-mixed"),
        ("amx", "cpu", "small_pool", "bf16-mixed"),
        ("amx", "gpu", "imagenet", None),  # never measured against each other on a GPU
        ("avx512_bf16", "auto", "imagenet", "bf16-mixed"),
        (None, "auto", "imagenet", "32-true"),
    ],
)
def test_moco_v2_takes_the_stem_that_learned_most_in_the_hour_on_its_machine(
    monkeypatch, compose, kind, accelerator, stem, precision
):
    """small_pool where AMX runs it in bf16 at half the ImageNet stem's speed; the recipe's
    ImageNet stem elsewhere (docs/results.md). The other experiments keep the recipe's stem."""
    monkeypatch.setattr(hardware, "cpu_bf16_kind", lambda: kind)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    cfg = compose(["+experiment=moco_v2", f"trainer.accelerator={accelerator}"])
    assert (cfg.backbone.stem, cfg.model.stem) == (stem, stem)
    if precision is not None:
        assert hardware.precision_for(cfg) == precision
    assert compose(["+experiment=moco_v1", f"trainer.accelerator={accelerator}"]).model.stem == (
        "imagenet"
    )


def test_pretraining_sets_the_allocator(compose):
    assert compose().malloc == "no-mmap"


def test_a_tuned_experiment_on_another_data_set_is_refused(compose):
    """The recipe's values were tuned for Fashion-MNIST: on CIFAR-10 they would apply silently."""
    with pytest.raises(ConfigError, match="tuned for data=fashion_mnist.*not data=cifar10"):
        check_pretrain(compose(["+experiment=moco_v2", "data=cifar10"]))
    check_pretrain(compose(["data=cifar10"]))  # the untuned group defaults run anywhere
