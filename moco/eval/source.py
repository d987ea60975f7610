"""The encoder to evaluate: a checkpoint's query encoder, or one of the two baselines.

``checkpoint=raw`` evaluates the pixels themselves, ``checkpoint=random`` an untrained encoder
built from an encoder spec (both go through the same feature and classifier code as a real
checkpoint).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moco.checkpoint import encoder_spec, query_encoder, read_moco_checkpoint, sha256
from moco.encoders import Encoder, EncoderSpec, resolve_stem
from moco.errors import ConfigError

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
    checkpoint = read_moco_checkpoint(path)
    spec = encoder_spec(checkpoint)
    if spec.in_channels != data_cfg.channels:
        raise ConfigError(
            f"{path} was pretrained on {spec.in_channels}-channel images but data={data_cfg.name} "
            f"has {data_cfg.channels}: evaluate on the data set it was pretrained on"
        )
    # Evaluate at the resolution the encoder was trained at (eval_transform resizes to it).
    data_cfg = OmegaConf.merge(data_cfg, {"image_size": spec.image_size})
    encoder = query_encoder(checkpoint, path)
    info = {
        "checkpoint": str(path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "backbone": spec.backbone,
        "stem": spec.stem,
        "image_size": spec.image_size,
    }
    return EvalEncoder(encoder, data_cfg, f"sha256:{sha256(path)}", info)


def random_spec_for(spec: EncoderSpec, data_cfg: DictConfig) -> EncoderSpec:
    """``spec`` (of an experiment) on the images of ``data_cfg``: the baseline is encoded at the
    evaluation's geometry, as the checkpoint it is compared with was trained at it."""
    values = {**spec.to_dict(), "in_channels": data_cfg.channels, "image_size": data_cfg.image_size}
    values["stem"] = resolve_stem(values["stem"], values["image_size"])
    return EncoderSpec(**values)
