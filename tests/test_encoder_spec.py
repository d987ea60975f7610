"""One encoder spec: built by each module, saved in its checkpoints, read back by evaluation;
old checkpoints (the spec among the hyper-parameters) still read; an experiment names the spec
that checkpoint=random builds."""

import io

import hydra
import torch
from conftest import TINY_OVERRIDES, compose_config

import moco.run.hardware as hardware
from moco.checkpoint import encoder_spec, query_encoder
from moco.encoders import EncoderSpec
from moco.run.experiments import experiment_encoder_spec


def _checkpoint(model) -> dict:
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)  # as Lightning calls it
    return checkpoint


def test_a_checkpoint_from_typed_configs_holds_plain_values_only(tiny_moco):
    """Composed values are enum members (model.head, model.stem); a checkpoint read with
    weights_only=True must hold none of them."""
    model, cfg = tiny_moco()
    assert type(cfg.model.head) is not str  # the schema's enum reaches the constructor
    buffer = io.BytesIO()
    torch.save({k: v for k, v in _checkpoint(model).items() if k != "state_dict"}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["encoder_spec"] == model.encoder_spec.to_dict()
    assert type(loaded["hyper_parameters"]["head"]) is str
    assert type(loaded["encoder_spec"]["stem"]) is str


def test_the_spec_in_the_checkpoint_rebuilds_the_query_encoder(tiny_moco):
    model, cfg = tiny_moco()
    checkpoint = _checkpoint(model)
    assert encoder_spec(checkpoint) == model.encoder_spec
    model.eval()
    encoder = query_encoder(checkpoint, "in-memory").eval()
    images = torch.randn(4, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encoder_q(images))


def test_the_spec_wins_over_the_hyper_parameters_and_old_files_still_read(tiny_moco):
    model, _ = tiny_moco()
    checkpoint = _checkpoint(model)
    without_spec = {k: v for k, v in checkpoint.items() if k != "encoder_spec"}
    assert encoder_spec(without_spec) == model.encoder_spec  # a file from before the spec
    edited = {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "dim": 999}}
    assert encoder_spec(edited).dim == model.encoder_spec.dim


def test_the_supervised_reference_states_its_classifier_as_its_head():
    data = [o for o in TINY_OVERRIDES if o.startswith("data")]
    cfg = compose_config([*data, "+experiment=supervised"])
    model = hydra.utils.instantiate(cfg.model)
    assert model.encoder_spec.head == "linear"
    assert model.encoder_spec.dim == cfg.data.num_classes
    assert encoder_spec(_checkpoint(model)) == model.encoder_spec


def test_an_experiment_names_the_encoder_that_checkpoint_random_builds(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_kind", lambda: None)  # a CPU without AMX
    v2 = experiment_encoder_spec("moco_v2")
    assert (v2.backbone, v2.stem, v2.in_channels, v2.image_size) == ("resnet18", "imagenet", 1, 28)
    assert (v2.head, v2.dim) == ("mlp", 128)
    assert experiment_encoder_spec("moco_v1").head == "linear"
    assert experiment_encoder_spec("supervised") == EncoderSpec(
        "resnet18", "imagenet", 1, 28, "linear", 10, True
    )
    assert experiment_encoder_spec(None).stem == "auto"  # the group defaults
    assert experiment_encoder_spec("moco_v2_imagenet").backbone == "resnet50"
