"""The one exception type for bad user input (config values, files, rows), and the one way it ends a command.

Commands wrap their work in `exit_on_user_error()`: a `UserInputError` (or an OmegaConf
interpolation error) anywhere in an exception's cause/context chain is printed as a one-paragraph
`error: ...` line and the process exits with status 2, without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf.errors import OmegaConfBaseException

USER_ERROR_EXIT_CODE = 2


class UserInputError(ValueError):
    """Bad input from the user: the message names the offending key, file or row."""


def _is_lightning_misconfiguration(error: BaseException) -> bool:
    """Lightning's `MisconfigurationException`: a trainer setting that contradicts another (a user error).

    Matched by name so this bottom-layer module does not import Lightning.
    """
    return any(cls.__name__ == "MisconfigurationException" and cls.__module__.startswith("lightning")
               for cls in type(error).__mro__)


def find_user_error(error: BaseException | None) -> Exception | None:
    """The first user error (bad value, bad `${...}` interpolation, a contradictory trainer setting) in a chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (UserInputError, OmegaConfBaseException)) or _is_lightning_misconfiguration(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Run a command's body; a user error inside becomes `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except Exception as error:  # jsonargparse and Lightning wrap errors raised while building classes
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
