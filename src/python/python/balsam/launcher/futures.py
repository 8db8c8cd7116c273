"""Wait for jobs as ``concurrent.futures`` waits for tasks.

Legacy Balsam called this module ``balsam.launcher.async``; ``async`` has been a keyword since
Python 3.7, so it is ``balsam.launcher.futures`` here, with the same names::

    from balsam.launcher.dag import add_job
    from balsam.launcher.futures import wait, FutureTask

    def on_done(job):
        return job.read_file_in_workdir(f'{job.name}.out')

    futures = []
    for i in range(10):
        j = add_job(name=f'task{i}', application='say-hello', args=f'world {i}!')
        futures.append(FutureTask(j, on_done))

    results = wait(futures, return_when='ANY_COMPLETED', timeout=30)

A future completes when its job reaches an end state: JOB_FINISHED (done), FAILED (failed) or
USER_KILLED (cancelled; so is a job removed from the database). Waiting never busy-polls: each
round asks the database for the states of every pending future in one query, a few times a
second at most, less and less often while nothing changes.
"""

import collections
import time
from concurrent.futures import CancelledError, TimeoutError

from .. import _native
from ..exceptions import JobFailed, RefusedError

__all__ = [
    "FutureTask",
    "wait",
    "as_completed",
    "WaitResult",
    "ANY_COMPLETED",
    "ALL_COMPLETED",
    "CancelledError",
    "TimeoutError",
]

ANY_COMPLETED = "ANY_COMPLETED"
ALL_COMPLETED = "ALL_COMPLETED"

# The first rounds of a wait are this far apart; each round in which nothing changed waits
# longer, up to MAX_INTERVAL. At most 1 / MIN_INTERVAL queries a second, whatever the number
# of futures.
MIN_INTERVAL = 0.25
MAX_INTERVAL = 2.0
BACKOFF = 1.5

_REMOVED = "REMOVED"
_END = {"JOB_FINISHED": "done", "FAILED": "failed", "USER_KILLED": "cancelled", _REMOVED: "cancelled"}

WaitResult = collections.namedtuple("WaitResult", ["active", "done", "failed", "cancelled"])
WaitResult.__doc__ = """What ``wait`` returns: lists of the futures still active, done (JOB_FINISHED),
failed (FAILED) and cancelled (USER_KILLED or removed). Unpacks as legacy's 4-tuple."""


class FutureTask:
    """A job's outcome to come.

    ``done_callback(job)`` makes the result of a job that finished (JOB_FINISHED);
    ``fail_callback(job)``, if given, makes the result of one that FAILED (else ``result()``
    raises :class:`~balsam.exceptions.JobFailed`). Callbacks run once, in ``result()``, with
    the job as it is in the database then.
    """

    def __init__(self, job, done_callback, fail_callback=None):
        if job.pk is None:
            raise RefusedError(f"{job!r} is not saved yet: save() it before waiting for it")
        self.job = job
        self._done_callback = done_callback
        self._fail_callback = fail_callback
        self._state = job.state
        self._checked = time.monotonic()
        self._outcome = None  # (value, exception) once the callbacks ran

    def _set(self, state):
        self._state = state
        self._checked = time.monotonic()

    def _refresh(self):
        # A lone call (done() in a user's loop) reads this job's state, at most a few times
        # a second.
        if self._state in _END or time.monotonic() - self._checked < MIN_INTERVAL:
            return
        self._set(_native.job_states([self.job.pk])[0] or _REMOVED)

    def _kind(self):
        return _END.get(self._state, "active")

    def done(self):
        """Whether the job is JOB_FINISHED."""
        self._refresh()
        return self._kind() == "done"

    def failed(self):
        """Whether the job is FAILED."""
        self._refresh()
        return self._kind() == "failed"

    def cancelled(self):
        """Whether the job was killed (USER_KILLED) or removed."""
        self._refresh()
        return self._kind() == "cancelled"

    def active(self):
        """Whether the job has not reached an end state yet."""
        self._refresh()
        return self._kind() == "active"

    @property
    def state(self):
        """The job's state at the last check."""
        return self._state

    def result(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the job to end, then
        return ``done_callback(job)`` (or ``fail_callback(job)`` for a FAILED job).

        Raises ``concurrent.futures.TimeoutError`` when the time is up, ``CancelledError``
        for a killed or removed job, and ``JobFailed`` for a FAILED job without a
        fail_callback.
        """
        if self._outcome is None:
            wait([self], timeout=timeout, return_when=ALL_COMPLETED)
            kind = self._kind()
            if kind == "active":
                raise TimeoutError(f"{self.job.cute_id} is still {self._state} after {timeout} s")
            if kind == "cancelled":
                how = "removed" if self._state == _REMOVED else "killed (USER_KILLED)"
                self._outcome = (None, CancelledError(f"{self.job.cute_id} was {how}"))
            else:
                self.job.refresh_from_db()
                if kind == "done":
                    self._outcome = (self._done_callback(self.job), None)
                elif self._fail_callback is not None:
                    self._outcome = (self._fail_callback(self.job), None)
                else:
                    self._outcome = (
                        None,
                        JobFailed(
                            f"{self.job.cute_id} FAILED; its history:\n{self.job.state_history}"
                        ),
                    )
        value, exc = self._outcome
        if exc is not None:
            raise exc
        return value

    def __repr__(self):
        return f"<FutureTask {self.job.cute_id} {self._state}>"


def _poll(futures):
    """One round: the states of every active future, in one query. Returns whether any
    changed."""
    pending = [f for f in futures if f._state not in _END]
    if not pending:
        return False
    states = _native.job_states([f.job.pk for f in pending])
    changed = False
    for f, s in zip(pending, states):
        s = s or _REMOVED
        if s != f._state:
            changed = True
        f._set(s)
    return changed


def _split(futures):
    out = WaitResult([], [], [], [])
    for f in futures:
        getattr(out, f._kind()).append(f)
    return out


def _rounds(futures, timeout):
    """Polls until the caller stops asking; yields after each round. Sleeps between rounds,
    longer while nothing changes, never past the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = MIN_INTERVAL
    while True:
        changed = _poll(futures)
        yield deadline is not None and time.monotonic() >= deadline
        interval = MIN_INTERVAL if changed else min(interval * BACKOFF, MAX_INTERVAL)
        pause = interval
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)


def wait(futures, timeout=None, return_when=ANY_COMPLETED):
    """Wait until one (``ANY_COMPLETED``) or all (``ALL_COMPLETED``) of the futures have
    completed, or ``timeout`` seconds passed (None: no limit).

    Returns ``(active, done, failed, cancelled)``, lists of futures (a :data:`WaitResult`).
    """
    if return_when not in (ANY_COMPLETED, ALL_COMPLETED):
        raise ValueError(
            f"return_when must be 'ANY_COMPLETED' or 'ALL_COMPLETED', not {return_when!r}"
        )
    fs = list(futures)
    for timed_out in _rounds(fs, timeout):
        parts = _split(fs)
        if not parts.active:
            return parts
        if return_when == ANY_COMPLETED and len(parts.active) < len(fs):
            return parts
        if timed_out:
            return parts
    raise AssertionError("unreachable")


def as_completed(futures, timeout=None):
    """Yield the futures as they complete (done, failed or cancelled), those already complete
    first. Raises ``concurrent.futures.TimeoutError`` if some are still active after
    ``timeout`` seconds."""
    pending = list(futures)
    for timed_out in _rounds(pending, timeout):
        still = []
        for f in pending:
            if f._kind() == "active":
                still.append(f)
            else:
                yield f
        pending[:] = still
        if not pending:
            return
        if timed_out:
            raise TimeoutError(f"{len(pending)} of the futures are still active after {timeout} s")
