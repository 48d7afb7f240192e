"""Progress of the long loops, on stderr: rich bars on a terminal, plain lines elsewhere (one per
finished layer and per finished phase), and one ETA over every phase of the job (:class:`Eta`)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

#: ``--log-format``: auto is plain where stderr is not a terminal (a log file, a pipe), else rich
STYLES = ("auto", "rich", "plain")
#: stderr, shared by the bars and the command line's messages and logging (so they do not garble each other)
console = Console(stderr=True)
_settings = {"style": "auto", "verbose": False}


def configure(style: str = "auto", verbose: bool = False) -> None:
    """The style of the :class:`Bars` made after this; ``verbose``: rich bars also print the plain lines."""
    if style not in STYLES:
        raise ValueError(f"progress style {style!r} is not one of {', '.join(STYLES)}")
    _settings.update(style=style, verbose=verbose)


def plain(to: Console | None = None, style: str | None = None) -> bool:
    """Whether progress is plain lines: ``style`` (default: :func:`configure`'s) plain, or auto where
    the console (default: stderr's) is no terminal."""
    style = style or _settings["style"]
    return style == "plain" or (style == "auto" and not (to or console).is_terminal)


def clock_time(seconds: float | None) -> str:
    """``1:02:03``; ``-:--:--`` for an unknown time."""
    if seconds is None:
        return "-:--:--"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


@dataclass
class _Phase:
    units: float                    # expected cost, in the unit all the job's phases share
    done: float = 0.0               # fraction of the phase done
    started: float | None = None
    updated: float | None = None    # when ``done`` last moved


class Eta:
    """Time left for a job of phases run one after another, each of an expected cost in one shared
    unit (for a plan: passes of the calibration samples through one decoder layer). A phase under way
    goes at its own pace; a phase to come at the seconds per unit of all the work done so far. So the
    estimate covers the whole job, not only the phase under way."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.phases: dict[str, _Phase] = {}

    def expect(self, name: str, units: float) -> None:
        """Phase ``name`` is to come, ``units`` its expected cost."""
        self.phases.setdefault(name, _Phase(units)).units = units

    def begin(self, name: str) -> None:
        """Phase ``name`` starts (again); one not expected is timed but has no cost to weigh the others by."""
        phase = self.phases.setdefault(name, _Phase(0.0))
        phase.started = phase.updated = self.clock()
        phase.done = 0.0

    def update(self, name: str, done: float) -> None:
        """Phase ``name`` (begun) is ``done`` (a fraction) through."""
        phase = self.phases[name]
        phase.done, phase.updated = min(done, 1.0), self.clock()

    def fraction(self) -> float:
        """How much of the job is done, by expected cost."""
        phases = list(self.phases.values())
        total = sum(p.units for p in phases)
        return sum(p.units * p.done for p in phases) / total if total else 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float | None:
        """Seconds left in the whole job; None until there is a pace to go by."""
        now, phases = self.clock(), list(self.phases.values())
        spent = sum(p.updated - p.started for p in phases if p.units and p.started is not None)
        units = sum(p.units * p.done for p in phases)
        per_unit = spent / units if units else None
        left = 0.0
        for p in phases:
            if p.done >= 1:
                continue
            if p.done > 0:
                expected = (p.updated - p.started) / p.done
            elif per_unit is not None and p.units:
                expected = p.units * per_unit
            else:
                return None
            left += max(0.0, expected - (now - p.started if p.started is not None else 0.0))
        return left


class _CountColumn(ProgressColumn):
    """``12/30``; the whole job's row: its percentage."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(width=9, justify="right", no_wrap=True))

    def render(self, task: Task) -> Text:
        if task.fields.get("overall"):
            return Text(f"{task.percentage:.0f}%", style="progress.percentage")
        return Text(f"{int(task.completed)}/{int(task.total or 0)}", style="progress.download")


class InfoColumn(ProgressColumn):
    """The whole job's elapsed time and ETA on its row (on a phase's when no phases were declared); on
    a row with ``item``: the item under way (numbered from 0), how long it has run, the last one's time
    and note. Cut to the width left, never wrapped."""

    def __init__(self, bars: Bars) -> None:
        super().__init__()
        self.bars = bars

    def render(self, task: Task) -> Text:
        f = task.fields
        if f.get("item"):
            text = f"{f['item']} {int(task.completed)}: {self.bars.eta.clock() - f['since']:.0f} s"
            if f.get("last"):
                text += f"; last {f['last']}"
        elif f.get("overall") or (f.get("phase") and not self.bars.declared):
            text = self.bars.times()
        else:
            text = ""
        return Text(text, style="progress.elapsed", no_wrap=True, overflow="ellipsis")


class Bars:
    """Progress of nested loops: ``with bars.task("prune", 30, item="layer") as advance: ...``.

    A task opened while no other is open is a phase of the job; :meth:`expect` declares the phases to
    come with their cost, so that the ETA covers them all (:class:`Eta`). ``advance(n=1, note=None)``
    moves a task on; with ``item`` each advance finishes an item, ``note`` saying more (peak memory).

    The style comes from :func:`configure`: ``rich``, a row per open task (the first the whole job's
    when phases were declared), each fitting the terminal's width; ``plain``, a line per finished item
    and per finished phase without items, each with the job's elapsed time and ETA (``auto``: plain
    where stderr is no terminal). Disabled, it prints nothing. It may be entered again, by a callee.
    """

    def __init__(self, enabled: bool = True, *, style: str | None = None, to: Console | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.eta = to or console, Eta(clock)
        self.plain = plain(self.console, style)
        self.lines = enabled and (self.plain or _settings["verbose"])   # print the plain lines
        self.declared, self._open, self._entered = False, 0, 0
        self._progress = Progress(TextColumn("{task.description}", table_column=Column(width=22, no_wrap=True,
                                                                                       overflow="ellipsis")),
                                  BarColumn(bar_width=12), _CountColumn(), InfoColumn(self),
                                  console=self.console, transient=True, get_time=clock,
                                  disable=not enabled or self.plain)
        self._overall = None

    def __enter__(self) -> Bars:
        if not self._entered:
            self._progress.__enter__()
        self._entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self._entered -= 1
        if not self._entered:
            self._progress.__exit__(*exc)

    def times(self) -> str:
        """The whole job's elapsed time and ETA: ``0:01:58 elapsed, ETA 0:02:50``."""
        return f"{clock_time(self.eta.elapsed())} elapsed, ETA {clock_time(self.eta.remaining())}"

    def expect(self, phase: str, units: float) -> None:
        """A phase to come: the task of that description, opened while no other is, costing ``units``
        (any unit, the same for all of the job's phases)."""
        self.eta.expect(phase, units)
        self.declared = True
        if self._overall is None:
            self._overall = self._progress.add_task("overall", total=1000, overall=True)
        self._progress.update(self._overall, completed=1000 * self.eta.fraction())

    def _say(self, line: str) -> None:
        if self.lines:
            self.console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int, *, item: str | None = None) -> Iterator:
        phase, start = not self._open, self.eta.clock()
        task_id = self._progress.add_task(description, total=total, item=item, since=start, last="", phase=phase)
        done, since = 0, start
        if phase:
            self.eta.begin(description)

        def advance(n: int = 1, note: str | None = None) -> None:
            nonlocal done, since
            now = self.eta.clock()
            done, last, since = done + n, f"{now - since:.1f} s" + (f", {note}" if note else ""), now
            self._progress.update(task_id, advance=n, since=now, last=last)
            if phase:
                self._moved(description, done / total if total else 1.0)
                if item:
                    self._say(f"{description} {done}/{total}: {item} {done - 1}, {last}; {self.times()}")

        self._open += 1
        try:
            yield advance
            if phase:
                self._moved(description, 1.0)
                if not item:
                    self._say(f"{description} {done}/{total} in {self.eta.clock() - start:.1f} s; {self.times()}")
        finally:
            self._open -= 1
            self._progress.remove_task(task_id)

    def _moved(self, phase: str, done: float) -> None:
        self.eta.update(phase, done)
        if self._overall is not None:
            self._progress.update(self._overall, completed=1000 * self.eta.fraction())
