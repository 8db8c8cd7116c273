"""Fixtures of the Python package's tests.

Each test gets a new database: SQLite, or with BALSAM_TEST_BACKEND=postgres a new database on
the server of BALSAM_TEST_PG_URL (tests/pg/server.sh). BALSAM_DB_PATH points at it for the
test. The ``balsam`` command and the launcher are the workspace's binaries, found in
BALSAM_BIN_DIR (default: target/debug of the checkout). Every process a test starts has a
timeout and is stopped by its pid.
"""

import itertools
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

import balsam

ROOT = Path(__file__).resolve().parents[3]
BIN_DIR = Path(os.environ.get("BALSAM_BIN_DIR", ROOT / "target" / "debug"))
BACKEND = os.environ.get("BALSAM_TEST_BACKEND", "sqlite")
# Generous: the machine is shared, and builds run beside the tests.
CMD_TIMEOUT = 120
_serial = itertools.count()


def pytest_report_header(config):
    return f"balsam backend: {BACKEND}; binaries: {BIN_DIR}"


def _pg_url():
    url = os.environ["BALSAM_TEST_PG_URL"]
    parts = urllib.parse.urlsplit(url)
    name = f"py_{os.getpid()}_{next(_serial)}_{int(time.time() * 1000) % 10**7}"
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def make_database(path):
    """A new database directory at ``path`` on the backend under test."""
    if BACKEND == "postgres":
        return balsam.create_database(path, _pg_url())
    return balsam.create_database(path)


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A new, active database with the talk's applications registered."""
    from balsam.launcher.dag import ApplicationDefinition

    root = make_database(tmp_path / "test-db")
    monkeypatch.setenv("BALSAM_DB_PATH", root)
    monkeypatch.delenv("BALSAM_JOB_ID", raising=False)
    for name, exe in [
        ("say-hello", "echo Hello,"),
        ("generate", "true"),
        ("simulate", "true"),
        ("reduce", "true"),
        ("fhi-aims", "true"),
    ]:
        ApplicationDefinition(name=name, executable=exe).save()
    return Path(root)


class Cli:
    """Runs the ``balsam`` command against the test's database."""

    def __init__(self, db_path):
        self.db_path = str(db_path)
        self.exe = str(BIN_DIR / "balsam")

    def env(self, extra=None):
        env = dict(os.environ)
        env["BALSAM_DB_PATH"] = self.db_path
        env.pop("BALSAM_JOB_ID", None)
        env.update(extra or {})
        return env

    def run(self, *args, check=True, timeout=CMD_TIMEOUT, input=None):
        p = subprocess.run(
            [self.exe, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        assert "panicked" not in p.stderr, p.stderr
        if check and p.returncode != 0:
            raise AssertionError(f"balsam {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
        return p

    def start(self, *args, log, env=None):
        """Starts ``balsam ARGS`` in the background (its own process group)."""
        out = open(log, "w")
        return subprocess.Popen(
            [self.exe, *args],
            env=self.env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@pytest.fixture
def cli(db):
    if not (BIN_DIR / "balsam").is_file():
        pytest.fail(f"no balsam binary in {BIN_DIR}: run `cargo build --workspace` first")
    return Cli(db)


def stop(proc, timeout=30):
    """Stops a process started by a test: SIGTERM to its group, then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def wait_for(cond, timeout, every=0.2):
    """Polls ``cond`` until it holds or ``timeout`` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


def python_exe():
    """The interpreter of this virtual environment (jobs' Python scripts use it)."""
    return sys.executable


def history_states(text):
    """The states of a history, in order."""
    return re.findall(r"^\[\S+ \S+ (\w+)\]", text, flags=re.M)
