"""Errors that the data, training and command-line layers report to a person.

The ``fastvae`` command prints these as one line on stderr and exits non-zero,
without a traceback; library callers get ordinary exceptions (a ``ConfigError``
is a ``ValueError``).
"""


class ConfigError(ValueError):
    """Bad input from the user: an unknown dataset, an unreadable file, a run folder that exists, ..."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step."""
