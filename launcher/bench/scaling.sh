#!/usr/bin/env bash
# Weak scaling of the launcher: jobs of `sleep 1`, 8 per slot, with 2, 4, 8 and 16 worker ranks
# (one slot each: node_packing_count 1 on one synthetic node per worker). The ranks oversubscribe
# this machine's cores, which works only because no rank busy-waits.
#
#   bash launcher/bench/scaling.sh [WORKER_COUNTS...]      (default: 2 4 8 16)
#
# Efficiency = ideal makespan (8 jobs x 1 s = 8 s) / measured makespan, the makespan being first
# RUNNING to last RUN_DONE in the state history. Target: at least 0.95 at every size.
# Environment: BENCH_DIR (default /var/tmp: a disk file system, as at a real site), PER_SLOT (default 8),
# SECONDS_PER_JOB (default 1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(2 4 8 16)
per_slot="${PER_SLOT:-8}"
secs="${SECONDS_PER_JOB:-1}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
work="$(mktemp -d "$BENCH_DIR/balsam-scaling.XXXXXX")"
trap 'rm -rf "$work"' EXIT
command -v sqlite3 >/dev/null || { echo "needs sqlite3 (apt-get install sqlite3)" >&2; exit 1; }
(cd "$root" && cargo build --release --workspace --quiet)
export PATH="$root/target/release:$PATH"

echo "balsam launcher weak scaling: sleep $secs, $per_slot jobs per slot, $(nproc) cores"
printf '  %7s  %5s  %9s  %9s  %10s\n' workers jobs ideal makespan efficiency
for w in "${sizes[@]}"; do
    export BALSAM_DB_PATH="$work/db$w"
    balsam init "$BALSAM_DB_PATH" >/dev/null
    balsam app --name sleep --executable "sleep $secs" >/dev/null
    n=$((w * per_slot))
    awk -v n="$n" 'BEGIN { for (i = 0; i < n; i++) printf "{\"name\":\"s%d\",\"workflow\":\"scale\",\"application\":\"sleep\"}\n", i }' > "$work/jobs$w.jsonl"
    balsam job --from-file "$work/jobs$w.jsonl" --yes >/dev/null
    MPIEXEC_TIMEOUT=600 balsam launcher --num-workers "$w" --consume-all 2> "$work/launcher$w.log"
    q() { sqlite3 "$BALSAM_DB_PATH/balsamdb.sqlite3" "$1"; }
    done_n=$(q "SELECT count(*) FROM jobs WHERE state = 8")
    [ "$done_n" = "$n" ] || { echo "only $done_n of $n jobs finished with $w workers" >&2; cat "$work/launcher$w.log" >&2; exit 1; }
    span=$(q "SELECT (max(CASE WHEN to_state = 6 THEN time_us END) - min(CASE WHEN to_state = 5 THEN time_us END)) / 1e6 FROM events")
    ideal=$((per_slot * secs))
    printf '  %7d  %5d  %8ds  %8.2fs  %10.3f\n' "$w" "$n" "$ideal" "$span" "$(awk -v i="$ideal" -v s="$span" 'BEGIN { print i / s }')"
done
