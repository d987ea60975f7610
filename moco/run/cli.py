"""What every script does around its work: user mistakes end as one line and exit code 2."""

import functools
import os
import shutil
import sys
from pathlib import Path

from moco.errors import MocoUserError, Preempted
from moco.run.launch import launched_rank


def _remove_if_only_hydra_files(run_dir: Path) -> None:
    """Delete a run directory that holds nothing but Hydra's own files, and the folders above
    it that this leaves empty, so a failed start leaves nothing half-written behind."""
    if not run_dir.is_dir() or not all(
        p.name in (".hydra",) or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    stop = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    while parent != stop and stop in parent.parents and not any(parent.iterdir()):
        parent.rmdir()  # e.g. runs/<data>/ made for this run alone
        parent = parent.parent


def _clean_run_dir() -> None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        _remove_if_only_hydra_files(Path(HydraConfig.get().runtime.output_dir))


def exit_on_user_error(task):
    """Decorator for a Hydra task function: MocoUserError -> 'error: ...' on stderr, exit 2.

    Any other exception propagates (a bug deserves its traceback), after the same clean-up.
    """

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except MocoUserError as exc:
            _clean_run_dir()
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Preempted as stop:  # a checkpoint was written: nothing to clean up
            if launched_rank() == 0:
                print(f"stopped: {stop}", file=sys.stderr)
            sys.exit(stop.exit_code)
        except BaseException:
            _clean_run_dir()
            raise

    return wrapper


def run_hydra_main(main) -> None:
    """Call a ``@hydra.main`` function; Hydra's own command-line errors (an unknown group
    option, a key that does not exist, an override that does not parse) end as one line and
    exit code 2, like the project's. ``HYDRA_FULL_ERROR=1`` still shows the full traceback."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from moco.run.config_store import register

    register()  # the schemas conf/ names in its defaults lists
    wants_traceback = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing many lines
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as exc:
        if wants_traceback:
            raise
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except AssertionError as exc:
        # OmegaConf's answer to a key set below a null node, e.g. logger.wandb.project=x
        # without logger=wandb (an option not chosen leaves its node null).
        if wants_traceback or not str(exc).startswith("Unexpected type for root"):
            raise
        print(f"error: {null_node_line(sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:
        # Hydra's defaults list rejects a group set to null (augment=null) with a bare ValueError.
        if wants_traceback or not str(exc).startswith("Config group override must be"):
            raise
        print(
            f"error: {exc}: a config group takes one of its options on the command line "
            "(--help lists the groups and their options)",
            file=sys.stderr,
        )
        sys.exit(2)


def null_node_line(overrides: list[str]) -> str:
    """The one line for overrides that set a key inside a node that is null."""
    for override in overrides:
        parts = override.lstrip("+").split("=", 1)[0].split(".")
        if len(parts) > 2 and parts[0] == "logger":
            return (
                f"{override} sets a setting of the {parts[1]} tracker, which is not chosen: "
                f"add logger=[csv,{parts[1]}]"
            )
    return "an override sets a key inside a config node that is null: set the node first"


def hydra_error_line(exc: Exception) -> str:
    """Hydra's several-line report of a command-line mistake, as the project's one line."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from moco.run.check import not_a_key, omegaconf_error_line

    text = str(exc)
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return f"{group}={name} is unknown: use one of {', '.join(exc.options)}"
    cause = exc.__cause__
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and text.startswith(
        "Could not override '"
    ):
        return not_a_key(text.split("'")[1])
    if isinstance(cause, OmegaConfBaseException):  # a value the schema refused
        return omegaconf_error_line(cause)
    if isinstance(exc, OverrideParseException):
        text = f"cannot parse the override {exc.override!r}: {exc.message}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
