"""The outer-optimizer family: DiLoCo and streaming DiLoCo (fragments, the outer optimizer), CO2,
NoLoCo, SparseLoCo."""

from lightning_fedopt.strategies.diloco.co2 import CO2OuterOptimizer, CO2Strategy
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy, StreamingDiLoCoStrategy
from lightning_fedopt.strategies.diloco.noloco import NoLoCoStrategy
from lightning_fedopt.strategies.diloco.sparseloco import SparseLoCoStrategy

__all__ = [
    "CO2OuterOptimizer",
    "CO2Strategy",
    "DiLoCoStrategy",
    "NoLoCoStrategy",
    "SparseLoCoStrategy",
    "StreamingDiLoCoStrategy",
]
