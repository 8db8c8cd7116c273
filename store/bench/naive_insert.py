"""The naive baseline of the import benchmark: a plain Python `executemany` of the same jobs,
one transaction, into the schema `balsam init` made. Reads the same JSON-lines file; every job
gets a random UUID (v4, as a script would make it) and its CREATED event.

    python3 naive_insert.py DB_FILE JOBS_JSONL
"""
import json
import sqlite3
import sys
import time
import uuid

DEFAULTS = dict(workflow="", name="", description="", input_files="*", stage_in_url="",
                stage_out_files="", stage_out_url="", wall_time_minutes=1, num_nodes=1,
                coschedule_num_nodes=0, ranks_per_node=1, cpu_affinity="none",
                threads_per_rank=1, threads_per_core=1, node_packing_count=1, environ_vars="",
                mpi_flags="", application="", args="", user_workdir="", wait_for_parents=1,
                post_error_handler=0, post_timeout_handler=0, auto_timeout_retry=1,
                max_restarts=5, data="{}")
COLS = list(DEFAULTS)


def rows(path):
    with open(path) as f:
        for line in f:
            job = dict(DEFAULTS)
            job.update(json.loads(line))
            yield [uuid.uuid4().bytes] + [job[c] for c in COLS] + [0]


def main():
    db, path = sys.argv[1], sys.argv[2]
    t0 = time.time()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("BEGIN")
    start = conn.execute("SELECT coalesce(max(pk), 0) FROM jobs").fetchone()[0]
    sql = "INSERT INTO jobs (job_id, %s, state) VALUES (%s)" % (
        ", ".join(COLS), ", ".join("?" * (len(COLS) + 2)))
    conn.executemany(sql, rows(path))
    end = conn.execute("SELECT max(pk) FROM jobs").fetchone()[0]
    now = int(time.time() * 1e6)
    conn.executemany(
        "INSERT INTO events (job, time_us, from_state, to_state, message) VALUES (?, ?, NULL, 0, '')",
        ((pk, now) for pk in range(start + 1, end + 1)))
    conn.execute("COMMIT")
    conn.close()
    print("%.2f" % (time.time() - t0))


if __name__ == "__main__":
    main()
