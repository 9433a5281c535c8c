"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class GiftQuantError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""
