"""The one exception type users see: a one-line message naming the problem and the fix."""


class TampError(Exception):
    """A user-facing error. Its message is one line: what is wrong, and what to do about it."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for the
    ``(why)`` part of a one-line TampError that wraps it."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
