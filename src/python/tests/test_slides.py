"""The talk's Python slides, as written (only ``async`` becomes ``futures``)."""

import os

from conftest import history_states, stop, wait_for


def test_modify_slide_resets_finished_test_jobs(db):
    from balsam.launcher.dag import BalsamJob

    for i in range(1, 11):
        BalsamJob(name=f"test{i}", workflow="test", application="say-hello").save()
    BalsamJob(name="test-big", workflow="test", application="say-hello", num_nodes=256).save()
    BalsamJob(name="other", workflow="test", application="say-hello").save()
    BalsamJob(name="test-new", workflow="test", application="say-hello").save()
    BalsamJob.objects.exclude(name="test-new").update(state="JOB_FINISHED")

    n = BalsamJob.objects.filter(num_nodes__lte=128, name__contains="test", state="JOB_FINISHED").update(
    state="RESTART_READY")

    assert n == 10
    states = dict(BalsamJob.objects.values_list("name", "state"))
    assert all(states[f"test{i}"] == "RESTART_READY" for i in range(1, 11)), states
    assert states["test-big"] == "JOB_FINISHED"
    assert states["other"] == "JOB_FINISHED"
    assert states["test-new"] == "CREATED"
    job = BalsamJob.objects.get(name="test3")
    assert history_states(job.state_history) == ["CREATED", "JOB_FINISHED", "RESTART_READY"]
    assert "User mutated state from Python" in job.state_history.splitlines()[-1]


def test_bulk_create_slide_populates_the_database(db, tmp_path):
    from balsam.launcher.dag import BalsamJob

    inbox_path = tmp_path / "inbox"
    for wf in ["gdb7-m4101-i2-c1", "gdb7-m4012-i1-c6"]:
        (inbox_path / wf).mkdir(parents=True)
        for d in range(5):
            (inbox_path / wf / f"{wf}-d{d}.xyz").write_text("3\n")
        (inbox_path / wf / "notes.txt").write_text("not a structure\n")

    def prep_job(name, workflow, xyz_path):
        return BalsamJob(name=name,
                        workflow = workflow,
                        stage_in_url = xyz_path,
                        application = 'fhi-aims',
                        ranks_per_node=64,
                        cpu_affinity='depth',
                        environ_vars="OMP_NUM_THREADS=1",
                        )

    created = 0
    for (dirpath, dirnames, filenames) in os.walk(inbox_path):
        xyz_files = [f for f in filenames if f.endswith('.xyz')]
        new_jobs = []
        for f in xyz_files:
            name = os.path.splitext(f)[0]
            workflow = os.path.basename(dirpath)
            xyz_path = os.path.join(dirpath, f)
            job = prep_job(name, workflow, xyz_path)
            new_jobs.append(job)
        BalsamJob.objects.bulk_create(new_jobs)
        created += len(new_jobs)
    print("Created", len(new_jobs), "new jobs in DB")

    assert created == 10
    assert BalsamJob.objects.count() == 10
    assert BalsamJob.objects.filter(workflow="gdb7-m4101-i2-c1").count() == 5
    job = BalsamJob.objects.get(name="gdb7-m4012-i1-c6-d3")
    assert job.stage_in_url == str(inbox_path / "gdb7-m4012-i1-c6" / "gdb7-m4012-i1-c6-d3.xyz")
    assert (job.ranks_per_node, job.cpu_affinity, job.environ_vars) == (64, "depth", "OMP_NUM_THREADS=1")
    assert job.state == "CREATED"
    assert history_states(job.state_history) == ["CREATED"]


def test_dependencies_slide_builds_the_dag(db):
    from balsam.launcher.dag import (
        add_job, add_dependency)

    A = add_job(name="A", application="generate")
    B,C,D = [
        add_job(
            name=name,
            application="simulate",
            input_files=name+".inp"
        )
        for name in "BCD"
    ]
    E = add_job(name="E", application="reduce", input_files="*.out")

    for job in B,C,D:
        add_dependency(A, job)
        add_dependency(job, E)

    assert sorted(j.name for j in A.get_children()) == ["B", "C", "D"]
    assert sorted(j.name for j in E.get_parents()) == ["B", "C", "D"]
    assert [j.name for j in B.get_parents()] == ["A"]
    assert [j.name for j in B.get_children()] == ["E"]
    assert (B.input_files, E.input_files) == ("B.inp", "*.out")
    assert A.get_parents().count() == 0


def test_futures_slide_waits_for_tasks_run_by_a_launcher(cli, db, tmp_path):
    from balsam.launcher.dag import add_job
    from balsam.launcher.futures import wait, FutureTask

    launcher = cli.start("launcher", "--num-workers", "2", "--persistent", log=tmp_path / "launcher.log")
    try:
        def on_done(job):
            return job.read_file_in_workdir(f'{job.name}.out')

        futures = []
        for i in range(10):
            j = add_job(name=f'task{i}',
                        application='say-hello',
                        args=f'world {i}!'
                        )
            futures.append(FutureTask(j, on_done))

        results = wait(futures, return_when='ANY_COMPLETED', timeout=30)

        active, done, failed, cancelled = results
        assert done, f"no task finished within 30 s; launcher log:\n{(tmp_path / 'launcher.log').read_text()}"
        assert not failed and not cancelled
        for f in done:
            i = f.job.name[len("task"):]
            assert f.result() == f"Hello, world {i}!\n"
        rest = wait(futures, return_when="ALL_COMPLETED", timeout=120)
        assert len(rest.done) == 10, rest
        assert sorted(f.result() for f in futures) == sorted(f"Hello, world {i}!\n" for i in range(10))
    finally:
        assert stop(launcher) is not None
