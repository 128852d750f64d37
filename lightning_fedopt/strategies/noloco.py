"""Compatibility path: ``lightning_fedopt.strategies.noloco`` is :mod:`lightning_fedopt.strategies.diloco.noloco`."""

from lightning_fedopt.strategies.diloco.noloco import *  # noqa: F403
from lightning_fedopt.strategies.diloco.noloco import __all__ as __all__
