"""The encoder to evaluate: a checkpoint's query encoder (any format moco.weights knows), or one of
the two baselines.

``checkpoint=raw`` evaluates the pixels themselves, ``checkpoint=random`` an untrained encoder
built from an encoder spec (both go through the same feature and classifier code as a real
checkpoint).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moco.checkpoint import FROM_PRETRAIN, sha256
from moco.encoders import Encoder, EncoderSpec, resolve_stem
from moco.errors import ConfigError
from moco.weights import read_weights

RAW, RANDOM = "raw", "random"


@dataclass
class EvalEncoder:
    """An encoder (None for raw pixels), the data config with its image geometry, and its origin."""

    encoder: Encoder | None
    data_cfg: DictConfig
    source: str  # identifies the weights: "raw", "random:<settings>" or "sha256:<file digest>"
    info: dict = field(default_factory=dict)  # what the reports show: path, epoch, global_step


def load_encoder(
    choice: str, data_cfg: DictConfig, random_spec: EncoderSpec | None, seed: int = 0
) -> EvalEncoder:
    """``choice`` is ``raw``, ``random`` (``random_spec`` with weights drawn from ``seed``) or the
    path of a checkpoint."""
    if choice == RAW:
        return EvalEncoder(None, data_cfg, RAW, {"checkpoint": RAW})
    if choice == RANDOM:
        return _random_encoder(data_cfg, random_spec, seed)
    path = Path(str(choice)).expanduser()
    if not path.is_file():  # the eval scripts also take the two baselines: say so
        raise ConfigError(
            f"checkpoint={path} does not exist: give a checkpoint written by "
            "scripts/pretrain.py (runs/.../checkpoints/last.ckpt), or raw, or random"
        )
    return _checkpoint_encoder(path, data_cfg)


def _random_encoder(data_cfg: DictConfig, spec: EncoderSpec, seed: int) -> EvalEncoder:
    with torch.random.fork_rng():  # the seed fixes the weights without touching the caller's RNG
        torch.manual_seed(seed)
        encoder = spec.build()
    settings = {**spec.to_dict(), "seed": seed}
    source = f"random:{sorted(settings.items())}"
    return EvalEncoder(encoder, data_cfg, source, {"checkpoint": RANDOM, **settings})


def _checkpoint_encoder(path: Path, data_cfg: DictConfig) -> EvalEncoder:
    """Any file moco.weights knows: a pretraining checkpoint, an export, an official MoCo
    checkpoint or torchvision weights (pretraining and official MoCo files have a head)."""
    # A file torch cannot read safely gets the message the eval scripts always gave.
    weights = read_weights(path, hint=FROM_PRETRAIN)
    if weights.in_channels != data_cfg.channels:
        raise ConfigError(
            f"{path} was pretrained on {weights.in_channels}-channel images but "
            f"data={data_cfg.name} has {data_cfg.channels}: evaluate on the data set it was "
            "pretrained on"
        )
    # Evaluate at the resolution the encoder was trained at (eval_transform resizes to it), or,
    # when the file does not say it (official and torchvision files), at the data's.
    image_size = weights.image_size or data_cfg.image_size
    data_cfg = OmegaConf.merge(data_cfg, {"image_size": image_size})
    info = {
        "checkpoint": str(path),
        "format": weights.format,
        "epoch": weights.info.get("epoch"),
        "global_step": weights.info.get("global_step"),
        "backbone": weights.architecture,
        "stem": weights.stem,
        "image_size": image_size,
    }
    source = f"sha256:{sha256(path)}"
    if weights.format != "pretrain":  # an export's JSON can say another stem for the same file
        source += f":{weights.stem}"
    return EvalEncoder(weights.encoder(), data_cfg, source, info)


def random_spec_for(spec: EncoderSpec, data_cfg: DictConfig) -> EncoderSpec:
    """``spec`` (of an experiment) on the images of ``data_cfg``: the baseline is encoded at the
    evaluation's geometry, as the checkpoint it is compared with was trained at it."""
    values = {**spec.to_dict(), "in_channels": data_cfg.channels, "image_size": data_cfg.image_size}
    values["stem"] = resolve_stem(values["stem"], values["image_size"])
    return EncoderSpec(**values)
