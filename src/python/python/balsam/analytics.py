"""Reports from the state history of jobs, as legacy Balsam's profiles drew them.

Each report reads the history lines of a query's jobs (all jobs by default) in the database,
and returns two sequences of the same length, ``(times, values)``:

- :func:`throughput_report`: at each RUN_DONE, how many jobs have finished their run so far;
- :func:`utilization_report`: at each start or end of a run, how many jobs are running;
- :func:`error_report`: for each minute from the first RUN_ERROR to the last, how many runs
  ended in RUN_ERROR in it.

Times are UTC. With numpy installed both are numpy arrays (``datetime64[us]`` and integers),
ready for matplotlib; without it, lists of ``datetime`` and ``int``::

    from balsam.analytics import throughput_report
    from balsam.launcher.dag import BalsamJob

    times, done = throughput_report(BalsamJob.objects.filter(workflow="gdb7"))
"""

import datetime

from . import _native

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the environment
    _np = None

__all__ = ["throughput_report", "utilization_report", "error_report"]

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _query(queryset):
    if queryset is None:
        return _native.JobQuery()
    if hasattr(queryset, "_all"):  # BalsamJob.objects itself
        queryset = queryset._all()
    q = getattr(queryset, "_q", None)
    if not isinstance(q, _native.JobQuery):
        raise TypeError(
            "reports take a query of jobs, e.g. BalsamJob.objects.filter(workflow='w'), or None"
        )
    return q


def _series(times_us, values):
    if _np is not None:
        return _np.array(times_us, dtype="datetime64[us]"), _np.array(values, dtype=_np.int64)
    times = [_EPOCH + datetime.timedelta(microseconds=t) for t in times_us]
    return times, list(values)


def throughput_report(queryset=None):
    """Cumulative count of jobs that reached RUN_DONE, at each time one did."""
    return _series(*_query(queryset).report("throughput"))


def utilization_report(queryset=None):
    """Number of jobs RUNNING, at each time a run started or ended."""
    return _series(*_query(queryset).report("utilization"))


def error_report(queryset=None):
    """RUN_ERROR per minute: the start of each minute, and the runs that ended in RUN_ERROR
    in it (minutes without errors count 0)."""
    return _series(*_query(queryset).report("errors"))
