"""Shared fixtures: composing the real Hydra config and building a tiny MoCo from it."""

from __future__ import annotations

import copy
import functools
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moco.errors import ConfigError
from moco.run.check import omegaconf_error_line
from moco.run.cli import hydra_error_line
from moco.run.config_store import register

# The tensors here are tiny, so a second thread buys nothing, and on a shared 2-core machine two
# threads per process oversubscribe the cores: a tiny MoCo step measured 10x slower with 2
# threads than with 1 while another job was running. An explicit OMP_NUM_THREADS still wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

CONF_DIR = (Path(__file__).resolve().parent.parent / "conf").resolve()
register()  # the schemas conf/ names, for every test that composes a config (as the scripts do)

# The smallest model that still exercises every piece: 8 px synthetic RGB images (small stem),
# batch 8 split into 2 SplitBatchNorm groups, a 64-key queue of 16-dim embeddings.
TINY_OVERRIDES = (
    "data=synthetic",
    "data.image_size=8",
    "data.batch_size=8",
    "data.num_train=64",
    "data.num_test=32",
    "model.bn_splits=2",
    "model.queue_size=64",
    "model.dim=16",
)


# A tiny real training run on the command line (tests that start scripts/pretrain.py).
TINY_RUN = (
    "data=synthetic",
    "data.num_train=96",
    "data.image_size=8",
    "data.batch_size=8",
    "data.num_workers=1",
    "model.bn_splits=2",
    "model.queue_size=40",
    "model.dim=16",
    "eval.enabled=false",
)
WORLD = 2  # processes of the two-rank tests


@contextmanager
def module_dir(tmp_path_factory, name: str) -> Iterator[Path]:
    """A directory for a module-scoped fixture, removed when the module is done. A test's own
    tmp_path goes when it passes (pyproject's tmp_path_retention_policy); this does the same for
    the runs a module shares, so the suite's ResNet checkpoints fit on a small disk."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_on_two_ranks(fn, out_dir: Path) -> list:
    """Run ``fn(rank)`` in 2 gloo processes; return what each returned."""
    import torch.multiprocessing as mp

    mp.spawn(_init_and_run, args=(fn, out_dir), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _init_and_run(rank: int, fn, out_dir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=WORLD
    )
    try:
        torch.save(fn(rank), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@functools.cache
def _composed(overrides: tuple[str, ...], config_name: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except ConfigCompositionException as exc:  # what the scripts report as one line
            raise ConfigError(hydra_error_line(exc)) from None


def compose_config(overrides: Sequence[str] = (), config_name: str = "pretrain") -> DictConfig:
    """The config the scripts would see for ``overrides`` (no Hydra runtime node).

    Composition costs ~0.2 s, so results are cached per override list; every call returns its
    own copy, free to modify.
    """
    return copy.deepcopy(_composed(tuple(overrides), config_name))


def with_values(cfg: DictConfig, *dotlist: str) -> DictConfig:
    """``cfg`` with ``key=value`` pairs merged in (values parsed as YAML, like Hydra does for
    plain values). A fast stand-in for composing again when only existing values change; a value
    the schema refuses is a ConfigError, as it is for the scripts."""
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotlist)))
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_error_line(exc)) from None


@pytest.fixture
def compose() -> Callable[..., DictConfig]:
    return compose_config


@pytest.fixture
def default_with() -> Callable[..., DictConfig]:
    """``default_with(*dotlist)``: the default ``pretrain`` config with some values changed."""
    return lambda *dotlist: with_values(compose_config(), *dotlist)


@pytest.fixture
def tiny_cfg() -> Callable[..., DictConfig]:
    """``tiny_cfg(*extra_overrides)``: the tiny pretraining config, extra overrides applied last."""

    def make(*extra: str) -> DictConfig:
        return compose_config([*TINY_OVERRIDES, *extra])

    return make


@pytest.fixture
def tiny_moco(tiny_cfg):
    """``tiny_moco(*extra_overrides) -> (model, cfg)``, built by ``hydra.utils.instantiate``."""

    def make(*extra: str):
        cfg = tiny_cfg(*extra)
        return hydra.utils.instantiate(cfg.model), cfg

    return make


def v3_hparams(**changes) -> dict:
    """Constructor arguments of a tiny MoCo v3 (16 px RGB, small stem)."""
    return (
        dict(
            backbone="resnet18",
            in_channels=3,
            image_size=16,
            dim=8,
            mlp_dim=16,
            momentum=0.99,
            momentum_schedule="cosine",
            temperature=1.0,
            sync_bn=True,
            channels_last=False,
            batch_size=4,
            lr_reference_batch=256,
            optimizer={"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
            scheduler={"name": "cosine"},
        )
        | changes
    )


def moco_hparams(**changes) -> dict:
    """Constructor arguments of a tiny MoCo built without Hydra (16 px RGB, small stem),
    ``changes`` applied."""
    return (
        dict(
            backbone="resnet18",
            in_channels=3,
            image_size=16,
            head="mlp",
            dim=8,
            queue_size=16,
            momentum=0.99,
            momentum_schedule="constant",
            temperature=0.2,
            bn_splits=2,
            shuffle_bn=True,
            symmetric=False,
            channels_last=False,
            batch_size=8,
            lr_reference_batch=256,
            optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
            scheduler={"name": "cosine"},
        )
        | changes
    )
