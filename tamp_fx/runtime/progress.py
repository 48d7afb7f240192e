"""Progress bars (rich, on stderr) for the loops over layers and samples; silent when disabled."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ItemColumn(ProgressColumn):
    """For tasks with an ``item`` name: how long the current item has run, then the task's note."""

    def render(self, task: Task) -> Text:
        parts = []
        if task.fields.get("item") and not task.finished:
            seconds = time.monotonic() - task.fields["since"]
            parts.append(f"{task.fields['item']} {int(task.completed)}: {seconds:.0f} s")
        if task.fields.get("note"):
            parts.append(task.fields["note"])
        return Text("; ".join(parts), style="progress.elapsed")


class Bars:
    """One rich Progress shared by nested loops: ``with bars.task("layers", 30) as advance: ...``.

    ``advance(n=1, note=None)`` moves the bar on; ``note`` replaces the text shown after it.
    With ``item="layer"`` the bar also shows how long the current layer has been running.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), ItemColumn(),
                                  transient=True, disable=not enabled, console=Console(stderr=True))

    def __enter__(self) -> Bars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def task(self, description: str, total: int, *, item: str | None = None) -> Iterator:
        task_id = self._progress.add_task(description, total=total, item=item, since=time.monotonic(), note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            fields = {"since": time.monotonic()}       # the next item starts now
            if note is not None:
                fields["note"] = note
            self._progress.update(task_id, advance=n, **fields)

        try:
            yield advance
        finally:
            self._progress.remove_task(task_id)
