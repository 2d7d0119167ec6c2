"""The one error type users see: the CLI prints its message on one line and exits 2."""


class SpeedQError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def one_line(e: BaseException) -> str:
    """'Type: first line of its message': a library's exception inside a one-line error."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
