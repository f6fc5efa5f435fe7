"""Everything that lives inside one actor: adapter pool, LoGo routing, mixture layers, generation.

No Ray import here: the predictor is a plain class that Ray Data instantiates, testable in one process.
The names below load their module on first use, so `from actors import RoutingConfig` (or
`import actors.options`) does not load torch; `from actors import LoGoPredictor` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Adapter": "adapters", "AdapterError": "adapters", "LoraFactors": "adapters", "read_adapter": "adapters",
    "BatchStats": "engine", "LoGoEngine": "engine",
    "Group": "grouping", "group_rows": "grouping",
    "GenerationConfig": "options", "OUTPUT_COLUMNS": "options", "PAPER_ROUTING": "options", "RoutingConfig": "options",
    "AdapterPool": "pool",
    "LoGoPredictor": "predictor",
    "Router": "router", "Routing": "router",
}

__all__ = [
    "Adapter", "AdapterError", "AdapterPool", "BatchStats", "GenerationConfig", "Group", "LoGoEngine",
    "LoGoPredictor", "LoraFactors", "OUTPUT_COLUMNS", "PAPER_ROUTING", "Router", "Routing", "RoutingConfig",
    "group_rows", "read_adapter",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"actors.{_WHERE[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # what type checkers and editors see
    from actors.adapters import Adapter, AdapterError, LoraFactors, read_adapter
    from actors.engine import BatchStats, LoGoEngine
    from actors.grouping import Group, group_rows
    from actors.options import OUTPUT_COLUMNS, PAPER_ROUTING, GenerationConfig, RoutingConfig
    from actors.pool import AdapterPool
    from actors.predictor import LoGoPredictor
    from actors.router import Router, Routing
