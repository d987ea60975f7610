"""What Hydra needs before it composes a config from conf/: every schema of moco/run/schema.py and
moco/run/eval_schema.py in its ConfigStore, under ``schema/<name>`` (each YAML names its schema in
its defaults list; in a group of their own, schemas never show up among a group's options), and
the resolvers of the launcher's numbers (``${moco.run_stamp:}`` and friends, moco/run/launch.py)
and of the machine (``${moco.stem_for_machine:}``, moco/run/hardware.py)."""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from moco.run import eval_schema, schema
from moco.run.hardware import stem_for_machine
from moco.run.launch import hydra_subdir, launched_devices, launched_nodes, run_stamp

# Every resolver the configs in conf/ use, by name: (function, cached). The stamp is cached, like
# Hydra's own ${now:}: the run directory is resolved more than once (Lightning reads it again to
# start its child processes) and must not move in between.
RESOLVERS = {
    "moco.run_stamp": (run_stamp, True),
    "moco.hydra_subdir": (hydra_subdir, False),
    "moco.launched_devices": (launched_devices, False),
    "moco.launched_nodes": (launched_nodes, False),
    "moco.stem_for_machine": (stem_for_machine, False),
}


def register() -> None:
    """Store every schema and register the resolvers (idempotent)."""
    for name, (function, cached) in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=cached)
    store = ConfigStore.instance()
    for name, node in schema.SCHEMAS.items():
        store.store(group="schema", name=name, node=node)
    top_level = {"pretrain": schema.PretrainConfig, **eval_schema.TOP_LEVEL}
    for name, node in top_level.items():
        store.store(group="schema", name=f"{name}_top", node=node)
