"""The Python package's benchmarks (see bench.sh). Prints each figure and its ratio to the
baseline measured in the same run."""

import json
import os
import resource
import subprocess
import sys
import time

N = int(sys.argv[1])
WORK = sys.argv[2]
CLI = os.environ["BALSAM_BIN"]
UPDATE_N = min(500_000, N)
FUTURES_N = min(10_000, N)
WAIT_SECONDS = 60


def structure(i):
    """The case study's job for structure i (the fields of the talk's prep_job); the first
    UPDATE_N are told apart by their description, for the update."""
    wf = f"gdb7-m{i % 5000}-i{i % 7}-c{i % 11}"
    return {
        "name": f"{wf}-d{i}",
        "workflow": wf,
        "description": "batch A" if i < UPDATE_N else "batch B",
        "stage_in_url": f"/projects/CrystalsADSP/xyz/{i}.xyz",
        "application": "fhi-aims",
        "ranks_per_node": 64,
        "cpu_affinity": "depth",
        "environ_vars": "OMP_NUM_THREADS=1",
    }


def new_db(name):
    path = os.path.join(WORK, name)
    subprocess.run([CLI, "init", path], check=True, capture_output=True)
    env = dict(os.environ, BALSAM_DB_PATH=path)
    subprocess.run([CLI, "app", "--name", "fhi-aims", "--executable", "echo aims"],
                   check=True, capture_output=True, env=env)
    os.environ["BALSAM_DB_PATH"] = path
    return env


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def futures_cpu():
    """Run in a process of its own: the CPU it uses while waiting on FUTURES_N futures whose
    jobs never end, and the cost of one round's query."""
    from balsam import _native
    from balsam.launcher import futures as fmod
    from balsam.launcher.dag import BalsamJob
    from balsam.launcher.futures import FutureTask, wait

    jobs = list(BalsamJob.objects.filter(description="batch A")[:FUTURES_N])
    fs = [FutureTask(j, str) for j in jobs]
    pks = [j.pk for j in jobs]
    t0 = time.perf_counter()
    for _ in range(10):
        _native.job_states(pks)
    per_query = (time.perf_counter() - t0) / 10
    rounds = []
    real = _native.job_states
    _native.job_states = lambda p: (rounds.append(1), real(p))[1]
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = wait(fs, timeout=WAIT_SECONDS, return_when=fmod.ALL_COMPLETED)
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    assert len(res.active) == FUTURES_N
    print(json.dumps({"cpu": cpu, "wall": wall, "rounds": len(rounds), "per_query": per_query}))


def main():
    from balsam.launcher.dag import BalsamJob

    jsonl = os.path.join(WORK, "jobs.jsonl")
    with open(jsonl, "w") as f:
        for i in range(N):
            f.write(json.dumps(structure(i)) + "\n")

    # Baseline: the CLI's import of the same jobs.
    env = new_db("cli-db")
    t0 = time.perf_counter()
    subprocess.run([CLI, "job", "--from-file", jsonl], check=True, capture_output=True, env=env)
    t_cli = time.perf_counter() - t0

    # bulk_create, with the jobs made as the talk's script makes them.
    new_db("py-db")
    t0 = time.perf_counter()
    jobs = [BalsamJob(**structure(i)) for i in range(N)]
    t_make = time.perf_counter() - t0
    t0 = time.perf_counter()
    BalsamJob.objects.bulk_create(jobs)
    t_bulk = time.perf_counter() - t0
    del jobs
    assert BalsamJob.objects.count() == N

    # The campaign finishes; then half a million finished jobs are sent back.
    t0 = time.perf_counter()
    BalsamJob.objects.all().update(state="JOB_FINISHED")
    t_finish = time.perf_counter() - t0
    t0 = time.perf_counter()
    updated = BalsamJob.objects.filter(description="batch A", state="JOB_FINISHED").update(
        state="RESTART_READY"
    )
    t_update = time.perf_counter() - t0
    assert updated == UPDATE_N

    out = subprocess.run([sys.executable, __file__, str(N), WORK, "futures"],
                         check=True, capture_output=True, text=True)
    fut = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"balsam Python package benchmark: {N} jobs ({os.cpu_count()} cores, files in {WORK})")
    print(f"  balsam job --from-file (baseline): {t_cli:8.2f} s  ({N / t_cli:,.0f} jobs/s)")
    print(f"  bulk_create:                       {t_bulk:8.2f} s  ({N / t_bulk:,.0f} jobs/s; "
          f"{t_cli / t_bulk:.2f} of the baseline's rate; target >= 0.5)")
    print(f"  making the {N} BalsamJob objects: {t_make:6.2f} s  (with bulk_create: "
          f"{t_cli / (t_make + t_bulk):.2f} of the baseline's rate)")
    print(f"  update(state='JOB_FINISHED') of all {N}: {t_finish:6.2f} s  ({N / t_finish:,.0f} jobs/s; "
          f"{t_cli / t_finish:.2f} of the import's rate)")
    print(f"  filter(...).update(state='RESTART_READY') of {updated}: {t_update:6.2f} s  "
          f"({updated / t_update:,.0f} jobs/s; {updated * t_cli / (N * t_update):.2f} of the import's rate)")
    print(f"  waiting on {FUTURES_N} futures for {fut['wall']:.0f} s: {100 * fut['cpu'] / fut['wall']:.2f} % of a core, "
          f"{fut['rounds']} queries ({fut['rounds'] / fut['wall']:.2f}/s; one query of {FUTURES_N} states: "
          f"{1000 * fut['per_query']:.1f} ms)")


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "futures":
        os.environ["BALSAM_DB_PATH"] = os.path.join(WORK, "py-db")
        futures_cpu()
    else:
        main()
