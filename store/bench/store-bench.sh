#!/usr/bin/env bash
# The store benchmark of the 1.2M-structure case study, on both backends in one run: import
# 1,200,000 jobs from a JSON-lines file, list them, lease from them, weigh them; a plain Python
# `executemany` of the same jobs as the import's baseline; and, on PostgreSQL, 8 launchers
# leasing at once. Prints each figure beside its target, with the ratios.
#
#   bash store/bench/store-bench.sh [N]     (N defaults to 1200000; WORK=dir keeps the files;
#                                            BACKENDS="sqlite postgres" chooses)
#
# Files live on the disk (/tmp here), never /dev/shm: real sites pay for every file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-1200000}"
backends="${BACKENDS:-sqlite postgres}"
work="${WORK:-$(mktemp -d /tmp/balsam-store-bench.XXXXXX)}"
servers=()
cleanup() {
    local s
    for s in "${servers[@]}"; do "$root/target/release/balsam" server stop --db "$s" >/dev/null 2>&1 || true; done
    [ -n "${WORK:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

bash "$root/src/scripts/install-deps.sh" --postgres --quiet
(cd "$root" && cargo build --release --workspace --quiet)
bin="$root/target/release"

# One line per structure, as the case study's script made them: name, workflow, stage-in file,
# 64 ranks per node with depth affinity.
awk -v n="$n" 'BEGIN {
  for (i = 0; i < n; i++) {
    wf = sprintf("gdb7-m%d-i%d-c%d", i % 5000, i % 7, i % 11);
    printf "{\"name\":\"%s-d%d\",\"workflow\":\"%s\",\"stage_in_url\":\"/projects/CrystalsADSP/xyz/%d.xyz\",\"application\":\"fhi-aims\",\"ranks_per_node\":64,\"cpu_affinity\":\"depth\",\"environ_vars\":\"OMP_NUM_THREADS=1\"}\n", wf, i, wf, i
  }
}' > "$work/jobs.jsonl"

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
declare -A R

run_backend() {
    local be=$1 db="$work/db-$1"
    case $be in
        sqlite) "$bin/balsam" init "$db" >/dev/null ;;
        postgres) "$bin/balsam" init "$db" --postgres >/dev/null; servers+=("$db") ;;
    esac
    export BALSAM_DB_PATH="$db"
    "$bin/balsam" app --name fhi-aims --executable "echo aims" >/dev/null
    R[$be.import]=$(secs "$bin/balsam" job --from-file "$work/jobs.jsonl")
    local jobs
    jobs=$("$bin/balsam" ls --by-states | awk '/^CREATED \(/ { gsub(/\(/, "", $2); print $2 }')
    [ "$jobs" = "$n" ] || { echo "$be: expected $n jobs, found $jobs" >&2; exit 1; }
    # 20% runnable and some finished, so states are mixed as in a real campaign.
    "$bin/balsam-store-probe" prepare "$db" $((n / 5)) 2>/dev/null
    local lease
    lease=$("$bin/balsam-store-probe" lease "$db" 1000 20 --finish 2>&1 >/dev/null)
    R[$be.lease_mean]=$(echo "$lease" | sed -E 's/.*mean ([0-9.]+) ms.*/\1/')
    R[$be.lease_max]=$(echo "$lease" | sed -E 's/.*max ([0-9.]+) ms.*/\1/')
    R[$be.by_states]=$(secs "$bin/balsam" ls --by-states)
    R[$be.run_done]=$(secs "$bin/balsam" ls --state RUN_DONE)
    if [ "$be" = sqlite ]; then
        # A write checkpoints the WAL, so the file size is the database's own.
        "$bin/balsam" app --name checkpoint --executable true >/dev/null
        R[$be.bytes]=$(( $(stat -c %s "$db/balsamdb.sqlite3") / n ))
    else
        R[$be.bytes]=$("$bin/balsam-store-probe" size "$db" 2>/dev/null | awk -v n="$n" '{ printf "%d", $1 / n }')
        # Eight launchers lease at once from the one server, behind a start barrier: every
        # job leased once, and the aggregate rate.
        "$bin/balsam-store-probe" prepare "$db" 100000 2>/dev/null
        rm -f "$work"/probe-*
        local pids=() i t0 t1
        for i in $(seq 8); do
            "$bin/balsam-store-probe" lease "$db" 500 1000 --print --ready "$work/probe-$i.ready" \
                --wait-for "$work/go" >"$work/probe-$i.ids" 2>"$work/probe-$i.err" &
            pids+=($!)
        done
        for i in $(seq 8); do
            for _ in $(seq 600); do [ -e "$work/probe-$i.ready" ] && break; sleep 0.1; done
        done
        t0=$(date +%s.%N); touch "$work/go"
        for p in "${pids[@]}"; do wait "$p"; done
        t1=$(date +%s.%N)
        R[$be.par_jobs]=$(cat "$work"/probe-*.ids | wc -l)
        R[$be.par_twice]=$(cat "$work"/probe-*.ids | sort | uniq -d | wc -l)
        R[$be.par_rate]=$(awk -v n="${R[$be.par_jobs]}" -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", n / (b - a) }')
    fi
    unset BALSAM_DB_PATH
}

for be in $backends; do run_backend "$be"; done
if [[ " $backends " == *" sqlite "* ]]; then
    "$bin/balsam" init "$work/db-naive" >/dev/null
    R[naive]=$(python3 "$here/naive_insert.py" "$work/db-naive/balsamdb.sqlite3" "$work/jobs.jsonl")
fi

f() { [ -n "${R[$1]:-}" ] && printf '%.2f' "${R[$1]}" || printf '%s' '-'; }
echo "balsam store benchmark: $n jobs, $(nproc) cores, files in $work"
printf '%-44s %12s %12s   %s\n' "" SQLite PostgreSQL "target"
printf '%-44s %10s s %10s s   %s\n' "import from JSON lines" "$(f sqlite.import)" "$(f postgres.import)" \
    "PostgreSQL <= SQLite: $( [ -n "${R[postgres.import]:-}" ] && [ -n "${R[sqlite.import]:-}" ] && ratio "${R[postgres.import]}" "${R[sqlite.import]}" || echo -)"
if [ -n "${R[naive]:-}" ]; then
    printf '%-44s %10s s %12s   %s\n' "  plain Python executemany, same rows" "$(f naive)" "" \
        "SQLite import <= 0.6 of it: $(ratio "${R[sqlite.import]}" "${R[naive]}")"
fi
printf '%-44s %10s s %10s s   %s\n' "ls --by-states" "$(f sqlite.by_states)" "$(f postgres.by_states)" "<= 1 s"
printf '%-44s %10s s %10s s   %s\n' "ls --state RUN_DONE (limit 5000)" "$(f sqlite.run_done)" "$(f postgres.run_done)" "<= 1 s"
printf '%-44s %8s ms %8s ms   %s\n' "lease 1000 runnable jobs, mean of 20" "${R[sqlite.lease_mean]:--}" "${R[postgres.lease_mean]:--}" "<= 50 ms"
printf '%-44s %8s ms %8s ms\n' "  the slowest of the 20" "${R[sqlite.lease_max]:--}" "${R[postgres.lease_max]:--}"
printf '%-44s %7s B/job %5s B/job\n' "on disk" "${R[sqlite.bytes]:--}" "${R[postgres.bytes]:--}"
if [ -n "${R[postgres.par_jobs]:-}" ]; then
    printf '%-44s %12s %12s   %s\n' "8 launchers leasing at once: jobs leased" "" "${R[postgres.par_jobs]}" ""
    printf '%-44s %12s %12s   %s\n' "  leased twice" "" "${R[postgres.par_twice]}" "0"
    printf '%-44s %12s %8s jobs/s\n' "  aggregate lease rate" "" "${R[postgres.par_rate]}"
fi
