"""Errors caused by the user's input (a config typo, a missing or malformed file, unsafe data).

The CLI prints every `UserError` (and the ValueError/TypeError/OSError family raised for user input) as one line on
stderr and exits with status 2; anything else is a bug and keeps its traceback. Each class also derives from the
builtin a caller would expect (ValueError, TypeError), so `except ValueError` keeps working.
"""
from __future__ import annotations

import pickle
import reprlib


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


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A pickle asks for something that is not on the allow-list (it could run code), or its object graph is a bomb
    (shared references that expand past the caps, nesting past the depth cap)."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the message names the path and the space
    it needs. The previous checkpoint is intact and the temporaries are removed."""


class NonFiniteError(UserError, FloatingPointError):
    """Training met non-finite values it must not keep (weights, or too many non-finite steps in a row)."""


class RunFolderBusyError(UserError, ValueError):
    """Another live process holds the run folder's lock."""


def excerpt(value, limit: int = 60) -> str:
    """A bounded repr of a value a user or a file supplied (reprlib: long strings, lists and nesting are cut), so
    an error message never carries a file's content or a huge value whole."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel = 3
    text = r.repr(value[:limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit + 5 else text[:limit] + "..."
