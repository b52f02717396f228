"""Errors meant for people: each says what was wrong, where, and what to do.

The CLI prints them as one line and exits non-zero; the service maps them to 4xx responses.
"""


class FinetuneError(Exception):
    """Bad input from the user (config, data, model name); never a bug in our code."""


class ConfigError(FinetuneError):
    """A configuration value is missing, of the wrong type or outside its allowed values."""


class DataError(FinetuneError):
    """A dataset cannot be used: missing file, unreadable format, missing column, too few rows."""


class ModelError(FinetuneError):
    """A base model or saved model cannot be found or loaded."""
