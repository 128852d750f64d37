"""The outer-optimizer family: DiLoCo and streaming DiLoCo (fragments, the outer optimizer), CO2,
eager updates, NoLoCo, SparseLoCo, MuLoCo."""

from lightning_fedopt.strategies.diloco.co2 import CO2OuterOptimizer, CO2Strategy
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy, StreamingDiLoCoStrategy
from lightning_fedopt.strategies.diloco.eager import EagerDiLoCoStrategy
from lightning_fedopt.strategies.diloco.muloco import MuLoCoStrategy
from lightning_fedopt.strategies.diloco.noloco import NoLoCoStrategy
from lightning_fedopt.strategies.diloco.sparseloco import SparseLoCoStrategy

__all__ = [
    "CO2OuterOptimizer",
    "CO2Strategy",
    "DiLoCoStrategy",
    "EagerDiLoCoStrategy",
    "MuLoCoStrategy",
    "NoLoCoStrategy",
    "SparseLoCoStrategy",
    "StreamingDiLoCoStrategy",
]
