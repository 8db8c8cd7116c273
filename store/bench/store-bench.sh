#!/usr/bin/env bash
# The store benchmark of the 1.2M-structure case study: import 1,200,000 jobs from a JSON-lines
# file, list them, lease from them, and weigh them on disk. Prints each figure beside its target.
#
#   bash store/bench/store-bench.sh [N]        (N defaults to 1200000; WORK=dir to keep files)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-1200000}"
work="${WORK:-$(mktemp -d /tmp/balsam-store-bench.XXXXXX)}"
cleanup() { [ -n "${WORK:-}" ] || rm -rf "$work"; }
trap cleanup EXIT

(cd "$root" && cargo build --release --workspace --quiet)
bin="$root/target/release"
export BALSAM_DB_PATH="$work/db"
"$bin/balsam" init "$BALSAM_DB_PATH" >/dev/null
"$bin/balsam" app --name fhi-aims --executable "echo aims" >/dev/null

# One line per structure, as the case study's script made them: name, workflow, stage-in file,
# 64 ranks per node with depth affinity.
awk -v n="$n" 'BEGIN {
  for (i = 0; i < n; i++) {
    wf = sprintf("gdb7-m%d-i%d-c%d", i % 5000, i % 7, i % 11);
    printf "{\"name\":\"%s-d%d\",\"workflow\":\"%s\",\"stage_in_url\":\"/projects/CrystalsADSP/xyz/%d.xyz\",\"application\":\"fhi-aims\",\"ranks_per_node\":64,\"cpu_affinity\":\"depth\",\"environ_vars\":\"OMP_NUM_THREADS=1\"}\n", wf, i, wf, i
  }
}' > "$work/jobs.jsonl"

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'; }
fmt() { printf '%.2f' "$1"; }

t_import=$(secs "$bin/balsam" job --from-file "$work/jobs.jsonl")
jobs=$("$bin/balsam" ls --by-states | awk '/^CREATED \(/ { gsub(/\(/, "", $2); print $2 }')
[ "$jobs" = "$n" ] || { echo "expected $n jobs, found $jobs" >&2; exit 1; }

# Make 20% of the jobs runnable and finish some, so states are mixed as in a real campaign.
"$bin/balsam-store-probe" prepare "$BALSAM_DB_PATH" $((n / 5)) 2>/dev/null
lease_line=$("$bin/balsam-store-probe" lease "$BALSAM_DB_PATH" 1000 20 --finish 2>&1 >/dev/null)
lease_mean=$(echo "$lease_line" | sed -E 's/.*mean ([0-9.]+) ms.*/\1/')
lease_max=$(echo "$lease_line" | sed -E 's/.*max ([0-9.]+) ms.*/\1/')

t_by_states=$(secs "$bin/balsam" ls --by-states)
t_run_done=$(secs "$bin/balsam" ls --state RUN_DONE)
t_created=$(secs "$bin/balsam" ls --state CREATED)

# Checkpoint the WAL so the file size is the database's own.
"$bin/balsam" ls --state FAILED >/dev/null
bytes=$(stat -c %s "$BALSAM_DB_PATH/balsamdb.sqlite3")
wal=$(stat -c %s "$BALSAM_DB_PATH/balsamdb.sqlite3-wal" 2>/dev/null || echo 0)

echo "balsam store benchmark: $n jobs ($(nproc) cores)"
printf '  import from JSON lines:          %8s s   (%d jobs/s; target <= 20 s)\n' "$(fmt "$t_import")" "$(awk -v n="$n" -v t="$t_import" 'BEGIN { printf "%d", n / t }')"
printf '  ls --by-states:                  %8s s   (target <= 1 s)\n' "$(fmt "$t_by_states")"
printf '  ls --state RUN_DONE (limit 5000): %7s s   (target <= 1 s)\n' "$(fmt "$t_run_done")"
printf '  ls --state CREATED (limit 5000):  %7s s\n' "$(fmt "$t_created")"
printf '  lease 1000 runnable jobs:        %8s ms mean, %s ms max over 20 leases (target <= 50 ms)\n' "$lease_mean" "$lease_max"
printf '  on disk:                         %8d bytes/job (%d MB database, %d MB WAL)\n' $((bytes / n)) $((bytes / 1048576)) $((wal / 1048576))
