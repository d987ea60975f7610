"""Export the pretrained query backbone for the tools people use.

python scripts/export.py checkpoint=runs/.../checkpoints/last.ckpt \
    format=torchvision|safetensors|moco|detectron2 [output=PATH]

- torchvision (.pth) / safetensors: the backbone under torchvision's names; any stem (see
  <export>.json for the stem of small or grey images, or of backbone.stem=late_pool):
    model = torchvision.models.resnet18()   # the "architecture" of the JSON
    # a changed stem: apply each line of "stem_changes" first, in order, e.g.
    #   model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    #   model.maxpool = nn.Identity()
    model.load_state_dict(torch.load(path, weights_only=True), strict=False)  # fc.* stay missing
    # or safetensors.torch.load_file(path) for format=safetensors
- moco (.pth.tar): the checkpoint layout of facebookresearch/moco main_moco.py (both encoders,
  head as fc, queue dim x K); `main_lincls.py --pretrained path` and
  detection/convert-pretrain-to-detectron2.py read it. A supervised reference: encoder_q only.
  A MoCo v3 run: moco-v3's layout (base_encoder with the projector as fc, or for a ViT as
  head with timm's names, momentum_encoder, predictor), which its main_lincls.py reads.
- detectron2 (.pkl): what that conversion script writes; MODEL.WEIGHTS path.
moco and detectron2 need the 3-channel ImageNet stem (7x7 stride-2 conv1, max-pool): other
ResNets are refused with one line. A ViT is written as moco only (any geometry: the JSON gives
the VisionTransformerMoCo line that builds it).
"""

import hydra
from omegaconf import DictConfig

from moco.run.check import check_export
from moco.run.cli import exit_on_user_error, run_hydra_main
from moco.run.export import export_backbone, metadata_path
from moco.run.export_formats import USAGE


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_export(cfg)
    fmt = str(cfg.format)
    path, meta = export_backbone(str(cfg.checkpoint), fmt, cfg.output)
    what = "query backbone"
    if "contents" in meta:  # format=moco: encoder_q, and encoder_k and the queue if pretrained
        what = f"MoCo checkpoint ({', '.join(meta['contents'])})"
    print(f"Exported the {meta['architecture']} {what} ({fmt}) to {path}")
    print(f"Stem and provenance: {metadata_path(path)}")
    for line in meta["stem_changes"]:
        print(f"  before load_state_dict: {line}")
    print(f"Load it: {USAGE[fmt].format(arch=meta['architecture'], path=path)}")


if __name__ == "__main__":
    run_hydra_main(main)
