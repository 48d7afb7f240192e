"""Reading a calibration file strictly and in bounded pieces: a regular, non-empty file
(:func:`checked_file`), UTF-8 text whose first byte that is not names its offset (:func:`pieces`,
"looks binary" for a NUL or a control byte near the start), universal newlines, and JSONL lines
of at most :data:`MAX_LINE` characters (:func:`lines`)."""
from __future__ import annotations

import codecs
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tamp_fx.errors import TampError, first_line

PIECE = 1 << 20              # bytes read at a time
MAX_LINE = 16 << 20          # characters in one JSONL line (one conversation)
SNIFF = 8192                # a control byte in the first SNIFF bytes: binary
CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f]")   # bytes no text holds (tab, newlines, form feed, ESC do)
NON_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"))
HINT = "pass a text file or a LLaVA-style .json/.jsonl"


def checked_file(path: str | Path, what: str = "calibration file", hint: str = HINT) -> Path:
    """``path`` if it is a regular, non-empty file; else a TampError naming it as ``what``, with ``hint``."""
    path = Path(path).expanduser()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TampError(f"{what} {path} does not exist: {hint}") from None
    except OSError as error:
        raise TampError(f"{what} {path} cannot be read ({first_line(error)}): {hint}") from error
    if stat.S_ISDIR(info.st_mode):
        raise TampError(f"{what} {path} is a directory: {hint} (a file in it)")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in NON_REGULAR if test(info.st_mode)), "a special file")
        raise TampError(f"{what} {path} is {kind}, not a regular file: {hint} (save the data to a file)")
    if info.st_size == 0:
        raise TampError(f"{what} {path} is empty: {hint}")
    return path


def open_bytes(path: Path, what: str = "calibration file") -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as error:
        raise TampError(f"{what} {path} cannot be read ({first_line(error)}): check its permissions") from error


def newlines(text: str) -> str:
    """Universal newlines, as ``Path.read_text`` gives them: ``\\r\\n`` and ``\\r`` become ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def binary_at(chunk: bytes, offset: int) -> int | None:
    """The offset in the file of the first byte no text holds in ``chunk``, read at ``offset``:
    a NUL, or another control byte in the first 8 KiB of the file."""
    sniffed = CONTROL.search(chunk, 0, max(0, SNIFF - offset))
    found = [i for i in (sniffed.start() if sniffed else -1, chunk.find(b"\0")) if i >= 0]
    return offset + min(found) if found else None


def pieces(path: Path, what: str = "calibration file") -> Iterator[str]:
    """The file's text, about :data:`PIECE` bytes at a time (joined: what ``read_text`` gives), or
    a TampError at the first byte that is not UTF-8 text, naming its offset: "looks binary" when
    the file holds a NUL byte, or another control byte in its first 8 KiB, "not UTF-8" otherwise."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, carry = 0, ""                          # bytes read before this chunk; a "\r" whose "\n" may follow
    with open_bytes(path, what) as f:
        while True:
            chunk = f.read(PIECE)
            held = len(decoder.getstate()[0])      # bytes of a character cut by the previous chunk
            bad = None
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                bad = offset - held + error.start
            binary = binary_at(chunk, offset)
            if binary is not None:
                raise TampError(f"{what} {path} looks binary (byte {binary if bad is None else min(binary, bad)}): "
                                "pass a UTF-8 text, .json or .jsonl file")
            if bad is not None:
                raise TampError(f"{what} {path} is not UTF-8 text (invalid byte at offset {bad}): "
                                "save it as UTF-8")
            text, carry = carry + text, ""
            if chunk and text.endswith("\r"):
                text, carry = text[:-1], "\r"
            if text:
                yield newlines(text)
            if not chunk:
                return
            offset += len(chunk)


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of the file, read in pieces; a line over :data:`MAX_LINE`
    characters is refused before it is read whole."""
    parts: list[str] = []
    length, number = 0, 1
    for piece in pieces(path):
        *complete, rest = piece.split("\n")
        for line in complete:
            yield number, "".join(parts) + line
            parts, length, number = [], 0, number + 1
        parts.append(rest)
        length += len(rest)
        if length > MAX_LINE:
            raise TampError(f"calibration file {path}: line {number} is over {MAX_LINE >> 20} MiB long, too long for "
                            "one conversation: write one conversation a line")
    if parts:
        yield number, "".join(parts)
