"""Dependencies' noise, silenced the same way for the command line and the Python API."""
from __future__ import annotations

import logging

#: Loggers whose own warnings are noise to a tamp-fx user: torchao's about CUDA-only extensions it
#: skips on import, torch's pytree about Enum constants registered the old way. Only records of
#: these loggers themselves are dropped (below ERROR); every other logger, the user's included,
#: and Python's ``warnings`` are left alone.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_ERRORS_ONLY = _ErrorsOnly()


def quiet_dependencies() -> None:
    """Drop the warnings of :data:`NOISY_LOGGERS` (idempotent, cheap: imports nothing)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _ERRORS_ONLY not in logger.filters:
            logger.addFilter(_ERRORS_ONLY)
