"""The one exception type for bad user input (config values, files, rows).

The CLI prints these as a one-paragraph message and exits non-zero, without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the offending key, file or row."""
