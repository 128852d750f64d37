"""The model-averaging family: Local SGD / FedAvg (participation, weights, merged rounds) and FedSpeed."""

from lightning_fedopt.strategies.local_sgd.fedspeed import FedSpeedStrategy
from lightning_fedopt.strategies.local_sgd.local_sgd import LocalSGDStrategy

__all__ = ["FedSpeedStrategy", "LocalSGDStrategy"]
