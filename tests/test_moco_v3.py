"""MoCo v3 (moco/model_v3.py): the loss against the paper's Algorithm 1, the momentum update and
its schedule in a real training loop, the official module layout in both directions, the
config, and the loss across two processes."""

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from conftest import WORLD, compose_config, run_on_two_ranks, v3_hparams
from torch import nn
from torch.utils.data import DataLoader, Dataset

import moco
from moco import distributed
from moco.errors import ConfigError
from moco.losses import in_batch_info_nce, in_batch_top1
from moco.model_v3 import MoCoV3
from moco.momentum import cosine_momentum, scheduled_momentum
from moco.run.check import check_pretrain
from moco.run.warm_start import warm_start
from moco.weights import read_weights


# ------------------------------------------------------------------------------------ loss
def algorithm_1(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """ctr(q, k) of the paper's Algorithm 1, on one process."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / t
    labels = torch.arange(len(q))
    return F.cross_entropy(logits, labels) * 2 * t


@pytest.mark.parametrize("t", [1.0, 0.2])
def test_the_loss_is_algorithm_1(t):
    torch.manual_seed(0)
    q, k = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    loss, logits = in_batch_info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1), t)
    torch.testing.assert_close(loss, algorithm_1(q, k, t))
    assert logits.shape == (6, 6)
    loss.backward()
    assert q.grad is not None and k.grad is None  # the keys are targets


def test_the_loss_by_hand_and_its_2t_factor():
    # Two orthogonal unit queries, each equal to its key: logits [[1, 0], [0, 1]] / T.
    eye = torch.eye(2)
    for t in (1.0, 0.5):
        loss, _ = in_batch_info_nce(eye, eye, t)
        by_hand = 2 * t * math.log(1 + math.exp(-1 / t))  # -log(e^(1/T) / (e^(1/T) + 1)) x 2T
        assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_the_positive_of_rank_r_is_key_r_times_n_plus_i():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(3, 4), dim=1)
    keys = F.normalize(torch.randn(6, 4), dim=1)  # two ranks' keys, rank order
    keys[3:] = q  # rank 1's own keys are its queries: perfect positives at columns 3, 4, 5
    loss, logits = in_batch_info_nce(q, keys, 0.1, rank=1)
    reference = F.cross_entropy(logits, torch.arange(3, 6)) * 0.2
    torch.testing.assert_close(loss, reference)
    assert in_batch_top1(logits, rank=1).item() == 1.0
    assert in_batch_top1(logits, rank=0).item() == 0.0


# ---------------------------------------------------------------------------- momentum
def test_the_momentum_rises_from_m_to_1_on_a_cosine():
    assert scheduled_momentum(0.99, "cosine", 0, 100) == pytest.approx(0.99)
    assert scheduled_momentum(0.99, "cosine", 50, 100) == pytest.approx(0.995)
    assert scheduled_momentum(0.99, "cosine", 100, 100) == pytest.approx(1.0)
    assert scheduled_momentum(0.99, "cosine", 25, 100) == pytest.approx(
        1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2
    )
    assert scheduled_momentum(0.99, "constant", 50, 100) == 0.99
    assert scheduled_momentum(0.99, "cosine", 50, None) == 0.99  # no trainer yet


def test_the_keys_come_from_the_momentum_encoder_updated_first():
    """With m=0 the update copies the base encoder: keys computed after it are the base
    encoder's projections; keys computed before it would be the old momentum encoder's."""
    torch.manual_seed(2)
    model = MoCoV3(**v3_hparams(momentum=0.0, momentum_schedule="constant"))
    with torch.no_grad():
        for p in model.momentum_encoder.parameters():
            p.add_(0.5)  # the momentum encoder lags: it differs from the base encoder
    base = copy.deepcopy(model.base_encoder)
    predictor = copy.deepcopy(model.predictor)
    stale = copy.deepcopy(model.momentum_encoder)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss = model.training_step(((x1, x2), None), 0)

    def expected(keys_from):
        with torch.no_grad():
            q1, q2 = predictor(base(x1)), predictor(base(x2))
            k1, k2 = keys_from(x1), keys_from(x2)
        return algorithm_1(q1, k2, 1.0) + algorithm_1(q2, k1, 1.0)  # symmetric

    torch.testing.assert_close(loss.detach(), expected(base))
    assert not torch.allclose(loss.detach(), expected(stale))
    for p, q in zip(model.momentum_encoder.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)


class TwoViews(Dataset):
    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 2, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return (self.images[i, 0], self.images[i, 1]), 0


class Watch(pl.Callback):
    """Records both encoders before each step, and the momentum encoder after it."""

    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        snap = [p.detach().clone() for p in module.base_encoder.parameters()]
        mom = [p.detach().clone() for p in module.momentum_encoder.parameters()]
        pred = [p.detach().clone() for p in module.predictor.parameters()]
        self.steps.append({"base": snap, "momentum": mom, "predictor": pred})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = [p.detach().clone() for p in module.momentum_encoder.parameters()]
        self.steps[-1]["predictor_after"] = [
            p.detach().clone() for p in module.predictor.parameters()
        ]


def test_in_training_the_momentum_encoder_follows_the_cosine_and_the_predictor_learns():
    torch.manual_seed(4)
    model = MoCoV3(**v3_hparams(momentum=0.9))
    watch = Watch()
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[watch],
    )  # fmt: skip
    trainer.fit(model, DataLoader(TwoViews(16), batch_size=4))
    assert len(watch.steps) == 4
    for step, seen in enumerate(watch.steps):
        m = cosine_momentum(0.9, step, 4)  # the schedule, step by step
        for after, mom, base in zip(seen["after"], seen["momentum"], seen["base"], strict=True):
            # No gradient step moves it: only m * itself + (1 - m) * the base encoder.
            torch.testing.assert_close(after, m * mom + (1 - m) * base)
        changed = [
            not torch.equal(a, b)
            for a, b in zip(seen["predictor"], seen["predictor_after"], strict=True)
        ]
        assert any(changed)  # the predictor is among the optimized parameters
    # Both encoders started equal: the first update changed nothing.
    first = watch.steps[0]
    assert all(torch.equal(a, b) for a, b in zip(first["base"], first["momentum"], strict=True))
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.momentum_encoder.parameters()}
    assert {id(p) for p in model.predictor.parameters()} <= optimized


# ------------------------------------------------------------------- the official layout
def official_mlp(layers, in_dim, mlp_dim, out_dim, last_bn):
    """facebookresearch/moco-v3 builder.py's _build_mlp, rewritten here as the reference."""
    mlp = []
    for i in range(layers):
        d1 = in_dim if i == 0 else mlp_dim
        d2 = out_dim if i == layers - 1 else mlp_dim
        mlp.append(nn.Linear(d1, d2, bias=False))
        if i < layers - 1:
            mlp += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            mlp.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*mlp)


def official_state_dict(dim=8, mlp_dim=16) -> dict:
    """What main_moco.py of moco-v3 saves for a ResNet-18 (ImageNet stem): module.* keys."""
    torch.manual_seed(5)
    parts = {}
    for name in ("base_encoder", "momentum_encoder"):
        net = torchvision.models.resnet18(zero_init_residual=True)
        net.fc = official_mlp(2, 512, mlp_dim, dim, last_bn=True)
        for mod in net.modules():  # running statistics away from 0/1: they must load too
            if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
        parts[name] = net
    parts["predictor"] = official_mlp(2, dim, mlp_dim, dim, last_bn=False)
    return {
        f"module.{name}.{k}": v for name, net in parts.items() for k, v in net.state_dict().items()
    }, parts


def imagenet_stem_v3(**changes) -> MoCoV3:
    return MoCoV3(**v3_hparams(image_size=32, stem="imagenet", **changes))


def test_the_state_dict_is_the_official_layout_one_to_one():
    official, parts = official_state_dict()
    model = imagenet_stem_v3()
    ours = model.state_dict()
    theirs = {k[len("module.") :]: v for k, v in official.items()}
    assert list(ours) == list(theirs)  # same names, same order
    assert all(ours[k].shape == v.shape for k, v in theirs.items())
    model.load_state_dict(theirs, strict=True)  # an official checkpoint loads as it is
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.base_encoder(x), parts["base_encoder"].eval()(x))
        torch.testing.assert_close(
            model.predictor(model.base_encoder(x)),
            parts["predictor"].eval()(parts["base_encoder"](x)),
        )
        # The base encoder as backbone + head (what evaluation reads) is the same network.
        view = model.encoder_q
        torch.testing.assert_close(view(x), model.base_encoder(x))
        features = torchvision.models.resnet18()
        features.fc = nn.Identity()
        prefix = "base_encoder."
        features.load_state_dict(  # main_lincls.py's way: the base encoder without its fc
            {
                k[len(prefix) :]: v
                for k, v in theirs.items()
                if k.startswith(prefix) and not k.startswith(f"{prefix}fc.")
            }
        )
        torch.testing.assert_close(view.backbone(x), features.eval()(x))
    assert list(view.state_dict()) == [
        f"backbone.{k}" if not k.startswith("fc.") else f"head.{k[3:]}"
        for k in model.base_encoder.state_dict()
    ]


def test_an_official_file_is_read_with_its_projector_and_initialises_our_module(tmp_path):
    official, parts = official_state_dict()
    path = tmp_path / "r-18-100ep.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": official}, path)
    weights = read_weights(path, image_size=32)
    assert (weights.format, weights.head, weights.dim, weights.mlp_dim) == (
        "moco_v3",
        "v3_mlp",
        8,
        16,
    )
    model = imagenet_stem_v3()
    line = warm_start(model, str(path))
    assert "backbone and v3_mlp head" in line
    base = parts["base_encoder"].state_dict()
    for key, value in model.base_encoder.state_dict().items():
        assert torch.equal(value, base[key]), key
    for key, value in model.momentum_encoder.state_dict().items():
        assert torch.equal(value, base[key]), key  # both start from the base encoder


def test_our_checkpoint_loads_through_load_backbone_and_the_checkpoint_reader(tmp_path):
    from moco.checkpoint import query_encoder

    torch.manual_seed(6)
    model = imagenet_stem_v3()
    with torch.no_grad():
        model.encoder_q(torch.randn(4, 3, 32, 32))  # train mode: running statistics move
        for p in model.momentum_encoder.parameters():
            p.add_(1.0)  # readers must take the base encoder, not this one
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    assert checkpoint["encoder_spec"]["head"] == "v3_mlp"
    assert checkpoint["encoder_spec"]["mlp_dim"] == 16
    net = moco.load_backbone(tmp_path / "last.ckpt")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.encoder_q.backbone(x))
        encoder = query_encoder(checkpoint, "in-memory").eval()
        torch.testing.assert_close(encoder(x), model.base_encoder(x))
    assert net.source_format == "pretrain" and net.feature_dim == 512


# -------------------------------------------------------------------------------- config
def test_model_moco_v3_and_the_experiments_compose_and_check():
    tiny = ["data=synthetic", "data.image_size=8", "data.batch_size=8"]
    cfg = compose_config(["model=moco_v3", *tiny])
    check_pretrain(cfg)
    assert cfg.model.temperature == 1.0 and cfg.model.momentum_schedule == "cosine"
    assert (cfg.model.dim, cfg.model.mlp_dim) == (256, 4096)
    paper = compose_config(["+experiment=moco_v3", "data.root=/somewhere"])
    check_pretrain(paper)
    assert paper.model._target_ == "moco.MoCoV3" and paper.model.backbone == "resnet50"
    assert paper.optimizer._target_ == "moco.optim.LARS"
    assert (paper.optimizer.lr, paper.optimizer.weight_decay) == (0.6, 1e-6)
    assert paper.scheduler.name == "cosine" and paper.scheduler.warmup_epochs == 10
    assert list(paper.augment.crop_scale) == [0.08, 1.0] and paper.trainer.max_epochs == 100
    assert paper.model.momentum == 0.99 and paper.model.temperature == 1.0
    small = compose_config(["+experiment=moco_v3_fashion_mnist"])
    check_pretrain(small)
    assert small.data.name == "fashion_mnist" and small.recipe == "fashion_mnist"
    assert (small.model.dim, small.model.mlp_dim, small.model.temperature) == (256, 2048, 0.2)
    assert small.data.batch_size == 128 and small.backbone.stem == "imagenet"  # the recipe's


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("+model.queue_size=4096", "model.queue_size is not a key"),  # no queue in v3
        ("+model.mlp_dimm=8", "model.mlp_dimm is not a key"),
        ("model.temperature=0", "must be > 0 (paper: 1.0 for ResNets"),
        ("model.momentum=1.0", "must be in [0, 1)"),
        ("model.mlp_dim=0", "model.mlp_dim=0 must be >= 1"),
        ("data.batch_size=1", "data.batch_size=1 must be >= 2"),
    ],
)
def test_v3_config_mistakes_are_one_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        check_pretrain(compose_config(["model=moco_v3", "data=synthetic", override]))
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------- two processes
N, C = 3, 4


def _queries_and_keys(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)


def _contrast_on_rank(rank: int) -> dict:
    model = MoCoV3(**v3_hparams(temperature=0.5))
    q, k = _queries_and_keys(rank)
    q.requires_grad_(True)
    loss, logits = model.contrast(q, k)
    loss.backward()
    return {"loss": loss.detach(), "logits": logits.detach(), "grad": q.grad,
            "rank": distributed.rank()}  # fmt: skip


def test_across_two_processes_every_rank_contrasts_with_all_keys(tmp_path):
    ranks = run_on_two_ranks(_contrast_on_rank, tmp_path)
    qs, ks = zip(*(_queries_and_keys(r) for r in range(WORLD)), strict=True)
    all_keys = F.normalize(torch.cat(ks), dim=1)  # rank order
    for r, seen in enumerate(ranks):
        assert seen["rank"] == r
        q = F.normalize(qs[r], dim=1)
        # N x (world*N): own keys and the other rank's keys, which are this rank's negatives.
        torch.testing.assert_close(seen["logits"], q @ all_keys.T / 0.5)
        labels = torch.arange(N) + N * r  # the positive of query i on rank r: key r*N + i
        torch.testing.assert_close(
            seen["loss"], F.cross_entropy(q @ all_keys.T / 0.5, labels) * 1.0
        )
    # The mean of the ranks' losses is the loss of the whole global batch on one process.
    whole = algorithm_1(torch.cat(qs), torch.cat(ks), 0.5)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole)


# ----------------------------------------------------------------------------------- ViT
def test_a_vit_backbone_plugs_in_by_name(tmp_path):
    """vit_small (moco/vit.py): a 3-layer projector in torchvision's classifier slot (heads), a
    predictor ending in BatchNorm, and its checkpoints read back like a ResNet's."""
    from moco.run.export import export_backbone

    torch.manual_seed(7)
    model = MoCoV3(**v3_hparams(backbone="vit_small", temperature=0.2))
    linear = [m for m in model.base_encoder.heads if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linear] == [384, 16, 16] and linear[-1].out_features == 8
    assert isinstance(model.predictor[-1], nn.BatchNorm1d) and not model.predictor[-1].affine
    x = torch.randn(4, 3, 16, 16)
    loss = model.training_step(((x, x.flip(3)), None), 0)
    assert torch.isfinite(loss)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "vit.ckpt")
    net = moco.load_backbone(tmp_path / "vit.ckpt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.encoder_q.backbone(x))
    assert net.feature_dim == 384
    with pytest.raises(ConfigError, match="export writes ResNet backbones"):
        export_backbone(tmp_path / "vit.ckpt", "torchvision")
    cfg = compose_config(["model=moco_v3", "backbone=vit_small", "data=synthetic"])
    check_pretrain(cfg)


# ------------------------------------------------------------------------------- SyncBN
def _setup_in(model: MoCoV3, world: int, device: str) -> None:
    """``model.setup`` as Lightning calls it, in a world of ``world`` processes on ``device``."""
    from types import SimpleNamespace

    strategy = SimpleNamespace(root_device=torch.device(device))
    model._trainer = SimpleNamespace(world_size=world, strategy=strategy)
    model.setup("fit")


def test_under_ddp_on_gpus_every_batchnorm_becomes_syncbatchnorm():
    torch.manual_seed(8)
    model = MoCoV3(**v3_hparams())
    before = model.state_dict()
    _setup_in(model, 2, "cuda")  # conversion only; nothing runs on the GPU here
    for name in ("base_encoder", "momentum_encoder", "predictor"):
        norms = [
            m
            for m in getattr(model, name).modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms), name
    after = model.state_dict()
    assert list(after) == list(before)  # checkpoints keep the official names
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    view = model.encoder_q  # built from the converted modules: evaluation sees the same net
    assert (
        isinstance(view.backbone.bn1, nn.SyncBatchNorm)
        and view.backbone.bn1 is model.base_encoder.bn1
    )
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # eval mode: no sync, so it runs on the CPU
        torch.testing.assert_close(view(x), model.base_encoder(x))


@pytest.mark.parametrize(
    "world,device,sync_bn", [(1, "cuda", True), (2, "cpu", True), (2, "cuda", False)]
)
def test_batchnorm_stays_per_process_otherwise(world, device, sync_bn, recwarn):
    model = MoCoV3(**v3_hparams(sync_bn=sync_bn))
    _setup_in(model, world, device)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if device == "cpu":
        assert any("SyncBatchNorm needs GPUs" in str(w.message) for w in recwarn)


def test_the_vit_small_experiment_is_the_official_reference_setup():
    cfg = compose_config(["+experiment=moco_v3_vit_small", "data.root=/somewhere"])
    check_pretrain(cfg)
    assert (cfg.model.backbone, cfg.model.temperature, cfg.model.mlp_dim) == (
        "vit_small",
        0.2,
        4096,
    )
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1.5e-4, 0.1)
    assert (cfg.scheduler.warmup_epochs, cfg.trainer.max_epochs) == (40, 300)
    from moco.run.experiments import experiment_encoder_spec

    spec = experiment_encoder_spec("moco_v3_vit_small")
    assert (spec.backbone, spec.head, spec.image_size) == ("vit_small", "v3_mlp", 224)
