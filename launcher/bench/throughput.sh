#!/usr/bin/env bash
# Launcher throughput: N jobs of /bin/true (default 20,000) through `balsam launcher --job-mode
# serial` with one master and two worker ranks, against the machine's limit measured in the same
# run.
#
#   bash launcher/bench/throughput.sh [N]
#
# Runs on each backend of BACKENDS (default "sqlite postgres": the embedded file, and a private
# PostgreSQL server made with `balsam init --postgres`) in the same run, and prints PostgreSQL's
# figures as a ratio to SQLite's (target: within 10%).
#
# Prints, each measured here and now:
#   - loop:      two threads spawning and waiting for /bin/true in a loop (examples/spawn_baseline),
#                the ceiling of any task farm on this machine, run before and after the launcher
#                (the ratios use the mean; a warning says when the two differ by more than 10%);
#   - parallel:  GNU parallel -j2 on the same N commands (when installed);
#   - launcher:  from its start to the last JOB_FINISHED, and from its start to its exit (with the
#                default idle rules: it leaves as soon as nothing more can arrive), each as jobs/s
#                and as a ratio to the loop; and the run phase (first RUNNING to last RUN_DONE).
#
# Environment: BENCH_DIR (where the database goes; default /var/tmp, which should be a disk file
# system: every job's working directory and output file cost what real sites pay, which /dev/shm
# hides), WORKERS (default 2), KEEP=1 to keep the database, PARALLEL=0 to leave out GNU parallel,
# ROUNDS=K to run the backends K times in turn, in alternating order, and print each round's
# PostgreSQL / SQLite ratio and their median (this machine's speed drifts within minutes; a
# round's two runs are neighbours in time). The full figures shown are the last round's.
# SERVER_NICE (default 0) is the PostgreSQL server's nice value during the run (see below).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-20000}"
workers="${WORKERS:-2}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
fs=$(stat -f -c %T "$BENCH_DIR")
case "$fs" in
    tmpfs|ramfs) echo "warning: $BENCH_DIR is $fs, not a disk: per-job files cost less than at a real site" >&2 ;;
esac
work="$(mktemp -d "$BENCH_DIR/balsam-throughput.XXXXXX")"
backends="${BACKENDS:-sqlite postgres}"
servers=()
cleanup() {
    local s
    for s in "${servers[@]}"; do "$root/target/release/balsam" server stop --db "$s" >/dev/null 2>&1 || true; done
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

command -v sqlite3 >/dev/null || { echo "needs sqlite3 (apt-get install sqlite3)" >&2; exit 1; }
case " $backends " in
    *" postgres "*) bash "$root/src/scripts/install-deps.sh" --postgres --quiet ;;
esac
(cd "$root" && cargo build --release --workspace --quiet && cargo build --release -p balsam-launcher --examples --quiet)
bin="$root/target/release"
export PATH="$bin:$PATH"
awk -v n="$n" 'BEGIN { for (i = 0; i < n; i++) printf "{\"name\":\"t%d\",\"workflow\":\"bench\",\"application\":\"true\"}\n", i }' > "$work/jobs.jsonl"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
rate() { awk -v n="$1" -v t="$2" 'BEGIN { printf "%.0f", n / t }'; }

# The machine's limit, measured before and after the launchers: the ratios use their mean, and a
# spread above 10% means the machine was not quiet (other work ran meanwhile).
read -r _ loop1_s _ < <("$bin/examples/spawn_baseline" "$n" 2 /bin/true)

# GNU parallel on the same commands (optional).
par_s=""
if [ "${PARALLEL:-1}" != 0 ] && command -v parallel >/dev/null; then
    t0=$(date +%s%6N)
    seq "$n" | parallel -j2 -N0 /bin/true
    t1=$(date +%s%6N)
    par_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print (b - a) / 1e6 }')
fi

# One SQL query on the database of backend $1 in directory $2.
q() {
    case $1 in
        sqlite) sqlite3 "$2/balsamdb.sqlite3" "$3" ;;
        postgres)
            local host port user dbname
            read -r host port user dbname < <(python3 -c 'import json,sys; i=json.load(open(sys.argv[1])); print(i["host"], i["port"], i["user"], i["dbname"])' "$2/server-info")
            PGPASSFILE="$2/pgpass" psql -X -A -t -q -h "$host" -p "$port" -U "$user" -d "$dbname" -c "$3" ;;
    esac
}

# CPU seconds (user + system) used so far by a PostgreSQL server and all its processes: on this
# one host the server shares the cores with the jobs, which a site's login node does not.
server_cpu() {
    local pm pid ticks=0 t p
    pm=$(cat "$1/balsamdb/postmaster.pid" 2>/dev/null | head -1) || true
    [ -n "$pm" ] || { echo 0; return; }
    for p in "$pm" $(pgrep -P "$pm"); do
        t=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$p/stat" 2>/dev/null) || t=0
        ticks=$((ticks + ${t:-0}))
    done
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { print t / hz }'
}

# The PostgreSQL server stands here for one on a login node, which takes no CPU from the
# compute nodes. On this one host it shares the cores with the jobs, at their priority: the
# worst case, and the default. SERVER_NICE=10 runs it at the priority of the launcher's own
# bookkeeping threads (launcher/src/store_thread.rs BOOKKEEPING_NICE), where SQLite's writes
# run: each backend's database work then gets the same share of the CPU.
server_nice="${SERVER_NICE:-0}"

declare -A DONE EXIT RUN SERVER
ROUND_RATIOS=()
rounds="${ROUNDS:-1}"
for round in $(seq "$rounds"); do
    # Every other round runs the backends in the opposite order: a run leaves the file system
    # with work to do (tens of thousands of new files and directories, written back meanwhile),
    # which the run after it pays for.
    order=$backends
    if [ $((round % 2)) = 0 ]; then order=$(printf '%s\n' $backends | tac | tr '\n' ' '); fi
    for be in $order; do
        db="$work/db-$be-$round"
        case $be in
            sqlite) balsam init "$db" >/dev/null ;;
            postgres)
                balsam init "$db" --postgres >/dev/null 2>&1; servers+=("$db")
                # The server's backends are forked from the postmaster and inherit its priority.
                pm=$(head -1 "$db/balsamdb/postmaster.pid")
                renice -n "$server_nice" -p "$pm" $(pgrep -P "$pm") >/dev/null ;;
            *) echo "unknown backend $be (sqlite or postgres)" >&2; exit 2 ;;
        esac
        export BALSAM_DB_PATH="$db"
        balsam app --name true --executable /bin/true >/dev/null
        balsam job --from-file "$work/jobs.jsonl" --yes >/dev/null
        # Dirty pages of the import (and of earlier runs) are written back first, not during the run.
        sync
        # The launcher, with its default idle rules.
        cpu0=$(server_cpu "$db")
        t0_us=$(date +%s%6N)
        MPIEXEC_TIMEOUT=3600 balsam launcher --job-mode serial --num-workers "$workers" --consume-all \
            2> "$work/launcher-$be.log"
        t1_us=$(date +%s%6N)
        SERVER[$be]=$(awk -v a="$cpu0" -v b="$(server_cpu "$db")" 'BEGIN { printf "%.1f", b - a }')
        # Times from the state history: RUNNING = 5, RUN_DONE = 6, JOB_FINISHED = 8 (store/src/state.rs).
        finished=$(q "$be" "$db" "SELECT count(*) FROM jobs WHERE state = 8")
        [ "$finished" = "$n" ] || { echo "$be: only $finished of $n jobs finished; see $work/launcher-$be.log" >&2; KEEP=1; exit 1; }
        first_running=$(q "$be" "$db" "SELECT min(time_us) FROM events WHERE to_state = 5")
        last_done=$(q "$be" "$db" "SELECT max(time_us) FROM events WHERE to_state = 6")
        last_finished=$(q "$be" "$db" "SELECT max(time_us) FROM events WHERE to_state = 8")
        DONE[$be]=$(awk -v a="$t0_us" -v b="$last_finished" 'BEGIN { print (b - a) / 1e6 }')
        EXIT[$be]=$(awk -v a="$t0_us" -v b="$t1_us" 'BEGIN { print (b - a) / 1e6 }')
        RUN[$be]=$(awk -v a="$first_running" -v b="$last_done" 'BEGIN { print (b - a) / 1e6 }')
        # Keeps each round's times beside the last round's (which the report shows in full).
        DONE[$be.$round]=${DONE[$be]}
        # Its server's memory and CPU go back before the next run (the files stay until the end:
        # removing 20,000 directories would slow the next run's file creation).
        if [ "$be" = postgres ] && [ "$rounds" -gt 1 ]; then
            balsam server stop --db "$db" >/dev/null 2>&1 || true
        fi
    done
    if [ -n "${DONE[sqlite.$round]:-}" ] && [ -n "${DONE[postgres.$round]:-}" ]; then
        ROUND_RATIOS+=("$(ratio "${DONE[postgres.$round]}" "${DONE[sqlite.$round]}")")
    fi
done

read -r _ loop2_s _ < <("$bin/examples/spawn_baseline" "$n" 2 /bin/true)
loop_s=$(awk -v a="$loop1_s" -v b="$loop2_s" 'BEGIN { print (a + b) / 2 }')
spread=$(awk -v a="$loop1_s" -v b="$loop2_s" 'BEGIN { d = a - b; if (d < 0) d = -d; printf "%.0f", 100 * d / ((a + b) / 2) }')
loop_rate=$(rate "$n" "$loop_s")

echo "balsam launcher throughput: $n jobs of /bin/true, 1 master + $workers workers, $(nproc) cores, databases in $BENCH_DIR ($fs)"
printf '  loop (2 threads spawn+wait):      %6.2f s  %5d jobs/s  (the limit; %.2f s before the launchers, %.2f s after)\n' "$loop_s" "$loop_rate" "$loop1_s" "$loop2_s"
if [ -n "$par_s" ]; then
    printf '  GNU parallel -j2:                 %6.2f s  %5d jobs/s  %s of the loop\n' "$par_s" "$(rate "$n" "$par_s")" "$(ratio "$loop_s" "$par_s")"
fi
for be in $backends; do
    printf '  %-8s start to last finished:   %6.2f s  %5d jobs/s  %s of the loop (target >= 0.7)\n' "$be" "${DONE[$be]}" "$(rate "$n" "${DONE[$be]}")" "$(ratio "$loop_s" "${DONE[$be]}")"
    printf '  %-8s start to exit:            %6.2f s  %5d jobs/s  %s of the loop (target >= 0.7)\n' "$be" "${EXIT[$be]}" "$(rate "$n" "${EXIT[$be]}")" "$(ratio "$loop_s" "${EXIT[$be]}")"
    printf '  %-8s run phase:                %6.2f s  %5d jobs/s  %s of the loop\n' "$be" "${RUN[$be]}" "$(rate "$n" "${RUN[$be]}")" "$(ratio "$loop_s" "${RUN[$be]}")"
done
if [ -n "${DONE[sqlite]:-}" ] && [ -n "${DONE[postgres]:-}" ]; then
    printf '  postgres / sqlite time, to last finished: %s, to exit: %s (target <= 1.10)\n' \
        "$(ratio "${DONE[postgres]}" "${DONE[sqlite]}")" "$(ratio "${EXIT[postgres]}" "${EXIT[sqlite]}")"
    if [ "$rounds" -gt 1 ]; then
        median=$(printf '%s\n' "${ROUND_RATIOS[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
        printf '  postgres / sqlite time to last finished, each of %d rounds run back to back: %s; median %s (target <= 1.10)\n' \
            "$rounds" "${ROUND_RATIOS[*]}" "$median"
    fi
    printf '  the PostgreSQL server (at nice %s; SERVER_NICE sets it) used %s CPU seconds of these %d cores during its launcher run\n' "$server_nice" "${SERVER[postgres]}" "$(nproc)"
fi
if [ "$spread" -gt 10 ]; then
    echo "  warning: the two loop runs differ by $spread%: the machine was not quiet; run again" >&2
fi
