"""Everything that lives inside one actor: adapter pool, LoGo routing, mixture layers, generation.

No Ray import here: the predictor is a plain class that Ray Data instantiates, testable in one process.
"""

from actors.adapters import Adapter, AdapterError, LoraFactors, read_adapter
from actors.engine import BatchStats, GenerationConfig, LoGoEngine
from actors.grouping import Group, group_rows
from actors.pool import AdapterPool
from actors.predictor import OUTPUT_COLUMNS, LoGoPredictor
from actors.router import Router, Routing, RoutingConfig

__all__ = [
    "Adapter", "AdapterError", "AdapterPool", "BatchStats", "GenerationConfig", "Group", "LoGoEngine",
    "LoGoPredictor", "LoraFactors", "OUTPUT_COLUMNS", "Router", "Routing", "RoutingConfig", "group_rows",
    "read_adapter",
]
