"""The linear probe: learns separable features with every optimizer and its conf/ learning rate;
the frozen-encoder check fires on any change; checkpoints load safely or fail with one line."""

import pickle
from pathlib import Path

import pytest
import torch
from conftest import moco_hparams
from omegaconf import OmegaConf

from moco import MoCo
from moco.encoders import EncoderSpec
from moco.errors import ConfigError, DataError
from moco.eval.probe import (
    BackboneChangedError,
    assert_unchanged,
    cached_batches,
    fit_normaliser,
    hold_out,
    topk_accuracy,
    train_linear_probe,
    weights_snapshot,
)
from moco.eval.source import load_encoder

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]


def probe_conf():
    return OmegaConf.load(CONF / "probe" / "default.yaml")


def optimizer_conf(name):
    """conf/optimizer/<name>.yaml with the probe's lr for it, as probe.yaml composes it."""
    cfg = OmegaConf.load(CONF / "optimizer" / f"{name}.yaml")
    cfg.pop("defaults")  # Hydra's list (the schema to check it against), not an argument
    cfg.lr = probe_conf().lr_by_optimizer[name]
    return cfg


def features(n, dim=64, classes=10, noise=0.6, seed=0):
    """Gaussian clusters: linearly separable up to a few per cent of overlap."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(classes, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), labels


def run_probe(name, epochs=10, train=2000):
    x, y = features(train)
    tx, ty = features(1000, seed=1)
    p = probe_conf()
    normalise = fit_normaliser(p.normalize, x)
    x, tx = normalise(x), normalise(tx)
    batch = 128
    linear, losses = train_linear_probe(
        cached_batches(x, y, batch, seed=0),
        -(-len(x) // batch),
        x.shape[1],
        10,
        epochs,
        optimizer_conf(name),
        OmegaConf.load(CONF / "scheduler" / "cosine.yaml"),
    )
    return linear, losses, topk_accuracy(linear, tx, ty)


def test_probe_reaches_high_accuracy_with_the_default_protocol():
    linear, losses, acc = run_probe("momentum")
    assert acc["top1"] > 97.0 and acc["top5"] == 100.0
    assert losses.shape == (10 * 16,)  # one loss per step
    assert losses[-16:].mean() < 0.2 * losses[:16].mean()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_learns_with_its_probe_lr(name):
    _, losses, acc = run_probe(name, epochs=4)
    assert torch.isfinite(losses).all()
    assert losses[-16:].mean() < 0.5 * losses[:16].mean()
    assert acc["top1"] > 90.0


def test_cached_batches_cover_every_sample_once_per_epoch_in_a_new_order():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    epoch = cached_batches(x, y, 4, seed=0)
    first, second = [torch.cat([b[1] for b in epoch()]) for _ in range(2)]
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    assert [len(b[1]) for b in epoch()] == [4, 4, 2]


def test_topk_accuracy():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
    linear = torch.nn.Identity()
    acc = topk_accuracy(linear, logits, torch.tensor([2, 1, 2]), ks=(1, 2))
    assert acc == {"top1": pytest.approx(100 / 3), "top2": pytest.approx(300 / 3)}


# ------------------------------------------------------------------------ frozen encoder
def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))


def test_frozen_check_passes_when_nothing_changed_even_after_eval_forward():
    net = small_net()
    snapshot = weights_snapshot(net)
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 1, 8, 8))
    assert_unchanged(net, snapshot)


def test_frozen_check_fires_on_a_changed_weight():
    net = small_net()
    snapshot = weights_snapshot(net)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(BackboneChangedError, match="0.weight"):
        assert_unchanged(net, snapshot)


def test_frozen_check_fires_on_moved_batchnorm_statistics():
    net = small_net()
    snapshot = weights_snapshot(net)
    net.train()  # the mistake the check exists for: a forward pass in train mode
    with torch.no_grad():
        net(torch.randn(2, 1, 8, 8))
    with pytest.raises(BackboneChangedError, match="running_mean"):
        assert_unchanged(net, snapshot)


# --------------------------------------------------------------------------- checkpoints
DATA = OmegaConf.create({"name": "synthetic", "channels": 3, "image_size": 32})
RANDOM = EncoderSpec("resnet18", "auto", 3, 32, "mlp", 8)


def test_checkpoint_loads_query_encoder_and_takes_its_geometry(tmp_path):
    model = MoCo(**moco_hparams())
    with torch.no_grad():
        model.encoder_q.backbone.conv1.weight.fill_(0.5)  # the query encoder, not the key encoder
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "epoch": 3,
            "global_step": 40,
        },
        path,
    )
    loaded = load_encoder(str(path), DATA, RANDOM)
    assert loaded.data_cfg.image_size == 16 and DATA.image_size == 32  # caller's config untouched
    assert torch.equal(loaded.encoder.backbone.conv1.weight, model.encoder_q.backbone.conv1.weight)
    assert loaded.info["epoch"] == 3 and loaded.source.startswith("sha256:")
    with pytest.raises(ConfigError, match="3-channel"):
        load_encoder(str(path), OmegaConf.merge(DATA, {"channels": 1}), RANDOM)


def test_random_encoder_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a, b = load_encoder("random", DATA, RANDOM), load_encoder("random", DATA, RANDOM)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.encoder.backbone.conv1.weight, b.encoder.backbone.conv1.weight)
    assert load_encoder("raw", DATA, RANDOM).encoder is None


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_bad_checkpoints_fail_with_one_line_and_no_pickle_runs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_encoder(str(tmp_path / "missing.ckpt"), DATA, RANDOM)
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable"):
        load_encoder(str(tmp_path / "text.ckpt"), DATA, RANDOM)
    torch.save(
        {"state_dict": {"fc.weight": torch.zeros(1)}, "hyper_parameters": {}},
        tmp_path / "other.ckpt",
    )
    with pytest.raises(DataError, match="not a MoCo checkpoint"):
        load_encoder(str(tmp_path / "other.ckpt"), DATA, RANDOM)
    exploit = Exploit()
    exploit.target = str(tmp_path / "pwned")
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": exploit}))
    torch.save({"state_dict": exploit}, tmp_path / "evil_zip.ckpt")
    with pytest.raises(DataError, match="not a readable"):  # a bare pickle is no torch checkpoint
        load_encoder(str(tmp_path / "evil.ckpt"), DATA, RANDOM)
    with pytest.raises(DataError, match="would execute code"):
        load_encoder(str(tmp_path / "evil_zip.ckpt"), DATA, RANDOM)
    assert not (tmp_path / "pwned").exists()


def test_hold_out_splits_the_rows_in_two_and_repeats_for_a_seed():
    x, y = features(100)
    (rest_x, rest_y), (held_x, held_y) = hold_out(x, y, 30, seed=0)
    assert len(held_x) == len(held_y) == 30 and len(rest_x) == len(rest_y) == 70
    rows = {tuple(r.tolist()) for r in torch.cat([rest_x, held_x])}
    assert rows == {tuple(r.tolist()) for r in x}  # every row once, in one part or the other
    assert torch.equal(hold_out(x, y, 30, seed=0)[1][0], held_x)
    assert not torch.equal(hold_out(x, y, 30, seed=1)[1][0], held_x)
    with pytest.raises(ConfigError, match="probe.validation=100 cannot be held out of 100"):
        hold_out(x, y, 100, seed=0)


def test_standardize_uses_the_training_statistics_of_each_dimension():
    x, _ = features(500)
    x[:, 3] = 7.0  # a dead dimension: no variance
    normalise = fit_normaliser("standardize", x)
    z = normalise(x)
    live = [d for d in range(x.shape[1]) if d != 3]
    assert torch.allclose(z[:, live].mean(0), torch.zeros(len(live)), atol=1e-5)
    assert torch.allclose(z[:, live].std(0), torch.ones(len(live)), atol=1e-5)
    assert torch.equal(z[:, 3], torch.zeros(len(x)))
    shifted = normalise(x + 1.0)  # other data: the training statistics, not its own
    assert torch.allclose(shifted[:, live].mean(0), 1.0 / x[:, live].std(0), atol=1e-4)
    assert torch.equal(shifted[:, 3], torch.ones(len(x)))  # the dead one is only centred
