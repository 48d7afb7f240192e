"""The one exception type users see: a one-line message naming the problem and the fix."""
from __future__ import annotations

#: What ``str.splitlines`` splits at, written as escapes: a name read from a damaged file (a tensor
#: name, a path) cannot break a message into several lines.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class TampError(Exception):
    """A user-facing error. Its message is one line: what is wrong, and what to do about it."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(str(message).translate(_LINE_BREAKS), *args)


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type's name when it has none), for the
    ``(why)`` part of a one-line TampError that wraps it; cut at ``limit`` characters (with "...").

    >>> first_line(ValueError("no\\nmore")), first_line(ValueError("x" * 9), limit=4)
    ('no', 'xxxx...')
    """
    text = str(error).strip()
    text = text.splitlines()[0].strip() if text else type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."
