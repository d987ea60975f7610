"""What every script does around its work: user mistakes end as one line and exit code 2."""

import functools
import shutil
import sys
from pathlib import Path

from moco.errors import MocoUserError


def _remove_if_only_hydra_files(run_dir: Path) -> None:
    """Delete a run directory that holds nothing but Hydra's own files, so a failed start
    leaves nothing half-written behind."""
    if run_dir.is_dir() and all(
        p.name in (".hydra",) or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)


def exit_on_user_error(task):
    """Decorator for a Hydra task function: MocoUserError -> 'error: ...' on stderr, exit 2."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except MocoUserError as exc:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                _remove_if_only_hydra_files(Path(HydraConfig.get().runtime.output_dir))
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
