"""The README's Python section runs as shown: its ``pycon`` blocks as doctests, its ``python``
blocks in order in one namespace, and the postprocess script as a real application's script
under a real launcher."""

import doctest
import os
import re
import sys
from pathlib import Path

from balsam.launcher.dag import ApplicationDefinition, BalsamJob
from conftest import ROOT, stop, wait_for


def python_section_blocks():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(pycon|python)\n(.*?)```", section, flags=re.S)


def test_readme_python_section_runs_as_shown(cli, db, tmp_path, monkeypatch):
    blocks = python_section_blocks()
    assert len(blocks) >= 6, blocks
    # What the snippets expect to find: 10 finished test jobs, an inbox of structures, a home.
    BalsamJob.objects.bulk_create(
        [BalsamJob(name=f"test{i}", workflow="test", application="say-hello") for i in range(1, 11)]
    )
    BalsamJob.objects.all().update(state="JOB_FINISHED")
    monkeypatch.setenv("HOME", str(tmp_path))
    for wf in ["gdb7-m4101-i2-c1", "gdb7-m4012-i1-c6"]:
        (tmp_path / "inbox" / wf).mkdir(parents=True)
        for d in range(3):
            (tmp_path / "inbox" / wf / f"{wf}-d{d}.xyz").write_text("3\n")
    monkeypatch.chdir(tmp_path)
    venv_path = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # Serial mode: the campaign's 64-rank jobs stay where they are; the tasks run.
    launcher = cli.start(
        "launcher", "--num-workers", "2", "--persistent", "--job-mode", "serial",
        log=tmp_path / "launcher.log", env=venv_path,
    )
    try:
        namespace = {}
        for lang, code in blocks:
            if lang == "pycon":
                test = doctest.DocTestParser().get_doctest(code, namespace, "README", "README.md", 0)
                runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
                runner.run(test, out=lambda s: print(s, end=""))
                assert runner.failures == 0, code
            elif code.startswith("# post.py"):
                script = tmp_path / "post.py"
                script.write_text(code)
                ApplicationDefinition(name="sim", executable="echo Hello,", postprocess=f"python3 {script}").save()
                BalsamJob(name="sim", workflow="hooks", application="sim", args="world").save()
            else:
                exec(compile(code, "README.md", "exec"), namespace)
        # What each snippet did.
        reset = [j for j in BalsamJob.objects.filter(name__startswith="test")
                 if "RESTART_READY] User mutated state from Python" in j.state_history]
        assert len(reset) == 10
        assert BalsamJob.objects.filter(application="fhi-aims").count() == 6
        assert sorted(j.name for j in namespace["E"].get_parents()) == ["B", "C", "D"]
        assert namespace["results"].done, namespace["results"]
        assert len(namespace["running"]) == len(namespace["times"]) > 0
        finished = wait_for(
            lambda: dict(BalsamJob.objects.filter(workflow="hooks").values_list("name", "state"))
            == {"sim": "JOB_FINISHED", "sim_child": "JOB_FINISHED"},
            300,
            every=1,
        )
        hooks = dict(BalsamJob.objects.filter(workflow="hooks").values_list("name", "state"))
        assert finished, f"{hooks}\n{(tmp_path / 'launcher.log').read_text()[-3000:]}"
        assert BalsamJob.objects.get(name="sim_child").args == "converged"
    finally:
        stop(launcher)
