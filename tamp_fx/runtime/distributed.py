"""Data-parallel planning over the processes ``torchrun`` starts (DESIGN.md §3, placement and scale).

Rank r of K takes the calibration samples i with i % K == r. Everything between two
collective points runs on each rank alone, inside :func:`guarded`; at the end of every guarded
block all ranks learn whether any of them failed, so a failure on one rank stops every rank at
the same point with the same one-line error (naming the rank), and nobody is left waiting in a
collective. The data collectives (:func:`gather_rows`, :func:`weighted_sum`) run only between
guarded blocks.

Sums are made the same on any K: per-sample statistics are kept as one row per sample and the
rows of all samples are gathered in sample order before they are added up (exactly the bits
one process gets); Hessians, too large to keep per sample, are added in rank order, so every
rank holds the same bits (and one process its own, unchanged).

Without ``RANK`` / ``WORLD_SIZE`` in the environment there is one process, no process group,
and every function here is a no-op.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from tamp_fx.errors import TampError, first_line
from tamp_fx.runtime.launch import launch_env, lenient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``device`` is where it computes (None: unchanged)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    """The world :func:`init_from_env` joined (one process until then)."""
    return _world


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env() -> World:
    """Join the process group ``torchrun`` describes: ``cuda:LOCAL_RANK`` with NCCL when CUDA is
    there (gloo carries the small control messages), the CPU with gloo otherwise. Idempotent."""
    global _world
    if not launched() or _world.distributed:
        return _world
    env = launch_env()                                   # one line naming a bad variable
    rank, size, local_rank = env.rank, env.size, env.local_rank
    if size == 1:
        _world = World()
        return _world
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    _world = World(rank, size, local_rank, device)
    log.info("rank %d of %d on %s (%s)", rank, size, device, backend)
    return _world


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def end_process(code: int | str | None = 0) -> NoReturn:
    """Leave the process group and end this process with exit status ``code`` (as ``sys.exit``).
    Under torchrun the interpreter's clean-up is skipped (``os._exit``): gloo's worker threads
    can still be dropping the last collective's tensors when Python shuts down, and a thread
    that needs the interpreter then aborts the process ("terminate called without an active
    exception", exit status -6, about one run in five on two cores) after the work succeeded;
    destroy_process_group does not join those threads (pytorch/pytorch#190489). Call it once
    every output is written."""
    shutdown()
    if launched() and lenient().size > 1:
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)


def sample_indices(n_local: int, w: World | None = None) -> range:
    """The positions in the full sample list of this rank's ``n_local`` samples (rank r of K
    holds samples r, r + K, ...: ``load_calibration(..., shard=(r, K))``).

    >>> list(sample_indices(2, World(rank=1, size=3)))
    [1, 4]
    """
    w = w or _world
    return range(w.rank, w.rank + n_local * w.size, w.size)


def sample_seed(seed: int, sample: int) -> int:
    """A seed for what is drawn for one calibration sample: depends on the sample's index in the
    full list, not on the rank that runs it or the samples before it.

    >>> sample_seed(0, 3) != sample_seed(1, 3) != sample_seed(0, 4)
    True
    """
    return (seed * 1_000_003 + sample) % (1 << 63)


# --- agreeing on failures ------------------------------------------------------------------

class RankFailed(TampError):
    """Another rank (or this one) failed: every rank raises this with the same message."""


@contextlib.contextmanager
def guarded(w: World | None = None) -> Iterator[None]:
    """Run a block on every rank, then agree: if any rank raised (or was interrupted), every
    rank raises :class:`RankFailed` naming the first rank that failed and its one-line reason.
    One process: the block's exception goes through unchanged."""
    w = w or _world
    if not w.distributed:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except (Exception, KeyboardInterrupt) as caught:  # noqa: BLE001 - passed on to every rank
        error = caught
    _agree(error, w)


def _ignore_more_interrupts() -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:                # not the main thread: leave it
        pass


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = first_line(error)
    return text if isinstance(error, TampError) else f"{type(error).__name__}: {text}"


def _agree(error: BaseException | None, w: World) -> None:
    if isinstance(error, KeyboardInterrupt):
        _ignore_more_interrupts()     # Ctrl-C reaches each rank twice (terminal, then torchrun): stop once
    reasons: list[str | None] = [None] * w.size
    dist.all_gather_object(reasons, None if error is None else _reason(error))
    failed = [(r, reason) for r, reason in enumerate(reasons) if reason is not None]
    if not failed:
        return
    ranks = ", ".join(str(r) for r, _ in failed)
    message = f"rank{'s' if len(failed) > 1 else ''} {ranks} of {w.size}: {failed[0][1]}"
    if error is not None and not isinstance(error, (TampError, KeyboardInterrupt)):
        raise error  # a bug: its own traceback on the rank where it happened
    raise RankFailed(message) from error


#: How gloo words a rank that is gone (a plain RuntimeError): killed, out of memory, crashed.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost(error: BaseException, w: World | None = None) -> bool:
    """Whether ``error`` (raised by a collective) says another rank of this run is gone."""
    w = w or _world
    return w.distributed and (isinstance(error, dist.DistNetworkError) or any(t in str(error) for t in _PEER_GONE))


def barrier(w: World | None = None) -> None:
    """Wait until every rank is here (over the CPU: gloo)."""
    w = w or _world
    if w.distributed:
        dist.all_gather_object([None] * w.size, None)


# --- data collectives ----------------------------------------------------------------------

def gather_rows(local: torch.Tensor, w: World | None = None) -> torch.Tensor:
    """Every rank's rows (n_r, D) of its samples, as the rows of all samples in sample order (n, D).

    Rank r holds samples r, r + K, ...; the result is the same tensor on every rank. One
    process: ``local`` itself.
    """
    w = w or _world
    if not w.distributed:
        return local
    counts = torch.tensor([local.shape[0], local.shape[1]], dtype=torch.long, device=local.device)
    all_counts = [torch.empty_like(counts) for _ in range(w.size)]
    dist.all_gather(all_counts, counts)
    shapes = [tuple(c.tolist()) for c in all_counts]
    n = sum(s[0] for s in shapes)
    expected = [len(range(r, n, w.size)) for r in range(w.size)]
    if [s[0] for s in shapes] != expected or len({s[1] for s in shapes}) != 1:
        raise RuntimeError(f"ranks hold sample rows of shapes {shapes}, expected {expected} rows of one width")
    m = expected[0]                                                     # the most rows any rank has
    padded = local.new_zeros(m, local.shape[1])                         # (m, D)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).reshape(m * w.size, -1)[:n]            # row i = rank i % K, its row i // K


def weighted_sum(tensor: torch.Tensor, weight: float, w: World | None = None,
                 chunk_elements: int = 1 << 24) -> torch.Tensor:
    """sum over ranks r of weight_r * tensor_r, added in rank order: the same bits on every rank.
    Gathered in chunks so memory stays at K chunks beside the tensor. One process: ``weight * tensor``."""
    w = w or _world
    if not w.distributed:
        return tensor if weight == 1.0 else tensor * weight
    weights = [0.0] * w.size
    dist.all_gather_object(weights, float(weight))
    flat = tensor.contiguous().reshape(-1)                              # (E,)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), chunk_elements):
        piece = flat[start:start + chunk_elements]
        parts = [torch.empty_like(piece) for _ in range(w.size)]
        dist.all_gather(parts, piece)
        total = parts[0] * weights[0]
        for r in range(1, w.size):
            total += parts[r] * weights[r]
        out[start:start + chunk_elements] = total
    return out.reshape(tensor.shape)


def total_count(n_local: float, w: World | None = None) -> float:
    """The sum of a count over all ranks, added in rank order (the same on every rank; exact
    for integers)."""
    w = w or _world
    if not w.distributed:
        return n_local
    counts = [0] * w.size
    dist.all_gather_object(counts, n_local)
    return sum(counts)
