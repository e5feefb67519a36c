"""The one error type users see for bad input."""


class LsloError(ValueError):
    """Bad input: the message names the file, field, language or value at fault and what is expected."""
