"""The root of every exception the service raises on purpose, with an actionable message."""


class WhopAutocancelError(Exception):
    """Base class of the service's own errors."""


class ConfigurationError(WhopAutocancelError):
    """A setting or the catalog is missing or invalid: start-up stops with this one line."""
