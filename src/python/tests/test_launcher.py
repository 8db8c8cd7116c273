"""The package inside real launchers: a DeepHyper-like master, Python pre/post scripts, and
Python writing beside the CLI and a launcher."""

import subprocess
import textwrap
import threading

from balsam.launcher.dag import ApplicationDefinition, BalsamJob
from conftest import CMD_TIMEOUT, history_states, python_exe, stop, wait_for

LAUNCHER_TIMEOUT = 300


def script(path, body):
    path.write_text(textwrap.dedent(body))
    return f"{python_exe()} {path}"


def run_launcher(cli, tmp_path, name="launcher"):
    """`balsam launcher --num-workers 2` until it exits by itself (no work left)."""
    log = tmp_path / f"{name}.log"
    proc = cli.start("launcher", "--num-workers", "2", log=log)
    try:
        code = proc.wait(LAUNCHER_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"launcher still running after {LAUNCHER_TIMEOUT} s:\n{log.read_text()}")
    return code, log.read_text()


def test_deephyper_master_adds_tasks_and_waits_for_them(cli, db, tmp_path):
    ApplicationDefinition(
        name="evaluate",
        executable=script(tmp_path / "evaluate.py", """
            import sys
            x = int(sys.argv[1])
            print(x * x)
        """),
    ).save()
    ApplicationDefinition(
        name="search",
        executable=script(tmp_path / "master.py", """
            from balsam.launcher.dag import add_job, current_job
            from balsam.launcher.futures import FutureTask, wait

            def on_done(job):
                return job.read_file_in_workdir(f"{job.name}.out").strip()

            futures = []
            for i in range(10):
                job = add_job(name=f"eval{i}", workflow=current_job.workflow,
                              application="evaluate", args=str(i))
                futures.append(FutureTask(job, on_done))
            active, done, failed, cancelled = wait(futures, return_when="ALL_COMPLETED", timeout=240)
            assert not active and not failed and not cancelled, (active, failed, cancelled)
            with open("results.txt", "w") as f:
                for fut in futures:
                    f.write(f"{fut.job.name} {fut.result()}\\n")
        """),
    ).save()
    # Every job takes a whole node (node_packing_count 1): the master holds one of the two
    # workers while it waits, and its tasks must all run on the other, none queued behind it.
    master = BalsamJob(name="master", workflow="hpo", application="search")
    master.save()

    code, log = run_launcher(cli, tmp_path)

    assert code == 0, log
    states = dict(BalsamJob.objects.values_list("name", "state"))
    master.refresh_from_db()
    assert states == {"master": "JOB_FINISHED", **{f"eval{i}": "JOB_FINISHED" for i in range(10)}}, (
        f"{master.state_history}\n{log}"
    )
    master.refresh_from_db()
    assert master.read_file_in_workdir("results.txt") == "".join(f"eval{i} {i * i}\n" for i in range(10))
    assert BalsamJob.objects.filter(workflow="hpo").count() == 11


def test_python_pre_and_post_scripts_read_current_job_and_add_jobs(cli, db, tmp_path):
    ApplicationDefinition(
        name="hooked",
        executable="echo main",
        preprocess=script(tmp_path / "pre.py", """
            from balsam.launcher.dag import add_job, current_job
            assert current_job.state == "STAGED_IN", current_job.state
            current_job.data = {"seen_by": "pre", "name": current_job.name}
            current_job.save()
            add_job(name=current_job.name + "-extra", workflow="hooks", application="say-hello",
                    args="from pre")
        """),
        postprocess=script(tmp_path / "post.py", """
            from balsam.launcher import dag
            job = dag.current_job
            assert job.state == "RUN_DONE", job.state
            assert job.data["seen_by"] == "pre"
            child = dag.spawn_child(application="say-hello", args="from post")
            print("spawned", child.name)
        """),
    ).save()
    ApplicationDefinition(
        name="flaky",
        executable="false",
        postprocess=script(tmp_path / "on_error.py", """
            import os
            from balsam.launcher.dag import current_job
            assert os.environ["BALSAM_JOB_ERROR"] == "TRUE"
            # An error handler sends the job back; a script's restarts count toward
            # max_restarts, so it cannot loop forever.
            current_job.state = "RESTART_READY"
            current_job.save()
        """),
    ).save()
    BalsamJob(name="hooked", workflow="hooks", application="hooked").save()
    BalsamJob(name="flaky", workflow="hooks", application="flaky", post_error_handler=True,
              max_restarts=2).save()

    code, log = run_launcher(cli, tmp_path)

    assert code == 0, log
    states = dict(BalsamJob.objects.values_list("name", "state"))
    assert states == {
        "hooked": "JOB_FINISHED",
        "hooked-extra": "JOB_FINISHED",
        "hooked_child": "JOB_FINISHED",
        "flaky": "FAILED",
    }, log
    hooked = BalsamJob.objects.get(name="hooked")
    assert hooked.data == {"seen_by": "pre", "name": "hooked"}
    assert [j.name for j in hooked.get_children()] == ["hooked_child"]
    assert BalsamJob.objects.get(name="hooked-extra").read_file_in_workdir("hooked-extra.out") == "Hello, from pre\n"
    assert BalsamJob.objects.get(name="hooked_child").args == "from post"
    flaky = BalsamJob.objects.get(name="flaky")
    assert history_states(flaky.state_history).count("RUN_ERROR") == 3, flaky.state_history
    assert "restart limit reached" in flaky.state_history


def test_python_the_cli_and_a_launcher_write_at_once(cli, db, tmp_path):
    ApplicationDefinition(name="quick", executable="true").save()
    launcher = cli.start("launcher", "--num-workers", "2", "--persistent", log=tmp_path / "launcher.log")
    errors = []
    cli_outputs = []

    def python_writer():
        try:
            for batch in range(20):
                BalsamJob.objects.bulk_create(
                    [BalsamJob(name=f"py{batch}-{i}", workflow="py", application="quick") for i in range(50)]
                )
                BalsamJob(name=f"single{batch}", workflow="py", application="quick").save()
                BalsamJob.objects.filter(workflow="py", state="CREATED").update(wall_time_minutes=2)
                BalsamJob.objects.filter(workflow="cli").count()
        except Exception as e:  # reported by the test below
            errors.append(repr(e))

    def cli_writer():
        lines = "".join(f'{{"name": "file{i}", "workflow": "cli"}}\n' for i in range(200))
        (tmp_path / "jobs.jsonl").write_text(lines)
        cli_outputs.append(cli.run("job", "--from-file", str(tmp_path / "jobs.jsonl"), "--app", "quick", "--yes", check=False))
        for i in range(20):
            p = cli.run("job", "--name", f"cli{i}", "--workflow", "cli", "--app", "quick", "--yes", check=False)
            cli_outputs.append(p)

    try:
        threads = [threading.Thread(target=python_writer), threading.Thread(target=cli_writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CMD_TIMEOUT * 4)
            assert not t.is_alive(), "a writer did not finish"
        assert errors == []
        for p in cli_outputs:
            assert p.returncode == 0, p.stderr
            assert "locked" not in p.stderr
        total = 20 * 51 + 200 + 20
        assert BalsamJob.objects.count() == total
        done = wait_for(
            lambda: BalsamJob.objects.filter(state="JOB_FINISHED").count() == total, LAUNCHER_TIMEOUT, every=1
        )
        left = BalsamJob.objects.exclude(state="JOB_FINISHED").values_list("name", "state")[:10]
        assert done, f"not finished: {left}\n{(tmp_path / 'launcher.log').read_text()[-3000:]}"
    finally:
        stop(launcher)
    log = (tmp_path / "launcher.log").read_text()
    assert "locked" not in log, log
    assert BalsamJob.objects.filter(workflow="py", wall_time_minutes=2).count() > 0
