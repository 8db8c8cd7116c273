#!/usr/bin/env bash
# tests/slurm/cluster.sh start|stop|status DIR
#
# A real Slurm 22.05 cluster on loopback, for tests: munged + slurmctld + three slurmd (nodes
# n1, n2, n3, 4 CPUs each, all on this host), with every file (config, munge key and socket,
# state, spool, logs, pid files) inside DIR, so clusters in different DIRs do not interfere
# except through their ports.
#
#   start   installs the packages if needed (src/scripts/install-deps.sh --slurm), writes
#           DIR/etc/slurm.conf and DIR/env.sh, starts the daemons that are not already running
#           (by their pid files) and waits until sinfo shows the three nodes up (30 s at most;
#           then it prints the logs' tails and exits 1, leaving what started for `stop`).
#   stop    cancels the cluster's jobs, then stops the daemons by their pid files only (SIGTERM,
#           SIGKILL after 15 s), then kills leftover slurmstepd processes of this DIR and their
#           children. Safe after a half-failed start, and when nothing runs.
#   status  prints sinfo and squeue; exits 3 when slurmctld is not running.
#
# Clients: `source DIR/env.sh`, then sbatch/squeue/scancel/scontrol/srun/sinfo talk to it.
#
# Environment: SLURM_PORT_BASE (default 16817): slurmctld listens on it, slurmd of nK on
# base+K. Pick distinct bases for clusters that run at the same time.
#
# What this relies on (the first five from shared/ENVIRONMENT.md) and what surprised us here
# (Debian 12, Slurm 22.05.8, munge 0.5.15):
# - The host name is not "localhost", so nodes are NodeName=nK NodeHostname=localhost
#   NodeAddr=127.0.0.1 with a distinct Port each, and each slurmd is started as `slurmd -N nK`.
# - SlurmdParameters=config_overrides is what lets a node claim CPUs=4 on a 2-core machine;
#   without it the node registers as INVAL.
# - Without MpiDefault=pmi2, `srun -n 2 prog` starts two single-rank MPICH programs.
# - Without EnforcePartLimits=ALL an impossible request pends forever instead of failing at
#   sbatch time.
# - A second slurmd started with the same pid file kills the first one, hence the pid-file
#   checks: `start` never starts a daemon whose pid file names a live process of this DIR.
# - SlurmdPidFile/SlurmdLogFile/SlurmdSpoolDir accept %n, which keeps the three slurmd apart.
# - munged wants its socket folder mode 755 and its key mode 600 owned by the user it runs as;
#   every folder above the socket must be searchable by all (a `mktemp -d` folder is 700: this
#   script adds o+x to DIR when needed, and says so).
# - A unix socket path must stay under 108 bytes: a very deep DIR fails with a clear message.
# - Daemons would inherit the caller's stdout/stderr (a test harness reading a pipe then waits
#   for EOF) and any fd it holds: they start with stdio redirected to DIR/log and with this
#   script's lock fd closed -- a daemon that inherited the lock held it for its whole life and
#   the next start/stop waited for it (seen here).
# - slurmstepd (one per running job step) outlives slurmd, so `stop` cancels jobs first and
#   then looks for stepds still holding files in DIR/spool.
# - slurmctld makes its first scheduling pass about 3 s after it starts; `start` waits for it
#   (SLURM_CLUSTER_NO_SCHED_WAIT=1 skips that), so a cold start takes about 3.1 s here and a
#   start of a running cluster 0.1 s; a trivial job then completes about 1 s after sbatch.
# - A restarted slurmctld shows the nodes "idle" from its saved state before any slurmd has
#   registered: readiness is judged by SlurmdStartTime, not by sinfo alone.
# - MPICH's mpiexec inside a 3-node job does spread the ranks over n1..n3 (through srun), but
#   it forwards the batch script's environment to every rank, so SLURMD_NODENAME and
#   SLURM_TOPOLOGY_ADDR read "n1" in all ranks; SLURM_NODEID shows the real placement.
# - Time limits are whole minutes and checked about every 30 s: a `-t 1` job ends TIMEOUT about
#   60-90 s after it starts, not at 60 s.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}

(($# == 2)) || usage
cmd=$1
dir_arg=$2
[[ $cmd == start || $cmd == stop || $cmd == status ]] || usage

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)

if [[ $cmd == start ]]; then
    mkdir -p "$dir_arg"
fi
if [[ ! -d $dir_arg ]]; then
    if [[ $cmd == stop ]]; then exit 0; fi          # nothing was ever started there
    echo "cluster.sh: no such folder: $dir_arg" >&2
    exit 3
fi
DIR=$(cd "$dir_arg" && pwd -P)
# Slurm's config format has no quoting: a path with blanks cannot be written into it.
if [[ $DIR =~ [[:space:]] ]]; then
    echo "cluster.sh: DIR must not contain blanks: $DIR" >&2
    exit 2
fi

CONF=$DIR/etc/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MUNGE_KEY=$MUNGE_DIR/munge.key
RUN=$DIR/run
LOG=$DIR/log
NODES=(n1 n2 n3)
export SLURM_CONF=$CONF

# Daemons and clients get a small, fixed environment: nothing from a caller that may itself be
# inside another Slurm job (SLURM_JOB_ID, SLURM_CONF...) leaks into them.
clean_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8)
client() { "${clean_env[@]}" SLURM_CONF="$CONF" timeout 10 "$@"; }

# Prints the pid in pidfile $1 if it names a live process whose command line contains $2 (the
# config path or the munge socket of this DIR), so a recycled pid or another cluster's daemon
# is never taken for ours.
live_pid() {
    local pidfile=$1 marker=$2 pid cmdline
    [[ -r $pidfile ]] || return 1
    pid=$(head -c 32 "$pidfile" 2>/dev/null | tr -dc '0-9')
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$marker"* ]] || return 1
    # A zombie still has a /proc entry; it is not a running daemon.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    echo "$pid"
}

munged_pid()   { live_pid "$RUN/munged.pid" "$MUNGE_SOCKET"; }
slurmctld_pid() { live_pid "$RUN/slurmctld.pid" "$CONF"; }
slurmd_pid()   { live_pid "$RUN/slurmd-$1.pid" "$CONF"; }

tail_logs() {
    local f
    for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd-n*.log "$LOG"/*.stderr; do
        [[ -s $f ]] || continue
        echo "----- tail of $f" >&2
        tail -n 15 "$f" >&2
    done
}

# Serialise start/stop of one DIR (two `start` at once would both see "not running").
# Every daemon is started with this fd closed ({lockfd}>&-): a daemon inheriting it would hold
# the lock for its whole life and block the next start/stop (seen here).
lock_dir() {
    exec {lockfd}>>"$DIR/.cluster.lock"
    flock -w 120 "$lockfd" || { echo "cluster.sh: $DIR is locked by another cluster.sh" >&2; exit 1; }
}

port_in_use() {
    # Connecting succeeds only if something listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

write_config() {
    local base=$1
    mkdir -p "$DIR/etc"
    cat >"$CONF.tmp" <<EOF
# Written by tests/slurm/cluster.sh; rewritten at each start while no daemon of $DIR runs.
ClusterName=balsam
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmi2
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
MailProg=/bin/true
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
InactiveLimit=0
KillWait=10
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 1)) CPUs=4 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 2)) CPUs=4 State=UNKNOWN
NodeName=n3 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 3)) CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=n1,n2,n3 Default=YES MaxTime=30 State=UP
PartitionName=batch Nodes=n1,n2,n3 MaxTime=60 State=UP
EOF
    mv -f "$CONF.tmp" "$CONF"
    echo "$base" >"$DIR/etc/port_base"
}

write_env() {
    cat >"$DIR/env.sh.tmp" <<EOF
# source this file to use the test Slurm cluster in $DIR
export SLURM_CONF=$CONF
export BALSAM_SLURM_CLUSTER_DIR=$DIR
# Clients find the munge socket through AuthInfo in slurm.conf; this is for munge/unmunge -S.
export BALSAM_SLURM_MUNGE_SOCKET=$MUNGE_SOCKET
EOF
    mv -f "$DIR/env.sh.tmp" "$DIR/env.sh"
}

# True when every node is usable and its slurmd has registered since we (re)started it.
# sinfo alone is not enough: a restarted slurmctld recovers "idle" from its state folder before
# any slurmd has registered again.
declare -A started_at=()
nodes_ready() {
    local out line name state ready=0 t
    out=$(client scontrol show node -o 2>/dev/null) || return 1
    while read -r line; do
        [[ $line =~ NodeName=([^ ]+) ]] || continue
        name=${BASH_REMATCH[1]}
        [[ $line =~ \ State=([^ ]+) ]] || continue
        state=${BASH_REMATCH[1]}
        case "$state" in
            *DOWN*|*DRAIN*|*FAIL*|*INVAL*|*NOT_RESPONDING*|*UNKNOWN*|*FUTURE*) continue ;;
        esac
        if [[ -n ${started_at[$name]:-} ]]; then
            [[ $line =~ SlurmdStartTime=([0-9T:-]+) ]] || continue
            t=$(date -d "${BASH_REMATCH[1]}" +%s 2>/dev/null) || continue
            # SlurmdStartTime has whole seconds.
            ((t + 1 >= ${started_at[$name]})) || continue
        fi
        ready=$((ready + 1))
    done <<<"$out"
    ((ready == ${#NODES[@]}))
}

# True once the running slurmctld has made its first scheduling pass (see do_start).
scheduler_started() {
    awk '/slurmctld version .* started on cluster/ { seen = 0 }
         /SchedulerParameters=/ { seen = 1 }
         END { exit !seen }' "$LOG/slurmctld.log" 2>/dev/null
}

do_start() {
    local t0 t1
    t0=$(date +%s.%N)
    # Packages first: a no-op taking milliseconds when present, one line per package otherwise.
    bash "$repo/src/scripts/install-deps.sh" --slurm

    mkdir -p "$DIR"/{etc,state,spool,run,log} "$MUNGE_DIR"
    lock_dir

    if ((${#MUNGE_SOCKET} >= 100)); then
        echo "cluster.sh: munge socket path too long for a unix socket (${#MUNGE_SOCKET} bytes):" \
             "$MUNGE_SOCKET; use a shorter DIR" >&2
        exit 2
    fi
    # munged refuses a socket folder that is not searchable by everyone, up the whole path.
    local d=$DIR
    while [[ $d != / ]]; do
        if [[ ! $(stat -c %A "$d") =~ [xt]$ ]]; then   # "t": sticky and searchable (/tmp)
            if [[ $d == "$DIR" ]]; then
                echo "cluster.sh: note: adding o+x to $DIR (munged requires it)" >&2
                chmod o+x "$DIR"
            else
                echo "cluster.sh: munged needs every folder above its socket searchable by all;" \
                     "$d is not (chmod o+x it or use another DIR)" >&2
                exit 2
            fi
        fi
        d=$(dirname "$d")
    done
    chmod 755 "$DIR" "$MUNGE_DIR" "$RUN" "$LOG"

    local any_live=0 n
    munged_pid >/dev/null && any_live=1
    slurmctld_pid >/dev/null && any_live=1
    for n in "${NODES[@]}"; do slurmd_pid "$n" >/dev/null && any_live=1; done

    local base=${SLURM_PORT_BASE:-16817}
    [[ $base =~ ^[0-9]+$ ]] && ((base > 1024 && base < 65530)) \
        || { echo "cluster.sh: bad SLURM_PORT_BASE=$base" >&2; exit 2; }
    if ((any_live)) && [[ -f $CONF ]]; then
        # Keep the config the running daemons use.
        local running_base
        running_base=$(cat "$DIR/etc/port_base" 2>/dev/null || echo "$base")
        if [[ $running_base != "$base" ]]; then
            echo "cluster.sh: note: daemons of $DIR already run on port base $running_base;" \
                 "keeping it" >&2
        fi
    else
        local p
        for p in "$base" $((base + 1)) $((base + 2)) $((base + 3)); do
            if port_in_use "$p"; then
                echo "cluster.sh: port $p is in use (another cluster?); set SLURM_PORT_BASE" >&2
                exit 1
            fi
        done
        write_config "$base"
    fi
    write_env

    # --- munged, with key, socket, pid, log and seed inside DIR.
    if [[ ! -s $MUNGE_KEY ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY.tmp" && mv -f "$MUNGE_KEY.tmp" "$MUNGE_KEY")
    fi
    chmod 600 "$MUNGE_KEY"
    if ! munged_pid >/dev/null; then
        rm -f "$RUN/munged.pid"
        # --force: a socket or lock left by a munged that died is removed instead of refused;
        # the pid-file check above makes sure no live munged of this DIR owns them.
        "${clean_env[@]}" setsid munged --force \
            --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$RUN/munged.pid" \
            --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
            </dev/null >>"$LOG/munged.stderr" 2>&1 {lockfd}>&- \
            || { echo "cluster.sh: munged failed to start" >&2; tail_logs; exit 1; }
    fi
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S $MUNGE_SOCKET ]] && munged_pid >/dev/null && break
        sleep 0.05
    done
    [[ -S $MUNGE_SOCKET ]] || { echo "cluster.sh: munged socket did not appear" >&2; tail_logs; exit 1; }

    # --- slurmctld (daemonizes itself; setsid only keeps it out of the caller's group).
    if ! slurmctld_pid >/dev/null; then
        rm -f "$RUN/slurmctld.pid"
        "${clean_env[@]}" setsid slurmctld -f "$CONF" \
            </dev/null >>"$LOG/slurmctld.stderr" 2>&1 {lockfd}>&- \
            || { echo "cluster.sh: slurmctld failed to start" >&2; tail_logs; exit 1; }
    fi

    # --- one slurmd per node.
    for n in "${NODES[@]}"; do
        if ! slurmd_pid "$n" >/dev/null; then
            rm -f "$RUN/slurmd-$n.pid"
            started_at[$n]=$(date +%s)
            mkdir -p "$DIR/spool/$n"
            "${clean_env[@]}" setsid slurmd -f "$CONF" -N "$n" \
                </dev/null >>"$LOG/slurmd-$n.stderr" 2>&1 {lockfd}>&- \
                || { echo "cluster.sh: slurmd -N $n failed to start" >&2; tail_logs; exit 1; }
        fi
    done

    # --- wait (bounded) for the three nodes to be up.
    local deadline=$((SECONDS + 30))
    until nodes_ready; do
        if ((SECONDS >= deadline)); then
            echo "cluster.sh: nodes not up after 30 s; sinfo says:" >&2
            client sinfo -N >&2 || true
            tail_logs
            echo "cluster.sh: daemons that did start are left running; run: $0 stop $DIR" >&2
            exit 1
        fi
        sleep 0.1
    done
    # slurmctld makes its first scheduling pass about 3 s after it starts (it logs its
    # SchedulerParameters then); a job submitted before that waits for it. Waiting here makes
    # "submitted after start returned" mean "starts within about a second".
    # SLURM_CLUSTER_NO_SCHED_WAIT=1 skips the wait.
    if [[ -z ${SLURM_CLUSTER_NO_SCHED_WAIT:-} ]]; then
        until scheduler_started; do
            if ((SECONDS >= deadline)); then
                echo "cluster.sh: note: no first scheduling pass seen in $LOG/slurmctld.log;" \
                     "going on" >&2
                break
            fi
            sleep 0.1
        done
    fi
    t1=$(date +%s.%N)
    printf 'cluster.sh: slurm up in %.1f s: %s (ports %s-%s); source %s/env.sh\n' \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$DIR" \
        "$(cat "$DIR/etc/port_base")" "$(($(cat "$DIR/etc/port_base") + 3))" "$DIR"
}

# Pids of processes that hold a file, or their cwd, inside $1 (one `find`, not a fork per fd).
pids_using() {
    find /proc/[0-9]*/fd /proc/[0-9]*/cwd -maxdepth 1 -lname "$1/*" 2>/dev/null \
        | cut -d/ -f3 | sort -u | grep -vx -e "$$" -e "$BASHPID" || true
}

# All descendants of the given pids, from one ps snapshot.
descendants() {
    ps -eo pid=,ppid= | awk -v roots="$*" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) mark[r[i]] = 1
            changed = 1
            while (changed) { changed = 0
                for (i in pids) { p = pids[i]
                    if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; changed = 1; print p } } }
        }'
}

do_stop() {
    mkdir -p "$RUN" "$LOG" 2>/dev/null || true
    lock_dir

    # Cancel jobs while the daemons can still do it properly (stepds outlive slurmd otherwise).
    if slurmctld_pid >/dev/null && [[ -f $CONF ]]; then
        local jobs
        jobs=$(client squeue -h -o '%i' 2>/dev/null | tr '\n' ' ') || jobs=""
        if [[ -n ${jobs// /} ]]; then
            # shellcheck disable=SC2086
            client scancel $jobs >/dev/null 2>&1 || true
            local deadline=$((SECONDS + 15))
            while ((SECONDS < deadline)); do
                [[ -z $(client squeue -h -t R,CG,S,CF -o '%i' 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi

    # slurmd first, slurmctld, munged last (the others need munge while they shut down).
    local -a pids=() pidfiles=()
    local n pid
    for n in "${NODES[@]}"; do
        if pid=$(slurmd_pid "$n"); then pids+=("$pid"); fi
        pidfiles+=("$RUN/slurmd-$n.pid")
    done
    if pid=$(slurmctld_pid); then pids+=("$pid"); fi
    pidfiles+=("$RUN/slurmctld.pid")
    local slurm_pids=("${pids[@]}")
    ((${#slurm_pids[@]} == 0)) || kill -TERM "${slurm_pids[@]}" 2>/dev/null || true
    wait_gone 15 "${slurm_pids[@]}"

    if pid=$(munged_pid); then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone 10 "$pid"
    fi
    pidfiles+=("$RUN/munged.pid")

    # Job steps whose stepd survived (e.g. slurmd was SIGKILLed): they hold sockets and logs in
    # DIR/spool. Kill them and everything under them.
    local -a left
    mapfile -t left < <(pids_using "$DIR/spool")
    if ((${#left[@]} > 0)); then
        local -a all
        mapfile -t all < <(descendants "${left[@]}")
        all+=("${left[@]}")
        kill -KILL "${all[@]}" 2>/dev/null || true
        wait_gone 5 "${all[@]}"
    fi
    rm -f "${pidfiles[@]}" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    echo "cluster.sh: stopped $DIR"
}

# wait_gone SECONDS PID...: wait until none of the pids runs; then SIGKILL what is left.
wait_gone() {
    local limit=$1; shift
    (($# > 0)) || return 0
    local deadline=$((SECONDS + limit)) p alive
    while :; do
        alive=()
        for p in "$@"; do
            if [[ -e /proc/$p && $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]]; then
                alive+=("$p")
            fi
        done
        ((${#alive[@]} == 0)) && return 0
        if ((SECONDS >= deadline)); then
            echo "cluster.sh: SIGKILL to ${alive[*]} (did not exit in ${limit} s)" >&2
            kill -KILL "${alive[@]}" 2>/dev/null || true
            sleep 0.2
            return 0
        fi
        sleep 0.1
    done
}

do_status() {
    if ! slurmctld_pid >/dev/null; then
        echo "cluster.sh: slurmctld of $DIR is not running"
        exit 3
    fi
    client sinfo
    client squeue
}

case "$cmd" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
esac
