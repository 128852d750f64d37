"""Strategies: who trains what, and when the replicas talk."""

from lightning_fedopt.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_fedopt.strategies.ddp import MeteredDDPStrategy
from lightning_fedopt.strategies.diloco.co2 import CO2OuterOptimizer, CO2Strategy
from lightning_fedopt.strategies.diloco.diloco import DiLoCoStrategy, StreamingDiLoCoStrategy
from lightning_fedopt.strategies.diloco.eager import EagerDiLoCoStrategy
from lightning_fedopt.strategies.diloco.muloco import MuLoCoStrategy
from lightning_fedopt.strategies.diloco.noloco import NoLoCoStrategy
from lightning_fedopt.strategies.diloco.sparseloco import SparseLoCoStrategy
from lightning_fedopt.strategies.gossip.gossip import GossipStrategy
from lightning_fedopt.strategies.local_sgd.desloc import DESLOCStrategy
from lightning_fedopt.strategies.local_sgd.fedspeed import FedSpeedStrategy
from lightning_fedopt.strategies.local_sgd.local_sgd import LocalSGDStrategy
from lightning_fedopt.strategies.replica import ReplicaStrategy

__all__ = [
    "CO2OuterOptimizer",
    "CO2Strategy",
    "CompressedDDPStrategy",
    "DESLOCStrategy",
    "DiLoCoStrategy",
    "EagerDiLoCoStrategy",
    "FedSpeedStrategy",
    "GossipStrategy",
    "LocalSGDStrategy",
    "MeteredDDPStrategy",
    "MuLoCoStrategy",
    "NoLoCoStrategy",
    "ReplicaStrategy",
    "SparseLoCoStrategy",
    "StreamingDiLoCoStrategy",
]
