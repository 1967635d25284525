"""The one error type for bad user input, and the one-line form of a pydantic validation error."""

from pydantic import ValidationError


class InputError(ValueError):
    """Input that cannot be used; the message says what to fix, in one line; `status` is the HTTP answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keeps the status when the error crosses a process boundary (worker → parent)
        return type(self), (str(self), self.status)


def one_line(e: ValidationError, what: str) -> str:
    """The first error of a pydantic validation as `what: field: message (and N more)`."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{what}: {where}: {first['msg']}{more}"
