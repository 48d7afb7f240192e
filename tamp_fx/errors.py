"""The one exception type users see: a one-line message naming the problem and the fix."""


class TampError(Exception):
    """A user-facing error. Its message is one line: what is wrong, and what to do about it."""
