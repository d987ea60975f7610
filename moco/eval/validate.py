"""Validation of the evaluation configs (knn.yaml, probe.yaml, compare.yaml) before any work."""

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from moco.data.datasets import LOADERS
from moco.errors import ConfigError
from moco.eval.features import LAYERS
from moco.eval.probe import NORMALISATIONS
from moco.optim.schedules import SCHEDULES


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_eval(cfg: DictConfig) -> None:
    """Raise ConfigError with one actionable line for the first invalid value, before any work."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError(
            "checkpoint is required: checkpoint=runs/.../checkpoints/last.ckpt, raw or random"
        )
    f = cfg.features
    check(
        cfg.data.name in LOADERS,
        f"data.name={cfg.data.name} is unknown: use one of {sorted(LOADERS)}",
    )
    check(f.layer in LAYERS, f"features.layer={f.layer} is unknown: use one of {list(LAYERS)}")
    check(f.batch_size >= 1, f"features.batch_size={f.batch_size} must be >= 1")
    for key in ("train_limit", "test_limit"):
        check(
            f[key] is None or f[key] >= 1,
            f"features.{key}={f[key]} must be >= 1 or null (all images)",
        )
    if "knn" in cfg:
        knn = cfg.knn
        check(
            len(knn.ks) > 0 and all(k >= 1 for k in knn.ks),
            f"knn.ks={list(knn.ks)} must be integers >= 1",
        )
        check(
            len(knn.temperatures) > 0 and all(t > 0 for t in knn.temperatures),
            f"knn.temperatures={list(knn.temperatures)} must be > 0",
        )
        check(
            knn.report.k in knn.ks and knn.report.temperature in knn.temperatures,
            "knn.report.k and knn.report.temperature must be among knn.ks and knn.temperatures",
        )
    if "probe" in cfg:
        p = cfg.probe
        check(p.epochs >= 1, f"probe.epochs={p.epochs} must be >= 1")
        check(p.batch_size >= 1, f"probe.batch_size={p.batch_size} must be >= 1")
        check(
            p.normalize in NORMALISATIONS,
            f"probe.normalize={p.normalize} is unknown: use one of {list(NORMALISATIONS)}",
        )
        check(
            cfg.scheduler.name in SCHEDULES,
            f"scheduler.name={cfg.scheduler.name} is unknown: use one of {list(SCHEDULES)}",
        )
        for name, opt in optimizers(cfg).items():
            try:
                lr = opt.lr
            except InterpolationResolutionError:
                raise ConfigError(
                    f"no probe learning rate for optimizer {name}: add it to probe.lr_by_optimizer "
                    f"(conf/probe/default.yaml) or set optimizer.lr=..."
                ) from None
            check(lr > 0, f"the learning rate of optimizer {name} must be > 0, got {lr}")


def optimizers(cfg: DictConfig) -> dict[str, DictConfig]:
    """The optimizer configs: all of ``optimizers`` (compare) or ``optimizer`` (probe)."""
    if "optimizers" in cfg:
        check(
            len(cfg.optimizers) > 0, "optimizers is empty: keep at least one optimizer to compare"
        )
        return dict(cfg.optimizers.items())
    from hydra.core.hydra_config import HydraConfig

    choice = (
        HydraConfig.get().runtime.choices.get("optimizer") if HydraConfig.initialized() else None
    )
    return {choice or cfg.optimizer._target_.rsplit(".", 1)[-1].lower(): cfg.optimizer}
