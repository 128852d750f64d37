"""Compatibility path: ``lightning_fedopt.strategies.fedspeed`` is :mod:`lightning_fedopt.strategies.local_sgd.fedspeed`."""

from lightning_fedopt.strategies.local_sgd.fedspeed import *  # noqa: F403
from lightning_fedopt.strategies.local_sgd.fedspeed import __all__ as __all__
