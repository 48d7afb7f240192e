"""The variables ``torchrun`` sets for each process (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT),
read and checked without importing torch: a bad value is one line naming the variable and the
value, not a traceback from wherever it is first used."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tamp_fx.errors import TampError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


def _integer(name: str, low: int, high: int | None = None, default: int | None = None) -> int | None:
    """``$name`` as an integer in [low, high] (``default`` when it is not set)."""
    text = os.environ.get(name)
    if text is None:
        return default
    value = int(text) if re.fullmatch(r"\s*[0-9]+\s*", text) else None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise TampError(f"environment variable {name}={text!r} is not a whole number {bounds}: unset it, or start "
                        "the command with torchrun, which sets it")
    return value


def launch_env() -> Launch:
    """This process's place as the environment gives it (one process without the variables).
    Raises TampError naming the first variable that is set to something it cannot be; MASTER_PORT
    is checked when there are several processes (only they use it)."""
    size = _integer("WORLD_SIZE", 1, default=1)
    rank = _integer("RANK", 0, default=0)
    if "WORLD_SIZE" in os.environ and rank >= size:
        raise TampError(f"environment variable RANK={rank} is not below WORLD_SIZE={size}: unset both, or start the "
                        "command with torchrun, which sets them")
    local_rank = _integer("LOCAL_RANK", 0, default=rank)
    if size > 1:
        _integer("MASTER_PORT", 1, 65535)
    return Launch(rank, size, local_rank)


def lenient() -> Launch:
    """:func:`launch_env`, or one process where a variable is bad (the command says so in one line)."""
    try:
        return launch_env()
    except TampError:
        return Launch()
