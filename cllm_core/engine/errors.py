"""The one exception type for bad input: what a user gave (a profile, a path, a model, a flag) is wrong.

A command prints a `UserError` as one line, its message, and exits 1; any other exception is a bug and keeps its
traceback. It is a ValueError, so library callers that catch ValueError around an argument check still do.
"""


class UserError(ValueError):
    """Bad input: the message names what is wrong and how to fix it."""
