"""Errors raised on bad input, before any expensive work starts."""


class RayslError(ValueError):
    """Base class: a message that names the field, the value and what is allowed."""


class ConfigError(RayslError):
    """A config key or value is unknown or out of its declared limits."""


class DataError(RayslError):
    """A dataset is missing, malformed or too small for the requested split."""
