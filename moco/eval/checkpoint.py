"""The encoder to evaluate: a MoCo checkpoint read without executing pickled code, or a baseline.

``checkpoint=raw`` evaluates the pixels themselves, ``checkpoint=random`` an untrained encoder
(both go through the same feature and classifier code as a real checkpoint).
"""

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moco.encoders import Encoder, build_backbone, build_head
from moco.errors import ConfigError, DataError

RAW, RANDOM = "raw", "random"
PREFIX = "encoder_q."  # the query encoder is the one trained by gradient (the key encoder lags it)
REQUIRED_HPARAMS = ("backbone", "in_channels", "image_size", "head", "dim")


@dataclass
class EvalEncoder:
    """An encoder (None for raw pixels), the data config with its image geometry, and its origin."""

    encoder: Encoder | None
    data_cfg: DictConfig
    source: str  # identifies the weights: "raw", "random:<settings>" or "sha256:<file digest>"
    info: dict = field(default_factory=dict)  # what the reports show: path, epoch, global_step


def load_encoder(spec: str, data_cfg: DictConfig, random_init: DictConfig) -> EvalEncoder:
    """``spec`` is ``raw``, ``random`` (built from ``random_init``) or the path of a checkpoint."""
    if spec == RAW:
        return EvalEncoder(None, data_cfg, RAW, {"checkpoint": RAW})
    if spec == RANDOM:
        return _random_encoder(data_cfg, random_init)
    return _checkpoint_encoder(Path(str(spec)).expanduser(), data_cfg)


def _random_encoder(data_cfg: DictConfig, cfg: DictConfig) -> EvalEncoder:
    with torch.random.fork_rng():  # the seed fixes the weights without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        net = build_backbone(cfg.backbone, data_cfg.channels, data_cfg.image_size)
        encoder = Encoder(net, build_head(cfg.head, net.feature_dim, cfg.dim), cfg.channels_last)
    settings = OmegaConf.to_container(cfg, resolve=True)
    source = f"random:{sorted(settings.items())}:{data_cfg.channels}x{data_cfg.image_size}"
    return EvalEncoder(encoder, data_cfg, source, {"checkpoint": RANDOM, **settings})


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(
            f"checkpoint={path} does not exist: give a checkpoint written by "
            "scripts/pretrain.py (runs/.../checkpoints/last.ckpt), or raw, or random"
        )
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function the file wants called
            raise DataError(
                f"{path} holds objects other than tensors and plain values; it is refused because "
                "loading it would execute code: use a checkpoint from scripts/pretrain.py"
            ) from None
        raise DataError(
            f"{path} is not a readable PyTorch checkpoint: give a .ckpt written by "
            "scripts/pretrain.py"
        ) from None
    except Exception as exc:  # truncated zip, empty file, ...
        raise DataError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}): "
            "give a .ckpt written by scripts/pretrain.py"
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hparams, dict)
        or not isinstance(state, dict)
        or any(k not in hparams for k in REQUIRED_HPARAMS)
        or not any(k.startswith(PREFIX) for k in state)
    ):
        raise DataError(
            f"{path} is not a MoCo checkpoint (no encoder_q weights or MoCo hyper-parameters): "
            "give a checkpoint written by scripts/pretrain.py"
        )
    return checkpoint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_encoder(path: Path, data_cfg: DictConfig) -> EvalEncoder:
    checkpoint = _load(path)
    hp = checkpoint["hyper_parameters"]
    if hp["in_channels"] != data_cfg.channels:
        raise ConfigError(
            f"{path} was pretrained on {hp['in_channels']}-channel images but data={data_cfg.name} "
            f"has {data_cfg.channels}: evaluate on the data set it was pretrained on"
        )
    # Evaluate at the resolution the encoder was trained at (eval_transform resizes to it).
    data_cfg = OmegaConf.merge(data_cfg, {"image_size": hp["image_size"]})
    # Plain BatchNorm: SplitBatchNorm has the same parameters and buffers and, in eval mode,
    # computes the same thing.
    net = build_backbone(hp["backbone"], hp["in_channels"], hp["image_size"])
    encoder = Encoder(
        net, build_head(hp["head"], net.feature_dim, hp["dim"]), hp.get("channels_last", False)
    )
    weights = {
        k[len(PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)
    }
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise DataError(
            f"{path}: the encoder weights do not fit its hyper-parameters "
            f"({str(exc).splitlines()[0]})"
        ) from None
    digest = _sha256(path)
    info = {
        "checkpoint": str(path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "backbone": hp["backbone"],
        "image_size": hp["image_size"],
    }
    return EvalEncoder(encoder, data_cfg, f"sha256:{digest}", info)
