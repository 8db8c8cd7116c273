"""balsam.launcher.dag's module functions and BalsamJob's attributes."""

import pydoc

import pytest

from balsam.exceptions import CycleError, DatabaseError, RefusedError
from balsam.launcher import dag
from balsam.launcher.dag import BalsamJob, add_dependency, add_job, kill, spawn_child
from conftest import history_states


def test_cycles_are_refused_and_change_nothing(db):
    a, b, c = (add_job(name=n, application="generate") for n in "abc")
    add_dependency(a, b)
    add_dependency(b, c)
    for parent, child in [(c, a), (b, a), (a, a)]:
        with pytest.raises(CycleError, match="cycle"):
            add_dependency(parent, child)
    with pytest.raises(RefusedError, match="already a parent"):
        add_dependency(a, b)
    assert [j.name for j in a.get_children()] == ["b"]
    assert [j.name for j in c.get_children()] == []
    assert [j.name for j in a.get_parents()] == []
    # Ids and id prefixes work as with `balsam dep`.
    d = add_job(name="d", application="generate")
    add_dependency(a.job_id[:10], d.job_id)
    assert sorted(j.name for j in a.get_children()) == ["b", "d"]


def test_job_attributes(db):
    job = BalsamJob(name="j/1", workflow="wf", application="say-hello")
    assert job.pk is None and job.state == "CREATED" and job.input_files == "*"
    assert job.max_restarts == 5 and job.wait_for_parents is True and job.data == {}
    job_id = job.job_id
    job.save()
    assert job.job_id == job_id and job.pk is not None
    assert job.working_directory == f"{db}/data/wf/j_1_{job_id[:8]}"
    assert history_states(job.state_history) == ["CREATED"]
    assert repr(job) == f"<BalsamJob [j/1 | {job_id[:8]}] CREATED>"
    with pytest.raises(Exception):
        job.return_code = 3
    other = BalsamJob(name="u", application="say-hello", user_workdir="/tmp/somewhere")
    assert other.working_directory == "/tmp/somewhere"


def test_help_describes_jobs():
    text = pydoc.render_doc(BalsamJob, renderer=pydoc.plaintext)
    for words in ["planned application run", "objects.filter", "num_nodes", "Nodes for an MPI job",
                  "state_history", "read_file_in_workdir", "get_children"]:
        assert words in text, words


def test_current_job_outside_a_job_is_none(db, monkeypatch):
    monkeypatch.delenv("BALSAM_JOB_ID", raising=False)
    assert dag.current_job is None and dag.parents is None and dag.children is None
    with pytest.raises(RefusedError, match="BALSAM_JOB_ID"):
        spawn_child(name="x")


def test_current_job_and_spawn_child(db, monkeypatch):
    parent = add_job(name="master", workflow="hpo", application="say-hello", num_nodes=2, args="--a 1")
    monkeypatch.setenv("BALSAM_JOB_ID", parent.job_id)
    from balsam.launcher.dag import current_job

    assert current_job == parent and current_job.num_nodes == 2
    child = spawn_child(args="--a 2")
    assert (child.name, child.workflow, child.num_nodes, child.args) == ("master_child", "hpo", 2, "--a 2")
    assert [j.name for j in dag.children] == ["master_child"]
    assert [j.name for j in child.get_parents()] == ["master"]


def test_kill_follows_killjob(db):
    a = add_job(name="a", application="generate")
    b = add_job(name="b", application="simulate")
    c = add_job(name="c", application="reduce")
    add_dependency(a, b)
    add_dependency(b, c)
    assert kill(b) == [b.job_id]
    assert b.state == "USER_KILLED"
    assert "Killed by user" in b.state_history
    assert kill(a, recursive=True) == [a.job_id, c.job_id]
    assert {j.name: j.state for j in BalsamJob.objects.all()} == {
        "a": "USER_KILLED", "b": "USER_KILLED", "c": "USER_KILLED"
    }
    assert kill(a) == []


def test_without_a_database_the_error_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("BALSAM_DB_PATH", raising=False)
    with pytest.raises(DatabaseError, match="balsamactivate"):
        BalsamJob.objects.count()
