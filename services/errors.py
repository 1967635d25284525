"""The one error type for bad user input."""


class InputError(ValueError):
    """Input that cannot be used; the message says what to fix, in one line."""
