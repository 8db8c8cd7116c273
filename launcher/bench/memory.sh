#!/usr/bin/env bash
# Rank 0's memory over a large database: N serial /bin/true jobs (default 1,200,000, the store
# benchmark's case-study size), one master and two workers working through them for SECONDS
# (default 120; the launcher's own time limit stops it cleanly). Reports rank 0's peak resident
# set (VmHWM) and how many jobs it finished. Target: under 100 MB.
#
#   bash launcher/bench/memory.sh [N]
#
# Environment: BENCH_DIR (default /var/tmp: a disk file system, as at a real site), SECONDS_TO_RUN, WORKERS.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-1200000}"
run_s="${SECONDS_TO_RUN:-120}"
workers="${WORKERS:-2}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
work="$(mktemp -d "$BENCH_DIR/balsam-memory.XXXXXX")"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
command -v sqlite3 >/dev/null || { echo "needs sqlite3 (apt-get install sqlite3)" >&2; exit 1; }
(cd "$root" && cargo build --release --workspace --quiet)
export PATH="$root/target/release:$PATH"
export BALSAM_DB_PATH="$work/db"
balsam init "$BALSAM_DB_PATH" >/dev/null
balsam app --name true --executable /bin/true >/dev/null
# wall_time_minutes 0: every job fits the launcher's short time limit.
awk -v n="$n" 'BEGIN { for (i = 0; i < n; i++) printf "{\"name\":\"m%d\",\"workflow\":\"wf%d\",\"application\":\"true\",\"wall_time_minutes\":0}\n", i, i % 5000 }' > "$work/jobs.jsonl"
t0=$(date +%s.%N)
balsam job --from-file "$work/jobs.jsonl" --yes >/dev/null
t1=$(date +%s.%N)
rm -f "$work/jobs.jsonl"

minutes=$(awk -v s="$run_s" 'BEGIN { print s / 60 }')
MPIEXEC_TIMEOUT=$((run_s + 300)) balsam launcher --num-workers "$workers" --consume-all \
    --time-limit-minutes "$minutes" 2> "$work/launcher.log" &
launcher=$!
db="$BALSAM_DB_PATH/balsamdb.sqlite3"
pid=""
for _ in $(seq 200); do
    pid=$(sqlite3 "$db" "SELECT pid FROM sessions ORDER BY id DESC LIMIT 1" 2>/dev/null || true)
    [ -n "$pid" ] && [ -r "/proc/$pid/status" ] && break
    sleep 0.1
done
[ -n "$pid" ] || { echo "the launcher did not start; see $work/launcher.log" >&2; exit 1; }
peak=0 rss_samples=""
while kill -0 "$pid" 2>/dev/null; do
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$hwm" ] && [ "$hwm" -gt "$peak" ] && peak=$hwm
    sleep 1
done
wait "$launcher" || true
finished=$(sqlite3 "$db" "SELECT count(*) FROM jobs WHERE state = 8")
preprocessed=$(sqlite3 "$db" "SELECT count(*) FROM jobs WHERE state IN (4, 11)")
mb=$((peak / 1024))
echo "balsam launcher memory: $n jobs in the database ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s to import), 1 master + $workers workers for $run_s s"
echo "  rank 0 (pid $pid) peak resident set: $mb MB (target < 100 MB)"
echo "  jobs finished: $finished; runnable when it stopped: $preprocessed"
[ "$mb" -lt 100 ] || echo "  OVER TARGET"
