"""Peak memory: the process's peak resident set size on the host and, per stretch of work (one
decoder layer) on a CUDA device, that device's peak allocated memory; the host heap given back."""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_PROC = Path("/proc/self")


def resident_mib() -> float | None:
    """The process's resident memory now (MiB; Linux ``/proc/self/statm``), None where it cannot be read."""
    try:
        return int((_PROC / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def process_peak_mib() -> float:
    """The process's peak RSS since it started (MiB): Linux's ``VmHWM``, else ``getrusage``'s
    ``ru_maxrss``. Nothing here resets the kernel's mark, so ``/usr/bin/time`` and a caller's own
    ``getrusage`` see the same peak.

    >>> process_peak_mib() > 0
    True
    """
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024              # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Memory of a stretch of work, read at its end: on the host the process's peak so far
    (:func:`process_peak_mib`: the layer that raises it is the one whose reading jumps; the
    kernel's mark is never reset, which would hide the earlier peak from every other reader) and
    what is resident at the end (:func:`resident_mib`: how memory moves from layer to layer), and
    on ``device``, when it is a CUDA device, the peak allocated since construction.

    >>> list(PeakMemory(torch.device("cpu")).read())
    ['peak_host_mib', 'host_mib']
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float]:
        """``peak_host_mib``, ``host_mib`` (where it can be read), and ``peak_device_mib`` on a CUDA device."""
        resident = resident_mib()                # read first: the peak read after it is at least as high
        stats = {"peak_host_mib": round(process_peak_mib(), 1)}
        if resident is not None:
            stats["host_mib"] = round(resident, 1)
        if self.device.type == "cuda":
            stats["peak_device_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return stats


def describe(stats: dict[str, float]) -> str:
    """``peak host 812 MiB (640 now), device 1,204 MiB`` from :meth:`PeakMemory.read`'s keys.

    >>> describe({"peak_host_mib": 812.0, "host_mib": 640.2, "peak_device_mib": 1204.0})
    'peak host 812 MiB (640 now), device 1,204 MiB'
    """
    now = f" ({stats['host_mib']:,.0f} now)" if "host_mib" in stats else ""
    parts = [f"host {stats['peak_host_mib']:,.0f} MiB{now}"]
    if "peak_device_mib" in stats:
        parts.append(f"device {stats['peak_device_mib']:,.0f} MiB")
    return "peak " + ", ".join(parts)


#: below this share of memory free (host, or the CUDA device computed on), the garbage collector
#: runs after each decoder layer (:func:`release_memory`)
SHORT_SHARE = 0.25


def free_share(device: torch.device) -> float:
    """The share of ``device``'s memory free now (the host's for a CPU: ``MemAvailable``; 0.0 where it cannot be read)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free / total
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return 0.0


def release_memory(device: torch.device) -> None:
    """After a decoder layer: run the garbage collector when memory is short (:data:`SHORT_SHARE`),
    else leave it to Python (a full collection costs a fraction of a second, and a released layer
    frees its tensors without one, :func:`tamp_fx.capture.graph.drop_tensors`); then give the
    host heap's free pages back to the system (:func:`trim_host_heap`)."""
    if free_share(device) < SHORT_SHARE:
        gc.collect()
    trim_host_heap()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim     # glibc; absent elsewhere (macOS, musl)
    except (OSError, AttributeError):
        return None


def trim_host_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Tensors that outlive a layer (the next layer's inputs, a staged layer's values
    between stages) are allocated among that layer's temporaries, so the heap's free space ends up
    scattered between them, and glibc only shrinks a heap from its top: without this, a
    128 x 512 SmolLM2 plan's resident memory grew by about 100 MiB a layer, to 4.8 GiB over 30
    layers (1.2 GiB with it, at the same speed; results.md, "Planning speed"). A layer planned in
    stages trims after each stage too (1.04 GiB for Wanda, against 1.33-1.52 after layers only)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
