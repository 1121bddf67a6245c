"""Errors that the data, training and command-line layers report to a person.

The ``fastvae`` command prints these as one line on stderr and exits non-zero,
without a traceback; library callers get ordinary exceptions (a ``ConfigError``
is a ``ValueError``, a ``RunError`` a ``RuntimeError``).
"""


class ConfigError(ValueError):
    """Bad input from the user: an unknown dataset, an unreadable file, a run folder that exists, ... (exit 2)."""


class RunError(RuntimeError):
    """A run that started could not go on: a file it writes could not be written (a full disk), ... (exit 1).

    What was written before (the last checkpoint) is intact; the message says so.
    """


class NonFiniteLossError(RunError):
    """Training produced a NaN or infinite loss; the message names the step."""
