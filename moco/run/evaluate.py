"""The offline evaluations behind scripts/knn_eval.py, linear_probe.py and compare_optimizers.py:
a composed config in, results printed and written to the run directory."""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from moco.data.augment import pretrain_transform
from moco.data.datasets import load_dataset
from moco.data.workers import loader_workers
from moco.eval.features import (
    FrozenFeatures,
    cache_key,
    cached_features,
    eval_dataset,
    extract_features,
)
from moco.eval.knn import knn_sweep
from moco.eval.neighbours import nearest, plot_neighbours, query_indices
from moco.eval.probe import (
    assert_unchanged,
    cached_batches,
    fit_normaliser,
    hold_out,
    topk_accuracy,
    torch_threads,
    train_linear_probe,
    weights_snapshot,
)
from moco.eval.report import knn_table, plot_loss_curves, rows_table, write_csv, write_json
from moco.eval.source import RANDOM, RAW, EvalEncoder, load_encoder, random_spec_for
from moco.run.check import check_eval, optimizers, require
from moco.run.experiments import experiment_encoder_spec


# --------------------------------------------------------------------------------- features
@dataclass
class Prepared:
    """The frozen feature model, a snapshot of its weights and the features of both splits."""

    loaded: EvalEncoder
    model: FrozenFeatures
    snapshot: dict
    train: tuple[torch.Tensor, torch.Tensor]  # features N x D, labels N
    test: tuple[torch.Tensor, torch.Tensor]
    seconds: float  # feature extraction (or cache read)
    datasets: dict  # "train" and "test": the un-augmented images the features came from


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(cfg: DictConfig) -> Prepared:
    """Load the encoder, snapshot its weights, extract (or read cached) features of both splits."""
    f = cfg.features
    random_spec = None
    if cfg.checkpoint == RANDOM:
        random_spec = random_spec_for(experiment_encoder_spec(cfg.random_from), cfg.data)
    loaded = load_encoder(cfg.checkpoint, cfg.data, random_spec, f.random_init.seed)
    data_cfg, device = loaded.data_cfg, _device(f.device)
    model = FrozenFeatures(loaded.encoder, f.layer).to(device).requires_grad_(False)
    snapshot = weights_snapshot(model)
    # Both splits are loaded before any extraction, so a data problem shows at once.
    datasets = {s: eval_dataset(data_cfg, s, f[f"{s}_limit"], f.seed) for s in ("train", "test")}
    start, out = time.perf_counter(), {}
    for split, dataset in datasets.items():
        out[split] = _split_features(cfg, loaded.source, model, data_cfg, split, dataset, device)
        top = int(out[split][1].max())
        require(
            top < data_cfg.num_classes,
            f"labels go up to {top} but data.num_classes={data_cfg.num_classes}: "
            "set data.num_classes",
        )
    seconds = time.perf_counter() - start
    return Prepared(loaded, model, snapshot, out["train"], out["test"], seconds, datasets)


def _split_features(
    cfg: DictConfig,
    source: str,
    model: FrozenFeatures,
    data_cfg: DictConfig,
    split: str,
    dataset: Dataset,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of one split through ``model``, from the cache when it holds them."""
    f = cfg.features

    def extract():
        desc = f"features ({split})" if f.progress else None
        return extract_features(
            model, dataset, f.batch_size, data_cfg.num_workers, device, desc=desc
        )

    key = cache_key(source, model.layer, data_cfg, split, f[f"{split}_limit"])
    return cached_features(f.cache_dir, key, extract)


def _describe(cfg: DictConfig, prep: Prepared) -> dict:
    test_x = prep.test[0]
    return {
        **prep.loaded.info,
        "data": cfg.data.name,
        "image_size": prep.loaded.data_cfg.image_size,
        "layer": cfg.features.layer,
        "feature_dim": test_x.shape[1],
        "num_train": len(prep.train[0]),
        "num_test": len(test_x),
        "feature_seconds": round(prep.seconds, 2),
    }


# ------------------------------------------------------------------------------------- kNN
def run_knn(cfg: DictConfig, out_dir: Path) -> dict:
    """kNN top-1 over the (k, T) sweep; prints the table, writes knn.csv and knn.json."""
    check_eval(cfg)
    prep = prepare(cfg)
    ks, temps = sorted(cfg.knn.ks), sorted(cfg.knn.temperatures)
    start = time.perf_counter()
    results = knn_sweep(*prep.train, *prep.test, cfg.data.num_classes, ks, temps)
    sweep_seconds = time.perf_counter() - start
    best = max(results, key=results.get)
    report = (cfg.knn.report.k, cfg.knn.report.temperature)
    summary = {
        **_describe(cfg, prep),
        "sweep_seconds": round(sweep_seconds, 2),
        "top1": {"k": report[0], "temperature": report[1], "top1": results[report]},
        "best": {"k": best[0], "temperature": best[1], "top1": results[best]},
        "results": [{"k": k, "temperature": t, "top1": v} for (k, t), v in results.items()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "knn.csv", summary["results"])
    write_json(out_dir / "knn.json", summary)
    picture = _neighbours_picture(cfg, prep, out_dir / "neighbours.png")
    print(
        f"kNN top-1 (%) of {summary['checkpoint']} on {cfg.data.name} "
        f"({summary['num_train']} bank, {summary['num_test']} test, "
        f"{summary['feature_dim']}-d {cfg.features.layer} features)"
    )
    print(knn_table(results, ks, temps))
    print(
        f"k={report[0]}, T={report[1]:g}: {results[report]:.2f}%   "
        f"best: k={best[0]}, T={best[1]:g}: {results[best]:.2f}%   "
        f"sweep {sweep_seconds:.2f} s, features {prep.seconds:.1f} s"
    )
    if picture:
        print(f"Nearest-neighbour picture: {picture}")
    return summary


def _neighbours_picture(cfg: DictConfig, prep: Prepared, path: Path) -> Path | None:
    """With knn.picture.queries > 0: the nearest training images of a few test images, by these
    features and by raw pixels (moco/eval/neighbours.py)."""
    picture = cfg.knn.picture
    if picture.queries <= 0:
        return None
    queries = query_indices(prep.test[1], picture.queries, cfg.features.seed)
    blocks = {"features": nearest(prep.train[0], prep.test[0][queries], picture.neighbours)}
    if prep.loaded.encoder is not None:  # raw pixels against themselves say nothing new
        pixels, data_cfg = FrozenFeatures(None), prep.loaded.data_cfg
        train_set, test_set = prep.datasets["train"], prep.datasets["test"]
        bank = _split_features(cfg, RAW, pixels, data_cfg, "train", train_set)[0]
        asked = torch.stack([test_set[q][0].flatten() for q in queries])
        blocks["raw pixels"] = nearest(bank, asked, picture.neighbours)
    source = Path(str(prep.loaded.info["checkpoint"]))
    name = "/".join(source.parts[-3:])  # run/checkpoints/last.ckpt: enough to tell runs apart
    title = f"{cfg.data.name}: nearest training images, {name}"
    plot_neighbours(path, prep.datasets["test"], prep.datasets["train"], queries, blocks, title)
    return path


# ---------------------------------------------------------------------------- linear probe
def _probe_one(
    cfg: DictConfig,
    prep: Prepared,
    optimizer_cfg: DictConfig,
    name: str,
    augment: bool = False,
) -> tuple[dict, np.ndarray]:
    """Train and test one linear layer; then make sure the encoder did not change."""
    p = cfg.probe
    train, held = prep.train, None
    if p.validation:  # the same rows for every probe seed: they follow the features' seed
        train, held = hold_out(*prep.train, p.validation, cfg.features.seed)
    normalise = fit_normaliser(p.normalize, train[0])  # statistics of un-augmented train features
    test_x = normalise(prep.test[0])
    if augment:  # the encoder runs in every step: it keeps all threads
        batches, steps_per_epoch = _augmented_batches(cfg, prep, normalise)
        threads = None
    else:
        train_x = normalise(train[0])
        batches = cached_batches(train_x, train[1], p.batch_size, p.seed)
        steps_per_epoch = -(-len(train_x) // p.batch_size)
        threads = p.threads
    start = time.perf_counter()
    with torch_threads(threads):
        linear, losses = train_linear_probe(
            batches,
            steps_per_epoch,
            test_x.shape[1],
            cfg.data.num_classes,
            p.epochs,
            optimizer_cfg,
            cfg.scheduler,
            p.seed,
            desc=f"probe ({name})" if cfg.features.progress else None,
        )
    seconds = time.perf_counter() - start
    accuracy = topk_accuracy(linear, test_x, prep.test[1])
    if held is not None:
        validation = topk_accuracy(linear, normalise(held[0]), held[1])
        accuracy.update({f"val_{k}": v for k, v in validation.items()})
    assert_unchanged(prep.model, prep.snapshot)
    final = losses[-steps_per_epoch:].mean().item()  # mean over the last epoch
    return {
        "optimizer": name,
        "lr": optimizer_cfg.lr,
        "final_loss": final,
        **accuracy,
        "seconds": round(seconds, 2),
    }, losses.numpy()


def _augmented_batches(cfg: DictConfig, prep: Prepared, normalise):
    """Batches of features of randomly cropped and flipped training images, through the frozen
    encoder (kept in eval mode: its BatchNorm statistics must not move)."""
    data_cfg, p = prep.loaded.data_cfg, cfg.probe
    dataset = load_dataset(data_cfg, "train")
    dataset.transform = pretrain_transform(p.augmentation, data_cfg)
    loader = DataLoader(
        dataset,
        batch_size=p.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(p.seed),
        **loader_workers(data_cfg.num_workers),
    )
    device = next(iter(prep.model.parameters()), torch.empty(0)).device

    def epoch():
        prep.model.eval()
        for images, labels in loader:
            with torch.no_grad():
                features = prep.model(images.to(device)).float().cpu()
            yield normalise(features), labels

    return epoch, len(loader)


def run_probe(cfg: DictConfig, out_dir: Path) -> dict:
    """One linear probe; prints and writes probe.json and losses.csv."""
    check_eval(cfg)
    [(name, optimizer_cfg)] = optimizers(cfg).items()
    prep = prepare(cfg)
    row, losses = _probe_one(cfg, prep, optimizer_cfg, name, cfg.probe.augment)
    summary = {
        **_describe(cfg, prep),
        **row,
        "epochs": cfg.probe.epochs,
        "augment": cfg.probe.augment,
        "optimizer_config": OmegaConf.to_container(optimizer_cfg, resolve=True),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "probe.json", summary)
    write_csv(
        out_dir / "losses.csv", [{"step": i, "loss": v} for i, v in enumerate(losses.tolist())]
    )
    print(
        f"Linear probe of {summary['checkpoint']} on {cfg.data.name}, {name} lr {row['lr']:g}, "
        f"{cfg.probe.epochs} epochs: top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%, "
        + (f"validation top-1 {row['val_top1']:.2f}%, " if "val_top1" in row else "")
        + f"final loss {row['final_loss']:.4f}, {row['seconds']:.1f} s "
        f"(features {prep.seconds:.1f} s); encoder unchanged"
    )
    return summary


def run_compare(cfg: DictConfig, out_dir: Path) -> dict:
    """The probe with every optimizer of ``cfg.optimizers`` on the same cached features."""
    check_eval(cfg)
    prep = prepare(cfg)
    rows, curves = [], {}
    for name, optimizer_cfg in optimizers(cfg).items():
        row, losses = _probe_one(cfg, prep, optimizer_cfg, name)
        rows.append(row)
        curves[f"{name} (lr {row['lr']:g})"] = losses
    steps_per_epoch = -(-len(prep.train[0]) // cfg.probe.batch_size)
    summary = {**_describe(cfg, prep), "epochs": cfg.probe.epochs, "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "compare.csv", rows)
    write_json(out_dir / "compare.json", summary)
    write_csv(
        out_dir / "losses.csv",
        [
            {
                "step": i,
                **{n: float(c[i]) for n, c in zip(_names(rows), curves.values(), strict=True)},
            }
            for i in range(len(next(iter(curves.values()))))
        ],
    )
    plot_loss_curves(
        out_dir / "loss_curves.png",
        curves,
        steps_per_epoch,
        f"Linear probe on {cfg.data.name} features of {Path(str(cfg.checkpoint)).name}",
    )
    print(
        f"Linear probe of {summary['checkpoint']} on {cfg.data.name}, {cfg.probe.epochs} epochs, "
        f"same cached features (extracted in {prep.seconds:.1f} s); encoder unchanged"
    )
    print(rows_table(rows))
    return summary


def _names(rows: list[dict]) -> list[str]:
    return [row["optimizer"] for row in rows]
