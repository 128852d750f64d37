"""The model-averaging family: Local SGD / FedAvg (participation, weights, merged rounds), FedSpeed
and DES-LOC."""

from lightning_fedopt.strategies.local_sgd.desloc import DESLOCStrategy
from lightning_fedopt.strategies.local_sgd.fedspeed import FedSpeedStrategy
from lightning_fedopt.strategies.local_sgd.local_sgd import LocalSGDStrategy

__all__ = ["DESLOCStrategy", "FedSpeedStrategy", "LocalSGDStrategy"]
