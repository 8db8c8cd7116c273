"""balsam.launcher.futures: FutureTask, wait and as_completed, and that waiting does not
busy-poll."""

import threading
import time

import pytest

from balsam import _native
from balsam.exceptions import JobFailed
from balsam.launcher import futures as fmod
from balsam.launcher.dag import BalsamJob, add_job, kill
from balsam.launcher.futures import CancelledError, FutureTask, TimeoutError, as_completed, wait


def later(seconds, fn):
    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_wait_any_then_all(db):
    jobs = [add_job(name=f"t{i}", application="say-hello") for i in range(3)]
    fs = [FutureTask(j, lambda job: job.name.upper(), fail_callback=None) for j in jobs]
    later(0.5, lambda: BalsamJob.objects.filter(name="t0").update(state="JOB_FINISHED"))
    active, done, failed, cancelled = wait(fs, timeout=60)
    assert [f.job.name for f in done] == ["t0"] and len(active) == 2
    assert fs[0].done() and fs[0].result() == "T0"

    later(0.5, lambda: BalsamJob.objects.filter(name="t1").update(state="FAILED"))
    later(0.7, lambda: kill(BalsamJob.objects.get(name="t2")))
    res = wait(fs, timeout=60, return_when="ALL_COMPLETED")
    assert (len(res.active), len(res.done), len(res.failed), len(res.cancelled)) == (0, 1, 1, 1)
    assert fs[1].failed() and fs[2].cancelled() and not fs[2].active()
    with pytest.raises(JobFailed, match="FAILED"):
        fs[1].result()
    with pytest.raises(CancelledError, match="USER_KILLED"):
        fs[2].result()
    assert FutureTask(jobs[1], str, fail_callback=lambda job: "handled").result() == "handled"


def test_timeouts_and_bad_arguments(db):
    job = add_job(name="slow", application="say-hello")
    f = FutureTask(job, lambda j: 1)
    start = time.monotonic()
    res = wait([f], timeout=0.6)
    assert res.active == [f] and time.monotonic() - start >= 0.6
    with pytest.raises(TimeoutError):
        f.result(timeout=0.3)
    with pytest.raises(ValueError, match="ALL_COMPLETED"):
        wait([f], return_when="FIRST_COMPLETED")
    with pytest.raises(Exception, match="save"):
        FutureTask(BalsamJob(name="unsaved", application="say-hello"), str)


def test_as_completed_yields_in_completion_order(db):
    jobs = [add_job(name=f"c{i}", application="say-hello") for i in range(3)]
    fs = [FutureTask(j, lambda job: job.name) for j in jobs]
    BalsamJob.objects.filter(name="c2").update(state="JOB_FINISHED")
    later(0.5, lambda: BalsamJob.objects.filter(name="c0").update(state="JOB_FINISHED"))
    later(1.5, lambda: BalsamJob.objects.filter(name="c1").update(state="JOB_FINISHED"))
    assert [f.result() for f in as_completed(fs, timeout=60)] == ["c2", "c0", "c1"]
    pending = FutureTask(add_job(name="never", application="say-hello"), str)
    with pytest.raises(TimeoutError):
        list(as_completed([pending], timeout=0.5))


def test_a_removed_job_is_cancelled(db):
    f = FutureTask(add_job(name="gone", application="say-hello"), str)
    later(0.3, lambda: BalsamJob.objects.filter(name="gone").delete())
    assert wait([f], timeout=60).cancelled == [f]


def test_waiting_asks_once_per_round_with_backoff(db, monkeypatch):
    made = BalsamJob.objects.bulk_create([BalsamJob(name=f"w{i}", application="say-hello") for i in range(500)])
    fs = [FutureTask(j, str) for j in made]
    calls = []
    real = _native.job_states

    def counting(pks):
        calls.append((time.monotonic(), len(pks)))
        return real(pks)

    monkeypatch.setattr(_native, "job_states", counting)
    start = time.monotonic()
    wait(fs, timeout=4, return_when="ALL_COMPLETED")
    elapsed = time.monotonic() - start
    # One query a round for all 500 futures, never more than 1/MIN_INTERVAL a second, and
    # farther apart while nothing changes.
    assert all(n == 500 for _, n in calls)
    assert 2 <= len(calls) <= elapsed / fmod.MIN_INTERVAL + 1, calls
    gaps = [b - a for (a, _), (b, _) in zip(calls, calls[1:])]
    assert gaps[-1] > gaps[0], gaps
