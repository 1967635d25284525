"""The method's one error: input it cannot use (data, model, spec or config). How a caller answers it (an HTTP
status, an exit code, a failed job) is the caller's business."""


class InputError(ValueError):
    """Input that cannot be used; the message says what to fix, in one line."""
