"""Weights in: the backbone (and head) of any MoCo checkpoint, recognised from the file's content.

``read_weights`` knows these formats (the file's name plays no part):

- ``pretrain``: this project's Lightning checkpoint (``encoder_q.*`` or, MoCo v3,
  ``base_encoder.*``, and ``encoder_spec``);
- ``export``: a torchvision state dict with its ``<file>.json`` (scripts/export.py);
- ``safetensors``: the same tensors with the JSON's facts in the file's metadata;
- ``moco_v1_v2`` / ``moco_v3``: facebookresearch's ``module.encoder_q.*`` /
  ``module.base_encoder.*`` as main_moco.py saves them: ResNet-18/50 (torchvision names) or, v3,
  ViT-S/B (``arch`` vit_small or vit_base, timm names: moco/vit_names.py), any patch size, image
  size, channel count and depth, read off the tensors;
- ``moco_v3_deit``: moco-v3's convert_to_deit.py output, ``{"model": <its ViT, timm names>}``;
- ``moco_v3_lincls``: moco-v3's main_lincls.py ViT checkpoint (timm names, its classifier
  dropped);
- ``torchvision``: a plain ResNet-18/50 state dict, the stem guessed from conv1.

Files are read with ``torch.load(weights_only=True)`` (``moco.checkpoint.load_weights_only``) or,
for safetensors, without pickle at all. The backbone becomes this project's own module
(``moco.encoders.build_backbone``: a torchvision ResNet with ``fc = Identity``, or
``moco.vit.build_vit``: torchvision's ViT with ``heads = Identity``).
"""

import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import torch
from torch import nn

from moco.checkpoint import (
    check_moco_checkpoint,
    encoder_spec,
    load_weights_only,
    query_encoder,
    shape_text,
    state_dict_mismatch,
    under,
)
from moco.encoders import (
    ALL_BACKBONES,
    BACKBONES,
    STEM_LAYOUTS,
    V3_HEAD,
    V3_PROJECTOR_LAYERS,
    Encoder,
    build_backbone,
    build_head,
    pool_place,
    resolve_stem,
    stem_with,
)
from moco.errors import ConfigError, DataError
from moco.vit import VIT_SIZES, VITS, build_vit
from moco.vit_names import TIMM_PATCH_WEIGHT, TIMM_POS_EMBED, timm_name, torchvision_name

KNOWN = (
    "known formats: a scripts/pretrain.py checkpoint, a scripts/export.py export (.pth with its "
    ".json, or .safetensors), an official MoCo v1/v2 or v3 ResNet checkpoint, an official MoCo "
    "v3 ViT-S/B checkpoint or its convert_to_deit.py output, a torchvision ResNet-18/50 state dict"
)


@dataclass(frozen=True)
class Weights:
    """A file's backbone weights (torchvision names, no ``fc``) and the geometry to build them."""

    format: str  # pretrain, export, safetensors, moco_v1_v2, moco_v3(_deit, _lincls), torchvision
    architecture: str  # one of moco.encoders.ALL_BACKBONES
    stem: str  # small, small_pool, imagenet or late_pool
    in_channels: int
    image_size: int | None  # None: the file does not say
    backbone: dict
    head: str | None = None  # linear, mlp or v3_mlp: the file holds a MoCo projection head
    head_state: dict | None = None
    dim: int | None = None
    channels_last: bool = False  # the memory format the encoder trained in (speed only)
    stem_said: bool = True  # False: guessed from conv1 alone (a state dict cannot say max-pools)
    info: dict = field(default_factory=dict)  # epoch, global_step when the file has them
    mlp_dim: int | None = None  # hidden width of a v3_mlp head
    # A ViT's patch side and number of blocks when the file says them (official files: read off
    # the tensors); None: moco.vit's defaults, as this project's checkpoints were built with.
    patch_size: int | None = None
    depth: int | None = None
    final_relu: bool = True  # False: layer4's last block ends without ReLU (moco/final_relu.py)

    def build_backbone(self) -> nn.Module:
        if self.architecture in VITS:  # moco.encoders.build_backbone takes neither patch nor depth
            net = build_vit(
                self.architecture, self.in_channels, self.image_size, self.patch_size, self.depth
            )
        else:  # the stem is resolved, so the image size given to build_backbone plays no part
            net = build_backbone(
                self.architecture,
                self.in_channels,
                self.image_size or 0,
                stem=self.stem,
                final_relu=self.final_relu,
            )
        net.load_state_dict(self.backbone)
        return net

    def encoder(self) -> Encoder:
        """Backbone and head (``head`` None when the file has none)."""
        net, head = self.build_backbone(), None
        if self.head is not None:
            layers = V3_PROJECTOR_LAYERS.get(self.architecture, 2)
            head = build_head(self.head, net.feature_dim, self.dim, self.mlp_dim, layers)
            head.load_state_dict(self.head_state)
        return Encoder(net, head, self.channels_last)


def load_backbone(path, *, in_channels=None, image_size=None, stem=None) -> nn.Module:
    """The frozen backbone (eval mode, no gradients) of a checkpoint in any of FORMATS: images
    (N x C x H x W) to pooled features (N x feature_dim). Geometry the file does not say comes
    from the arguments (``stem`` only matters for a file without stem facts, whose conv1 cannot
    say where a max-pool sits: small by default for a 3x3 conv1, imagenet for a 7x7)."""
    weights = read_weights(path, in_channels=in_channels, image_size=image_size, stem=stem)
    net = weights.build_backbone().eval().requires_grad_(False)
    for key in ("architecture", "stem", "in_channels", "image_size"):  # net.feature_dim is set
        setattr(net, key, getattr(weights, key))
    net.source_format = weights.format
    return net


def read_weights(path, *, in_channels=None, image_size=None, stem=None, hint=KNOWN) -> Weights:
    """The Weights of ``path``; anything not in FORMATS ends in one DataError line. ``hint`` ends
    the message of a file torch cannot read safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {KNOWN}")
    if _is_safetensors(path):
        weights = _safetensors(path)
    else:
        weights = _recognise(load_weights_only(path, hint=hint), path)
    if in_channels is not None and in_channels != weights.in_channels:
        raise DataError(f"{path} holds {weights.in_channels}-channel weights, not {in_channels}")
    vit = weights.architecture in VITS  # no stem to compare
    if stem is not None and stem != "auto" and stem != weights.stem and not vit:
        told, held = STEM_LAYOUTS.get(stem), STEM_LAYOUTS[weights.stem]
        if weights.stem_said or told is None or told.conv1_kernel != held.conv1_kernel:
            raise DataError(f"{path} holds a {weights.stem} stem, not stem={stem}")
        weights = replace(weights, stem=stem)
    return weights if weights.image_size else replace(weights, image_size=image_size)


def _refuse(path: Path, why: str):
    raise DataError(f"{path} is not a MoCo checkpoint or ResNet/ViT weights ({why}); {KNOWN}")


def _recognise(obj, path: Path) -> Weights:
    if not isinstance(obj, dict):
        _refuse(path, f"it holds a {type(obj).__name__}")
    state = obj.get("state_dict")
    if isinstance(state, dict):
        if "encoder_spec" in obj or "hyper_parameters" in obj:  # written by pretrain.py
            return _pretrain(check_moco_checkpoint(obj, path), path)
        arch = obj.get("arch")
        _refuse_other_architectures(arch, path)
        # DistributedDataParallel's module. prefix, or the same files saved without it.
        state = _without_module_prefix(state)
        keys = [str(k) for k in state]
        if any(k.startswith("encoder_q.") for k in keys):
            return _official(obj, state, path, "encoder_q.", "moco_v1_v2")
        if TIMM_PATCH_WEIGHT in state:  # main_lincls.py's ViT: its classifier is no MoCo head
            backbone = {k: v for k, v in state.items() if not str(k).startswith("head.")}
            weights = _timm_vit(backbone, path, "moco_v3_lincls", arch)
            return replace(weights, info={"epoch": obj.get("epoch")})
        if arch in VITS or f"base_encoder.{TIMM_PATCH_WEIGHT}" in state:
            base = under("base_encoder.", state)
            fc = under("head.", base)  # the projector (vits.py's classifier slot)
            backbone = {k: v for k, v in base.items() if not k.startswith("head.")}
            weights = _timm_vit(backbone, path, "moco_v3", arch)
            return _with_head(replace(weights, info={"epoch": obj.get("epoch")}), fc)
        if any(k.startswith("base_encoder.") for k in keys):
            return _official(obj, state, path, "base_encoder.", "moco_v3")
        if _all_tensors(state):  # a classifier's checkpoint (main_lincls.py): torchvision names
            return _from_resnet(state, path, "torchvision", {})
        _refuse(path, "its state_dict has no encoder_q, module.encoder_q or module.base_encoder")
    model = obj.get("model")
    if set(obj) == {"model"} and isinstance(model, dict) and TIMM_PATCH_WEIGHT in model:
        # convert_to_deit.py: the base encoder without its projector, so a head.* is unexpected
        # (a timm classifier, perhaps of a DeiT with another head count: not to be read as ours).
        return _timm_vit(model, path, "moco_v3_deit", None)
    if _all_tensors(obj):
        obj = _without_module_prefix(obj)
        sidecar = path.with_name(path.name + ".json")
        if sidecar.is_file():
            return _from_resnet(obj, path, "export", _read_json(sidecar))
        return _from_resnet(obj, path, "torchvision", {})
    _refuse(path, f"a dict with keys {sorted(map(str, obj))[:5]}")


def _pretrain(checkpoint: dict, path: Path) -> Weights:
    spec = encoder_spec(checkpoint)
    encoder = query_encoder(checkpoint, path)
    return Weights(
        "pretrain",
        spec.backbone,
        resolve_stem(spec.stem, spec.image_size),
        spec.in_channels,
        spec.image_size,
        encoder.backbone.state_dict(),
        spec.head,
        encoder.head.state_dict(),
        spec.dim,
        spec.channels_last,
        info={k: checkpoint.get(k) for k in ("epoch", "global_step")},
        mlp_dim=spec.mlp_dim,
        final_relu=spec.final_relu,
    )


def _all_tensors(obj: dict) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _without_module_prefix(state: dict) -> dict:
    """``state`` without the ``module.`` that DistributedDataParallel puts before every key."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _refuse_other_architectures(arch, path: Path) -> None:
    """Official files name their architecture: one this project has no model of (vit_large,
    resnet101, ...) is refused by that name."""
    if isinstance(arch, str) and arch not in ALL_BACKBONES:
        raise DataError(
            f"{path} holds a {arch} model: only {', '.join(ALL_BACKBONES)} weights are read"
        )


def _official(checkpoint: dict, state: dict, path: Path, prefix: str, fmt: str) -> Weights:
    """facebookresearch/moco (v1/v2: ``fc`` is the MoCo head) or moco-v3 (``fc`` is the
    projector, read as a ``v3_mlp`` head) ResNets as main_moco.py saves them (``module.``
    already taken off)."""
    state = under(prefix, state)
    weights = _from_resnet(state, path, fmt, {})
    arch = checkpoint.get("arch")
    if arch in ALL_BACKBONES and arch != weights.architecture:
        raise DataError(f"{path} says arch={arch} but holds {weights.architecture} weights")
    weights = replace(weights, info={"epoch": checkpoint.get("epoch")})
    return _with_head(weights, under("fc.", state))


def _with_head(weights: Weights, fc: dict) -> Weights:
    """``weights`` with the MoCo head of an official file (``fc``: v1/v2's head, v3's
    projector) when it is one of this project's heads on these features; an ``fc`` of another
    shape (a classifier, or no v3 projector in a v3 file) is dropped."""
    head, dim, mlp_dim = _moco_head(fc)
    if head is None or (head == V3_HEAD) != (weights.format == "moco_v3"):
        return weights
    if weights.architecture in VITS:
        features = VIT_SIZES[weights.architecture].dim
    else:
        features = _stock_resnet(weights.architecture)[1]
    layers = V3_PROJECTOR_LAYERS.get(weights.architecture, 2)
    with torch.device("meta"):
        expected = build_head(head, features, dim, mlp_dim, layers).state_dict()
    if state_dict_mismatch(expected, fc):
        return weights
    return replace(weights, head=head, head_state=fc, dim=dim, mlp_dim=mlp_dim)


def _moco_head(fc: dict) -> tuple[str | None, int | None, int | None]:
    """The head kind of an official ``fc``, its output size and (v3) hidden width."""
    if set(fc) == {"weight", "bias"}:
        return "linear", fc["weight"].shape[0], None
    if set(fc) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        return "mlp", fc["2.weight"].shape[0], None
    if {"0.weight", "3.weight", "4.running_mean"} <= set(fc) and fc["0.weight"].dim() == 2:
        # Linear layers at 0, 3 (, 6 for a ViT's 3 layers): the last one gives the output size.
        linear = [k for k, v in fc.items() if k.endswith(".weight") and v.dim() == 2]
        last = max(linear, key=lambda k: int(k.split(".")[0]) if k[0].isdigit() else -1)
        return V3_HEAD, fc[last].shape[0], fc["0.weight"].shape[0]
    return None, None, None


def _timm_vit(state: dict, path: Path, fmt: str, arch) -> Weights:
    """A MoCo v3 ViT backbone under timm's names (no ``head.*``), its geometry read off the
    tensors: ``patch_embed.proj.weight`` (D x C x p x p) gives the width, the channels and the
    patch side, ``pos_embed`` (1 x (1 + grid^2) x D) the grid, so the image is grid * p pixels;
    the highest block index gives the depth (a block missing below it is then a missing key)."""
    patch, table = state.get(TIMM_PATCH_WEIGHT), state.get(TIMM_POS_EMBED)
    if not (isinstance(patch, torch.Tensor) and isinstance(table, torch.Tensor)):
        _refuse(path, f"a ViT's {TIMM_PATCH_WEIGHT} or {TIMM_POS_EMBED} is missing")
    tokens = table.shape[1] - 1 if table.dim() == 3 else -1
    grid = math.isqrt(max(tokens, 0))
    if (
        patch.dim() != 4
        or patch.shape[2] != patch.shape[3]
        or grid < 1
        or grid * grid != tokens
        or (table.shape[0], table.shape[2]) != (1, patch.shape[0])
    ):
        raise DataError(
            f"{path}: {TIMM_PATCH_WEIGHT} {shape_text(patch)} and {TIMM_POS_EMBED} "
            f"{shape_text(table)} are no square grid of square patches "
            "(D x C x p x p and 1 x (1 + grid^2) x D)"
        )
    width, in_channels, side = patch.shape[:3]
    found = [name for name, size in VIT_SIZES.items() if size.dim == width]
    if not found:
        raise DataError(
            f"{path} holds a ViT {width} wide: only "
            f"{', '.join(f'{n} ({s.dim})' for n, s in VIT_SIZES.items())} are read"
        )
    if arch is not None and arch != found[0]:
        raise DataError(f"{path} says arch={arch} but holds {found[0]} weights ({width} wide)")
    blocks = [re.match(r"blocks\.(\d+)\.", str(k)) for k in state]
    depth = 1 + max((int(b[1]) for b in blocks if b), default=-1)
    if depth == 0:
        _refuse(path, "a ViT without transformer blocks")
    image_size = grid * side
    with torch.device("meta"):  # names and shapes only
        expected = build_vit(found[0], in_channels, image_size, side, depth).state_dict()
    expected = {timm_name(k): v for k, v in expected.items()}
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise DataError(
            f"{path}: the weights do not fit a {found[0]} of {depth} blocks, {side}-px patches "
            f"on {image_size}-px {in_channels}-channel images ({problem})"
        )
    return Weights(
        fmt,
        found[0],
        resolve_stem("auto", image_size),  # as this project's own ViT checkpoints say (unused)
        in_channels,
        image_size,
        {torchvision_name(k): v for k, v in state.items()},
        patch_size=side,
        depth=depth,
    )


@cache
def _stock_resnet(name: str) -> tuple[frozenset, int]:
    """The parameter names of a torchvision ResNet without ``fc``, and its feature size."""
    with torch.device("meta"):  # names only: no memory, no initialisation cost
        net = BACKBONES[name](weights=None)
    return frozenset(k for k in net.state_dict() if not k.startswith("fc.")), net.fc.in_features


def _from_resnet(state: dict, path: Path, fmt: str, facts: dict) -> Weights:
    """torchvision-named weights (``fc.*`` dropped: a classifier or a projector) and stem
    ``facts`` (an export's JSON or safetensors metadata; empty: guessed from conv1)."""
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # Older torchvision files have no BatchNorm step counters; BatchNorm starts them at 0.
    for name in [k[: -len("running_mean")] for k in backbone if k.endswith(".running_mean")]:
        backbone.setdefault(f"{name}num_batches_tracked", torch.tensor(0))
    found = [name for name in BACKBONES if _stock_resnet(name)[0] == set(backbone)]
    conv1 = backbone.get("conv1.weight")
    if not found or conv1 is None or conv1.dim() != 4:
        _refuse(path, f"its {len(backbone)} tensors are no ResNet-18/50 backbone")
    arch, kernel, in_channels = found[0], conv1.shape[-1], conv1.shape[1]
    if kernel not in (3, 7):
        _refuse(path, f"conv1 is {kernel}x{kernel}, neither the 3x3 small nor 7x7 ImageNet stem")
    stem = stem_with(kernel, _pool_place(facts, kernel, path))
    if stem is None:
        raise DataError(
            f"{path}: its metadata place the max-pool where no {kernel}x{kernel} stem has it "
            f"(has_maxpool={facts.get('has_maxpool')}, "
            f"pool_after_layer1={facts.get('pool_after_layer1')})"
        )
    # Exports also name the stem the facts above give (older ones do not): they must agree.
    said = {
        "architecture": arch,
        "in_channels": in_channels,
        "conv1_kernel_size": kernel,
        "stem": stem,
    }
    for key, value in said.items():
        if key in facts and facts[key] != value:
            raise DataError(f"{path}: its metadata say {key}={facts[key]} but it holds {value}")
    with torch.device("meta"):
        expected = build_backbone(arch, in_channels, 0, stem=stem).state_dict()
    problem = state_dict_mismatch(expected, backbone)
    if problem:
        raise DataError(f"{path}: the weights do not fit a {arch} with a {stem} stem ({problem})")
    size = facts.get("image_size")
    return Weights(
        fmt,
        arch,
        stem,
        in_channels,
        size if isinstance(size, int) else None,
        backbone,
        stem_said=_says_pool(facts),
        final_relu=bool(facts.get("final_relu", True)),  # older exports do not say it
    )


def _says_pool(facts: dict) -> bool:
    """Whether ``facts`` (an export's) say where the max-pool is: a state dict cannot."""
    return "has_maxpool" in facts or "pool_after_layer1" in facts


def _pool_place(facts: dict, kernel: int, path: Path) -> str | None:
    """Where the max-pool sits (one of POOL_PLACES, or None) by the export's ``facts``; for a
    bare state dict, where the usual stem of its conv1 has it: torchvision's ImageNet stem for a
    7x7 conv1, the CIFAR demo's small stem (no max-pool) for a 3x3 one."""
    if not _says_pool(facts):
        return STEM_LAYOUTS["imagenet" if kernel == 7 else "small"].pool
    try:
        return pool_place(facts.get("has_maxpool", False), facts.get("pool_after_layer1", False))
    except ValueError:
        raise DataError(
            f"{path}: its metadata put the max-pool in two places (has_maxpool and "
            "pool_after_layer1): no stem has two"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({type(exc).__name__}): {KNOWN}") from None
    if not isinstance(facts, dict):
        raise DataError(f"{path} holds no export facts (not a JSON object): {KNOWN}")
    return facts


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the
    header, a JSON object."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})") from None
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    return head[8:9] == b"{" and 2 <= size <= path.stat().st_size - 8


def _safetensors(path: Path) -> Weights:
    from safetensors import safe_open  # only this format needs it

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
            header = f.metadata() or {}
    except Exception as exc:
        raise DataError(f"{path} is no readable safetensors ({type(exc).__name__})") from None
    facts = {}
    for key, value in header.items():  # str -> str: strings as they are, the rest as JSON
        try:
            facts[key] = json.loads(value)
        except ValueError:
            facts[key] = value
    return _from_resnet(state, path, "safetensors", facts)
