"""MoCo v3 through the scripts, as a user runs them: pretraining killed and resumed ends
bit-identical to an uninterrupted run; kNN, linear probe and export read its checkpoint."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from conftest import compose_config, module_dir
from torch import nn

import moco
from moco.data import PretrainDataModule
from moco.distributed import ddp_strategy
from moco.encoders import V3_HEAD
from moco.model_v3 import MoCoV3
from moco.run.experiments import experiment_encoder_spec
from moco.run.export import export_backbone
from moco.run.export_formats import detectron2_model
from moco.run.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 3, 6  # 48 images / batch 8
# model=moco_v3 without an experiment: the Fashion-MNIST experiment's recipe refuses other data.
# LARS, so that its state is part of what must resume exactly.
RUN = [
    "model=moco_v3",
    "optimizer=lars",
    "data=synthetic",
    "data.num_train=48",
    "data.image_size=8",
    "data.batch_size=8",
    "data.num_workers=1",
    "model.dim=16",
    "model.mlp_dim=32",
    "eval.enabled=false",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
]
CLOCK_COLUMNS = ("time/train_s", "time/epoch_s", "throughput/images_per_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "scripts/pretrain.py", f"hydra.run.dir={run_dir}", *RUN]


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "logs" / "metrics.csv").open() as f:
        return [
            {k: v for k, v in row.items() if v and k not in CLOCK_COLUMNS}
            for row in csv.DictReader(f)
        ]


def _all_tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_all_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_all_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.slow
def test_killed_and_resumed_v3_run_ends_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(
        _command(straight), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    first = interrupted / "checkpoints" / "epoch000.ckpt"
    process = subprocess.Popen(
        _command(interrupted), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600
    while not (first.exists() and (interrupted / "logs" / "metrics.csv").exists()):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=300)
    process.stderr.close()
    assert not (interrupted / "checkpoints" / f"epoch{EPOCHS - 1:03d}.ckpt").exists()
    resumed = subprocess.run(
        _command(interrupted), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout

    expected, got = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
        for d in (straight, interrupted)
    )
    assert expected["global_step"] == got["global_step"] == EPOCHS * STEPS_PER_EPOCH
    weights, other = expected["state_dict"], got["state_dict"]
    assert weights.keys() == other.keys()
    assert any(k.startswith("momentum_encoder.") for k in weights)
    different = [k for k in weights if not torch.equal(weights[k], other[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
    assert _all_tensors_equal(expected["optimizer_states"], got["optimizer_states"])
    rows = _rows(straight)
    assert rows == _rows(interrupted)
    # The logged momentum followed the cosine from 0.99 towards 1 over the whole run.
    logged = {int(r["step"]): float(r["train/momentum"]) for r in rows if "train/momentum" in r}
    assert logged and all(0.99 <= m < 1 for m in logged.values())
    assert list(logged.values()) == sorted(logged.values())


# ------------------------------------------------------------------------------ evaluation
DATA = ["data=synthetic", "data.num_train=60", "data.num_test=30", "features.progress=false"]


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory) -> Iterator[Path]:
    """A real (tiny) MoCo v3 checkpoint: 2 steps on 16 px RGB images, ImageNet stem (so the
    official layouts can take it), in fp32: bf16 on a CPU is refused for 16-px images with this
    stem, which shrink to 1x1 maps (moco.run.check)."""
    cfg = compose_config(
        [
            "model=moco_v3",
            "data=synthetic",
            "data.num_train=32",
            "data.num_test=16",
            "data.image_size=16",
            "data.batch_size=8",
            "backbone.stem=imagenet",
            "trainer.precision=32",
            "model.dim=16",
            "model.mlp_dim=32",
            "eval.enabled=false",
            "trainer.max_steps=2",
            "+trainer.enable_progress_bar=false",
        ]
    )
    with module_dir(tmp_path_factory, "v3") as run_dir:
        yield pretrain(cfg, run_dir)


def _script(name: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *overrides, f"hydra.run.dir={out}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # three script runs
def test_knn_and_probe_read_the_base_encoders_backbone(v3_checkpoint, tmp_path):
    one = ["knn.ks=[10]", "knn.temperatures=[0.1]", "knn.report.k=10", "features.cache_dir=null"]
    _script("knn_eval", tmp_path / "knn", f"checkpoint={v3_checkpoint}", *DATA, *one)
    summary = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert (summary["format"], summary["feature_dim"], summary["image_size"]) == (
        "pretrain",
        512,
        16,
    )
    # The projector's embedding too: the v3 head is rebuilt from the checkpoint's spec.
    _script(
        "knn_eval", tmp_path / "head", f"checkpoint={v3_checkpoint}", *DATA, *one,
        "features.layer=head",
    )  # fmt: skip
    assert json.loads((tmp_path / "head" / "knn.json").read_text())["feature_dim"] == 16
    probe = _script(
        "linear_probe", tmp_path / "probe", f"checkpoint={v3_checkpoint}", *DATA,
        "probe.epochs=2", "probe.batch_size=30", "features.cache_dir=null",
    )  # fmt: skip
    assert "encoder unchanged" in probe.stdout
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert 0.0 <= result["top1"] <= 100.0


@pytest.mark.slow  # two script runs
def test_export_writes_the_official_v3_layout_and_torchvision_weights(v3_checkpoint, tmp_path):
    ours = torch.load(v3_checkpoint, weights_only=True)["state_dict"]
    out = tmp_path / "v3.pth.tar"
    proc = _script("export", tmp_path / "export", f"checkpoint={v3_checkpoint}", "format=moco",
                   f"output={out}")  # fmt: skip
    assert "base_encoder, momentum_encoder, predictor" in proc.stdout
    official = torch.load(out, weights_only=True)
    assert official["arch"] == "resnet18" and official["epoch"] == 1
    # One to one: our names with main_moco.py's DistributedDataParallel prefix.
    assert set(official["state_dict"]) == {f"module.{k}" for k in ours}
    assert all(torch.equal(official["state_dict"][f"module.{k}"], v) for k, v in ours.items())
    # moco-v3 main_lincls.py --pretrained: the base encoder without fc, into torchvision.
    prefix = "module.base_encoder."
    state = {
        k[len(prefix) :]: v
        for k, v in official["state_dict"].items()
        if k.startswith(prefix) and not k.startswith(prefix + "fc")
    }
    lincls = torchvision.models.resnet18()
    missing = lincls.load_state_dict(state, strict=False).missing_keys
    assert set(missing) == {"fc.weight", "fc.bias"}
    lincls.fc = nn.Identity()
    backbone = moco.load_backbone(v3_checkpoint)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(lincls.eval()(images), backbone(images))
    # The exported file reads back as an official v3 file, projector included.
    again = moco.load_backbone(out, image_size=16)
    assert again.source_format == "moco_v3"
    with torch.no_grad():
        torch.testing.assert_close(again(images), backbone(images))

    _script("export", tmp_path / "tv", f"checkpoint={v3_checkpoint}", f"output={tmp_path}/b.pth")
    plain = torchvision.models.resnet18()
    plain.load_state_dict(torch.load(tmp_path / "b.pth", weights_only=True), strict=False)
    plain.fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), backbone(images))


def test_detectron2_export_of_v3_takes_the_base_encoder(v3_checkpoint, tmp_path):
    path, meta = export_backbone(v3_checkpoint, "moco", tmp_path / "v3.pth.tar")
    model = detectron2_model(torch.load(path, weights_only=True)["state_dict"])
    ours = torch.load(v3_checkpoint, weights_only=True)["state_dict"]
    assert (
        model["res2.0.conv1.weight"] == ours["base_encoder.layer1.0.conv1.weight"].numpy()
    ).all()
    assert (model["stem.conv1.norm.weight"] == ours["base_encoder.bn1.weight"].numpy()).all()
    export_backbone(v3_checkpoint, "detectron2", tmp_path / "v3.pkl")
    assert (tmp_path / "v3.pkl").stat().st_size > 0


def test_random_baseline_of_the_v3_experiment_has_the_v3_projector():
    spec = experiment_encoder_spec("moco_v3_fashion_mnist")
    assert (spec.backbone, spec.head, spec.dim, spec.mlp_dim) == ("resnet18", V3_HEAD, 256, 2048)


# --------------------------------------------------------------------- Lightning DDP, 2 CPUs
class RecordingMoCoV3(MoCoV3):
    """MoCoV3 that remembers the width of each step's logits (the keys it contrasted with)."""

    def contrast(self, q, k):
        loss, logits = super().contrast(q, k)
        self.__dict__.setdefault("widths", []).append(logits.shape[1])
        return loss, logits


class SaveEnd(pl.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, module):
        torch.save(
            {
                "state": {k: v.clone() for k, v in module.state_dict().items()},
                "widths": module.widths,
                "lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_two_process_ddp_fit_contrasts_with_both_ranks_keys_and_stays_in_step(tmp_path):
    batch, steps = 4, 3
    cfg = compose_config(
        ["model=moco_v3", "data=synthetic", "data.image_size=8", f"data.batch_size={batch}",
         "data.num_train=64", "model.dim=8", "model.mlp_dim=16"]
    )  # fmt: skip
    cfg.model._target_ = f"{__name__}.RecordingMoCoV3"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ddp_strategy(start_method="spawn"),
        use_distributed_sampler=False,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveEnd(tmp_path)],
    )
    trainer.fit(
        hydra.utils.instantiate(cfg.model), datamodule=PretrainDataModule(cfg.data, cfg.augment)
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for seen in ranks:
        # Two contrasts per step (one per view), each against the keys of both ranks.
        assert seen["widths"] == [2 * batch] * (2 * steps)
        assert seen["lr"] == pytest.approx(cfg.optimizer.lr * 2 * batch / 256)
    # Gradients are averaged by DDP and the momentum update is the same everywhere: the
    # encoders stay identical on both ranks (BatchNorm running statistics are per process).
    weights = [
        {k: v for k, v in r["state"].items() if "running_" not in k and "num_batches" not in k}
        for r in ranks
    ]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
