"""Errors any layer may raise; a leaf module, it imports nothing of dache."""


class ConfigError(Exception):
    """A setting has a value dache cannot use; the message is one line for a person."""


class StartupError(Exception):
    """dache cannot start; str() is the one line to show."""
