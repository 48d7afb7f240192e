"""All-or-nothing outputs: every output of a command is written into a temporary beside its
target and all are committed by rename together, only once every one of them is complete; on
any error everything the command created is removed, the parent directories it made for a
nested ``--out`` included, and a failed write (a full disk above all) is one line."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tamp_fx.errors import TampError, first_line
from tamp_fx.runtime.output import OUTPUT_MARKER, WRITTEN, check_output, owned, remove, remove_stale_temporaries

_MARKER_TEXT = "written by tamp-fx: `--overwrite` may replace this directory as a whole\n"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("(os error 28)", "(os error 122)")   # how Rust writers (safetensors) word ENOSPC / EDQUOT


class Outputs:
    """The outputs of one command, written as one. Inside ``with Outputs(...) as outputs:``,
    :meth:`directory` and :meth:`file` check a target (:func:`check_output`) and hand back a
    temporary beside it to write; when the block ends without error every temporary is renamed
    to its target (a replaced target is moved aside first and put back if a later rename
    fails); on any error nothing is committed and every temporary and every parent directory
    made for a target is removed. An OSError in the block (or a Rust writer's I/O error) becomes
    one TampError naming the output and, for a full disk, what ran out."""

    def __init__(self, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> None:
        self.overwrite, self.protect = overwrite, tuple(protect)
        self._claims = contextlib.ExitStack()           # the ownership markers of the temporaries
        self._staged: list[tuple[Path, Path, bool]] = []     # (temporary, target, is a file)
        self._made: list[Path] = []                     # parent directories made, outermost first

    def check(self, out: str | os.PathLike, *, file: bool = False) -> Path:
        """Refuse ``out`` as :meth:`directory` / :meth:`file` would, before any work is spent on it."""
        return check_output(out, overwrite=self.overwrite, protect=self.protect, file=file)

    def directory(self, out: str | os.PathLike) -> Path:
        """A new temporary directory that becomes the directory ``out`` on commit."""
        return self._stage(out, file=False)

    def file(self, out: str | os.PathLike) -> Path:
        """A new empty temporary file (``out``'s suffix) that becomes the file ``out`` on commit."""
        return self._stage(out, file=True)

    def _stage(self, out: str | os.PathLike, file: bool) -> Path:
        out = self.check(out, file=file)
        for tmp, target, staged_file in self._staged:
            if out == target:
                raise TampError(f"{out} is given as two outputs of one command: choose two paths")
            if not staged_file and out.is_relative_to(target):        # inside a new output directory: in it
                inner = tmp / out.relative_to(target)
                inner.parent.mkdir(parents=True, exist_ok=True)
                inner.touch() if file else inner.mkdir()
                return inner
        remove_stale_temporaries(out, self.protect)
        missing = [p for p in out.parents if not p.exists()][::-1]       # outermost first
        for parent in missing:
            parent.mkdir()
            self._made.append(parent)
        prefix = self._claims.enter_context(owned(out))
        if file:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=out.suffix, dir=out.parent)
            os.close(fd)
        else:
            name = tempfile.mkdtemp(prefix=prefix, dir=out.parent)
        self._staged.append((Path(name), out, file))
        return Path(name)

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        committed = False
        try:
            if error is None:
                for tmp, _, file in self._staged:
                    if not file:
                        (tmp / OUTPUT_MARKER).write_text(_MARKER_TEXT)
                    _umask_modes(tmp)
                _commit([(tmp, out) for tmp, out, _ in self._staged], self.overwrite)
                committed = True
        except Exception as failure:  # noqa: BLE001 - reported below, once the temporaries are gone
            error = failure
        finally:
            written = sum(_size(tmp) for tmp, _, _ in self._staged) if not committed else 0
            for tmp, _, _ in self._staged:
                if tmp.exists() or tmp.is_symlink():
                    remove(tmp)
            self._claims.close()
            if not committed:
                for parent in reversed(self._made):
                    with contextlib.suppress(OSError):
                        parent.rmdir()                  # only if empty: what another process put there stays
        if error is not None and _io_failure(error):
            raise self._failure(error, written) from error
        if error is not None and kind is None:
            raise error

    def _failure(self, error: BaseException, written: int) -> TampError:
        """One line for a failed write: which output (the one the error names, else the last one
        staged: outputs are staged as they are written), and for a full disk, how much is free there."""
        where = str(getattr(error, "filename", None) or "")
        outs = [out for tmp, out, _ in self._staged if where.startswith(str(tmp))] or \
               [out for _, out, _ in self._staged[-1:]]
        names = " and ".join(map(str, outs)) or "the output"
        if _disk_full(error):
            nearest = next((p for p in (outs[0] if outs else Path.cwd()).parents if p.exists()), Path("/"))
            free = shutil.disk_usage(nearest).free
            return TampError(f"no space left on device while writing {names} ({_bytes(free)} free there, and the output "
                             f"needs more than the {_bytes(written)} written before the disk filled): free space or "
                             "write it to another path, then retry; nothing was written")
        reason = getattr(error, "strerror", None) or first_line(error)
        return TampError(f"could not write {names} ({reason}): nothing was written")


def _commit(staged: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Rename every temporary to its target, signals held so no rename pair is cut in half; an
    existing target (only with ``overwrite``) is moved aside (under a marker, :func:`owned`)
    first and removed once all are in place. If any rename fails, the ones done are undone."""
    with contextlib.ExitStack() as claims:
        undo: list[Callable[[], None]] = []
        aside: list[Path] = []
        with _signals_deferred():
            try:
                for tmp, out in staged:
                    if out.exists() or out.is_symlink():
                        if not overwrite:
                            raise TampError(f"output {out} appeared while this ran: choose another path or pass "
                                            "--overwrite")
                        old = out.with_name(claims.enter_context(owned(out, "old")) + "previous")
                        os.replace(out, old)
                        undo.append(lambda out=out, old=old: os.replace(old, out))
                        aside.append(old)
                    os.replace(tmp, out)
                    undo.append(lambda tmp=tmp, out=out: os.replace(out, tmp))
            except BaseException:
                for step in reversed(undo):
                    step()                               # the previous outputs back where they were
                raise
            WRITTEN.extend(out for _, out in staged)
        for old in aside:
            remove(old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask_modes(tmp: Path) -> None:
    """Give ``tmp`` and every path in it the modes the umask gives new paths (0666 / 0777 less
    it): mkstemp, mkdtemp and some writers (safetensors) make private 0600 / 0700 paths, and an
    output should be readable by the services and people the umask lets read it. Symbolic links
    are left alone (chmod would change what they point to)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [tmp, *(tmp.rglob("*") if tmp.is_dir() else ())]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _io_failure(error: BaseException) -> bool:
    """An OSError, or a Rust writer's I/O error (safetensors words it ``I/O error: ... (os error N)``)."""
    return isinstance(error, OSError) or "I/O error" in str(error)


def _disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) in _DISK_FULL or any(text in str(error) for text in _DISK_FULL_TEXT)


def _size(path: Path) -> int:
    """Bytes in ``path`` (a file, or every file under a directory); 0 where it cannot be read."""
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
        return sum(p.stat().st_size for p in files)
    except OSError:
        return 0


def _bytes(size: int) -> str:
    """``size`` in the largest binary unit it fills at least once (``12.3 MiB``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):,.1f} {unit}"
    return f"{size} bytes"


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """One output directory (:class:`Outputs`): yield a temporary directory beside ``out`` that
    becomes ``out`` only if the block finishes."""
    with Outputs(overwrite=overwrite, protect=protect) as outputs:
        yield outputs.directory(out)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """One output file (:class:`Outputs`): yield a temporary path beside ``out`` (same suffix)
    that replaces ``out`` only if the block finishes."""
    with Outputs(overwrite=overwrite, protect=protect) as outputs:
        yield outputs.file(out)
