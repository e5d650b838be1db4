"""The errors engram raises for problems a user can fix.

Each message names the file, the config field or the training step, and says what to do. The ``engram`` command
line prints an :class:`EngramError` as one ``engram <command>: error: ...`` line without a traceback
(``--debug`` or ``ENGRAM_DEBUG=1`` shows it). Every class also derives from the built-in error it refines, so code
that catches ``ValueError`` / ``RuntimeError`` / ``FloatingPointError`` keeps working.

Raise the most specific class that fits; add a class only for a new kind of step, not for a new message.
"""

from __future__ import annotations


class EngramError(Exception):
    """A problem with the user's input, files or run that the message explains how to fix."""


class ConfigError(EngramError, ValueError):
    """A config file or a ``--set`` override is malformed or holds a wrong value (names the file or field)."""


class DataError(EngramError, ValueError):
    """A corpus, token file or prompt cannot be used as given (names the file, and the line where there is one)."""


class ModelLoadError(EngramError, ValueError):
    """A saved model cannot be loaded as asked: missing or corrupt file, or config / tokenizer / weights disagree."""


class CheckpointError(EngramError, RuntimeError):
    """A training checkpoint is missing, incomplete or corrupt."""


class DivergenceError(EngramError, FloatingPointError):
    """Training produced a non-finite loss (names the step)."""
