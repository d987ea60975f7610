"""What Hydra needs before it composes a config from conf/: every schema of moco/run/schema.py and
moco/run/eval_schema.py in its ConfigStore, under ``schema/<name>`` (each YAML names its schema in
its defaults list; in a group of their own, schemas never show up among a group's options), and
the resolvers of the launcher's numbers (``${moco.run_stamp:}`` and friends, moco/run/launch.py)
and of the machine (``${moco.stem_for_machine:}``, moco/run/hardware.py)."""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from moco.run import eval_schema, schema
from moco.run.hardware import stem_for_machine
from moco.run.launch import register_resolvers


def register() -> None:
    """Store every schema and register the resolvers (idempotent)."""
    register_resolvers()
    if not OmegaConf.has_resolver("moco.stem_for_machine"):
        OmegaConf.register_new_resolver("moco.stem_for_machine", stem_for_machine)
    store = ConfigStore.instance()
    for name, node in schema.SCHEMAS.items():
        store.store(group="schema", name=name, node=node)
    top_level = {"pretrain": schema.PretrainConfig, **eval_schema.TOP_LEVEL}
    for name, node in top_level.items():
        store.store(group="schema", name=f"{name}_top", node=node)
