"""The one exception type a user is meant to see.

Anything raised as `W2VCacheError` is a mistake in the user's input (a file, an option, a store)
and its message says what is at fault; the command line prints it without a traceback. Any other
exception is a bug in w2vcache and keeps its traceback.
"""


class W2VCacheError(Exception):
    """A problem with the user's input, explained in the message."""
