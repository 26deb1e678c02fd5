"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class MuseError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""

    exit_code: int = 2


class DataError(MuseError):
    """A corpus file is missing, malformed or has the wrong shape."""


class ConfigError(MuseError):
    """A command-line option, hyperparameter or name is invalid."""


class ModelError(MuseError):
    """A model or tokenizer cannot be loaded safely."""


class TrainingError(MuseError):
    """Training cannot go on (for example the loss became non-finite)."""

    exit_code = 3
