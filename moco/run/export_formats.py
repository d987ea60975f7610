"""The layouts of the other tools: the official MoCo checkpoint and detectron2's pickle.

``format=moco`` writes the layout of what facebookresearch/moco ``main_moco.py`` saves,
``{"epoch", "arch", "state_dict", "optimizer"}``, with the query and key encoders under
``module.encoder_q.`` and ``module.encoder_k.`` (torchvision ResNet names, the projection head as
torchvision's ``fc``: ``fc.weight`` for the linear head of v1, ``fc.0.*`` / ``fc.2.*`` for the
MLP of v2) and the queue as ``module.queue`` (dim x K) and ``module.queue_ptr``. Its
``main_lincls.py --pretrained`` and ``detection/convert-pretrain-to-detectron2.py`` read it
unchanged. The optimizer state is left empty: those read the weights only, and a
``main_moco.py --resume`` cannot continue from it.

A MoCo v3 model is written in the layout of facebookresearch/moco-v3 ``main_moco.py`` instead:
``module.base_encoder.*`` (the projector in the classifier's slot), ``module.momentum_encoder.*``
and ``module.predictor.*``, which are this project's own module names (``moco.model_v3``). A
ResNet's tensors go over one to one (the projector as ``fc``); a ViT's take the timm names of
moco-v3's ``vits.py`` (moco/vit_names.py; the projector as ``head``). Its ``main_lincls.py
--pretrained`` reads it.

``format=detectron2`` writes what that conversion script writes from such a file (v3: from the
base encoder); it is for ResNets only.

Both rebuild the stock ImageNet ResNet (3 input channels, 7x7 stride-2 conv1, max-pool) from
the architecture name alone, so a ResNet with another stem is refused before anything is
written. A ViT of any geometry is written: moco-v3's ``VisionTransformerMoCo`` takes image size,
patch size, channels and depth as arguments (the export's JSON says them); only its
``main_lincls.py`` builds the stock one (224 px, 3 channels, 16-px patches, 12 blocks).
"""

import io
import json
import pickle

import torch
from torch import nn

from moco.checkpoint import state_dict_mismatch, under
from moco.encoders import SLOTS
from moco.errors import ConfigError, DataError
from moco.vit import VITS
from moco.vit_names import timm_name

# format -> file extension (.pth.tar as main_moco.py names its checkpoints)
FORMATS = {
    "torchvision": ".pth",
    "safetensors": ".safetensors",
    "moco": ".pth.tar",
    "detectron2": ".pkl",
}
STOCK_RESNET_ONLY = ("moco", "detectron2")  # rebuilt as torchvision.models.<arch>() / detectron2
# What the official MoCo files carry besides encoder_q (a supervised reference has neither).
KEY_ENCODER, QUEUE_KEYS, QUEUE_PTR = "encoder_k.", "queue.keys", "queue.ptr"
# The parts of an official file, v1/v2 then v3 (a v3 file's query encoder is base_encoder).
PARTS = ("encoder_q", "encoder_k", "queue", "base_encoder", "momentum_encoder", "predictor")
# detection/convert-pretrain-to-detectron2.py, in its order.
DETECTRON2_RENAMES = (
    ("layer1", "res2"),
    ("layer2", "res3"),
    ("layer3", "res4"),
    ("layer4", "res5"),
    ("bn1", "conv1.norm"),
    ("bn2", "conv2.norm"),
    ("bn3", "conv3.norm"),
    ("downsample.0", "shortcut"),
    ("downsample.1", "shortcut.norm"),
)
USAGE = {  # how to load it, printed by scripts/export.py (.format(arch=..., path=...))
    "torchvision": "torchvision.models.{arch}().load_state_dict(torch.load('{path}', "
    "weights_only=True), strict=False)",
    "safetensors": "torchvision.models.{arch}().load_state_dict("
    "safetensors.torch.load_file('{path}'), strict=False)",
    "moco": "python main_lincls.py -a {arch} --pretrained {path} ... (facebookresearch/moco; "
    "moco-v3 for a MoCo v3 model)",
    "detectron2": "MODEL.WEIGHTS {path}, MODEL.RESNETS.STRIDE_IN_1X1 False (torchvision's "
    "stride), INPUT.FORMAT RGB, PIXEL_MEAN/STD of pretraining x 255; resnet50 for MoCo's R50 "
    "configs, resnet18 only with an FPN config (DEPTH 18, RES2_OUT_CHANNELS 64); NumPy 2 wrote "
    "the pickle",
}


def refuse_unless_stock_resnet(fmt: str, facts: dict) -> None:
    """One ConfigError line when ``fmt`` cannot rebuild the backbone that ``facts``
    (``export.resnet_facts``) describe: the official tools build the stock ImageNet ResNet."""
    if fmt not in STOCK_RESNET_ONLY or not facts["stem_changes"]:
        return
    problems = []
    channels = facts["in_channels"]
    if channels != 3:
        problems.append(f"{channels} input channel{'' if channels == 1 else 's'}")
    if facts["stem"] is None:
        k, s = facts["conv1_kernel_size"], facts["conv1_stride"]
        problems.append(f"a {k}x{k} stride-{s} conv1")
    elif facts["stem"] != "imagenet":
        problems.append(f"the {facts['stem']} stem")
    if not facts["final_relu"]:
        problems.append("no ReLU after its last block")
    raise ConfigError(
        f"format={fmt} needs a 3-channel ImageNet-stem ResNet; this one has "
        f"{' and '.join(problems)}: use format=torchvision or safetensors (their JSON says how "
        "to rebuild it)"
    )


def _as_torchvision(
    encoder_weights: dict[str, torch.Tensor], slot: str = "fc"
) -> dict[str, torch.Tensor]:
    """Our Encoder's names (``backbone.*``, ``head.*``) as torchvision's (``*``, ``fc.*``; a
    ViT's head slot is ``heads``)."""
    renamed = {}
    for key, value in encoder_weights.items():
        part, _, rest = key.partition(".")
        renamed[rest if part == "backbone" else f"{slot}.{rest}"] = value.detach().contiguous()
    return renamed


def _key_encoder(state_dict: dict, prefix: str, query: dict, path, query_name: str) -> dict:
    """The key (momentum) encoder's tensors under ``prefix``, named without it and checked to fit
    the query encoder's ``query``; empty when the file has none (a converted official file, a
    supervised reference)."""
    key = {k: v.detach().contiguous() for k, v in under(prefix, state_dict).items()}
    problem = state_dict_mismatch(query, key) if key else ""
    if problem:
        raise DataError(f"{path}: the {prefix[:-1]} weights do not fit {query_name} ({problem})")
    return key


def moco_checkpoint(state_dict: dict, encoder: nn.Module, arch: str, epochs_finished, path) -> dict:
    """The official MoCo checkpoint of a pretraining ``state_dict`` whose ``encoder_q`` is
    ``encoder`` (rebuilt and checked by ``query_encoder``). A supervised reference has no key
    encoder and no queue: the file then holds ``module.encoder_q.*`` only, all that
    ``main_lincls.py`` and the detectron2 conversion read."""
    query = encoder.state_dict()
    out = {f"module.encoder_q.{k}": v for k, v in _as_torchvision(query).items()}
    key_encoder = _key_encoder(state_dict, KEY_ENCODER, query, path, "encoder_q")
    if key_encoder:
        out.update({f"module.encoder_k.{k}": v for k, v in _as_torchvision(key_encoder).items()})
    if QUEUE_KEYS in state_dict and QUEUE_PTR in state_dict:
        # ours is K x dim (a key per row), main_moco.py's dim x K (a key per column)
        out["module.queue"] = state_dict[QUEUE_KEYS].t().contiguous()
        out["module.queue_ptr"] = state_dict[QUEUE_PTR].reshape(1).long()
    return {"epoch": epochs_finished or 0, "arch": arch, "state_dict": out, "optimizer": {}}


def moco_v3_checkpoint(
    state_dict: dict, encoder: nn.Module, arch: str, epochs_finished, path
) -> dict:
    """The official MoCo v3 checkpoint: the base encoder from ``encoder`` (our ``Encoder``,
    checked by ``query_encoder``: the backbone, the projector in its slot), and the momentum
    encoder and predictor of a pretraining ``state_dict`` (their module names are the official
    ones); a file with the base encoder only (an official one converted back) has neither. A
    ViT's tensors take timm's names, which vits.py's model has."""
    base = _as_torchvision(encoder.state_dict(), SLOTS[arch])
    momentum = _key_encoder(state_dict, "momentum_encoder.", base, path, "base_encoder")
    if arch in VITS:  # every name is the network's (checked above), so each has a timm name
        base, momentum = ({timm_name(k): v for k, v in part.items()} for part in (base, momentum))
    out = {f"module.base_encoder.{k}": v for k, v in base.items()}
    out |= {f"module.momentum_encoder.{k}": v for k, v in momentum.items()}
    for key, value in state_dict.items():
        if key.startswith("predictor."):
            out[f"module.{key}"] = value.detach().contiguous()
    return {"epoch": epochs_finished or 0, "arch": arch, "state_dict": out, "optimizer": {}}


def moco_contents(moco_state_dict: dict) -> list[str]:
    """Which parts of an official MoCo file (PARTS) a MoCo state dict holds."""
    return [
        part
        for part in PARTS
        if f"module.{part}" in moco_state_dict  # the queue is one tensor
        or any(k.startswith(f"module.{part}.") for k in moco_state_dict)
    ]


def detectron2_model(moco_state_dict: dict) -> dict:
    """What ``detection/convert-pretrain-to-detectron2.py`` makes of a MoCo state dict: the
    query encoder under detectron2's stem and stage names, as numpy arrays. As that script does,
    the head is kept too, as ``stem.fc.*``: no detectron2 model has such a key, so it loads the
    backbone and leaves them unused (its checkpointer logs them)."""
    model = {}
    v3 = any(k.startswith("module.base_encoder.") for k in moco_state_dict)
    prefix = "module.base_encoder." if v3 else "module.encoder_q."
    for key, value in moco_state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key.replace(prefix, "")
        if "layer" not in key:
            key = f"stem.{key}"
        for old, new in DETECTRON2_RENAMES:
            key = key.replace(old, new)
        model[key] = value.numpy()
    return model


def encode(fmt: str, payload, meta: dict) -> bytes:
    """``payload``: the backbone tensors (torchvision, safetensors) or the MoCo checkpoint."""
    if fmt == "detectron2":
        # The official script's pickle: detectron2 reads .pkl files with pickle.load. NumPy 2
        # writes numpy._core names, which NumPy 1.x cannot unpickle (numpy/numpy#28340).
        model = detectron2_model(payload["state_dict"])
        return pickle.dumps({"model": model, "__author__": "MOCO", "matching_heuristics": True})
    if fmt in ("torchvision", "moco"):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()
    from safetensors.torch import save  # only this format needs it

    # safetensors metadata is str -> str: strings as they are, everything else as JSON.
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return save(payload, metadata=header)
