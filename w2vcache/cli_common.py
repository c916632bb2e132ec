"""What the command-line modules share: a user's mistake shown as one line, sizes in words."""

import functools

import click

from .errors import W2VCacheError
from .space import human_size  # noqa: F401  (the commands' one way of writing sizes)


def user_errors(command):
    """Show a W2VCacheError as click's one-line `Error: ...` (exit code 1), never as a traceback;
    the same under the `w2vcache` group and for a command run on its own."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except W2VCacheError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            # click would print a bare "Aborted!": say that nothing finished is lost.
            raise click.ClickException("interrupted; what was finished is kept: run the same command again "
                                       "to go on from there") from None

    return wrapper
