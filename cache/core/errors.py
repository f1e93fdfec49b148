"""The one exception type the CLI turns into a one-line message and an exit status."""


class CaerError(Exception):
    """Bad input or a refused request. ``str(err)`` is the whole message a user sees."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line, or its type's name: one line for a message."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class WriteFailed(CaerError):
    """The system refused a write (disk full, read-only file system, permission); nothing
    half-written is left behind."""

    exit_code = 4
