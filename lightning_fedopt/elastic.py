"""Compatibility path: :mod:`lightning_fedopt.fault_tolerance.elastic` (``python -m lightning_fedopt.elastic store``)."""

from lightning_fedopt.fault_tolerance.elastic import ReplicaLostError, main, num_nodes

__all__ = ["ReplicaLostError", "main", "num_nodes"]

if __name__ == "__main__":
    main()
