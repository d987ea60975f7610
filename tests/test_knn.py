"""faiss kNN against a brute-force torch reference; feature extraction; the online kNN monitor."""

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from torch import nn

from moco.encoders import Encoder, build_backbone, build_head
from moco.errors import ConfigError
from moco.eval import knn
from moco.eval.features import (
    FrozenFeatures,
    cache_key,
    cached_features,
    eval_dataset,
    extract_features,
)
from moco.eval.knn import knn_predict, knn_search, knn_sweep
from moco.eval.monitor import KNNMonitor
from moco.run.check import check_pretrain


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """The MoCo CIFAR demo's kNN written plainly: full similarity matrix, topk, one-hot votes."""
    sims = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T  # N_test x N_bank
    top_sims, top_idx = sims.topk(k, dim=1)  # N_test x k
    one_hot = F.one_hot(bank_labels[top_idx], num_classes).double()  # N_test x k x C
    return (one_hot * (top_sims.double() / temperature).exp().unsqueeze(-1)).sum(1)  # N_test x C


def clustered(n_bank=3000, n_test=500, dim=32, classes=10, noise=2.0, seed=0):
    """Gaussian clusters around random centres; ``noise`` is the per-coordinate std."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    yb, yt = (
        torch.randint(classes, (n_bank,), generator=g),
        torch.randint(classes, (n_test,), generator=g),
    )
    xb = centres[yb] + noise * torch.randn(n_bank, dim, generator=g)
    xt = centres[yt] + noise * torch.randn(n_test, dim, generator=g)
    return xb, yb, xt, yt


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (20, 0.07), (200, 0.1), (200, 0.5)])
def test_knn_predict_matches_brute_force(k, temperature):
    xb, yb, xt, yt = clustered()
    scores = knn_predict(xb, yb, xt, 10, k=k, temperature=temperature)
    reference = brute_force_knn(xb, yb, xt, 10, k, temperature)
    assert scores.shape == (len(xt), 10)
    assert torch.equal(scores.argmax(1), reference.argmax(1))
    # Same scores up to the per-query normalisation (the weights sum to 1 per row).
    torch.testing.assert_close(
        scores.double(), reference / reference.sum(1, keepdim=True), atol=1e-5, rtol=1e-4
    )
    # Hard enough that the test means something: neither chance nor perfect.
    accuracy = (scores.argmax(1) == yt).float().mean()
    assert 0.3 < accuracy < 0.99


def test_search_in_chunks_is_exact_and_sorted():
    xb, _, xt, _ = clustered(n_bank=1000, n_test=300)
    sims, idx = knn_search(xb, xt, k=50, chunk_size=64)  # many chunks of bank and queries
    ref_sims, ref_idx = (F.normalize(xt, dim=1) @ F.normalize(xb, dim=1).T).topk(50, dim=1)
    torch.testing.assert_close(sims, ref_sims, atol=1e-5, rtol=0)
    assert (idx == ref_idx).float().mean() > 0.999  # only float ties may swap places
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_sweep_equals_separate_predictions_and_k_is_capped():
    xb, yb, xt, yt = clustered(n_bank=150, n_test=200)
    results = knn_sweep(xb, yb, xt, yt, 10, ks=[5, 50, 150, 400], temperatures=[0.05, 0.5])
    for (k, t), top1 in results.items():
        expected = 100.0 * (knn_predict(xb, yb, xt, 10, k, t).argmax(1) == yt).float().mean().item()
        assert top1 == pytest.approx(expected)
    for t in (0.05, 0.5):  # k beyond the bank (150) means the whole bank
        assert results[(400, t)] == results[(150, t)]


def test_tiny_temperature_does_not_overflow_and_becomes_nearest_neighbour():
    xb, yb, xt, _ = clustered(n_bank=500, n_test=100)
    scores = knn_predict(xb, yb, xt, 10, k=50, temperature=1e-4)  # exp(1 / 1e-4) would overflow
    assert torch.isfinite(scores).all()
    nearest = (F.normalize(xt, dim=1) @ F.normalize(xb, dim=1).T).argmax(1)
    assert torch.equal(scores.argmax(1), yb[nearest])


@pytest.fixture
def split_search(monkeypatch):
    """Make knn_search split even small query sets over a pool of 3 single-threaded workers
    (the production minimum block is ~1000 queries at d=128), and count the blocks searched."""
    blocks = []
    search_one_thread = knn._search_one_thread

    def counting(index, queries, sims, indices):
        blocks.append(len(queries))
        search_one_thread(index, queries, sims, indices)

    monkeypatch.setattr(knn, "_min_blas_rows", lambda dim: 25)
    monkeypatch.setattr(knn.faiss, "omp_get_max_threads", lambda: 3)
    monkeypatch.setattr(knn, "_search_one_thread", counting)
    return blocks


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (200, 0.1)])
def test_split_search_predicts_like_brute_force(split_search, k, temperature):
    xb, yb, xt, yt = clustered(n_bank=3000, n_test=503)
    scores = knn_predict(xb, yb, xt, 10, k=k, temperature=temperature)
    assert sorted(split_search) == [83, 84, 84, 84, 84, 84]  # 2 blocks per worker, every row
    reference = brute_force_knn(xb, yb, xt, 10, k, temperature)
    assert torch.equal(scores.argmax(1), reference.argmax(1))
    torch.testing.assert_close(
        scores.double(), reference / reference.sum(1, keepdim=True), atol=1e-5, rtol=1e-4
    )


def test_split_search_in_chunks_equals_one_faiss_call(split_search):
    """Blocks and chunks must land in the right rows: compared with faiss searched in one call."""
    xb, _, xt, _ = clustered(n_bank=2000, n_test=1000, dim=48)
    sims, idx = knn_search(xb, xt, k=30, chunk_size=333)  # 4 chunks of 250, 3 x 3 blocks each
    assert len(split_search) == 4 * 6 and sum(split_search) == 1000
    index = knn.faiss.IndexFlatIP(48)
    index.add(knn._normalised(xb))
    ref_sims, ref_idx = index.search(knn._normalised(xt), 30)
    torch.testing.assert_close(sims, torch.from_numpy(ref_sims), atol=1e-6, rtol=0)
    assert (idx == torch.from_numpy(ref_idx)).float().mean() > 0.999  # only float ties differ
    bf_sims, _ = (F.normalize(xt, dim=1) @ F.normalize(xb, dim=1).T).topk(30, dim=1)
    torch.testing.assert_close(sims, bf_sims, atol=1e-5, rtol=0)


def test_split_blocks_and_threads():
    assert knn._bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert knn._bounds(0, 0) == []
    assert [knn._split(possible, 2) for possible in (0, 1, 2, 3, 4, 9)] == [0, 1, 2, 2, 4, 4]
    assert [knn._split(possible, 1) for possible in (0, 1, 5)] == [0, 1, 1]
    # faiss 1.15 switches to BLAS at nq * d >= 128000; older versions at nq >= 20.
    assert knn._min_blas_rows(128) * 128 >= knn.faiss.cvar.distance_compute_blas_threshold


def test_one_thread_and_few_queries_match_the_default():
    xb, _, xt, _ = clustered(n_bank=800, n_test=120)
    sims, idx = knn_search(xb, xt, k=40)  # fewer queries than a block: one faiss call
    one_sims, one_idx = knn_search(xb, xt, k=40, num_threads=1)
    torch.testing.assert_close(sims, one_sims, atol=1e-6, rtol=0)
    assert (idx == one_idx).float().mean() > 0.999


def test_empty_queries_and_empty_bank():
    xb, _, xt, _ = clustered(n_bank=50, n_test=10)
    sims, idx = knn_search(xb, xt[:0], k=5)
    assert sims.shape == (0, 5) and idx.shape == (0, 5)
    with pytest.raises(ValueError, match="empty"):
        knn_search(xb[:0], xt, k=5)


# ------------------------------------------------------------------------------- features
def synthetic_cfg(**overrides):
    base = {
        "name": "synthetic",
        "root": None,
        "download": False,
        "num_train": 60,
        "num_test": 30,
        "seed": 0,
        "image_size": 16,
        "channels": 3,
        "num_classes": 10,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "batch_size": 16,
        "num_workers": 0,
    }
    return OmegaConf.create({**base, **overrides})


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    net = build_backbone("resnet18", 3, 16)
    return Encoder(net, build_head("mlp", net.feature_dim, 8), channels_last=False)


def test_extract_features_in_eval_mode_in_order_and_restores_modes():
    data = synthetic_cfg()
    dataset = eval_dataset(data, "train")
    encoder = tiny_encoder()
    encoder.train()
    encoder.head.eval()  # a mixed state must come back as it was
    stats = encoder.backbone.bn1.running_mean.clone()
    feats, labels = extract_features(FrozenFeatures(encoder), dataset, batch_size=7)
    assert feats.shape == (60, 512) and labels.tolist() == [dataset[i][1] for i in range(60)]
    assert encoder.training and encoder.backbone.training and not encoder.head.training
    assert torch.equal(
        stats, encoder.backbone.bn1.running_mean
    )  # eval mode: BN statistics untouched
    encoder.eval()
    with torch.no_grad():
        direct = encoder.backbone(torch.stack([dataset[i][0] for i in range(5, 9)]))
    torch.testing.assert_close(feats[5:9], direct, atol=1e-4, rtol=1e-4)
    head_feats, _ = extract_features(FrozenFeatures(encoder, "head"), dataset, batch_size=64)
    assert head_feats.shape == (60, 8)


def test_raw_features_are_flattened_pixels_and_reject_head():
    dataset = eval_dataset(synthetic_cfg(), "test", limit=10)
    feats, _ = extract_features(FrozenFeatures(None), dataset, batch_size=4)
    assert feats.shape == (10, 3 * 16 * 16)
    assert torch.equal(feats[3], dataset[3][0].flatten())
    with pytest.raises(ConfigError):
        FrozenFeatures(None, "head")


def test_feature_cache_reuses_and_keys_on_what_matters(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(4, 3), torch.arange(4)

    data = synthetic_cfg()
    key = cache_key("raw", "backbone", data, "train", None)
    first = cached_features(str(tmp_path), key, compute)
    second = cached_features(str(tmp_path), key, compute)
    assert len(calls) == 1 and torch.equal(first[0], second[0])
    assert key == cache_key(
        "raw", "backbone", synthetic_cfg(batch_size=3, num_workers=2), "train", None
    )
    assert key != cache_key("raw", "backbone", synthetic_cfg(image_size=32), "train", None)
    assert key != cache_key("sha256:ab", "backbone", data, "train", None)
    assert key != cache_key("raw", "backbone", data, "test", None)


# ---------------------------------------------------------------------------- kNN monitor
class FrozenEncoderModule(pl.LightningModule):
    """A MoCo stand-in whose encoder_q never changes (only a dummy weight trains), so the
    monitor's number can be checked against an offline computation."""

    def __init__(self):
        super().__init__()
        self.encoder_q = tiny_encoder(seed=1).requires_grad_(False)
        self.dummy = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.dummy - 1.0).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.dummy], lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)


def offline_top1(data, k, temperature, bank_size):
    encoder = tiny_encoder(seed=1)
    bank_x, bank_y = extract_features(
        FrozenFeatures(encoder), eval_dataset(data, "train", bank_size), 64
    )
    test_x, test_y = extract_features(FrozenFeatures(encoder), eval_dataset(data, "test"), 64)
    return (
        100.0
        * (knn_predict(bank_x, bank_y, test_x, 10, k, temperature).argmax(1) == test_y)
        .float()
        .mean()
        .item()
    )


def make_trainer(tmp_path, monitor, epochs=2, **kwargs):
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def test_monitor_logs_knn_top1_equal_to_offline_knn(tmp_path):
    data = synthetic_cfg()
    conf = Path(__file__).resolve().parents[1] / "conf" / "eval" / "knn_monitor.yaml"
    overrides = {"every_n_epochs": 2, "k": 20, "bank_size": 40, "test_size": None, "batch_size": 32}
    cfg = OmegaConf.merge(OmegaConf.load(conf), overrides)
    assert cfg.enabled and cfg.temperature == 0.1 and cfg.layer == "backbone"
    monitor = KNNMonitor.from_config(cfg, data)
    assert len(monitor.bank) == 40 and len(monitor.test) == 30
    calls = []
    original = monitor.evaluate
    monitor.evaluate = lambda *a: calls.append(1) or original(*a)
    trainer = make_trainer(tmp_path, monitor, epochs=3)
    trainer.fit(FrozenEncoderModule())
    assert len(calls) == 1  # epochs 1 and 3 skipped by every_n_epochs=2
    assert trainer.callback_metrics["knn_top1"].item() == pytest.approx(
        offline_top1(data, 20, 0.1, 40), abs=1e-4
    )
    assert KNNMonitor.from_config(OmegaConf.merge(cfg, {"enabled": False}), data) is None
    for bad in ("k=0", "temperature=0.0", "bank_size=0", "layer=neck"):
        with pytest.raises(ConfigError, match=f"eval.{bad.split('=')[0]}"):
            check_pretrain(compose_config([f"eval.{bad}"]))


def whole_split_monitor(data) -> KNNMonitor:
    """A monitor after every epoch over the whole bank and test split, k=20."""
    return KNNMonitor(
        data,
        every_n_epochs=1,
        k=20,
        temperature=0.1,
        bank_size=None,
        test_size=None,
        batch_size=16,
        layer="backbone",
    )


def test_monitor_keeps_its_loader_workers_across_epochs_and_stops_them_at_the_end(tmp_path):
    data = synthetic_cfg(num_workers=1)
    monitor = whole_split_monitor(data)
    worker_pids = []
    original = monitor.evaluate

    def evaluate(*args):
        top1 = original(*args)
        worker_pids.append([w.pid for w in monitor._loaders["bank"]._iterator._workers])
        return top1

    monitor.evaluate = evaluate
    make_trainer(tmp_path, monitor, epochs=2).fit(FrozenEncoderModule())
    assert len(worker_pids) == 2 and len(worker_pids[0]) == 1
    assert worker_pids[0] == worker_pids[1]  # the same worker process in both epochs
    assert monitor._loaders == {}  # dropped at the end of the fit, and their workers with them
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(worker_pids[0][0], 0)


@pytest.mark.slow
def test_monitor_under_ddp_matches_one_process(tmp_path):
    """Two CPU processes (gloo): bank shards gathered, test counts summed: the offline number."""
    data = synthetic_cfg(
        num_train=61, num_test=31
    )  # odd sizes: shards of unequal length get padded
    monitor = whole_split_monitor(data)
    trainer = make_trainer(tmp_path, monitor, epochs=1, devices=2, strategy="ddp_spawn")
    trainer.fit(FrozenEncoderModule())
    assert trainer.callback_metrics["knn_top1"].item() == pytest.approx(
        offline_top1(data, 20, 0.1, None), abs=1e-4
    )
