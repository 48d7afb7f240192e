"""Wall time of a run and of its stages, as ``plan.json`` records it (``timing``).

A :class:`Stopwatch` splits a run into parts that sum to its wall time. Coarse parts are laps
(``clock.lap("capture")``); finer stages are blocks timed wherever the work happens, without
passing the clock around: ``with stage("statistics"): ...`` charges the block to the stopwatch
that is :meth:`~Stopwatch.running` (nothing when none is). Stages nest, and each second is
charged once, to the innermost: an observer's statistics inside a layer's forward count as
statistics, not forward. On CUDA the stages are host times (kernels run asynchronously).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

#: the stages plan.json's timing records, besides the laps (load, capture, profile, prune)
LOAD, TRACE, FORWARD, STATISTICS, SELECTION = "load", "trace", "layer forwards", "statistics", "token selection"
ALLOCATION, PRUNING, WRITING = "allocation", "pruning", "writing"

#: the order plan.json lists parts in: these first, then the laps' remainders, ``other`` last
ORDER = (LOAD, "capture", TRACE, FORWARD, STATISTICS, SELECTION, ALLOCATION, PRUNING, WRITING)

_RUNNING: list[Stopwatch] = []         # the stopwatch stage() charges: the innermost running()


class Stopwatch:
    """Parts of one run: laps (``lap(part)``: the time since the previous lap, less the stages
    inside it) and stages (:func:`stage`); :meth:`record` adds what is left as ``other``."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._parts: dict[str, float] = {}
        self._open: list[list] = []         # stages being timed: [name, start, seconds of stages inside]
        self._in_stages = 0.0               # seconds of finished top-level stages since the last lap

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self._add(part, now - self._last - self._in_stages)
        self._last, self._in_stages = now, 0.0

    def _add(self, part: str, seconds: float) -> None:
        self._parts[part] = self._parts.get(part, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the block to ``name`` (less the stages nested in it)."""
        entry = [name, time.perf_counter(), 0.0]
        self._open.append(entry)
        try:
            yield
        finally:
            self._open.pop()
            seconds = time.perf_counter() - entry[1]
            self._add(name, seconds - entry[2])
            if self._open:
                self._open[-1][2] += seconds
            else:
                self._in_stages += seconds

    @contextlib.contextmanager
    def running(self) -> Iterator[Stopwatch]:
        """While the block runs, :func:`stage` blocks anywhere charge this stopwatch."""
        _RUNNING.append(self)
        try:
            yield self
        finally:
            _RUNNING.remove(self)

    def record(self) -> dict:
        """``{"wall_s": seconds, "parts_s": {part: seconds}}``, to the millisecond; parts in
        :data:`ORDER` (the laps' remainders after, ``other`` last), summing to the wall time."""
        now = time.perf_counter()
        parts = {**self._parts}
        parts["other"] = parts.get("other", 0.0) + now - self._last - self._in_stages
        return {"wall_s": round(now - self._start, 3), "parts_s": _ordered({k: round(v, 3) for k, v in parts.items()})}


def _ordered(parts: dict[str, float]) -> dict[str, float]:
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(parts.items(), key=lambda kv: (kv[0] == "other", rank.get(kv[0], len(ORDER)))))


def stage(name: str) -> contextlib.AbstractContextManager[None]:
    """Charge the block to stage ``name`` of the running stopwatch (none: just run it)."""
    return _RUNNING[-1].stage(name) if _RUNNING else contextlib.nullcontext()


def with_part(record: dict, part: str, seconds: float) -> dict:
    """A :meth:`Stopwatch.record` with ``seconds`` more of ``part`` (and of the wall time)."""
    parts = _ordered({**record["parts_s"], part: round(record["parts_s"].get(part, 0.0) + seconds, 3)})
    return {**record, "wall_s": round(record["wall_s"] + seconds, 3), "parts_s": parts}
