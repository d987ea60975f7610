"""Reading checkpoints: the one module that training (resume), evaluation and export use.

A checkpoint's encoder is rebuilt from its encoder spec (``moco.encoders.EncoderSpec``, saved as
``encoder_spec``; files written before it existed carry the same keys among their
hyper-parameters) and filled with its query encoder's weights: ``encoder_q.*`` (MoCo v1/v2, the
supervised reference) or ``base_encoder.*`` (MoCo v3, the projector in the backbone's slot).

Every script that reads a checkpoint goes through ``load_weights_only`` (``read_checkpoint``
for Lightning checkpoints, ``moco.weights`` for any MoCo weights): ``torch.load`` with
``weights_only=True`` unpickles tensors and plain containers only, so a file whose pickle would
call a function (``__reduce__``) is refused before anything in it runs.
"""

import hashlib
import pickle
import re
from pathlib import Path

import torch

from moco.encoders import BACKBONES, Encoder, EncoderSpec, build_backbone, slot_to_encoder_keys
from moco.errors import ConfigError, DataError, MocoUserError

# The query encoder is the one trained by gradient (the key encoder lags it). Its prefix in a
# checkpoint's state dict: v1/v2 (Encoder's layout) and v3 (the slot layout, moco/encoders.py).
PREFIX, V3_PREFIX = "encoder_q.", "base_encoder."
# The encoder spec's keys a checkpoint must hold, and the type each must have.
REQUIRED_HPARAMS = {"backbone": str, "in_channels": int, "image_size": int, "head": str, "dim": int}
FROM_PRETRAIN = "use a checkpoint as scripts/pretrain.py wrote it"


# ------------------------------------------------------------------------ reading the file
def load_weights_only(path: Path, option: str = "checkpoint", hint: str = FROM_PRETRAIN):
    """What ``torch.load(path, weights_only=True)`` returns, any type; a file that is missing,
    unreadable or whose pickle would call a function ends in one line that ends with ``hint``.

    ``option`` is the config key the path came from (``checkpoint``, ``resume``), so the error
    for a missing file names what to change. Raises ConfigError / DataError with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{option}={path} does not exist: give a checkpoint written by scripts/pretrain.py "
            "(runs/.../checkpoints/last.ckpt)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported global: GLOBAL (\S+)", str(exc), re.IGNORECASE)
        if found:  # a class or function the file wants called while it is read
            raise DataError(
                f"{path} was refused: reading it would execute code ({found.group(1)}), "
                f"not just load tensors; {hint}"
            ) from None
        raise DataError(f"{path} is not a readable PyTorch checkpoint: {hint}") from None
    except Exception as exc:  # truncated zip, empty file, a safetensors file, ...
        raise DataError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}): {hint}"
        ) from None


def read_checkpoint(path: Path, option: str = "checkpoint") -> dict:
    """A Lightning checkpoint as a dict, unpickled with ``weights_only=True``
    (``load_weights_only``); bare weights and other objects end in one DataError line."""
    checkpoint = load_weights_only(path, option)
    if (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    ):  # the likely mix-up: torchvision weights, or an export of scripts/export.py
        raise DataError(
            f"{path} holds bare weights (a state dict), not a pretraining checkpoint with its "
            f"settings: {FROM_PRETRAIN}"
        )
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{path} is not a Lightning checkpoint (no state_dict): {FROM_PRETRAIN}")
    return checkpoint


def _spec_values(checkpoint: dict):
    spec = checkpoint.get("encoder_spec")
    return spec if isinstance(spec, dict) else checkpoint.get("hyper_parameters")


def read_moco_checkpoint(path: Path, option: str = "checkpoint") -> dict:
    """``read_checkpoint`` plus the check that it holds a query encoder and its encoder spec."""
    return check_moco_checkpoint(read_checkpoint(path, option), path)


def check_moco_checkpoint(checkpoint: dict, path: Path) -> dict:
    """``checkpoint`` (a Lightning checkpoint as a dict) if it holds a query encoder and its
    encoder spec, else one DataError line."""
    hparams = _spec_values(checkpoint)
    if (
        not isinstance(hparams, dict)
        or any(k not in hparams for k in REQUIRED_HPARAMS)
        or not any(str(k).startswith((PREFIX, V3_PREFIX)) for k in checkpoint["state_dict"])
    ):
        raise DataError(
            f"{path} is not a MoCo checkpoint (no encoder_q or base_encoder weights, or no MoCo "
            "hyper-parameters): give a checkpoint written by scripts/pretrain.py"
        )
    for key, kind in REQUIRED_HPARAMS.items():
        # bool is an int subclass; in_channels=True is as wrong as in_channels="3".
        if not isinstance(hparams[key], kind) or isinstance(hparams[key], bool):
            raise DataError(
                f"{path}: hyper-parameter {key}={hparams[key]!r} should be a {kind.__name__}; "
                f"{FROM_PRETRAIN}"
            )
    return checkpoint


# ---------------------------------------------------------------------- building the encoder
def encoder_spec(checkpoint: dict) -> EncoderSpec:
    """The encoder spec of a checkpoint from ``read_moco_checkpoint``."""
    return EncoderSpec.from_dict(_spec_values(checkpoint))


def query_encoder(checkpoint: dict, path: Path) -> Encoder:
    """The query encoder that ``checkpoint`` (from ``read_moco_checkpoint``) describes, with its
    weights; a file whose weights belong to another architecture ends in one DataError line."""
    spec = encoder_spec(checkpoint)
    hp = spec.to_dict()
    try:
        # Plain BatchNorm: SplitBatchNorm has the same parameters and buffers and, in eval mode,
        # computes the same thing.
        encoder = spec.build()
    except MocoUserError as exc:  # e.g. a backbone this version of the code does not know
        raise DataError(f"{path}: {exc}") from None
    prefix = V3_PREFIX if spec.slot else PREFIX
    weights = under(prefix, checkpoint["state_dict"])
    if spec.slot:  # MoCo v3: the projector sits in the backbone's own slot
        weights = slot_to_encoder_keys(weights, spec.slot)
    problem = state_dict_mismatch(encoder.state_dict(), weights)
    if problem:
        guess = _guess_backbone(weights, hp)
        if guess and guess != hp["backbone"]:
            raise DataError(
                f"{path} holds {guess} weights but its hyper-parameters say "
                f"backbone={hp['backbone']}: the file was edited or mixed up; {FROM_PRETRAIN}"
            )
        raise DataError(
            f"{path}: the {prefix[:-1]} weights do not fit the {hp['backbone']} encoder its "
            f"hyper-parameters describe ({problem}); {FROM_PRETRAIN}"
        )
    encoder.load_state_dict(weights)
    return encoder


def under(prefix: str, state: dict) -> dict:
    """The entries of ``state`` whose name starts with ``prefix``, named without it."""
    return {
        k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)
    }


def shape_text(value) -> str:
    """A tensor's shape as 3x4x5, or the type of anything else (for error lines)."""
    shape = getattr(value, "shape", None)
    return "x".join(map(str, shape)) if shape is not None else type(value).__name__


def state_dict_mismatch(expected: dict, given: dict) -> str:
    """'' when ``given`` fits ``expected`` key for key and shape for shape, else the first
    difference of each kind (the full lists can run to hundreds of keys)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [
        k
        for k in expected
        if k in given
        and not (isinstance(given[k], torch.Tensor) and given[k].shape == expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, first {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, first {k}: "
            f"{shape_text(given[k])} in the file, {shape_text(expected[k])} expected"
        )
    return "; ".join(parts)


def _guess_backbone(weights: dict, hp: dict) -> str | None:
    """The backbone whose parameter names the file's backbone weights have, if exactly one."""
    names = {k for k in weights if k.startswith("backbone.")}
    matches = []
    for name in BACKBONES:
        with torch.device("meta"):  # names only: no memory, no initialisation cost
            keys = build_backbone(
                name, hp["in_channels"], hp["image_size"], stem=hp["stem"]
            ).state_dict()
        if {f"backbone.{k}" for k in keys} == names:
            matches.append(name)
    return matches[0] if len(matches) == 1 else None


def sha256(path: Path) -> str:
    """Hex digest of a file: names the exact weights in caches and export metadata."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
