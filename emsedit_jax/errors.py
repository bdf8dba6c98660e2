"""The exception types for mistakes in what a user gave: a file, a record, a field, a
flag, a folder. The CLI prints their message as one line and exits with status 2 (no
traceback unless --debug); library callers catch them like any ValueError. Every other
exception is an internal error and keeps its traceback."""


class UserError(ValueError):
    """A mistake in the user's input; the message names the file, record and field, or the
    flag, and what was expected."""


class ConfigError(UserError):
    """A configuration value (an option, a config file, a model's config.json) that this
    package cannot run with."""
