#!/usr/bin/env bash
# The service over the 1.2M-structure campaign: how long its passes take and how much CPU it
# uses between them, on the local scheduler (nothing is submitted: the policies below keep the
# queue closed, or open with a window no job fits, so every pass decides and none launches).
#
#   bash src/bench/service-bench.sh [N]        (N defaults to 1200000; WORK=dir to keep files)
#
# Figures:
#   first pass         the transitions of N new jobs (CREATED -> PREPROCESSED) by the service
#   measuring pass     a pass that measures the waiting work (one GROUP BY over N jobs)
#   closed pass        a pass when no queue can take a launch (the work is not measured)
#   CPU, work waiting  `balsam service --period 1` for 30 s with a queue open; the baseline is
#                      what measuring every pass would cost (measuring pass / period)
#   CPU, idle          the same on an empty database
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-1200000}"
work="${WORK:-$(mktemp -d /tmp/balsam-service-bench.XXXXXX)}"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${WORK:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

(cd "$root" && cargo build --release --workspace --quiet)
bin="$root/target/release/balsam"
tck=$(getconf CLK_TCK)

setting() { # setting DB KEY VALUE
    python3 - "$1/settings.json" "$2" "$3" <<'EOF'
import json, sys
p, k, v = sys.argv[1:]
s = json.load(open(p))
s[k] = v
json.dump(s, open(p, "w"), indent=2)
EOF
}
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'; }
cpu_share() { # cpu_share DB: the service's CPU over 30 s, as a fraction of one core
    BALSAM_DB_PATH="$1" "$bin" service --period 1 >/dev/null 2>&1 &
    local pid=$!
    pids+=("$pid")
    sleep 3
    local a b
    a=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    sleep 30
    b=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill -TERM "$pid"
    wait "$pid" || true
    awk -v t=$((b - a)) -v hz="$tck" 'BEGIN { printf "%.4f", t / hz / 30 }'
}

db="$work/db"
"$bin" init "$db" >/dev/null
BALSAM_DB_PATH="$db" "$bin" make_dummies "$n" >/dev/null
printf '[local]\nsubmit-jobs = off\nmax-queued = 1\npolicy = [{"min-nodes": 1, "max-nodes": 2, "min-minutes": 1, "max-minutes": 60}]\n' >"$db/closed.ini"
# Open, but the window is shorter than any job plus the launcher's margin: every pass measures
# the work and decides to submit nothing.
printf '[local]\nsubmit-jobs = on\nmax-queued = 1\npolicy = [{"min-nodes": 1, "max-nodes": 2, "min-minutes": 1, "max-minutes": 2}]\n' >"$db/open.ini"

setting "$db" QUEUE_POLICY closed.ini
first=$(BALSAM_DB_PATH="$db" secs "$bin" service --once)
closed=$(BALSAM_DB_PATH="$db" secs "$bin" service --once)
setting "$db" QUEUE_POLICY open.ini
measuring=$(BALSAM_DB_PATH="$db" secs "$bin" service --once)
waiting_cpu=$(cpu_share "$db")

empty="$work/empty"
"$bin" init "$empty" >/dev/null
idle_cpu=$(cpu_share "$empty")

baseline=$(awk -v m="$measuring" 'BEGIN { printf "%.4f", (m > 1 ? 1 : m) }')
echo "service benchmark, $n jobs (local scheduler, release build)"
printf '%-34s %10s   %s\n' "figure" "measured" "target"
printf '%-34s %8s s   %s\n' "first pass ($n transitions)" "$first" ""
printf '%-34s %8s s   %s\n' "measuring pass" "$measuring" ""
printf '%-34s %8s s   %s\n' "closed pass" "$closed" "< 0.1 s"
printf '%-34s %8.1f %%   %s\n' "CPU, work waiting, queue open" "$(awk -v c="$waiting_cpu" 'BEGIN { print c * 100 }')" "<= 5 % of a core"
printf '%-34s %8.3f     %s\n' "  ratio to measuring every pass" "$(awk -v c="$waiting_cpu" -v b="$baseline" 'BEGIN { print (b > 0 ? c / b : 0) }')" "(baseline $(awk -v b="$baseline" 'BEGIN { print b * 100 }') % of a core)"
printf '%-34s %8.2f %%   %s\n' "CPU, idle (empty database)" "$(awk -v c="$idle_cpu" 'BEGIN { print c * 100 }')" "<= 1 % of a core"
