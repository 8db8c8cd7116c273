"""BalsamJob.objects and ApplicationDefinition.objects: lookups, order, slices, values,
updates, deletes, and bad input that leaves the database as it was."""

import pytest

from balsam.exceptions import (
    BalsamError,
    DoesNotExist,
    FieldError,
    InvalidStateError,
    RefusedError,
)
from balsam.launcher.dag import ApplicationDefinition, BalsamJob
from conftest import history_states


@pytest.fixture
def jobs(db):
    specs = [
        dict(name="alpha", workflow="wf-A", num_nodes=1, args="--x 1", data={"k": 1}),
        dict(name="Beta", workflow="wf-A", num_nodes=4, wait_for_parents=False),
        dict(name="gamma", workflow="wf-B", num_nodes=16, environ_vars={"OMP_NUM_THREADS": "4"}),
        dict(name="delta-test", workflow="wf-B", num_nodes=128),
        dict(name="epsilon-test", workflow="other", num_nodes=512),
    ]
    out = BalsamJob.objects.bulk_create(
        [BalsamJob(application="say-hello", **s) for s in specs]
    )
    return {j.name: j for j in out}


def names(qs):
    return sorted(j.name for j in qs)


def snapshot():
    """Everything a query can see, to compare before and after a refused change."""
    return [
        (j.job_id, j.state, j.num_nodes, j.name, j.args, j.state_history)
        for j in BalsamJob.objects.all()
    ]


def test_every_lookup(jobs):
    f = BalsamJob.objects.filter
    assert names(f(name="alpha")) == ["alpha"]
    assert names(f(name__exact="beta")) == []
    assert names(f(name__iexact="beta")) == ["Beta"]
    assert names(f(name__contains="test")) == ["delta-test", "epsilon-test"]
    assert names(f(name__contains="TEST")) == []
    assert names(f(name__icontains="TEST")) == ["delta-test", "epsilon-test"]
    assert names(f(name__startswith="e")) == ["epsilon-test"]
    assert names(f(name__in=["alpha", "gamma", "nope"])) == ["alpha", "gamma"]
    assert names(f(num_nodes__lt=16)) == ["Beta", "alpha"]
    assert names(f(num_nodes__lte=16)) == ["Beta", "alpha", "gamma"]
    assert names(f(num_nodes__gt=128)) == ["epsilon-test"]
    assert names(f(num_nodes__gte=128)) == ["delta-test", "epsilon-test"]
    assert names(f(num_nodes__in=[4, 512])) == ["Beta", "epsilon-test"]
    assert names(f(num_nodes__startswith="1")) == ["alpha", "delta-test", "gamma"]
    assert names(f(wait_for_parents=False)) == ["Beta"]
    assert names(f(state="CREATED")) == sorted(jobs)
    assert names(f(state__startswith="RUN")) == []
    assert names(f(state__in=["CREATED", "FAILED"])) == sorted(jobs)
    assert names(f(environ_vars__contains="OMP")) == ["gamma"]
    assert names(f(data={"k": 1})) == ["alpha"]
    assert names(f(data__contains='"k"')) == ["alpha"]
    assert names(f(return_code=None)) == sorted(jobs)
    assert names(f(return_code__lt=1)) == []
    a = jobs["alpha"]
    assert names(f(job_id=a.job_id)) == ["alpha"]
    assert names(f(job_id__iexact=a.job_id.upper())) == ["alpha"]
    assert names(f(job_id__startswith=a.job_id[:8])) == ["alpha"]
    assert names(f(job_id__contains=a.job_id[9:13])) == ["alpha"]
    assert names(f(job_id__icontains=a.job_id[2:13].upper())) == ["alpha"]
    assert names(f(job_id__in=[a, jobs["gamma"].job_id])) == ["alpha", "gamma"]


def test_filters_chain_and_exclude(jobs):
    qs = BalsamJob.objects.filter(workflow__startswith="wf").exclude(num_nodes__gt=100)
    assert names(qs) == ["Beta", "alpha", "gamma"]
    qs = BalsamJob.objects.exclude(workflow="wf-A", num_nodes=1)
    assert names(qs) == ["Beta", "delta-test", "epsilon-test", "gamma"]
    # exclude on a field that may be absent (NULL) negates exactly.
    assert BalsamJob.objects.exclude(return_code=3).count() == 5


def test_order_slices_and_counts(jobs):
    qs = BalsamJob.objects.order_by("-num_nodes")
    assert [j.name for j in qs] == ["epsilon-test", "delta-test", "gamma", "Beta", "alpha"]
    assert [j.name for j in qs[1:3]] == ["delta-test", "gamma"]
    assert [j.name for j in qs[3:]] == ["Beta", "alpha"]
    assert qs[0].name == "epsilon-test"
    assert qs.first().name == "epsilon-test"
    assert BalsamJob.objects.first().name == "alpha"
    assert len(qs) == 5 and qs.count() == 5
    assert len(qs[1:3]) == 2 and qs[2:][1:].count() == 2
    with pytest.raises(IndexError):
        qs[5]
    assert BalsamJob.objects.filter(name="nope").first() is None
    assert not BalsamJob.objects.filter(name="nope")
    # Text orders by bytes, as on both backends: "other" < "wf-A", "alpha" > "Beta".
    assert [j.name for j in BalsamJob.objects.order_by("workflow", "-name")] == [
        "epsilon-test", "alpha", "Beta", "gamma", "delta-test"
    ]


def test_values_list(jobs):
    rows = BalsamJob.objects.order_by("num_nodes").values_list("name", "num_nodes", "state")
    assert rows[:2] == [("alpha", 1, "CREATED"), ("Beta", 4, "CREATED")]
    assert BalsamJob.objects.filter(name="alpha").values_list("data", flat=True) == [{"k": 1}]
    assert BalsamJob.objects.values_list("return_code", flat=True) == [None] * 5
    ids = BalsamJob.objects.filter(name="gamma").values_list("job_id", flat=True)
    assert ids == [jobs["gamma"].job_id]


def test_iteration_walks_large_queries_in_pages(db):
    BalsamJob.objects.bulk_create(
        [BalsamJob(name=f"j{i}", application="say-hello") for i in range(4500)]
    )
    seen = [j.name for j in BalsamJob.objects.all()]
    assert seen == [f"j{i}" for i in range(4500)]


def test_update_fields_and_state_in_one_transaction(jobs):
    n = BalsamJob.objects.filter(workflow="wf-A").update(
        wall_time_minutes=30, wait_for_parents="False", state="PREPROCESSED"
    )
    assert n == 2
    for j in BalsamJob.objects.filter(workflow="wf-A"):
        assert (j.wall_time_minutes, j.wait_for_parents, j.state) == (30, False, "PREPROCESSED")
        assert history_states(j.state_history) == ["CREATED", "PREPROCESSED"]
    assert BalsamJob.objects.filter(wall_time_minutes=30).count() == 2


def test_restart_ready_counts_toward_max_restarts(db):
    job = BalsamJob(name="flaky", application="say-hello", max_restarts=1)
    job.save()
    qs = BalsamJob.objects.filter(name="flaky")
    qs.update(state="RUN_ERROR")
    qs.update(state="RESTART_READY")
    job.refresh_from_db()
    assert (job.state, job.num_restarts) == ("RESTART_READY", 1)
    qs.update(state="RUN_ERROR")
    qs.update(state="RESTART_READY")
    job.refresh_from_db()
    assert (job.state, job.num_restarts) == ("FAILED", 1)
    assert "restart limit reached" in job.state_history


def test_restart_at_the_interactive_prompt_resets_the_count(db, monkeypatch):
    import sys

    job = BalsamJob(name="again", application="say-hello", max_restarts=1)
    job.save()
    qs = BalsamJob.objects.filter(name="again")
    qs.update(state="RUN_ERROR")
    qs.update(state="RESTART_READY")
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    qs.update(state="RUN_ERROR")
    qs.update(state="RESTART_READY")
    job.refresh_from_db()
    assert (job.state, job.num_restarts) == ("RESTART_READY", 0)
    assert "restart count reset from 1 to 0" in job.state_history


def test_update_finishing_a_parent_releases_its_children(db):
    from balsam.launcher.dag import add_dependency, add_job

    parent = add_job(name="parent", application="generate")
    child = add_job(name="child", application="simulate")
    add_dependency(parent, child)
    BalsamJob.objects.filter(name="child").update(state="AWAITING_PARENTS")
    BalsamJob.objects.filter(name="parent").update(state="JOB_FINISHED")
    child.refresh_from_db()
    assert child.state == "READY"


def test_save_writes_changed_fields(jobs):
    j = BalsamJob.objects.get(name="alpha")
    j.args = "--y 2"
    j.data["more"] = [1, 2]
    j.state = "RESTART_READY"
    j.save()
    again = BalsamJob.objects.get(job_id=j.job_id)
    assert (again.args, again.data, again.state) == ("--y 2", {"k": 1, "more": [1, 2]}, "RESTART_READY")
    assert history_states(again.state_history) == ["CREATED", "RESTART_READY"]


def test_delete_follows_rm(jobs):
    from balsam.launcher.dag import add_dependency

    add_dependency(jobs["alpha"], jobs["gamma"])
    BalsamJob.objects.filter(name="gamma").update(state="AWAITING_PARENTS")
    assert BalsamJob.objects.filter(workflow="wf-A").delete() == 2
    assert names(BalsamJob.objects.all()) == ["delta-test", "epsilon-test", "gamma"]
    # The child of a removed parent is checked again, so it never waits forever.
    assert BalsamJob.objects.get(name="gamma").state == "READY"


def test_killed_jobs_cannot_be_updated(jobs):
    from balsam.launcher.dag import kill

    kill(jobs["alpha"])
    before = snapshot()
    with pytest.raises(RefusedError, match="USER_KILLED"):
        BalsamJob.objects.filter(workflow="wf-A").update(state="RESTART_READY")
    assert snapshot() == before
    assert BalsamJob.objects.filter(workflow="wf-A").exclude(state="USER_KILLED").update(
        state="RESTART_READY"
    ) == 1


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: BalsamJob.objects.filter(nodes__lte=2), FieldError, ["nodes", "num_nodes"]),
        (lambda: BalsamJob.objects.filter(num_nodes__below=2), FieldError, ["below", "lte"]),
        (lambda: BalsamJob.objects.filter(wait_for_parents__gt=True), FieldError, ["true/false", "exact"]),
        (lambda: BalsamJob.objects.filter(num_nodes__lte="many"), FieldError, ["num_nodes__lte", "integer"]),
        (lambda: BalsamJob.objects.filter(state="DONE"), InvalidStateError, ["DONE", "JOB_FINISHED"]),
        (lambda: BalsamJob.objects.order_by("-size"), FieldError, ["size"]),
        (lambda: BalsamJob.objects.all().update(state="FINISHED"), InvalidStateError, ["FINISHED", "RESTART_READY"]),
        (lambda: BalsamJob.objects.all().update(nodes=2), FieldError, ["nodes"]),
        (lambda: BalsamJob.objects.all().update(num_nodes=0), FieldError, ["num_nodes", "1 to"]),
        (lambda: BalsamJob.objects.all().update(cpu_affinity="deep"), FieldError, ["cpu_affinity", "depth"]),
        (lambda: BalsamJob.objects.all().update(args="'unbalanced"), FieldError, ["args", "quote"]),
        (lambda: BalsamJob.objects.all().update(num_restarts=0), FieldError, ["num_restarts"]),
        (lambda: BalsamJob.objects.all().update(application="nope"), DoesNotExist, ["nope", "balsam app"]),
        (lambda: BalsamJob.objects.all().update(num_nodes=999_999, coschedule_num_nodes=2), FieldError, ["1000000"]),
        (lambda: BalsamJob.objects.all()[1:].update(num_nodes=2), RefusedError, ["slice"]),
        (lambda: BalsamJob(nodes=3), FieldError, ["nodes", "num_nodes"]),
        (lambda: BalsamJob(name="x", application="nope").save(), DoesNotExist, ["nope"]),
        (lambda: BalsamJob(name="x", application="say-hello", num_nodes=-1).save(), FieldError, ["num_nodes"]),
        (lambda: BalsamJob(name="x", application="say-hello", state="RUNNING"), RefusedError, ["CREATED"]),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(jobs, call, error, words):
    before = snapshot()
    with pytest.raises(error) as e:
        call()
    for w in words:
        assert w in str(e.value), str(e.value)
    assert isinstance(e.value, BalsamError)
    assert snapshot() == before


def test_bulk_create_is_all_or_nothing(db):
    good = [BalsamJob(name=f"ok{i}", application="say-hello") for i in range(100)]
    bad = BalsamJob(name="bad", application="say-hello", ranks_per_node=0)
    with pytest.raises(FieldError, match=r"bulk_create:51: .*ranks_per_node"):
        BalsamJob.objects.bulk_create(good[:50] + [bad] + good[50:])
    assert BalsamJob.objects.count() == 0
    with pytest.raises(DoesNotExist, match="bulk_create:3: .*nope"):
        BalsamJob.objects.bulk_create(
            [BalsamJob(name="a", application="say-hello")] * 0
            + [BalsamJob(name=f"b{i}", application="say-hello") for i in range(2)]
            + [BalsamJob(name="c", application="nope")]
        )
    with pytest.raises(TypeError):
        BalsamJob.objects.bulk_create([BalsamJob(name="d", application="say-hello", data={1: object()})])
    assert BalsamJob.objects.count() == 0
    made = BalsamJob.objects.bulk_create(good)
    assert BalsamJob.objects.count() == 100
    assert made[7].pk is not None and BalsamJob.objects.get(job_id=made[7].job_id).name == "ok7"


def test_applications(db):
    apps = ApplicationDefinition.objects
    assert apps.filter(name__in=["generate", "reduce"]).count() == 2
    a = ApplicationDefinition(name="post", executable="python3 run.py", postprocess="python3 post.py")
    a.save()
    assert apps.get(name="post").postprocess == "python3 post.py"
    a.executable = "python3 run2.py"
    a.save()
    assert apps.get(name="post").executable == "python3 run2.py"
    assert apps.filter(name__startswith="s").values_list("name", flat=True) == ["say-hello", "simulate"]
    assert apps.filter(name="post").update(description="runs things") == 1
    BalsamJob(name="uses-post", application="post").save()
    with pytest.raises(RefusedError, match="remove them first"):
        apps.filter(name="post").delete()
    with pytest.raises(RefusedError, match="already exists"):
        ApplicationDefinition(name="post", executable="true").save()
    with pytest.raises(FieldError):
        ApplicationDefinition(nme="x")
    assert apps.filter(name="reduce").delete() == 1
    assert apps.count() == 5
