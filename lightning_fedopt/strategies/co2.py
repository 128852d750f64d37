"""Compatibility path: ``lightning_fedopt.strategies.co2`` is :mod:`lightning_fedopt.strategies.diloco.co2`."""

from lightning_fedopt.strategies.diloco.co2 import *  # noqa: F403
from lightning_fedopt.strategies.diloco.co2 import __all__ as __all__
