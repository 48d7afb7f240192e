"""Dependencies' noise, silenced the same way for the command line and the Python API."""
from __future__ import annotations

import logging

#: Loggers (and their children) whose warnings are noise to a tamp-fx user: torchao's about
#: CUDA-only extensions and Triton it goes without on import, torch's pytree about Enum constants
#: torchao registers the old way. Their level is raised to ERROR unless someone set it already;
#: every other logger, the user's included, and Python's ``warnings`` are left alone.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_dependencies() -> None:
    """Show only errors of :data:`NOISY_LOGGERS` (idempotent, cheap: imports nothing)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
