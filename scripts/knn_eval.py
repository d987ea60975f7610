"""Weighted kNN evaluation of frozen features.

python scripts/knn_eval.py checkpoint=runs/.../checkpoints/last.ckpt   # or raw, or random
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moco.run.cli import exit_on_user_error, run_hydra_main
from moco.run.evaluate import run_knn


@hydra.main(config_path="../conf", config_name="knn", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    run_knn(cfg, out_dir)
    print(f"Results in {out_dir}")


if __name__ == "__main__":
    run_hydra_main(main)
