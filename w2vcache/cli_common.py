"""What the command-line modules share: a user's mistake shown as one line, sizes in words."""

import errno
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
        except OSError as err:
            if err.errno not in USER_FIXABLE:
                raise
            raise click.ClickException(os_error_message(err)) from None
        except KeyboardInterrupt:
            # click would print a bare "Aborted!": say that nothing finished is lost.
            raise click.ClickException("interrupted; what was finished is kept: run the same command again "
                                       "to go on from there") from None

    return wrapper


# File-system errors a user can act on, shown as one line: a full disk or quota, a read-only file
# system, a folder they may not write to. Others (an I/O error, say) keep their traceback.
USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def os_error_message(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    message = f"{err.strerror or err}{where}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        message += ("; what was finished is kept: make room (or choose another disk) and run the same "
                    "command again to go on from there")
    return message
