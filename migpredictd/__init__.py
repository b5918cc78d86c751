"""migpredictd: predicts QEMU pre-copy live migration time and convergence for every VM in a fleet."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
