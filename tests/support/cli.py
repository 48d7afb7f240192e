"""Run the tamp-fx command line in-process (typer's CliRunner) and check what a refusal must
be (:func:`support.snapshot.assert_refused`): one ``error:`` line, the exit status, no traceback,
nothing written and every input as it was."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from typer.testing import CliRunner

from support.snapshot import around, assert_refused, snapshot
from tamp_fx.cli.main import app

runner = CliRunner()


def invoke(args: Sequence[object]):
    """``tamp-fx ARGS`` in this process; the result's ``output`` holds stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args])


def fails_cleanly(args: Sequence[object], expected: str, *must_not_exist: Path, unchanged: Sequence[Path] = (),
                  code: int | None = None) -> str:
    """Run ``tamp-fx ARGS`` and assert a clean refusal (exit status ``code``, any non-zero for
    None) whose line contains ``expected``: nothing under ``unchanged`` or beside ``must_not_exist``
    (the outputs) created, changed or removed. Returns the output."""
    roots = [*unchanged, *around(*must_not_exist)]
    before = snapshot(*roots)
    result = invoke(args)
    assert_refused(result, before, snapshot(*roots), exit=code, says=expected)
    return result.output
