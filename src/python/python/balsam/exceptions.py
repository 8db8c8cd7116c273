"""The exceptions of the balsam package.

Every error carries the message the ``balsam`` command would print: what is wrong and how to
fix it. Each class also derives from the built-in exception a Python programmer would expect
(``ValueError`` for bad input, ``LookupError`` for a job that does not exist, ...), so code
that catches those keeps working.
"""


class BalsamError(Exception):
    """Base class of every error raised by balsam."""


class FieldError(BalsamError, ValueError):
    """An unknown field, a lookup that does not apply to a field, or a bad value."""


class InvalidStateError(FieldError):
    """A state name that does not exist (the message lists the valid ones)."""


class CycleError(BalsamError, ValueError):
    """A dependency that would make a cycle."""


class DoesNotExist(BalsamError, LookupError):
    """No job (or application) with this id, prefix or name."""


class RefusedError(BalsamError):
    """The database refused the change (a killed job, a duplicate, an ambiguous id prefix...);
    nothing was changed."""


class DatabaseError(BalsamError):
    """The database cannot be opened or read (none is active, the file is not one, ...)."""


class DatabaseUnavailable(DatabaseError, ConnectionError):
    """The database cannot be reached or written right now (server down, disk full)."""


class JobFailed(BalsamError):
    """A FutureTask's job ended FAILED and it has no fail_callback."""


__all__ = [
    "BalsamError",
    "FieldError",
    "InvalidStateError",
    "CycleError",
    "DoesNotExist",
    "RefusedError",
    "DatabaseError",
    "DatabaseUnavailable",
    "JobFailed",
]
