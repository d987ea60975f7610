"""A module's constructor arguments as plain Python values, the form its checkpoints store.

Checkpoints are read with ``torch.load(weights_only=True)``, which unpickles tensors and plain
containers only: an OmegaConf node or an enum member among the hyper-parameters would make the
file unreadable.
"""

from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """``value`` with every OmegaConf container and enum member replaced by plain Python."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def plain_settings(arguments: dict) -> dict:
    """``locals()`` of an ``__init__``, without ``self`` and ``__class__``, as plain values."""
    return {k: plain(v) for k, v in arguments.items() if k not in ("self", "__class__")}
