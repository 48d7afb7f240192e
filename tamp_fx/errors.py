"""The one exception type users see: a one-line message naming the problem and the fix."""
from __future__ import annotations


class TampError(Exception):
    """A user-facing error. Its message is one line: what is wrong, and what to do about it."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type's name when it has none), for the
    ``(why)`` part of a one-line TampError that wraps it; cut at ``limit`` characters (with "...").

    >>> first_line(ValueError("no\\nmore")), first_line(ValueError("x" * 9), limit=4)
    ('no', 'xxxx...')
    """
    text = str(error).strip()
    text = text.splitlines()[0].strip() if text else type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."
