"""Callbacks that inject into the ordinary training loop."""

from lightning_fedopt.callbacks.curriculum import Curriculum, find_partition_sampler
from lightning_fedopt.callbacks.hard_batch import HardBatchSelection, select_hard_batches
from lightning_fedopt.callbacks.monitor import CommunicationMonitor

__all__ = [
    "CommunicationMonitor",
    "Curriculum",
    "HardBatchSelection",
    "find_partition_sampler",
    "select_hard_batches",
]
