"""scripts/export.py: plain torchvision loads the query backbone and computes the same features."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from moco.encoders import build_backbone
from moco.errors import ConfigError, DataError
from moco.run.export import FORMATS, backbone_state_dict, export_backbone

ROOT = Path(__file__).resolve().parents[1]
# (image size, channels, backbone.stem): 8 px grey gets the small-image stem, 65 px RGB (just
# above SMALL_IMAGE_MAX_SIZE) the stock ImageNet stem; small_pool keeps torchvision's max-pool.
STEMS = {"small": (8, 1, "auto"), "small_pool": (8, 3, "small_pool"), "standard": (65, 3, "auto")}


def save_checkpoint(model, path: Path) -> Path:
    """What Lightning's ModelCheckpoint keeps of a MoCo run, as far as the export reads it."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "epoch": 1,
            "global_step": 2,
        },
        path,
    )
    return path


@pytest.fixture
def trained(tiny_moco, tmp_path):
    """``trained(stem) -> (model, checkpoint path)``: a tiny MoCo whose query and key encoders
    differ and whose BatchNorm running statistics have moved away from their initial values."""

    def make(stem: str):
        size, channels, kind = STEMS[stem]
        model, _ = tiny_moco(
            f"data.image_size={size}", f"data.channels={channels}", f"backbone.stem={kind}"
        )
        torch.manual_seed(0)
        with torch.no_grad():
            model.encoder_q(torch.randn(4, channels, size, size))  # train mode: running stats move
            for p in model.encoder_k.parameters():  # the export must take encoder_q, not this one
                p.add_(1.0)
        return model, save_checkpoint(model, tmp_path / f"{stem}.ckpt")

    return make


def plain_torchvision(meta: dict) -> nn.Module:
    """The backbone rebuilt from torchvision alone, as the README tells a user to do it."""
    model = getattr(torchvision.models, meta["architecture"])()
    if (meta["in_channels"], meta["conv1_kernel_size"]) != (3, 7):
        model.conv1 = nn.Conv2d(
            meta["in_channels"],
            64,
            kernel_size=meta["conv1_kernel_size"],
            stride=meta["conv1_stride"],
            padding=meta["conv1_padding"],
            bias=False,
        )
    if not meta["has_maxpool"]:
        model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
@pytest.mark.parametrize("stem", list(STEMS))
def test_plain_torchvision_loads_the_export_and_computes_the_same_features(trained, fmt, stem):
    model, ckpt = trained(stem)
    path, meta = export_backbone(ckpt, fmt)
    assert path == ckpt.with_name(f"{ckpt.stem}_backbone{FORMATS[fmt]}")  # next to the checkpoint
    assert json.loads(Path(f"{path}.json").read_text()) == meta

    weights = torch.load(path, weights_only=True) if fmt == "torchvision" else load_file(path)
    plain = plain_torchvision(meta)
    result = plain.load_state_dict(weights, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []

    plain.fc = nn.Identity()  # features, as the framework's backbone gives them
    size, channels, _ = STEMS[stem]
    images = torch.randn(3, channels, size, size)
    ours = model.encoder_q.backbone.eval()
    with torch.no_grad():
        assert torch.allclose(plain.eval()(images), ours(images), atol=1e-5)


def test_the_stem_facts_say_what_to_change_and_travel_inside_safetensors(trained):
    _, ckpt = trained("small")
    path, meta = export_backbone(ckpt, "safetensors", ckpt.parent / "out" / "b.safetensors")
    assert meta["stem_changes"] == [
        "model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)",
        "model.maxpool = nn.Identity()",
    ]
    assert meta["architecture"] == "resnet18" and meta["feature_dim"] == 512
    assert meta["epoch"] == 1 and len(meta["checkpoint_sha256"]) == 64
    with safe_open(str(path), framework="pt") as f:  # readable without the JSON next to it
        header = f.metadata()
    assert header["architecture"] == "resnet18" and header["small_image_stem"] == "true"
    assert json.loads(header["stem_changes"]) == meta["stem_changes"]

    _, standard = trained("standard")
    assert export_backbone(standard, "torchvision")[1]["stem_changes"] == []  # stock torchvision

    _, pooled = trained("small_pool")  # RGB, 3x3 conv, torchvision's max-pool kept
    meta = export_backbone(pooled, "torchvision")[1]
    assert meta["stem_changes"] == [
        "model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)"
    ]
    assert meta["small_image_stem"] and meta["has_maxpool"]


@pytest.mark.parametrize("size", [32, 224])
def test_resnet50_backbone_keys_are_torchvision_keys(size):
    with torch.device("meta"):  # names and shapes only: no 25M-parameter initialisation
        ours = backbone_state_dict(build_backbone("resnet50", 3, size))
        stock = torchvision.models.resnet50().state_dict()
    expected = {k: v.shape for k, v in stock.items() if not k.startswith("fc.")}
    got = {k: v.shape for k, v in ours.items()}
    if size == 224:
        assert got == expected
    else:  # the small stem changes conv1's kernel, never a name
        assert got.keys() == expected.keys() and got["conv1.weight"] == (64, 3, 3, 3)


def test_export_refuses_to_overwrite_the_checkpoint_or_an_unknown_format(trained):
    _, ckpt = trained("small")
    with pytest.raises(ConfigError, match="would overwrite the checkpoint"):
        export_backbone(ckpt, "torchvision", ckpt)
    with pytest.raises(ConfigError, match="format=onnx is unknown"):
        export_backbone(ckpt, "onnx")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["small.ckpt"]


def test_safetensors_missing_is_one_line_before_any_work(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "safetensors" else real(name)
    )
    with pytest.raises(ConfigError, match="format=safetensors needs the safetensors package"):
        export_backbone(tmp_path / "never_read.ckpt", "safetensors")


def test_export_of_an_unwritable_path_is_one_error_and_leaves_nothing(trained, tmp_path):
    _, ckpt = trained("small")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot write"):
        export_backbone(ckpt, "torchvision", blocker / "sub" / "b.pth")  # parent is a file
    assert not list(tmp_path.glob("**/*.pth"))


def run_export(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export.py"),
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_export_script_writes_safetensors_next_to_the_checkpoint(trained, tmp_path):
    _, ckpt = trained("small")
    proc = run_export(f"checkpoint={ckpt}", "format=safetensors", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "small_backbone.safetensors"
    assert f"to {out}" in proc.stdout and "model.maxpool = nn.Identity()" in proc.stdout
    assert set(load_file(out)) == set(torchvision.models.resnet18().state_dict()) - {
        "fc.weight",
        "fc.bias",
    }


def test_exporting_a_plain_torchvision_state_dict_is_one_line_exit_2(tmp_path):
    # A likely mix-up: the torchvision weights themselves instead of a pretraining checkpoint.
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    proc = run_export(f"checkpoint={path}", run_dir=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr == f"error: {path} holds bare weights (a state dict), not a pretraining "
        "checkpoint with its settings: use a checkpoint as scripts/pretrain.py wrote it\n"
    )
    assert not (tmp_path / "run").exists() and sorted(tmp_path.iterdir()) == [path]


def test_exporting_a_lightning_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    with pytest.raises(DataError, match="is not a MoCo checkpoint"):
        export_backbone(path, "torchvision")
    assert sorted(tmp_path.iterdir()) == [path]
