"""The replica runtime: the parts a :class:`~lightning_fedopt.strategies.ReplicaStrategy` owns."""
