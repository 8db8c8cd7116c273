"""balsam.analytics: reports from the state history of a query's jobs."""

import datetime

import pytest

from balsam import analytics
from balsam.analytics import error_report, throughput_report, utilization_report
from balsam.launcher.dag import BalsamJob


def run_states(names, *states):
    for s in states:
        BalsamJob.objects.filter(name__in=names).update(state=s)


@pytest.fixture
def history(db):
    BalsamJob.objects.bulk_create(
        [BalsamJob(name=f"j{i}", workflow="wf", application="say-hello") for i in range(4)]
        + [BalsamJob(name="elsewhere", workflow="other", application="say-hello")]
    )
    run_states(["j0", "j1", "j2", "elsewhere"], "PREPROCESSED", "RUNNING")
    run_states(["j0"], "RUN_DONE")
    run_states(["j1"], "RUN_ERROR")
    run_states(["j3"], "PREPROCESSED", "RUNNING")
    run_states(["j2", "j3"], "RUN_DONE", "POSTPROCESSED", "JOB_FINISHED")
    return BalsamJob.objects.filter(workflow="wf")


def test_reports_as_lists(history, monkeypatch):
    monkeypatch.setattr(analytics, "_np", None)
    times, done = throughput_report(history)
    assert done == [1, 2, 3]
    assert all(isinstance(t, datetime.datetime) and t.tzinfo is not None for t in times)
    assert times == sorted(times)
    times, running = utilization_report(history)
    # j0-j2 start together (one update), j0 and j1 end, j3 starts, j2 and j3 end.
    assert running == [1, 2, 3, 2, 1, 2, 1, 0]
    times, errors = error_report(history)
    assert errors == [1] and times[0].second == 0 and times[0].microsecond == 0
    assert throughput_report(None)[1] == [1, 2, 3]
    assert utilization_report()[1][-1] == 1  # "elsewhere" is still running


def test_reports_as_numpy_arrays(history):
    np = pytest.importorskip("numpy")
    times, done = throughput_report(history)
    assert isinstance(times, np.ndarray) and times.dtype == np.dtype("datetime64[us]")
    assert done.tolist() == [1, 2, 3]


def test_reports_take_queries_of_jobs(db):
    with pytest.raises(TypeError, match="query of jobs"):
        throughput_report("wf")
    assert throughput_report(BalsamJob.objects.filter(name="none"))[1] is not None
