"""moco.load_backbone: every incoming checkpoint layout, built here from its description, gives
the features of the same weights loaded by hand into torchvision; anything else is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import moco_hparams, with_values
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm_vit import randomise, timm_vit_features
from torch import nn

import moco
from moco.encoders import V3_HEAD, build_head, v3_mlp
from moco.errors import ConfigError, DataError
from moco.eval.features import FrozenFeatures
from moco.eval.source import load_encoder
from moco.model import MoCo
from moco.run.train import pretrain
from moco.run.warm_start import warm_start
from moco.vit import build_vit
from moco.vit_names import timm_name
from moco.weights import read_weights

ROOT = Path(__file__).resolve().parents[1]
DIFFS = {}  # format -> largest |feature difference| against torchvision, shown at the end
DATA = OmegaConf.create({"name": "synthetic", "channels": 3, "image_size": 32})


class Payload:
    """Pickles as a call to ``Path.touch(marker)``: whoever unpickles it creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ----------------------------------------------------------------------------- references
def torchvision_net(arch="resnet18", in_channels=3, kernel=7, maxpool=True, fc=None) -> nn.Module:
    """A stock torchvision ResNet changed by hand: the reference every loader is checked with."""
    net = getattr(torchvision.models, arch)()
    if kernel == 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    if not maxpool:
        net.maxpool = nn.Identity()
    for m in net.modules():  # running statistics away from 0/1, so they must be loaded too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if fc is not None:
        net.fc = fc
    return net


def reference_features(state: dict, images, arch="resnet18", **stem) -> torch.Tensor:
    net = torchvision_net(arch, images.shape[1], **stem, fc=nn.Identity())
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    with torch.no_grad():
        return net.eval()(images)


def check_features(name: str, backbone: nn.Module, state: dict, images, **stem) -> None:
    with torch.no_grad():
        got = backbone(images)
    want = reference_features(state, images, **stem)
    assert got.shape == want.shape == (len(images), backbone.feature_dim)
    diff = (got - want).abs().max().item()
    DIFFS[name] = max(diff, DIFFS.get(name, 0.0))
    # float32 rounding: the features are the same sums in another order (small-map layers as
    # matrix products, moco/small_map_conv.py), so the bound follows their scale
    scale = max(1.0, want.abs().max().item())
    assert diff < 1e-5 * scale, (diff, scale)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


@pytest.fixture(scope="module", autouse=True)
def show_diffs():
    yield
    print("\nlargest |feature difference| vs torchvision:")
    for name, diff in DIFFS.items():
        print(f"  {name:24s} {diff:.3g}")


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def official_v1_v2(path: Path, head: str, arch: str = "resnet18") -> dict:
    """facebookresearch/moco main_moco.py's file: DDP's module. prefix, both encoders, queue."""
    dim = 128
    feat = {"resnet18": 512, "resnet50": 2048}[arch]
    fc = (
        nn.Linear(feat, dim)
        if head == "linear"
        else nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, dim))
    )
    q = torchvision_net(arch, fc=fc).state_dict()
    state = {
        **prefixed("module.encoder_q.", q),
        **prefixed("module.encoder_k.", {k: -v for k, v in q.items()}),  # not the one to load
        "module.queue": torch.randn(dim, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}
    torch.save({"epoch": 200, "arch": arch, "state_dict": state, "optimizer": optimizer}, path)
    return q


def tiny_moco(**changes) -> MoCo:
    return MoCo(**moco_hparams(**changes))


# ------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("spec_key", ["encoder_spec", "hyper_parameters"])
def test_pretraining_checkpoint(tmp_path, spec_key):
    torch.manual_seed(0)
    model = tiny_moco()
    with torch.no_grad():  # the query encoder is loaded, not the key encoder
        for p in model.encoder_k.parameters():
            p.add_(1.0)
    for m in model.encoder_q.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    spec = model.encoder_spec.to_dict() if spec_key == "encoder_spec" else dict(model.hparams)
    path = tmp_path / "weights.bin"  # the name says nothing
    torch.save({"state_dict": model.state_dict(), spec_key: spec, "epoch": 3}, path)
    net = moco.load_backbone(path)
    assert (net.source_format, net.stem, net.in_channels, net.image_size) == (
        "pretrain",
        "small",
        3,
        16,
    )
    prefix = "encoder_q.backbone."
    q = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    check_features("pretrain (.ckpt)", net, q, torch.randn(4, 3, 16, 16), kernel=3, maxpool=False)
    assert read_weights(path).head == "mlp"


def export_state(in_channels=1) -> dict:
    net = torchvision_net(in_channels=in_channels, kernel=3, maxpool=True, fc=nn.Identity())
    return {k: v.contiguous() for k, v in net.state_dict().items()}


EXPORT_FACTS = {
    "architecture": "resnet18",
    "format": "torchvision",
    "image_size": 28,
    "feature_dim": 512,
    "small_image_stem": True,
    "in_channels": 1,
    "conv1_kernel_size": 3,
    "conv1_stride": 1,
    "conv1_padding": 1,
    "has_maxpool": True,
    "stem_changes": ["model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1)"],
}


def test_export_with_its_json_and_without(tmp_path):
    torch.manual_seed(1)
    state, images = export_state(), torch.randn(3, 1, 28, 28)
    path = tmp_path / "last_backbone.pth"
    torch.save(state, path)
    (tmp_path / "last_backbone.pth.json").write_text(json.dumps(EXPORT_FACTS))
    net = moco.load_backbone(path)
    assert (net.source_format, net.stem, net.in_channels, net.image_size) == (
        "export",
        "small_pool",
        1,
        28,
    )
    check_features("export (.pth + .json)", net, state, images, kernel=3, maxpool=True)
    # Without its JSON the same file is plain torchvision weights: the max-pool is not known.
    (tmp_path / "last_backbone.pth.json").unlink()
    bare = moco.load_backbone(path)
    assert (bare.source_format, bare.stem, bare.image_size) == ("torchvision", "small", None)
    with torch.no_grad():
        assert bare(images).shape == (3, 512) and not torch.allclose(bare(images), net(images))
    told = moco.load_backbone(path, stem="small_pool", image_size=28)
    check_features("torchvision 3x3 (told)", told, state, images, kernel=3, maxpool=True)
    with pytest.raises(DataError, match="holds a small stem, not stem=imagenet"):
        moco.load_backbone(path, stem="imagenet")


def test_safetensors_export_reads_its_metadata(tmp_path):
    torch.manual_seed(2)
    state = export_state()
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in EXPORT_FACTS.items()}
    path = tmp_path / "backbone.pth"  # a misleading name: the content decides
    save_file(state, path, metadata={**header, "format": "safetensors"})
    net = moco.load_backbone(path)
    assert (net.source_format, net.stem, net.image_size) == ("safetensors", "small_pool", 28)
    check_features("safetensors", net, state, torch.randn(3, 1, 28, 28), kernel=3, maxpool=True)
    save_file(state, path, metadata={**header, "architecture": "resnet50"})
    with pytest.raises(DataError, match="metadata say architecture=resnet50 but it holds resnet18"):
        moco.load_backbone(path)
    save_file(state, path, metadata={**header, "stem": "small_pool"})  # as exports now say
    assert moco.load_backbone(path).stem == "small_pool"
    save_file(state, path, metadata={**header, "stem": "small"})
    with pytest.raises(DataError, match="metadata say stem=small but it holds small_pool"):
        moco.load_backbone(path)
    save_file(state, path, metadata={**header, "pool_after_layer1": "true"})  # with a 3x3 conv1
    with pytest.raises(DataError, match="put the max-pool in two places"):
        moco.load_backbone(path)
    # Facts that name no stem of moco.encoders.STEM_LAYOUTS are refused, not read as the nearest.
    no_pool = {**header, "has_maxpool": "false", "pool_after_layer1": "true"}
    save_file(state, path, metadata=no_pool)  # small's 3x3 conv1, late_pool's max-pool
    with pytest.raises(DataError, match="place the max-pool where no 3x3 stem has it"):
        moco.load_backbone(path)
    imagenet = {k: v.contiguous() for k, v in torchvision_net(in_channels=1).state_dict().items()}
    imagenet = {k: v for k, v in imagenet.items() if not k.startswith("fc.")}
    facts_7x7 = {**header, "conv1_kernel_size": "7", "has_maxpool": "false"}
    save_file(imagenet, path, metadata=facts_7x7)  # a 7x7 conv1 with no max-pool anywhere
    with pytest.raises(DataError, match="place the max-pool where no 7x7 stem has it"):
        moco.load_backbone(path)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_official_moco_v1_v2(tmp_path, head):
    torch.manual_seed(3)
    path = tmp_path / "checkpoint_0199.pth.tar"
    q = official_v1_v2(path, head)
    net = moco.load_backbone(path, in_channels=3, image_size=32)
    assert (net.source_format, net.stem, net.in_channels, net.image_size) == (
        "moco_v1_v2",
        "imagenet",
        3,
        32,
    )
    check_features(f"official v1/v2 ({head})", net, q, torch.randn(2, 3, 32, 32))
    weights = read_weights(path)
    assert (weights.head, weights.dim, weights.info["epoch"]) == (head, 128, 200)
    fc = {k[3:]: v for k, v in q.items() if k.startswith("fc.")}
    assert all(torch.equal(weights.head_state[k], v) for k, v in fc.items())
    with pytest.raises(DataError, match="holds 3-channel weights, not 1"):
        moco.load_backbone(path, in_channels=1)


def test_official_moco_v3(tmp_path):
    torch.manual_seed(4)
    projector = nn.Sequential(
        nn.Linear(512, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32, affine=False),
    )
    base = torchvision_net(fc=projector).state_dict()
    predictor = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    state = {
        **prefixed("module.base_encoder.", base),
        **prefixed("module.momentum_encoder.", {k: v + 1 for k, v in base.items()}),
        **prefixed("module.predictor.", predictor.state_dict()),
    }
    path = tmp_path / "r-50-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "resnet18", "state_dict": state, "optimizer": {}}, path)
    net = moco.load_backbone(path, image_size=32)
    assert (net.source_format, net.stem) == ("moco_v3", "imagenet")
    check_features("official v3", net, base, torch.randn(2, 3, 32, 32))
    assert read_weights(path).head is None  # the projector is not a MoCo head


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_plain_torchvision_state_dict(tmp_path, arch):
    torch.manual_seed(5)
    state = torchvision_net(arch).state_dict()  # with its 1000-class fc
    path = tmp_path / "model"
    torch.save(state, path)
    net = moco.load_backbone(path)
    assert (net.source_format, net.architecture, net.stem) == ("torchvision", arch, "imagenet")
    assert net.feature_dim == {"resnet18": 512, "resnet50": 2048}[arch]
    check_features(f"torchvision {arch}", net, state, torch.randn(2, 3, 32, 32), arch=arch)
    # A bare state dict cannot say where the max-pool sits: the user may say late_pool.
    told = moco.load_backbone(path, stem="late_pool")
    assert told.stem == "late_pool" and isinstance(told.layer1[-1], nn.MaxPool2d)
    with pytest.raises(DataError, match="holds a imagenet stem, not stem=small"):
        moco.load_backbone(path, stem="small")  # conv1's kernel says it cannot be


# ------------------------------------------------------------------------------ refusals
def test_unknown_files_are_refused_with_one_line_naming_the_formats(tmp_path):
    cases = {
        "other_keys.pt": {"model": {"w": torch.zeros(2)}, "step": 3},
        "no_resnet.pt": {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)},
        "other_state.pt": {"state_dict": {"model.fc.weight": torch.zeros(2, 2)}},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not weights\n")
    for name in [*cases, "notes.txt"]:
        with pytest.raises(DataError) as error:
            moco.load_backbone(tmp_path / name)
        message = str(error.value)
        assert "\n" not in message and "official MoCo v1/v2 or v3" in message, message
        assert "torchvision ResNet-18/50 state dict" in message
    with pytest.raises(ConfigError, match="does not exist"):
        moco.load_backbone(tmp_path / "missing.pth")


def test_a_malicious_pickle_does_not_run(tmp_path):
    live = tmp_path / "live"
    torch.save({"state_dict": Payload(live)}, tmp_path / "live.pth")
    torch.load(tmp_path / "live.pth", weights_only=False)
    assert live.exists()  # the payload is real: an unsafe load runs it

    marker = tmp_path / "ran"
    torch.save({"state_dict": Payload(marker), "arch": "resnet50"}, tmp_path / "evil.pth.tar")
    with pytest.raises(DataError, match="would execute code.*known formats"):
        moco.load_backbone(tmp_path / "evil.pth.tar")
    assert not marker.exists()


# ------------------------------------------------------------------------------ evaluation
def test_the_eval_source_takes_official_files_at_the_datas_geometry(tmp_path):
    torch.manual_seed(6)
    path = tmp_path / "moco_v1.pth.tar"
    official_v1_v2(path, "linear")
    loaded = load_encoder(str(path), DATA, None)
    assert loaded.data_cfg.image_size == 32 and loaded.info["format"] == "moco_v1_v2"
    assert FrozenFeatures(loaded.encoder, "head")(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    with pytest.raises(ConfigError, match="3-channel images but data=synthetic has 1"):
        load_encoder(str(path), OmegaConf.merge(DATA, {"channels": 1}), None)
    torch.save(torchvision_net().state_dict(), tmp_path / "tv.pth")
    plain = load_encoder(str(tmp_path / "tv.pth"), DATA, None)
    assert plain.encoder.head is None
    with pytest.raises(ConfigError, match="no MoCo projection head.*features.layer=backbone"):
        FrozenFeatures(plain.encoder, "head")


def run_script(script: str, run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / f"{script}.py"),
            *overrides,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # two interpreters at once, ~15 s on 2 cores
def test_knn_eval_script_on_official_files(tmp_path):
    torch.manual_seed(7)
    v1 = tmp_path / "moco_v1.pth.tar"
    official_v1_v2(v1, "linear")
    tv = tmp_path / "resnet18.pth"
    torch.save(torchvision_net().state_dict(), tv)
    data = ["data=synthetic", "data.num_train=40", "data.num_test=20", "features.progress=false"]
    good = run_script(
        "knn_eval", tmp_path / "good", f"checkpoint={v1}", *data, "knn.ks=[5]", "knn.report.k=5"
    )
    head = run_script(
        "knn_eval", tmp_path / "head", f"checkpoint={tv}", *data, "features.layer=head"
    )
    out, err = good.communicate(timeout=300)
    assert good.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "good" / "knn.json").read_text())
    assert (summary["format"], summary["feature_dim"], summary["image_size"]) == (
        "moco_v1_v2",
        512,
        32,
    )
    _, err = head.communicate(timeout=300)
    assert head.returncode == 2 and err.count("\n") == 1, err[-3000:]
    assert err.startswith("error: the checkpoint holds no MoCo projection head")
    assert not (tmp_path / "head").exists()


# ---------------------------------------------------------------------------- init=
def test_init_copies_the_backbone_into_both_encoders_and_the_head_when_it_fits(tmp_path):
    torch.manual_seed(8)
    path = tmp_path / "moco_v1.pth.tar"
    q = official_v1_v2(path, "linear")
    fits = tiny_moco(image_size=32, stem="imagenet", head="linear", dim=128)
    line = warm_start(fits, str(path))
    assert line == (
        f"Initialised encoder_q and encoder_k from {path} (moco_v1_v2): resnet18 backbone and "
        "linear head"
    )
    for encoder in (fits.encoder_q, fits.encoder_k):
        for k, v in encoder.backbone.state_dict().items():
            assert torch.equal(v, q[k]), k
        assert torch.equal(encoder.head.weight, q["fc.weight"])

    other_head = tiny_moco(image_size=32, stem="imagenet", head="mlp", dim=8)
    before = {k: v.clone() for k, v in other_head.encoder_q.head.state_dict().items()}
    assert "head kept as initialised" in warm_start(other_head, str(path))
    assert torch.equal(other_head.encoder_k.backbone.conv1.weight, q["conv1.weight"])
    for k, v in other_head.encoder_q.head.state_dict().items():
        assert torch.equal(v, before[k])

    with pytest.raises(DataError, match=r"^init=.* does not fit the configured backbone") as e:
        warm_start(tiny_moco(), str(path))  # 16 px: the small stem's 3x3 conv1
    assert "\n" not in str(e.value)


def test_init_says_when_the_file_names_another_stem_of_the_same_weights(tmp_path):
    late = tiny_moco(image_size=32, stem="late_pool", head="linear", dim=8)
    path = tmp_path / "late.ckpt"
    torch.save({"state_dict": late.state_dict(), "encoder_spec": late.encoder_spec.to_dict()}, path)
    imagenet = tiny_moco(image_size=32, stem="imagenet", head="linear", dim=8)
    line = warm_start(imagenet, str(path))  # the keys fit: only the file can say the difference
    assert line.endswith("; trained with the late_pool stem, this run has imagenet")
    assert "trained with" not in warm_start(late, str(path))
    bare = tmp_path / "imagenet.pth"  # a bare state dict names no stem: nothing to say
    torch.save(torchvision_net(in_channels=3).state_dict(), bare)
    assert "trained with" not in warm_start(late, str(bare))


def test_pretrain_starts_from_init_on_a_fresh_start(tiny_cfg, tmp_path, capsys):
    torch.manual_seed(9)
    state = torchvision_net(kernel=3, maxpool=False).state_dict()
    path = tmp_path / "resnet18_small.pth"
    torch.save(state, path)
    cfg = tiny_cfg(
        "trainer.max_steps=1",
        "eval.enabled=false",
        "optimizer.lr=1e-12",  # the one step leaves the weights where init put them
        "+trainer.enable_progress_bar=false",
        f"init={path}",
    )
    last = pretrain(cfg, tmp_path / "run")
    assert (
        f"Initialised encoder_q and encoder_k from {path} (torchvision)" in capsys.readouterr().out
    )
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    for name in ("encoder_q", "encoder_k"):
        conv1 = saved[f"{name}.backbone.conv1.weight"]
        assert torch.allclose(conv1, state["conv1.weight"], atol=1e-6)
    # Resuming: the run's own weights, not the init file's.
    pretrain(with_values(cfg, "trainer.max_steps=2"), tmp_path / "run")
    out = capsys.readouterr().out
    assert "Resuming from" in out and "Initialised" not in out


# ------------------------------------------------------------------ layouts met in the wild
def test_official_files_saved_without_ddp_and_resnet50(tmp_path):
    """main_moco.py without DistributedDataParallel (no module. prefix), and a ResNet-50 file."""
    torch.manual_seed(6)
    path = tmp_path / "ddp.pth.tar"
    q = official_v1_v2(path, "mlp", arch="resnet50")
    images = torch.randn(2, 3, 32, 32)
    check_features("official v2 resnet50", moco.load_backbone(path), q, images, arch="resnet50")
    saved = torch.load(path, weights_only=True)
    plain = {k[len("module.") :]: v for k, v in saved["state_dict"].items()}
    torch.save({**saved, "state_dict": plain}, tmp_path / "single.pth.tar")
    net = moco.load_backbone(tmp_path / "single.pth.tar")
    assert (net.source_format, net.architecture) == ("moco_v1_v2", "resnet50")
    check_features("official v2, no module.", net, q, images, arch="resnet50")


def test_a_linear_classifier_checkpoint_and_old_torchvision_files(tmp_path):
    """main_lincls.py saves {"state_dict": {"module.conv1.weight", ...}}; older torchvision files
    have no BatchNorm step counters."""
    torch.manual_seed(7)
    state = torchvision_net().state_dict()
    torch.save({"arch": "resnet18", "state_dict": prefixed("module.", state)}, tmp_path / "lin")
    check_features(
        "main_lincls", moco.load_backbone(tmp_path / "lin"), state, torch.randn(2, 3, 32, 32)
    )
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    check_features(
        "torchvision, old",
        moco.load_backbone(tmp_path / "old.pth"),
        state,
        torch.randn(2, 3, 32, 32),
    )


# ------------------------------------------------------------------------- MoCo v3 ViTs
def tiny_vit(seed: int = 9) -> tuple[nn.Module, nn.Module]:
    """A CPU-sized ViT-S of moco/vit.py (28 px grey, 4-px patches, 2 blocks) and a 3-layer v3
    projector, both random (``randomise``), in eval mode."""
    torch.manual_seed(seed)
    net = build_vit("vit_small", 1, 28, depth=2)
    head = build_head(V3_HEAD, 384, 8, 16, layers=3)
    return randomise(net).eval(), randomise(head).eval()


def as_timm(state: dict) -> dict:
    """torchvision names (the projector in the heads slot) to timm's, through the table."""
    return {timm_name(k): v for k, v in state.items()}


def official_vit(path: Path, net: nn.Module, head: nn.Module, **changes) -> dict:
    """What moco-v3 main_moco.py saves for a ViT: DDP's module. prefix, base and momentum
    encoders (timm names, the projector as head.0 ... head.7), the predictor, its bookkeeping.
    Returns the base encoder's timm-named tensors."""
    in_slot = {**net.state_dict(), **{f"heads.{k}": v for k, v in head.state_dict().items()}}
    base = as_timm(in_slot)
    predictor = v3_mlp(2, 8, 16, 8, last_bn=True)
    state = {
        **prefixed("module.base_encoder.", base),
        **prefixed("module.momentum_encoder.", {k: v + 1 for k, v in base.items()}),
        **prefixed("module.predictor.", predictor.state_dict()),
    }
    checkpoint = {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {}}
    torch.save(checkpoint | {"scaler": {}} | changes, path)
    return base


def test_official_moco_v3_vit_reads_into_a_backbone_that_computes_the_same(tmp_path):
    net, head = tiny_vit()
    path = tmp_path / "vit-s-300ep.pth.tar"
    base = official_vit(path, net, head)
    assert "module.base_encoder.blocks.1.attn.qkv.weight" in torch.load(path)["state_dict"]
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        want = net(images)
        # The file (built through the table) computes, as timm would, what the model computes:
        # fails for any wrong pair in the table (ln_1 for norm2, fc1 for fc2, ...).
        torch.testing.assert_close(timm_vit_features(base, images), want)
        loaded = moco.load_backbone(path)
        torch.testing.assert_close(loaded(images), want)
    assert (loaded.source_format, loaded.architecture, loaded.in_channels) == (
        "moco_v3",
        "vit_small",
        1,
    )
    assert (loaded.image_size, loaded.patch_size, len(loaded.encoder.layers)) == (28, 4, 2)
    weights = read_weights(path)
    assert (weights.head, weights.dim, weights.mlp_dim, weights.info) == (
        "v3_mlp",
        8,
        16,
        {"epoch": 300},
    )
    with torch.no_grad():  # the projector is the head, in front of the same backbone
        torch.testing.assert_close(weights.encoder().eval()(images), head(want))


def test_convert_to_deit_output_reads_and_a_classifier_in_it_is_refused(tmp_path):
    net, _ = tiny_vit(seed=10)
    deit = as_timm(net.state_dict())  # convert_to_deit.py: base encoder, no prefix, no head
    torch.save({"model": deit}, tmp_path / "deit.pth")
    images = torch.randn(2, 1, 28, 28)
    loaded = moco.load_backbone(tmp_path / "deit.pth")
    assert (
        loaded.source_format == "moco_v3_deit" and read_weights(tmp_path / "deit.pth").head is None
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
        torch.testing.assert_close(timm_vit_features(deit, images), net(images))
    classifier = {"head.weight": torch.zeros(10, 384), "head.bias": torch.zeros(10)}
    torch.save({"model": deit | classifier}, tmp_path / "classifier.pth")
    with pytest.raises(DataError, match="unexpected keys, first head.weight"):
        moco.load_backbone(tmp_path / "classifier.pth")


def test_a_main_lincls_vit_checkpoint_reads_without_its_classifier(tmp_path):
    net, _ = tiny_vit(seed=11)
    classifier = {"head.weight": torch.randn(10, 384), "head.bias": torch.randn(10)}
    state = prefixed("module.", as_timm(net.state_dict()) | classifier)
    path = tmp_path / "linear-vit-s-300ep.pth.tar"
    torch.save({"epoch": 90, "arch": "vit_small", "state_dict": state, "optimizer": {}}, path)
    loaded = moco.load_backbone(path, stem="small")  # a stem names nothing in a ViT
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    weights = read_weights(path)
    assert (weights.format, weights.head, weights.info) == ("moco_v3_lincls", None, {"epoch": 90})


def _drop_block_0(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".blocks.0." not in k}


def _widen_fc1(state: dict) -> dict:
    return state | {"module.base_encoder.blocks.1.mlp.fc1.weight": torch.zeros(1000, 384)}


def _rectangular_grid(state: dict) -> dict:
    table = state["module.base_encoder.pos_embed"]
    return state | {"module.base_encoder.pos_embed": table[:, :-7]}  # 42 patches


@pytest.mark.parametrize(
    "change,message",
    [
        (_drop_block_0, "do not fit a vit_small of 2 blocks.*missing keys, first blocks.0.norm1"),
        (_widen_fc1, "1 of another shape, first blocks.1.mlp.fc1.weight: 1000x384 in the file"),
        (_rectangular_grid, "are no square grid of square patches"),
        ({"arch": "vit_base"}, "says arch=vit_base but holds vit_small weights"),
        ({"arch": "vit_large"}, "holds a vit_large model: only resnet18, resnet50, vit_small"),
    ],
)
def test_a_vit_file_that_does_not_fit_is_one_line(tmp_path, change, message):
    path = tmp_path / "vit.pth.tar"
    official_vit(path, *tiny_vit())
    checkpoint = torch.load(path)
    if callable(change):
        checkpoint["state_dict"] = change(checkpoint["state_dict"])
    else:
        checkpoint |= change
    torch.save(checkpoint, path)
    with pytest.raises(DataError, match=message) as error:
        moco.load_backbone(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stem", ["small", "small_pool", "imagenet", "late_pool"])
def test_a_real_export_reads_back_with_its_stem(tmp_path, stem):
    """The facts scripts/export.py writes, read back by load_backbone: no hand-made JSON."""
    from moco.run.export import export_backbone

    torch.manual_seed(8)
    model = tiny_moco(in_channels=1, image_size=16, stem=stem)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    images = torch.randn(2, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        want = model.encoder_q.backbone(images)
    for fmt in ("torchvision", "safetensors"):
        path, _ = export_backbone(tmp_path / "last.ckpt", fmt)
        net = moco.load_backbone(path)
        assert (net.stem, net.in_channels, net.image_size) == (stem, 1, 16)
        with torch.no_grad():
            diff = (net(images) - want).abs().max().item()
        DIFFS[f"export {fmt} ({stem})"] = diff
        assert diff < 1e-5
