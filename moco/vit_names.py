"""The two names of each MoCo v3 ViT tensor: timm's, which the official code saves
(facebookresearch/moco-v3: ``vits.py`` builds timm's ``VisionTransformer``), and torchvision's,
which this project's ViT has (``moco.vit.build_vit``). One table, read in both directions.

The modules behind each pair compute the same function, so the tensors go over as they are:
both are pre-norm blocks (``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``) with LayerNorm
eps 1e-6, GELU MLPs, the class token first and the position table (1 x (1 + grid^2) x D) added
after it; timm's fused ``qkv`` (3D x D) stacks q, k and v in that order, head after head within
each, which is the layout of ``nn.MultiheadAttention``'s ``in_proj_weight`` (it is split into
q, k, v and each reshaped into heads the same way). Both must split D into the same number of
heads, which changes no shape (moco/vit.py: 12, as vits.py).
"""

import re

# (timm, torchvision) within block i: its prefix ("{i}" is the index), then the rest.
BLOCK = ("blocks.{i}.", "encoder.layers.encoder_layer_{i}.")
IN_BLOCK = (
    ("norm1.", "ln_1."),
    ("attn.qkv.weight", "self_attention.in_proj_weight"),
    ("attn.qkv.bias", "self_attention.in_proj_bias"),
    ("attn.proj.", "self_attention.out_proj."),
    ("norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.0."),  # torchvision's MLP: 0 Linear, 1 GELU, 2 Dropout, 3 Linear
    ("mlp.fc2.", "mlp.3."),
)
# (timm, torchvision): a name ending in "." is a prefix (the rest of the name is kept).
NAMES = (
    ("patch_embed.proj.", "conv_proj."),
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    *((BLOCK[0] + timm, BLOCK[1] + tv) for timm, tv in IN_BLOCK),
    ("norm.", "encoder.ln."),
    # The classifier's slot, where MoCo v3 puts its projector (moco.encoders.SLOTS).
    ("head.", "heads."),
)
TIMM_PATCH_WEIGHT, TIMM_POS_EMBED = "patch_embed.proj.weight", "pos_embed"


def _pattern(name: str) -> re.Pattern:
    pattern = re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(pattern + ("(?P<rest>.+)" if name.endswith(".") else ""))


_TO_TORCHVISION = [(_pattern(timm), tv) for timm, tv in NAMES]
_TO_TIMM = [(_pattern(tv), timm) for timm, tv in NAMES]


def _rename(name: str, table) -> str | None:
    for pattern, target in table:
        found = pattern.fullmatch(name)
        if found:
            groups = found.groupdict()
            return target.replace("{i}", groups.get("i") or "") + (groups.get("rest") or "")
    return None


def torchvision_name(timm_name: str) -> str | None:
    """The torchvision name of a timm ViT tensor; None for a name outside the table."""
    return _rename(timm_name, _TO_TORCHVISION)


def timm_name(torchvision_name: str) -> str | None:
    """The timm name of a torchvision ViT tensor; None for a name outside the table."""
    return _rename(torchvision_name, _TO_TIMM)
