"""The kinds of bad input, and the one-line form of a pydantic validation error. The method's InputError is the
base of them all; api/problems.py chooses each kind's HTTP status."""

from pydantic import ValidationError

from services.method.errors import InputError

__all__ = ["InputError", "NotFound", "TooLarge", "Unavailable", "WrongMediaType", "one_line"]


class TooLarge(InputError):
    """An upload, or a part of one, over a limit."""


class WrongMediaType(InputError):
    """A part of a type or name the server does not take."""


class Unavailable(InputError):
    """What the request needs is not available on this server now (a check at capacity, a feature switched off)."""


class NotFound(InputError):
    """The request names something (a job) that does not exist."""


def one_line(e: ValidationError, what: str) -> str:
    """The first error of a pydantic validation as `what: field: message (and N more)`."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{what}: {where}: {first['msg']}{more}"
