"""The three evaluation scripts end to end on tiny synthetic data, as a user runs them."""

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import compose_config, module_dir

from moco.errors import ConfigError
from moco.run.check import check_eval
from moco.run.hardware import stem_for_machine
from moco.run.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
DATA = [
    "data=synthetic",
    "data.num_train=100",
    "data.num_test=50",
    "data.image_size=16",
    "features.progress=false",
]


def compose_cfg(name, overrides):
    return compose_config(overrides, name)  # a value the schema refuses: ConfigError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Iterator[Path]:
    """A real (tiny) pretraining checkpoint: 2 steps on 16 px synthetic images."""
    cfg = compose_cfg(
        "pretrain",
        [
            "data=synthetic",
            "data.num_train=32",
            "data.num_test=16",
            "data.image_size=16",
            "data.batch_size=16",
            "model.bn_splits=2",
            "model.queue_size=64",
            "trainer.max_steps=2",
            "+trainer.enable_progress_bar=false",
        ],
    )
    with module_dir(tmp_path_factory, "pretrain") as run_dir:
        yield pretrain(cfg, run_dir)


def run(script, tmp_path, *overrides, expect=0):
    out_dir = tmp_path / script
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / f"{script}.py"),
            *overrides,
            f"hydra.run.dir={out_dir}",
        ],
        cwd=ROOT,
        # One thread, as in conftest.py: the work is tiny and the test machine may be shared.
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return out_dir, proc


def test_knn_eval_on_a_checkpoint(checkpoint, tmp_path):
    out, proc = run(
        "knn_eval",
        tmp_path,
        f"checkpoint={checkpoint}",
        *DATA,
        "data.image_size=32",
        f"features.cache_dir={tmp_path / 'cache'}",
    )
    summary = json.loads((out / "knn.json").read_text())
    assert summary["image_size"] == 16  # taken from the checkpoint, not from data.image_size=32
    assert (summary["num_train"], summary["num_test"], summary["feature_dim"]) == (100, 50, 512)
    rows = list(csv.DictReader((out / "knn.csv").open()))
    assert len(rows) == 5 * 6 and {r["k"] for r in rows} == {"10", "20", "50", "100", "200"}
    top1 = {(int(r["k"]), float(r["temperature"])): float(r["top1"]) for r in rows}
    assert summary["top1"]["top1"] == top1[(200, 0.1)]
    assert summary["best"]["top1"] == max(top1.values()) > 10.0  # better than chance on 10 classes
    assert "k=200, T=0.1" in proc.stdout
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and test features cached


def test_knn_eval_draws_the_neighbours_picture_from_features_and_pixels(checkpoint, tmp_path):
    picture = [
        "knn.picture.queries=3",
        "knn.picture.neighbours=4",
        "knn.ks=[10]",
        "knn.report.k=10",
    ]
    cache = tmp_path / "cache"
    out, proc = run(
        "knn_eval",
        tmp_path,
        f"checkpoint={checkpoint}",
        *DATA,
        *picture,
        f"features.cache_dir={cache}",
    )
    assert (out / "neighbours.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Nearest-neighbour picture" in proc.stdout
    # the checkpoint's train and test features, and the raw pixels of the training images
    assert len(list(cache.glob("*.pt"))) == 3
    raw, _ = run(
        "knn_eval",
        tmp_path / "raw",
        "checkpoint=raw",
        *DATA,
        *picture,
        f"features.cache_dir={cache}",
    )
    assert (raw / "neighbours.png").is_file()
    assert len(list(cache.glob("*.pt"))) == 4  # the raw train features were shared: + raw test


def test_linear_probe_with_augmentation_keeps_the_checkpoint_frozen(checkpoint, tmp_path):
    out, proc = run(
        "linear_probe",
        tmp_path,
        f"checkpoint={checkpoint}",
        *DATA,
        "optimizer=adam",
        "data.num_train=50",
        "probe.epochs=2",
        "probe.batch_size=25",
        "probe.augment=true",
        "features.cache_dir=null",
    )
    summary = json.loads((out / "probe.json").read_text())
    assert (
        summary["optimizer"] == "adam"
        and summary["optimizer_config"]["_target_"] == "moco.optim.Adam"
    )
    conf_lr = compose_cfg("probe", ["checkpoint=raw"]).probe.lr_by_optimizer.adam
    assert summary["lr"] == conf_lr and summary["augment"] is True
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 100.0
    steps = list(csv.DictReader((out / "losses.csv").open()))
    assert len(steps) == 2 * 2  # 2 epochs of 50 images, 25 per step
    assert "encoder unchanged" in proc.stdout


def test_linear_probe_reports_a_held_out_validation_split(tmp_path):
    out, proc = run(
        "linear_probe",
        tmp_path,
        "checkpoint=raw",
        *DATA,
        "probe.epochs=2",
        "probe.batch_size=20",
        "probe.validation=40",
        "probe.normalize=standardize",
        "features.cache_dir=null",
    )
    summary = json.loads((out / "probe.json").read_text())
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 100.0
    steps = list(csv.DictReader((out / "losses.csv").open()))
    assert len(steps) == 2 * 3  # trained on the 60 images left: 3 steps of 20 per epoch
    assert f"validation top-1 {summary['val_top1']:.2f}%" in proc.stdout


def test_linear_probe_refuses_to_hold_out_every_training_image(tmp_path):
    out, proc = run(
        "linear_probe",
        tmp_path,
        "checkpoint=raw",
        *DATA,
        "probe.validation=100",  # all 100 training images of DATA: none left to train on
        "features.cache_dir=null",
        expect=2,
    )
    assert proc.stderr.startswith("error: probe.validation=100 cannot be held out of 100")
    assert proc.stderr.strip().count("\n") == 0 and not out.exists()


def test_compare_optimizers_on_raw_pixels(tmp_path):
    out, proc = run(
        "compare_optimizers",
        tmp_path,
        "checkpoint=raw",
        *DATA,
        "probe.epochs=3",
        "features.cache_dir=null",
        "optimizers.adam.lr=0.05",
    )
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["optimizer"] for r in rows] == [
        "sgd",
        "momentum",
        "nesterov",
        "adagrad",
        "rmsprop",
        "adam",
    ]
    assert float(rows[-1]["lr"]) == 0.05
    assert all(
        float(r["top1"]) > 10.0 for r in rows
    )  # raw synthetic patterns are partly linearly separable
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "losses.csv").open() as f:
        assert next(csv.reader(f)) == [
            "step",
            "sgd",
            "momentum",
            "nesterov",
            "adagrad",
            "rmsprop",
            "adam",
        ]


def test_user_mistake_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path):
    out, proc = run("knn_eval", tmp_path, f"checkpoint={tmp_path / 'nope.ckpt'}", *DATA, expect=2)
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: checkpoint=")
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("knn", "knn.ks=[0,5]", "knn.ks"),
        ("knn", "knn.report.k=7", "knn.report"),
        ("knn", "knn.picture.neighbours=0", "knn.picture"),
        ("knn", "features.layer=neck", "features.layer"),
        ("probe", "probe.normalize=zscore", "probe.normalize"),
        ("compare", "probe.validation=-1", "probe.validation"),
        ("compare", "probe.validation=10 probe.augment=true", "probe.augment=false"),
        ("compare", "probe.augmentation.affine.degrees=-1", "probe.augmentation.affine.degrees"),
        ("compare", "probe.augmentation.erase.p=2", "probe.augmentation.erase.p"),
        ("compare", "optimizers.sgd.lr=0", "optimizer sgd"),
    ],
)
def test_invalid_configs_are_refused_before_any_work(name, override, message):
    with pytest.raises(ConfigError, match=message):  # by the schema, or by the check
        check_eval(compose_cfg(name, ["checkpoint=raw", *DATA, *override.split()]))


def test_missing_checkpoint_value_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint is required"):
        check_eval(compose_cfg("knn", DATA))


def test_random_baseline_is_the_encoder_of_the_named_experiment(tmp_path):
    """checkpoint=random random_from=moco_v2: the architecture that experiment pretrains (its
    stem for this machine), untrained, at the evaluation's geometry."""
    out, proc = run(
        "knn_eval",
        tmp_path,
        "checkpoint=random",
        "random_from=moco_v2",
        *DATA,
        "knn.ks=[10]",
        "knn.temperatures=[0.1]",
        "knn.report.k=10",
        "features.cache_dir=null",
    )
    summary = json.loads((out / "knn.json").read_text())
    assert (summary["checkpoint"], summary["stem"], summary["head"]) == (
        "random",
        stem_for_machine("auto"),  # the experiment's stem on this machine
        "mlp",
    )
    assert (summary["in_channels"], summary["image_size"], summary["feature_dim"]) == (3, 16, 512)
    one_k = ["knn.ks=[10]", "knn.temperatures=[0.1]", "knn.report.k=10", "features.cache_dir=null"]
    default = run("knn_eval", tmp_path / "default", "checkpoint=random", *DATA, *one_k)
    assert json.loads((default[0] / "knn.json").read_text())["stem"] == "small"  # auto at 16 px
