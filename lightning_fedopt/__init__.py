"""lightning_fedopt: communication-efficient and decentralised training for PyTorch Lightning.

Importing the package registers its strategies with Lightning's ``StrategyRegistry``, so
``Trainer(strategy="local_sgd")`` works (``"<name>_spawn"`` and ``"<name>_fork"`` choose those
start methods, e.g. for notebooks).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_fedopt import (
    callbacks,
    compression,
    data,
    elastic,
    errors,
    merging,
    optim,
    schedules,
    topology,
)
from lightning_fedopt.comm import CommStats, Communicator
from lightning_fedopt.errors import (
    AgreementError,
    NoFiniteReplicaError,
    PeerStoppedError,
    PlainValueError,
    ReplicaLostError,
    ReplicasOutOfStepError,
)
from lightning_fedopt.merging import Merge
from lightning_fedopt.runtime.registry import register_name
from lightning_fedopt.schedules import AutoSync, Explicit, Increasing, LateBudget, Periodic, SyncSchedule
from lightning_fedopt.strategies import (
    CO2Strategy,
    CompressedDDPStrategy,
    DESLOCStrategy,
    DiLoCoStrategy,
    EagerDiLoCoStrategy,
    FedSpeedStrategy,
    GossipStrategy,
    LocalSGDStrategy,
    MeteredDDPStrategy,
    MuLoCoStrategy,
    NoLoCoStrategy,
    ReplicaStrategy,
    SparseLoCoStrategy,
    StreamingDiLoCoStrategy,
)
from lightning_fedopt.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "AgreementError",
    "AutoSync",
    "CO2Strategy",
    "CommStats",
    "Communicator",
    "CompressedDDPStrategy",
    "DESLOCStrategy",
    "DiLoCoStrategy",
    "EagerDiLoCoStrategy",
    "Explicit",
    "FedSpeedStrategy",
    "GossipStrategy",
    "Increasing",
    "LateBudget",
    "LocalSGDStrategy",
    "Merge",
    "MeteredDDPStrategy",
    "MuLoCoStrategy",
    "NoFiniteReplicaError",
    "NoLoCoStrategy",
    "PeerStoppedError",
    "Periodic",
    "PlainValueError",
    "ReplicaLostError",
    "ReplicaStrategy",
    "ReplicasOutOfStepError",
    "SparseLoCoStrategy",
    "StreamingDiLoCoStrategy",
    "SyncSchedule",
    "Topology",
    "callbacks",
    "compression",
    "data",
    "elastic",
    "errors",
    "merging",
    "optim",
    "schedules",
    "topology",
]


def _register() -> None:
    for cls in (
        LocalSGDStrategy,
        MeteredDDPStrategy,
        CompressedDDPStrategy,
        DiLoCoStrategy,
        CO2Strategy,
        StreamingDiLoCoStrategy,
        NoLoCoStrategy,
        SparseLoCoStrategy,
        MuLoCoStrategy,
        EagerDiLoCoStrategy,
        FedSpeedStrategy,
        DESLOCStrategy,
        GossipStrategy,
    ):
        cls.register_strategies(StrategyRegistry)
    register_name(StrategyRegistry, "fedavg", LocalSGDStrategy, description="FedAvg (LocalSGDStrategy)")


_register()
