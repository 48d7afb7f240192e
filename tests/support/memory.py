"""A cap on this process's memory for a test that could otherwise build a model of any size (a
GGUF header damaged upwards, if its check failed): an allocation past the cap fails at once
instead of taking the machine."""
from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator


@contextlib.contextmanager
def memory_cap(extra: int = 4 * 2 ** 30) -> Iterator[None]:
    """Address space limited to what the process maps now plus ``extra`` bytes, restored on exit.
    Left off where CUDA is available (a CUDA context reserves address space beyond any such cap)."""
    import torch
    if torch.cuda.is_available():
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
