"""backbone.final_relu=false: the last residual block returns its sum before the ReLU, and every
path that rebuilds an encoder (checkpoint, evaluation, export, torchvision) keeps it that way."""

import pytest
import torch
from torch import nn

from moco.checkpoint import encoder_spec
from moco.encoders import EncoderSpec, build_backbone
from moco.final_relu import BasicBlockNoFinalReLU, BottleneckNoFinalReLU, has_final_relu
from moco.weights import read_weights


def _pair(name: str, **geometry) -> tuple[nn.Module, nn.Module]:
    """The same weights with and without the final ReLU, in eval mode."""
    torch.manual_seed(0)
    stock = build_backbone(name, **geometry)
    signed = build_backbone(name, **geometry, final_relu=False)
    signed.load_state_dict(stock.state_dict())  # same names: the weights carry over as they are
    return stock.eval(), signed.eval()


@pytest.mark.parametrize(
    "name, block", [("resnet18", BasicBlockNoFinalReLU), ("resnet50", BottleneckNoFinalReLU)]
)
def test_the_last_block_returns_the_sum_the_stock_block_puts_through_relu(name, block):
    stock, signed = _pair(name, in_channels=3, image_size=16)
    assert type(signed.layer4[-1]) is block and not has_final_relu(signed) and has_final_relu(stock)
    # Every other block is torchvision's own.
    others = [b for layer in (signed.layer1, signed.layer2, signed.layer3) for b in layer]
    assert all(type(b) is type(stock.layer1[0]) for b in [*others, *signed.layer4[:-1]])
    torch.manual_seed(1)
    maps = torch.randn(2, stock.layer4[-1].conv1.in_channels, 2, 2)
    with torch.no_grad():
        before_relu = signed.layer4[-1](maps)
        torch.testing.assert_close(torch.relu(before_relu), stock.layer4[-1](maps))
    assert (before_relu < 0).any()


def test_pooled_features_are_signed_and_a_relu_of_them_is_the_stock_backbone():
    # The ImageNet stem at 28 px leaves 1x1 maps in layer4, so pooling is the identity and the
    # stock features are exactly the ReLU of the signed ones.
    stock, signed = _pair("resnet18", in_channels=1, image_size=28, stem="imagenet")
    images = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        features = signed(images)
        torch.testing.assert_close(torch.relu(features), stock(images))
    assert (features < 0).float().mean() > 0.1


def test_the_setting_reaches_both_encoders_and_the_checkpoints_reader(tiny_moco, tmp_path):
    model, cfg = tiny_moco("backbone.final_relu=false")
    assert model.encoder_spec.final_relu is False
    assert not has_final_relu(model.encoder_q.backbone)
    assert not has_final_relu(model.encoder_k.backbone)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert encoder_spec(checkpoint).final_relu is False
    path = tmp_path / "run.ckpt"
    torch.save(checkpoint, path)
    weights = read_weights(path)
    assert weights.final_relu is False
    encoder = weights.encoder().eval()
    size, channels = cfg.data.image_size, cfg.data.channels
    images = torch.randn(4, channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.backbone(images), model.encoder_q.eval().backbone(images)
        )


def test_files_from_before_the_setting_keep_torchvisions_relu(tiny_moco):
    model, _ = tiny_moco()
    values = model.encoder_spec.to_dict()
    del values["final_relu"]
    assert EncoderSpec.from_dict(values).final_relu is True
    assert model.encoder_spec.final_relu is True and has_final_relu(model.encoder_q.backbone)
