"""``python -m lightning_fedopt.plan``: see :mod:`lightning_fedopt.plan.cli`."""

import sys

from lightning_fedopt.plan.cli import main

sys.exit(main())
