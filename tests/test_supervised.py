"""The supervised reference (+experiment=supervised): a labelled baseline the eval scripts read."""

import hydra
import pytest
import torch
from conftest import TINY_OVERRIDES, compose_config

from moco.batchnorm import SplitBatchNorm
from moco.checkpoint import query_encoder
from moco.errors import ConfigError
from moco.supervised import SupervisedReference


def _reference(tiny_cfg, *extra):
    data_only = [o for o in TINY_OVERRIDES if o.startswith("data")]
    cfg = compose_config([*data_only, "+experiment=supervised", *extra])
    return hydra.utils.instantiate(cfg.model), cfg


def test_experiment_builds_the_reference_with_plain_batchnorm(tiny_cfg):
    model, cfg = _reference(tiny_cfg)
    assert isinstance(model, SupervisedReference)
    # Its own model config: none of MoCo's keys, so none is validated or silently ignored.
    assert not {"bn_splits", "queue_size", "temperature", "head", "dim"} & set(cfg.model)
    with pytest.raises(ConfigError, match="model.bn_splits is not a key"):
        compose_config(["+experiment=supervised", "model.bn_splits=2"])
    assert not any(isinstance(m, SplitBatchNorm) for m in model.modules())
    assert model.encoder_q.head.out_features == cfg.data.num_classes


def test_checkpoint_reads_back_as_the_same_encoder(tiny_cfg):
    model, cfg = _reference(tiny_cfg)
    model.eval()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)  # adds the encoder spec, as Lightning calls it
    encoder = query_encoder(checkpoint, "in-memory").eval()
    images = torch.randn(4, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encoder_q(images))
        torch.testing.assert_close(encoder.backbone(images), model.encoder_q.backbone(images))


def test_training_steps_learn_the_labels(tiny_cfg):
    torch.manual_seed(0)
    model, cfg = _reference(tiny_cfg)
    c, s = cfg.data.channels, cfg.data.image_size
    # Two classes a network can tell apart: bright and dark images, with noise.
    labels = torch.arange(16) % 2
    images = torch.randn(16, c, s, s) * 0.3 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.update({name: float(value)})  # no Trainer
    losses = []
    for step in range(15):
        loss = model.training_step(((images, images), labels), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert logged["train/loss"] == losses[-1]
    assert logged["train/top1"] == 1.0  # the batch's accuracy at the last step
