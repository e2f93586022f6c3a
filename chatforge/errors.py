"""The base class of the errors a user can fix.

Library code raises; only the command line (chatforge/cli.py) turns exceptions into exit codes. An error
that derives from :class:`ChatforgeError` (a bad config key, a bad data line, a missing model directory,
an interrupted run, ...) is printed as its one-line message with no traceback; anything else is a bug and
keeps its traceback. Each concern keeps its own subclass where it is raised (``config.ConfigError``,
``data.records.DataError``, ``trainer.TrainingError``, ``model.hf.ModelDirError``, ...); many also derive
from ``ValueError`` or ``RuntimeError`` so that callers catching those keep working.
"""

from __future__ import annotations


class ChatforgeError(Exception):
    """A problem the user can fix; the message says what and where (file, line, key) and how to fix it."""

    exit_code = 2
    """The command line's exit status for this error."""


class UserInputError(ChatforgeError, ValueError):
    """Bad input that has no more specific class (a tokenizer that is not chatforge's, a bad option value)."""


class ConfigError(ChatforgeError, ValueError):
    """A config problem the user can fix; the message names the key and the fix."""
