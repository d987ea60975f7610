"""Self-supervised MoCo pretraining.

python scripts/pretrain.py +experiment=moco_v2 [key=value ...]
python scripts/pretrain.py +experiment=supervised   # the labelled reference, not MoCo
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moco.run.cli import exit_on_user_error, run_hydra_main
from moco.run.train import pretrain


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    checkpoint = pretrain(cfg, Path(HydraConfig.get().runtime.output_dir))
    if checkpoint is not None:  # rank 0
        print(f"Done. Last checkpoint: {checkpoint}")


if __name__ == "__main__":
    run_hydra_main(main)
