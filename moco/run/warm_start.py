"""``init=<file>``: a fresh pretraining run starts from the weights of a file moco.weights knows."""

from pathlib import Path

from torch import nn

from moco.checkpoint import state_dict_mismatch
from moco.encoders import resolve_stem
from moco.errors import ConfigError, DataError
from moco.vit import VITS
from moco.weights import KNOWN, read_weights

ENCODERS = ("encoder_q", "encoder_k")  # MoCo has both; the supervised reference only encoder_q


def warm_start(model: nn.Module, path: str) -> str:
    """Copy the backbone of ``path`` into the model's encoders, and its head when the file has
    one of the same shapes (official MoCo v1/v2, this project's checkpoints); returns the line
    that says what was loaded. A backbone that does not fit is one DataError line. Stems that
    differ only in where the max-pool sits have the same weights: the line says so when the file
    names another stem than the run's."""
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"init={path} does not exist: give a file of the {KNOWN}")
    weights = read_weights(Path(path).expanduser())
    encoders = {name: getattr(model, name) for name in ENCODERS if hasattr(model, name)}
    first = next(iter(encoders.values()))
    problem = state_dict_mismatch(first.backbone.state_dict(), weights.backbone)
    if problem:
        raise DataError(
            f"init={path} holds a {weights.architecture} backbone with a {weights.stem} stem on "
            f"{weights.in_channels}-channel images that does not fit the configured backbone "
            f"({problem}): choose backbone/stem/data to match it, or another init file"
        )
    head = weights.head_state is not None and not state_dict_mismatch(
        first.head.state_dict(), weights.head_state
    )
    for encoder in encoders.values():
        encoder.backbone.load_state_dict(weights.backbone)
        if head:
            encoder.head.load_state_dict(weights.head_state)
    if head:
        what = f"backbone and {weights.head} head"
    elif weights.head_state is not None:
        what = f"backbone (its {weights.head} head has other shapes: head kept as initialised)"
    else:
        what = "backbone (the file has no head: head kept as initialised)"
    spec = model.encoder_spec
    ours = resolve_stem(spec.stem, spec.image_size)
    if weights.stem_said and weights.architecture not in VITS and weights.stem != ours:
        what += f"; trained with the {weights.stem} stem, this run has {ours}"
    return (
        f"Initialised {' and '.join(encoders)} from {path} ({weights.format}): "
        f"{weights.architecture} {what}"
    )
