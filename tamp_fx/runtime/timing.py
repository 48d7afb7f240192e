"""Wall time of a run and of its parts, as ``plan.json`` records it (``timing``)."""
from __future__ import annotations

import time


class Stopwatch:
    """Laps of one run: ``clock.lap("capture")`` ends the part called capture (time since the
    previous lap, or the start); :meth:`record` adds the time since the last lap as ``other``,
    so the parts sum to the wall time."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._parts: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self._parts[part] = self._parts.get(part, 0.0) + now - self._last
        self._last = now

    def record(self) -> dict:
        """``{"wall_s": seconds, "parts_s": {part: seconds}}``, to the millisecond."""
        now = time.perf_counter()
        parts = {**self._parts, "other": now - self._last}
        return {"wall_s": round(now - self._start, 3), "parts_s": {k: round(v, 3) for k, v in parts.items()}}
