"""Safe output: every output is checked before any work against the inputs it must never
replace, and the temporaries tamp-fx creates beside it carry an ownership marker so that only
they are ever cleaned up (:mod:`tamp_fx.runtime.transaction` stages and commits them)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from tamp_fx.errors import TampError

log = logging.getLogger(__name__)

#: Outputs committed by this process (the CLI's Ctrl-C message says whether any exist).
WRITTEN: list[Path] = []

#: The file every output directory gets: ``--overwrite`` replaces a directory only when it has
#: one (or is empty), so a mistyped ``--out`` (a home directory, a dataset) is never deleted.
OUTPUT_MARKER = ".tamp-fx-output"

_FS_IOC_GETFLAGS = 0x80086601                # ioctl: a file's ext2-style attribute flags (Linux)
_IMMUTABLE_OR_APPEND_ONLY = 0x10 | 0x20      # FS_IMMUTABLE_FL | FS_APPEND_FL (chattr +i / +a)

#: The suffix of an ownership marker: ``.NAME.KIND-PID-TOKEN`` + this claims the paths beside it
#: named ``.NAME.KIND-PID-TOKEN-*`` (KIND: ``tmp`` for temporaries, ``old`` for the backup of a
#: replaced output) for process PID of the host the marker names (see :func:`owned`).
OWNER_SUFFIX = ".tamp-fx-owner"
_TOKEN = secrets.token_hex(6)                 # this process's: a pid alone is reused
_HOST = socket.gethostname()
_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _prefix(out: Path, kind: str = "tmp") -> str:
    """``.NAME.KIND-PID-TOKEN``: this process's names beside ``out`` start with it."""
    return f".{out.name}.{kind}-{os.getpid()}-{_TOKEN}"


def temp_prefix(out: Path) -> str:
    """Name prefix of this process's temporary paths beside ``out``: ``.NAME.tmp-PID-TOKEN-``.
    Only what is created under it inside :func:`~tamp_fx.runtime.transaction.Outputs` carries
    the marker a later run's clean-up asks for."""
    return _prefix(out) + "-"


def check_output(out: str | os.PathLike, *, overwrite: bool, protect: tuple[Path, ...] = (), file: bool = False,
                 option: str = "--out") -> Path:
    """Refuse ``out`` in one line, before any work, if writing it could replace or change an
    input (a path in ``protect``, a directory holding one, or a path inside an input
    directory), if it exists and ``overwrite`` is off, or if its directory cannot be written.
    ``file``: ``out`` is one file (:meth:`~tamp_fx.runtime.transaction.Outputs.file`) rather than a directory. Returns
    ``out`` as an absolute path. ``option``: the command-line option that named ``out``, for the messages."""
    out = _absolute(out)
    for given in map(_absolute, protect):
        overlap = _overlap(out, given)
        if overlap == "inside":
            raise TampError(f"output {out} would be written inside the input {given}: choose another {option} "
                            "(inputs are never changed)")
        if overlap:
            raise TampError(f"output {out} would overwrite {overlap} {given}: choose another {option} "
                            "(inputs are never overwritten, even with --overwrite)")
    special = _special(out)
    if special:
        raise TampError(f"output {out} is {special}, not a file or directory: choose another {option} "
                        "(tamp-fx never writes to or replaces devices, FIFOs or sockets, even with --overwrite)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TampError(f"output {out} already exists: choose another {option} or pass --overwrite")
        if file and out.is_dir():
            raise TampError(f"output {out} is a directory: pass a file name to {option}")
        if _immutable(out):
            raise TampError(f"output {out} is immutable or append-only (chattr): it cannot be replaced, choose another {option}")
        if not file and not out.is_symlink():       # a symbolic link is replaced, never what it points to
            if not out.is_dir():
                raise TampError(f"output {out} is a file and tamp-fx writes a directory there: --overwrite replaces "
                                f"only tamp-fx output directories; choose another {option} or remove the file yourself")
            if not _replaceable(out):
                raise TampError(f"output {out} is a directory tamp-fx did not write (no {OUTPUT_MARKER} in it): "
                                f"--overwrite replaces only tamp-fx output directories; choose another {option} or "
                                "remove it yourself")
    _check_writable(out, option)
    return out


def _overlap(path: Path, given: Path) -> str | None:
    """How ``path`` overlaps the input ``given`` (by the names given and where they lead):
    "the input" (it is ``given``), "a directory holding the input", "inside" (it lies in
    ``given``), or None."""
    for p in {given, _resolved(given)}:
        for o in {path, _resolved(path)}:
            if p.is_relative_to(o):
                return "the input" if p == o else "a directory holding the input"
            if o.is_relative_to(p):
                return "inside"
    return None


def _resolved(path: Path) -> Path:
    """Where ``path`` leads; ``path`` itself where it cannot be resolved (a symbolic link loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):            # RuntimeError: a loop, before Python 3.13
        return path


def _special(path: Path) -> str | None:
    """What ``path`` (or what its symlink leads to) is if it is neither a regular file nor a
    directory (a device, a FIFO, a socket); None otherwise or if it does not exist."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def _replaceable(directory: Path) -> bool:
    """Whether ``--overwrite`` may replace ``directory``: it is empty or tamp-fx wrote it."""
    try:
        return (directory / OUTPUT_MARKER).is_file() or next(directory.iterdir(), None) is None
    except OSError:
        return False


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` absolute and without ``..`` (symlinks are not followed: callers check both)."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def _immutable(path: Path) -> bool:
    """Whether ``path`` has the immutable or append-only attribute (False where it cannot be read)."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (ImportError, OSError):
        return False
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
        return bool(flags & _IMMUTABLE_OR_APPEND_ONLY)
    except OSError:
        return False
    finally:
        os.close(fd)


def _check_writable(out: Path, option: str) -> None:
    """Create and remove a probe file where ``out`` will be created (its parent, or the nearest
    ancestor that exists): permission bits do not stop root, so only trying tells."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TampError(f"output {out} cannot be created: {parent} is a file, not a directory: choose another {option}")
    try:
        probe = _mark(parent, _prefix(out))             # a marker: what a killed probe leaves is cleaned up
        if probe is not None:
            probe.unlink()
    except OSError as error:
        raise TampError(f"output {out} cannot be written: {parent} is not writable ({error.strerror}): "
                        f"choose another {option}") from error


def remove_stale_temporaries(out: Path, protect: tuple[Path, ...] = ()) -> None:
    """Remove what runs killed before they finished (SIGKILL, power loss) left beside ``out``,
    and only that: the paths a marker (:func:`owned`) claims for a process of this host that no
    longer exists, a backup of a replaced output only once ``out`` exists again (before that it
    is the only copy of the previous output). A path without a marker is never touched,
    whatever its name, and neither is a path in ``protect`` (the inputs), one holding one or
    one inside one: the claim on it is dropped."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    names = os.listdir(out.parent)
    for marker in names:
        owner = _stale_owner(out, marker)
        if owner is None or (owner[0] == "old" and not out.exists()):
            continue
        claimed = marker.removesuffix(OWNER_SUFFIX) + "-"
        for name in names:
            path = out.parent / name
            if not name.startswith(claimed) or any(_overlap(path, _absolute(given)) for given in protect):
                continue                           # not claimed, or an input: the user's, whatever its name
            remove(path)
            log.warning("removed %s, left by an interrupted run (process %s)", path, owner[1])
        (out.parent / marker).unlink(missing_ok=True)


def _mark(directory: Path, prefix: str) -> Path | None:
    """Create the marker claiming ``directory/PREFIX-*`` for this process (pid, host, token);
    None if this process holds it already."""
    marker = directory / (prefix + OWNER_SUFFIX)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump({"written by": "tamp-fx", "pid": os.getpid(), "host": _HOST, "token": _TOKEN}, f)
    return marker


def _stale_owner(out: Path, marker: str) -> tuple[str, int] | None:
    """(kind, pid) if ``marker`` (a name beside ``out``) is a marker of ``out``'s whose process,
    on this host, is gone; None for anything else (another host's, a live process's, not one)."""
    match = re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-([0-9a-f]+){re.escape(OWNER_SUFFIX)}", marker)
    if match is None:
        return None
    path = out.parent / marker
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = int(match[2])
    if not isinstance(owner, dict) or (owner.get("pid"), owner.get("token")) != (pid, match[3]):
        return None
    return None if owner.get("host") != _HOST or _alive(pid) else (match[1], pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                # PermissionError: it exists, as another user
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def owned(out: Path, kind: str = "tmp") -> Iterator[str]:
    """Claim the names ``.NAME.KIND-PID-TOKEN-*`` beside ``out`` for this process while the block
    runs (a marker beside them names pid, host and token): :func:`remove_stale_temporaries`
    removes only what such a marker claims, once its process is gone. Yields the prefix."""
    marker = _mark(out.parent, _prefix(out, kind))
    try:
        yield _prefix(out, kind) + "-"
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
