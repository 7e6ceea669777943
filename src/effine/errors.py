"""Errors meant for people.

Every error that a user can cause (a bad config key, a malformed data row, a model that cannot be found) is raised
as an :class:`EffineError`. The CLI prints its message (no traceback) and exits with code 2. The message says what
went wrong, where (``file:line``, config key path) and what to do.
"""

from __future__ import annotations


class EffineError(Exception):
    """A user-facing error: printed without traceback, exit code 2."""

    exit_code = 2


class ConfigError(EffineError):
    """A config value or key is wrong; the message names the key path (``train.lr``)."""


class DataError(EffineError):
    """A data row is malformed; the message names ``file:line`` and the field path."""


class ModelError(EffineError):
    """A model cannot be resolved or loaded; the message says how to provide it locally."""


class PushError(EffineError):
    """Publishing to the Hugging Face Hub failed or cannot start; the message says what failed and how to retry."""
