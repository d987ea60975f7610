"""Every schema of moco/run/schema.py and moco/run/eval_schema.py in Hydra's ConfigStore, under
``schema/<name>``: each YAML of conf/ names its schema in its defaults list. Group schemas live in
their own group so that they never show up among a group's options."""

from hydra.core.config_store import ConfigStore

from moco.run import eval_schema, schema


def register() -> None:
    """Store every schema (idempotent); call before Hydra composes a config."""
    store = ConfigStore.instance()
    for name, node in schema.SCHEMAS.items():
        store.store(group="schema", name=name, node=node)
    top_level = {"pretrain": schema.PretrainConfig, **eval_schema.TOP_LEVEL}
    for name, node in top_level.items():
        store.store(group="schema", name=f"{name}_top", node=node)
