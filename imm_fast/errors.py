"""Errors caused by the user's input (a config typo, a missing or malformed file, unsafe data).

The CLI prints every `UserError` (and the ValueError/TypeError/OSError family raised for user input) as one line on
stderr and exits with status 2; anything else is a bug and keeps its traceback. Each class also derives from the
builtin a caller would expect (ValueError, TypeError), so `except ValueError` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user fixes by changing their input, not the code."""


class ConfigError(UserError, ValueError):
    """A config value out of range or not one of its choices; the message names the dotted key."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (a string for a bool, a float for an int, a number for a list)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be loaded as it is; the message names the file and the field."""


class DataError(UserError, ValueError):
    """A dataset file that cannot be read; the message names the file."""
