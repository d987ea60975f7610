"""scripts/export.py: plain torchvision, the official MoCo code and detectron2's conversion load
the query backbone and compute the same features."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import v3_hparams
from safetensors import safe_open
from safetensors.torch import load_file
from timm_vit import randomise, timm_vit_features
from torch import nn

from moco.encoders import build_backbone
from moco.errors import ConfigError, DataError
from moco.model_v3 import MoCoV3
from moco.run.export import FORMATS, backbone_state_dict, export_backbone
from moco.run.export_formats import DETECTRON2_RENAMES
from moco.vit import VIT_SIZES
from moco.weights import read_weights

ROOT = Path(__file__).resolve().parents[1]
# (image size, channels, backbone.stem): 8 px grey gets the small-image stem, 65 px RGB (just
# above SMALL_IMAGE_MAX_SIZE) the stock ImageNet stem; small_pool keeps torchvision's max-pool;
# late_pool moves it to the end of layer1.
STEMS = {
    "small": (8, 1, "auto"),
    "small_pool": (8, 3, "small_pool"),
    "standard": (65, 3, "auto"),
    "late_pool": (16, 3, "late_pool"),
}
GREY_IMAGENET = {"grey_imagenet": (65, 1, "imagenet")}  # the ImageNet stem on 1 channel


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

    def make(stem: str, *extra: str):
        size, channels, kind = (STEMS | GREY_IMAGENET)[stem]
        model, _ = tiny_moco(
            f"data.image_size={size}", f"data.channels={channels}", f"backbone.stem={kind}", *extra
        )
        torch.manual_seed(0)
        with torch.no_grad():
            model.encoder_q(torch.randn(4, channels, size, size))  # train mode: running stats move
            for p in model.encoder_k.parameters():  # the export must take encoder_q, not this one
                p.add_(1.0)
        return model, save_checkpoint(model, tmp_path / f"{stem}.ckpt")

    return make


def plain_torchvision(meta: dict) -> nn.Module:
    """The backbone rebuilt from torchvision alone, as docs/guide.md tells a user to do it: the
    stock model, then each line of the JSON's ``stem_changes``, run as written."""
    model = getattr(torchvision.models, meta["architecture"])()
    for line in meta["stem_changes"]:
        exec(line, {"nn": nn, "model": model})
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


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
@pytest.mark.parametrize("stem", ["small_pool", "standard"])
def test_a_backbone_without_its_final_relu_exports_a_line_torchvision_runs(trained, fmt, stem):
    model, ckpt = trained(stem, "backbone.final_relu=false")
    path, meta = export_backbone(ckpt, fmt)
    assert meta["final_relu"] is False and meta["stem_changes"][-1].startswith("b = model.layer4")
    weights = torch.load(path, weights_only=True) if fmt == "torchvision" else load_file(path)
    plain = plain_torchvision(meta)
    plain.load_state_dict(weights, strict=False)
    plain.fc = nn.Identity()
    size, channels, _ = STEMS[stem]
    images = torch.randn(3, channels, size, size)
    ours = model.encoder_q.backbone.eval()
    with torch.no_grad():
        features = ours(images)
        assert (features < 0).any()  # signed: the line must have taken the ReLU away
        assert torch.allclose(plain.eval()(images), features, atol=1e-5)
    assert read_weights(path).final_relu is False  # and this project reads it back so


def test_the_official_tools_refuse_a_backbone_without_its_final_relu(trained, tmp_path):
    _, ckpt = trained("standard", "backbone.final_relu=false")
    with pytest.raises(ConfigError, match="this one has no ReLU after its last block: use"):
        export_backbone(ckpt, "moco", tmp_path / "out" / "x")


def test_the_resnet_facts_say_what_to_change_and_travel_inside_safetensors(trained):
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
    assert meta["small_image_stem"] and meta["has_maxpool"] and not meta["pool_after_layer1"]

    _, late = trained("late_pool")  # the ImageNet conv1, the max-pool at the end of layer1
    meta = export_backbone(late, "torchvision")[1]
    assert meta["stem_changes"] == [
        "model.layer1.append(model.maxpool)",
        "model.maxpool = nn.Identity()",
    ]
    assert meta["pool_after_layer1"] and not meta["has_maxpool"] and not meta["small_image_stem"]


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


def test_other_formats_are_converted_torchvision_weights_and_official_moco(tmp_path):
    """Any file moco.weights reads is exported: torchvision weights to safetensors, an official
    MoCo v2 checkpoint to detectron2 (its query encoder, head included as the script keeps it)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    proc = run_export(
        f"checkpoint={tmp_path / 'resnet18.pth'}", "format=safetensors", run_dir=tmp_path / "run"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(tmp_path / "resnet18_backbone.safetensors")
    assert set(exported) == {k for k in net.state_dict() if not k.startswith("fc.")}
    assert all(torch.equal(exported[k], net.state_dict()[k]) for k in exported)
    meta = json.loads((tmp_path / "resnet18_backbone.safetensors.json").read_text())
    assert (meta["source_format"], meta["architecture"], meta["stem_changes"]) == (
        "torchvision",
        "resnet18",
        [],
    )

    mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    q = torchvision.models.resnet18()
    q.fc = mlp
    state = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    official = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}, official)
    path, meta = export_backbone(official, "detectron2")
    model = pickle.loads(path.read_bytes())["model"]
    assert meta["source_format"] == "moco_v1_v2"
    assert torch.equal(torch.from_numpy(model["stem.conv1.weight"]), q.conv1.weight)
    assert torch.equal(torch.from_numpy(model["res5.1.conv2.norm.running_var"]),
                       q.layer4[1].bn2.running_var)  # fmt: skip
    assert torch.equal(torch.from_numpy(model["stem.fc.2.weight"]), mlp[2].weight)


def test_exporting_a_lightning_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    with pytest.raises(DataError, match="is not a MoCo checkpoint"):
        export_backbone(path, "torchvision")
    assert sorted(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------- the official MoCo and detectron2
def main_lincls_load(model: nn.Module, path: Path) -> None:
    """facebookresearch/moco main_lincls.py --pretrained, line for line."""
    checkpoint = torch.load(path, map_location="cpu")
    state_dict = checkpoint["state_dict"]
    for k in list(state_dict.keys()):
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            state_dict[k[len("module.encoder_q.") :]] = state_dict[k]
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}


def official_conversion(moco_file: Path) -> dict:
    """facebookresearch/moco detection/convert-pretrain-to-detectron2.py, line for line."""
    obj = torch.load(moco_file, map_location="cpu")
    obj = obj["state_dict"]
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace("layer{}".format(t), "res{}".format(t + 1))  # noqa: UP032
        for t in [1, 2, 3]:
            k = k.replace("bn{}".format(t), "conv{}.norm".format(t))  # noqa: UP032
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = v.numpy()
    return {"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}


def official_moco_encoder(arch: str, head: str, dim: int) -> nn.Module:
    """main_moco.py's encoder: torchvision with num_classes=dim, the MLP put in front of fc."""
    model = getattr(torchvision.models, arch)(num_classes=dim)
    if head == "mlp":
        width = model.fc.weight.shape[1]
        model.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), model.fc)
    return model


def largest_difference(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return (a.eval()(images) - b.eval()(images)).abs().max().item()


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_main_lincls_loads_the_moco_export_and_the_official_moco_model_is_ours(trained, head):
    model, ckpt = trained("standard", f"model.head={head}")
    path, meta = export_backbone(ckpt, "moco")
    assert path == ckpt.with_name("standard_backbone.pth.tar") and meta["format"] == "moco"
    assert meta["contents"] == ["encoder_q", "encoder_k", "queue"]
    assert json.loads(Path(f"{path}.json").read_text()) == meta
    images = torch.randn(3, 3, 65, 65)

    lincls = torchvision.models.resnet18()
    main_lincls_load(lincls, path)
    lincls.fc = nn.Identity()  # features, as our backbone gives them
    assert largest_difference(lincls, model.encoder_q.backbone, images) <= 1e-5

    saved = torch.load(path, weights_only=True)
    # main_moco.py saves the epochs finished: Lightning's epoch 1 (from 0) is the second.
    assert (saved["epoch"], saved["arch"], saved["optimizer"]) == (2, "resnet18", {})
    weights = saved["state_dict"]
    assert weights["module.queue"].shape == (16, 64)  # dim x K
    assert torch.equal(weights["module.queue"], model.queue.keys.t())
    assert weights["module.queue_ptr"].dtype == torch.long
    assert weights["module.queue_ptr"].shape == (1,)
    official = {}
    for name in ("encoder_q", "encoder_k"):  # main_moco.py's encoders load strictly
        official[name] = official_moco_encoder("resnet18", head, 16)
        prefix = f"module.{name}."
        strip = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        official[name].load_state_dict(strip)
        theirs, ours = official[name].state_dict(), getattr(model, name).state_dict()
        assert all(torch.equal(a, b) for a, b in zip(theirs.values(), ours.values(), strict=True))
    # Features of the whole encoder (backbone and head); encoder_k's weights were shifted by +1,
    # so its features overflow and only its tensors are compared above.
    assert largest_difference(official["encoder_q"], model.encoder_q, images) <= 1e-5


def test_detectron2_export_is_the_official_conversion_of_the_moco_export(trained):
    model, ckpt = trained("standard")
    moco_file, _ = export_backbone(ckpt, "moco")
    path, meta = export_backbone(ckpt, "detectron2")
    assert path == ckpt.with_name("standard_backbone.pkl") and meta["format"] == "detectron2"
    with path.open("rb") as f:
        ours = pickle.load(f)  # our own file, written by this test
    expected = official_conversion(moco_file)
    assert ours.keys() == expected.keys() and ours["__author__"] == "MOCO"
    assert ours["matching_heuristics"] is True
    assert list(ours["model"]) == list(expected["model"])
    for key, array in expected["model"].items():
        assert ours["model"][key].dtype == array.dtype and (ours["model"][key] == array).all()
    assert "res3.0.shortcut.norm.running_var" in ours["model"]  # downsample.1, not shortcut.1

    # Back to torchvision names by undoing the renames: the same tensors as our backbone.
    backbone = {}
    for key, array in ours["model"].items():
        if key.startswith("stem.fc"):  # the head, kept as the script keeps it
            continue
        for old, new in reversed(DETECTRON2_RENAMES):
            key = key.replace(new, old)
        backbone[key.removeprefix("stem.")] = torch.from_numpy(array)
    reference = backbone_state_dict(model.encoder_q.backbone)
    assert backbone.keys() == reference.keys()
    assert all(torch.equal(backbone[k], reference[k]) for k in reference)
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    plain.load_state_dict(backbone)
    images = torch.randn(3, 3, 65, 65)
    assert largest_difference(plain, model.encoder_q.backbone, images) <= 1e-5


def test_a_supervised_reference_exports_its_encoder_q_only(trained, tmp_path):
    model, _ = trained("standard", "model.head=linear")
    path = tmp_path / "supervised.ckpt"
    torch.save(  # what SupervisedReference saves: encoder_q and its spec, no key encoder or queue
        {
            "state_dict": {
                k: v for k, v in model.state_dict().items() if k.startswith("encoder_q.")
            },
            "encoder_spec": model.encoder_spec.to_dict(),
            "epoch": 3,
        },
        path,
    )
    out, meta = export_backbone(path, "moco")
    assert meta["contents"] == ["encoder_q"]
    weights = torch.load(out, weights_only=True)["state_dict"]
    assert all(k.startswith("module.encoder_q.") for k in weights)
    lincls = torchvision.models.resnet18()
    main_lincls_load(lincls, out)
    lincls.fc = nn.Identity()
    images = torch.randn(2, 3, 65, 65)
    assert largest_difference(lincls, model.encoder_q.backbone, images) <= 1e-5


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_output_is_honoured_for_every_format(trained, tmp_path, fmt):
    _, ckpt = trained("standard")
    out = tmp_path / "exports" / f"weights-{fmt}.bin"
    path, meta = export_backbone(ckpt, fmt, out)
    assert path == out and out.is_file() and meta["format"] == fmt
    assert json.loads(Path(f"{out}.json").read_text())["format"] == fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "standard.ckpt"]


REFUSALS = {
    "small": "1 input channel and the small stem",
    "small_pool": "the small_pool stem",
    "grey_imagenet": "1 input channel",
    "late_pool": "the late_pool stem",
}


@pytest.mark.parametrize("fmt", ["moco", "detectron2"])
@pytest.mark.parametrize("stem", list(REFUSALS))
def test_a_model_the_official_tools_cannot_rebuild_is_one_line_and_nothing_written(
    trained, tmp_path, fmt, stem
):
    _, ckpt = trained(stem)
    with pytest.raises(ConfigError) as refused:
        export_backbone(ckpt, fmt, tmp_path / "out" / "x")
    assert str(refused.value) == (
        f"format={fmt} needs a 3-channel ImageNet-stem ResNet; this one has {REFUSALS[stem]}: "
        "use format=torchvision or safetensors (their JSON says how to rebuild it)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.ckpt"]


def test_export_script_writes_detectron2_and_refuses_the_small_stem(trained, tmp_path):
    _, ckpt = trained("standard")
    proc = run_export(f"checkpoint={ckpt}", "format=detectron2", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "standard_backbone.pkl"
    assert f"to {out}" in proc.stdout and f"MODEL.WEIGHTS {out}" in proc.stdout
    assert out.is_file() and Path(f"{out}.json").is_file()

    _, small = trained("small")
    proc = run_export(f"checkpoint={small}", "format=moco", run_dir=tmp_path / "run2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: format=moco needs a 3-channel ImageNet-stem ResNet")
    assert not (tmp_path / "small_backbone.pth.tar").exists()


# ------------------------------------------------------------------------- MoCo v3 ViTs
def vit_run(monkeypatch, tmp_path: Path) -> tuple[MoCoV3, Path]:
    """A MoCo v3 run on a ViT-S of 2 blocks (VIT_SIZES patched: an encoder spec has no depth)
    at 28 px grey, every base-encoder tensor random, the momentum encoder apart from it, saved
    as Lightning saves it."""
    monkeypatch.setitem(VIT_SIZES, "vit_small", VIT_SIZES["vit_small"]._replace(depth=2))
    torch.manual_seed(0)
    model = MoCoV3(**v3_hparams(backbone="vit_small", in_channels=1, image_size=28, sync_bn=False))
    randomise(model.base_encoder)
    randomise(model.predictor)
    with torch.no_grad():
        for p in model.momentum_encoder.parameters():  # the export must keep the two apart
            p.copy_(torch.randn_like(p))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    checkpoint |= {"epoch": 1, "global_step": 2}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "vit.ckpt")
    return model.eval(), tmp_path / "vit.ckpt"


def test_a_vit_exports_to_moco_v3s_layout_with_timm_names_and_reads_back(monkeypatch, tmp_path):
    model, ckpt = vit_run(monkeypatch, tmp_path)
    path, meta = export_backbone(ckpt, "moco")
    monkeypatch.undo()  # reading back, the depth comes from the file, not the default
    saved = torch.load(path, weights_only=True)
    assert (saved["arch"], saved["epoch"]) == ("vit_small", 2)
    state = saved["state_dict"]
    prefix = "module.base_encoder."
    base = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = model.encoder_q.backbone(images)
        # What main_lincls.py of moco-v3 keeps (base_encoder without head), computed as timm
        # would: a wrong pair in the name table would show here.
        backbone = {k: v for k, v in base.items() if not k.startswith("head.")}
        torch.testing.assert_close(timm_vit_features(backbone, images), features)
        weights = read_weights(path)
        assert (weights.format, weights.depth, weights.patch_size) == ("moco_v3", 2, 4)
        torch.testing.assert_close(weights.build_backbone().eval()(images), features)
        torch.testing.assert_close(weights.encoder().eval()(images), model.encoder_q(images))
    # The projector as vits.py's head, the momentum encoder under the same names, the predictor.
    projector, momentum = model.base_encoder.heads, model.momentum_encoder
    assert torch.equal(base["head.6.weight"], projector[6].weight)
    assert torch.equal(base["head.7.running_var"], projector[7].running_var)
    ln_2 = momentum.encoder.layers.encoder_layer_1.ln_2.weight
    assert torch.equal(state["module.momentum_encoder.blocks.1.norm2.weight"], ln_2)
    assert set(state) == {
        *(f"module.base_encoder.{k}" for k in base),
        *(f"module.momentum_encoder.{k}" for k in base),
        *(f"module.predictor.{k}" for k in model.predictor.state_dict()),
    }
    assert meta["contents"] == ["base_encoder", "momentum_encoder", "predictor"]
    assert meta["missing_on_load"] == ["head.weight", "head.bias"]
    assert (meta["image_size"], meta["in_channels"], meta["patch_size"], meta["depth"]) == (
        28,
        1,
        4,
        2,
    )
    assert meta["stem_changes"] == [
        "model = vits.VisionTransformerMoCo(img_size=28, patch_size=4, in_chans=1, "
        "embed_dim=384, depth=2, num_heads=12, mlp_ratio=4, qkv_bias=True, "
        "norm_layer=partial(nn.LayerNorm, eps=1e-6))"
    ]
    # Converted again, the official file gives the same file.
    again, _ = export_backbone(path, "moco", tmp_path / "again.pth.tar")
    first, second = (torch.load(p, weights_only=True) for p in (path, again))
    assert second["epoch"] == first["epoch"] == 2  # an official file's count is kept as it is
    resaved = second["state_dict"]
    assert set(resaved) == {k for k in state if k.startswith(prefix)}
    assert all(torch.equal(v, state[k]) for k, v in resaved.items())


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors", "detectron2"])
def test_a_vit_in_a_resnet_format_is_one_line_and_nothing_written(monkeypatch, tmp_path, fmt):
    _, ckpt = vit_run(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as refused:
        export_backbone(ckpt, fmt, tmp_path / "out" / "x")
    message = str(refused.value)
    assert message.startswith(f"format={fmt}: export writes ResNet backbones in it; ")
    assert "use format=moco" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.ckpt"]
