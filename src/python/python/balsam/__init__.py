"""balsam: workflow manager and pilot launcher for supercomputers, from Python.

- :mod:`balsam.launcher.dag` — jobs and applications (``BalsamJob``, ``ApplicationDefinition``),
  queries (``BalsamJob.objects.filter(...)``), DAGs (``add_job``, ``add_dependency``), and the
  job a script runs in (``current_job``).
- :mod:`balsam.launcher.futures` — wait for jobs as ``concurrent.futures`` waits for tasks
  (legacy Balsam called it ``balsam.launcher.async``; ``async`` is a keyword since Python 3.7).
- :mod:`balsam.analytics` — throughput, utilization and error reports from state histories.

Everything works on the database ``BALSAM_DB_PATH`` names (``source balsamactivate DB`` sets
it), SQLite or PostgreSQL alike: the work is done by the same Rust store as the ``balsam``
command's, so rules, messages and histories are the same.
"""

from . import _native
from .exceptions import (
    BalsamError,
    CycleError,
    DatabaseError,
    DatabaseUnavailable,
    DoesNotExist,
    FieldError,
    InvalidStateError,
    JobFailed,
    RefusedError,
)

try:
    from importlib.metadata import version as _version

    __version__ = _version("balsam")
except Exception:  # pragma: no cover - not installed as a distribution
    __version__ = "unknown"


def create_database(path, db_url=None):
    """Create a database directory at ``path`` and return its absolute path.

    Without ``db_url`` the database is SQLite, in the directory (as ``balsam init PATH``).
    With ``db_url`` (``postgresql://USER[:PASSWORD]@HOST:PORT/NAME``) it lives on that
    PostgreSQL server, and the directory only says how to reach it; the database is created
    on the server when missing. Point ``BALSAM_DB_PATH`` at the directory to use it.
    """
    return _native.create_database(str(path), db_url)


__all__ = [
    "create_database",
    "BalsamError",
    "CycleError",
    "DatabaseError",
    "DatabaseUnavailable",
    "DoesNotExist",
    "FieldError",
    "InvalidStateError",
    "JobFailed",
    "RefusedError",
]
