"""Export the pretrained query backbone as a plain torchvision ResNet state dict.

The backbone *is* a torchvision ResNet whose ``fc`` was replaced by ``nn.Identity`` (no
parameters), so its state dict already carries torchvision's key names: a stock
``torchvision.models.resnet18()`` loads it with ``strict=False`` and reports only ``fc.weight``
and ``fc.bias`` missing. What torchvision cannot guess is a changed stem (small images: 3x3
stride-1 ``conv1`` and no max-pool; grey images: 1 input channel; ``late_pool``: the max-pool at
the end of layer1), so every export carries those facts, in a JSON file next to it and, for
safetensors, in the file's own metadata too.

``format=moco`` and ``format=detectron2`` write the layouts of the official MoCo code and of
its detectron2 conversion (moco/run/export_formats.py); those tools rebuild the stock ImageNet
ResNet, so a backbone with another stem or channel count is refused with one line.

A MoCo v3 ViT goes out as ``format=moco`` only (moco-v3's layout, timm names), with the
geometry its official model class must be built with in the JSON (``vit_facts``); the other
formats are ResNet layouts and refuse it in one line.
"""

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from moco.checkpoint import FROM_PRETRAIN, query_encoder, read_moco_checkpoint, sha256
from moco.encoders import V3_HEAD, pool_place, stem_with
from moco.errors import ConfigError, DataError
from moco.final_relu import has_final_relu, rebuild_line
from moco.run.export_formats import (
    FORMATS,
    encode,
    moco_checkpoint,
    moco_contents,
    moco_v3_checkpoint,
    refuse_unless_stock_resnet,
)
from moco.vit import VIT_SIZES, VITS
from moco.weights import read_weights

# What moco-v3's main_lincls.py builds, vits.vit_small() / vit_base(): anything else is built
# with its VisionTransformerMoCo class and these values.
STOCK_VIT = {"in_channels": 3, "image_size": 224, "patch_size": 16, "depth": 12}


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors under torchvision's names, contiguous (NCHW) and detached.

    Contiguous because the training encoder may be channels_last and safetensors stores only
    dense row-major tensors; the values are unchanged.
    """
    return {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}


def resnet_facts(backbone: nn.Module) -> dict:
    """What plain torchvision must change to rebuild this backbone, read off the module itself
    (not re-derived from the image size, so it cannot drift from moco/encoders.py)."""
    conv1, maxpool = backbone.conv1, backbone.maxpool
    k, s, p = conv1.kernel_size[0], conv1.stride[0], conv1.padding[0]
    changes = []  # Python lines that turn model = torchvision.models.<architecture>() into it
    if (conv1.in_channels, k, s, p) != (3, 7, 2, 3):  # torchvision's ImageNet conv1
        changes.append(
            f"model.conv1 = nn.Conv2d({conv1.in_channels}, {conv1.out_channels}, "
            f"kernel_size={k}, stride={s}, padding={p}, bias=False)"
        )
    # backbone.stem late_pool: the max-pool sits at the end of layer1 (a parameter-free module:
    # the state dict cannot say where it is)
    pool_after_layer1 = isinstance(backbone.layer1[-1], nn.MaxPool2d)
    if pool_after_layer1:
        changes.append("model.layer1.append(model.maxpool)")
    has_maxpool = not isinstance(maxpool, nn.Identity)
    if not has_maxpool:
        changes.append("model.maxpool = nn.Identity()")
    final_relu = has_final_relu(backbone)
    if not final_relu:
        changes.append(rebuild_line(backbone))
    # None: a conv1 or max-pool of no stem in STEM_LAYOUTS
    stem = stem_with(k, pool_place(has_maxpool, pool_after_layer1))
    return {
        "stem": stem,  # backbone.stem, for a reader; the facts below are what rebuilds it
        "small_image_stem": k == 3,  # the 3x3 stride-1 stem (backbone.stem small or small_pool)
        "in_channels": conv1.in_channels,
        "conv1_kernel_size": k,
        "conv1_stride": s,
        "conv1_padding": p,
        "has_maxpool": has_maxpool,  # right after the stem's conv
        "pool_after_layer1": pool_after_layer1,
        "final_relu": final_relu,  # False: layer4's last block returns its sum before the ReLU
        # Every change, the final-ReLU line too; the name is part of the file format.
        "stem_changes": changes,  # empty: the stock torchvision model as it is
    }


def vit_facts(net: nn.Module, architecture: str) -> dict:
    """The geometry of a ViT of moco/vit.py, read off the module, and (``stem_changes``, as for
    a ResNet) the line that builds it with moco-v3's vits.py when it is not the stock one."""
    facts = {
        "in_channels": net.conv_proj.in_channels,
        "image_size": net.image_size,
        "patch_size": net.patch_size,
        "depth": len(net.encoder.layers),
    }
    changes = []
    if facts != STOCK_VIT:
        size = VIT_SIZES[architecture]
        changes.append(
            f"model = vits.VisionTransformerMoCo(img_size={facts['image_size']}, "
            f"patch_size={facts['patch_size']}, in_chans={facts['in_channels']}, "
            f"embed_dim={size.dim}, depth={facts['depth']}, num_heads={size.heads}, "
            "mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))"
        )
    return {**facts, "stem_changes": changes}


def default_output(checkpoint: Path, fmt: str) -> Path:
    """Next to the checkpoint, so the export stays with the run that produced it."""
    return checkpoint.with_name(f"{checkpoint.stem}_backbone{FORMATS[fmt]}")


def metadata_path(output: Path) -> Path:
    """``<export>.json``: one per export, so a .pth and a .safetensors of one run never collide."""
    return output.with_name(output.name + ".json")


def export_backbone(
    checkpoint: Path | str, fmt: str, output: Path | str | None = None
) -> tuple[Path, dict]:
    """Write the query backbone of ``checkpoint`` in format ``fmt`` to ``output`` (or
    ``default_output``) plus its metadata JSON. Returns the export path and the metadata.
    ``checkpoint`` is any file moco.weights reads, so this also converts between formats.
    ``fmt=moco`` of a pretraining checkpoint writes the whole official MoCo checkpoint (both
    encoders and the queue; MoCo v3: base and momentum encoders and predictor); of another
    file, the query encoder it holds."""
    fmt = str(fmt)  # the schema's enum member, or a plain string
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is unknown: use one of {list(FORMATS)}")
    if fmt == "safetensors" and importlib.util.find_spec("safetensors") is None:
        raise ConfigError(
            "format=safetensors needs the safetensors package: pip install -e . (it is a "
            "dependency) or use format=torchvision"
        )
    checkpoint = Path(checkpoint).expanduser()
    output = Path(output).expanduser() if output is not None else default_output(checkpoint, fmt)
    meta_file = metadata_path(output)
    if checkpoint.exists() and checkpoint.resolve() in (output.resolve(), meta_file.resolve()):
        raise ConfigError(f"output={output} would overwrite the checkpoint: choose another path")

    # Any format moco.weights knows (a conversion); a file torch cannot read safely gets the
    # same hint as in the eval scripts.
    weights = read_weights(checkpoint, hint=FROM_PRETRAIN)
    vit = weights.architecture in VITS
    if vit and fmt != "moco":  # the other formats are ResNet layouts
        raise ConfigError(
            f"format={fmt}: export writes ResNet backbones in it; {checkpoint} holds a "
            f"{weights.architecture}: use format=moco (moco-v3's layout, timm names) or evaluate "
            "it with scripts/knn_eval.py or linear_probe.py, which read it"
        )
    if vit and weights.head not in (None, V3_HEAD):
        raise ConfigError(
            f"format=moco writes a ViT as MoCo v3 (its projector as head); {checkpoint} has a "
            f"{weights.head} head: evaluate it with scripts/knn_eval.py or linear_probe.py"
        )
    if weights.format == "pretrain":  # the whole run: key encoder and queue too
        ckpt = read_moco_checkpoint(checkpoint)
        encoder, state = query_encoder(ckpt, checkpoint), ckpt["state_dict"]
    else:  # the query encoder only (the backbone, and the head where the file has one)
        encoder, state, ckpt = weights.encoder(), {}, weights.info
    backbone = encoder.backbone
    if vit:
        facts = vit_facts(backbone, weights.architecture)
    else:
        facts = resnet_facts(backbone)
        refuse_unless_stock_resnet(fmt, facts)
    # main_moco.py saves the epochs finished. Lightning counts epochs from 0 in its checkpoints;
    # an official file (or an export of one) already holds the count.
    finished = ckpt.get("epoch")
    if weights.format == "pretrain" and finished is not None:
        finished = int(finished) + 1
    if fmt in ("moco", "detectron2") and (vit or weights.head == V3_HEAD):  # MoCo v3's layout
        payload = moco_v3_checkpoint(state, encoder, weights.architecture, finished, checkpoint)
    elif fmt in ("moco", "detectron2"):
        payload = moco_checkpoint(state, encoder, weights.architecture, finished, checkpoint)
    else:
        payload = backbone_state_dict(backbone)
    meta = {
        "architecture": weights.architecture,  # a ResNet: torchvision.models.<architecture>()
        "format": fmt,
        "source_format": weights.format,
        "image_size": weights.image_size,
        "feature_dim": backbone.feature_dim,
        **facts,
        # The classifier is not part of pretraining (main_lincls.py asserts these are missing).
        "missing_on_load": ["head.weight", "head.bias"] if vit else ["fc.weight", "fc.bias"],
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": sha256(checkpoint),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    if fmt == "moco":  # a supervised reference has encoder_q only
        meta["contents"] = moco_contents(payload["state_dict"])
    if fmt == "detectron2":  # detectron2 builds its own heads: nothing is "missing"
        del meta["missing_on_load"]
    # Both files are encoded in memory first, so every write is a plain Python file write and a
    # full disk or a read-only directory shows up as one OSError (torch.save on a path raises a
    # RuntimeError from C++ instead).
    _write_atomically(
        {
            output: encode(fmt, payload, meta),
            meta_file: (json.dumps(meta, indent=2) + "\n").encode(),
        }
    )
    return output, meta


def _write_atomically(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary name in its directory, then rename them all into place:
    an interrupted export leaves no truncated file, and no weights without their metadata."""
    temporary = {path: path.with_name(f".{path.name}.tmp") for path in files}
    path = next(iter(files))
    try:
        for path, tmp in temporary.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(files[path])
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    except OSError as exc:
        for tmp in temporary.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise DataError(
            f"cannot write {path} ({exc.strerror or exc}): set output=... to a writable path"
        ) from None
