"""What a refusal must leave: a snapshot of the paths a command could touch (its inputs, their
folders, the output's parent) taken before and after it, and :func:`assert_refused`, which checks
the exit status, the one ``error:`` line, and that nothing was changed, removed or left behind."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

#: path -> what it is: ("file", size, mtime_ns, sha256), ("dir",), ("link", target), ("unreadable", size,
#: mtime_ns) or ("special", mode) (a FIFO or device is never opened: reading a FIFO blocks), or ("missing",)
Snapshot = dict[str, tuple]


def _entry(path: Path) -> tuple:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ("missing",)
    if stat.S_ISLNK(info.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return ("dir",)              # no mtime: a probe or temporary made and removed inside changes it
    if not stat.S_ISREG(info.st_mode):
        return ("special", stat.S_IFMT(info.st_mode))
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except PermissionError:
        return ("unreadable", info.st_size, info.st_mtime_ns)
    return ("file", info.st_size, info.st_mtime_ns, digest)


def snapshot(*roots: str | os.PathLike) -> Snapshot:
    """Every path under ``roots``, the roots included, without following symbolic links (a link
    loop is one entry): what it is, and for a file its size, mtime and sha256."""
    state: Snapshot = {}
    for root in map(Path, roots):
        state[str(root)] = _entry(root)
        if state[str(root)] != ("dir",):
            continue
        for folder, dirs, files in os.walk(root, onerror=lambda error: None):
            for name in dirs + files:
                state[os.path.join(folder, name)] = _entry(Path(folder, name))
    return state


def around(*paths: str | os.PathLike) -> list[Path]:
    """The folders to snapshot for a command given ``paths`` (its inputs and outputs): each one's
    parent folder, which holds it and anything written beside it."""
    return sorted({Path(p).absolute().parent for p in paths})


def error_lines(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if line.strip()]


def assert_refused(result, before: Snapshot, after: Snapshot, exit: int | None = 1, says: str | None = None) -> str:
    """A clean refusal by typer's CliRunner ``result``: exit status ``exit`` (any non-zero for
    None; 2 is a usage error, which the CLI prints as one ``error:`` line too), the whole output
    one line starting with ``error:`` (containing ``says``), no traceback and no exception but
    the exit, every path of ``before`` as it was and nothing new in ``after``. Returns the line."""
    output = result.output
    assert result.exit_code != 0 and exit in (None, result.exit_code), f"exit {result.exit_code}: {output}"
    lines = error_lines(output)
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert says is None or says in output, f"expected {says!r} in: {output}"
    changed = sorted(p for p in before if after.get(p, ("missing",)) != before[p])
    assert not changed, f"changed or removed: {[(p, before[p], after.get(p)) for p in changed]}"
    new = sorted(set(after) - set(before))
    assert not new, f"left behind: {new}"
    return lines[0]
