"""Export the pretrained query backbone so plain torchvision can load it.

python scripts/export.py checkpoint=runs/.../checkpoints/last.ckpt format=torchvision|safetensors

Loading it without this package (see <export>.json for the stem of small or grey images):
    model = torchvision.models.resnet18()   # the "architecture" of the JSON
    # small-image stem: apply each line of "stem_changes" first, e.g.
    #   model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    #   model.maxpool = nn.Identity()
    model.load_state_dict(torch.load(path, weights_only=True), strict=False)  # fc.* stay missing
    # or safetensors.torch.load_file(path) for format=safetensors
"""

import hydra
from omegaconf import DictConfig

from moco.run.check import check_export
from moco.run.cli import exit_on_user_error, run_hydra_main
from moco.run.export import export_backbone, metadata_path


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_export(cfg)
    path, meta = export_backbone(str(cfg.checkpoint), cfg.format, cfg.output)
    print(f"Exported the {meta['architecture']} query backbone ({cfg.format}) to {path}")
    print(f"Stem and provenance: {metadata_path(path)}")
    for line in meta["stem_changes"]:
        print(f"  before load_state_dict: {line}")


if __name__ == "__main__":
    run_hydra_main(main)
