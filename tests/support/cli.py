"""Run the tamp-fx command line in-process (typer's CliRunner) and check what a refusal must
be: one ``error:`` line, a non-zero exit, nothing written and every input byte-identical."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from typer.testing import CliRunner

from tamp_fx.cli.main import app

runner = CliRunner()


def invoke(args: Sequence[object]):
    """``tamp-fx ARGS`` in this process; the result's ``output`` holds stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args])


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (the roots included): a file's sha256, "dir", a symlink's
    target, or "missing" for a root that does not exist. Equal snapshots: nothing changed."""
    state: dict[str, str] = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            state[str(root)] = "missing"
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
            if path.is_symlink():
                state[str(path)] = "-> " + os.readlink(path)
            elif path.is_dir():
                state[str(path)] = "dir"
            else:
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def fails_cleanly(args: Sequence[object], expected: str, *must_not_exist: Path, unchanged: Sequence[Path] = (),
                  code: int | None = None) -> str:
    """Run ``tamp-fx ARGS`` and assert a clean refusal: non-zero exit (``code`` if given), one
    line starting with ``error:`` that contains ``expected``, no traceback, none of
    ``must_not_exist`` written (nor a temporary beside it), and nothing under ``unchanged``
    created, changed or removed. Returns the output."""
    before = snapshot(*unchanged)
    result = invoke(args)
    assert result.exit_code != 0 and code in (None, result.exit_code), result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for path in must_not_exist:
        assert not path.exists(), f"{path} was written"
        assert not list(path.parent.glob(f".{path.name}.tmp-*")), "a temporary directory was left behind"
    assert snapshot(*unchanged) == before, "a file was created, changed or removed"
    return result.output
