"""What the command-line modules share: a user's mistake shown as one line, sizes in words."""

import functools

import click

from .errors import W2VCacheError


def user_errors(command):
    """Show a W2VCacheError as click's one-line `Error: ...` (exit code 1), never as a traceback;
    the same under the `w2vcache` group and for a command run on its own."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except W2VCacheError as err:
            raise click.ClickException(str(err)) from None

    return wrapper


def human_size(n: int | None) -> str:
    """Bytes in decimal units: 1536 -> '1.5 KB'; None (unknown) -> '?'."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
