#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test suites: one server, each test a database of its own.
#
#   bash tests/pg/server.sh start DIR [PORT]   # prints the admin URL; DIR/url holds it
#   bash tests/pg/server.sh stop DIR           # stops it by the pid in its data folder
#
# Debian's PostgreSQL 15 (src/scripts/install-deps.sh --postgres). The server refuses to run as
# root, so as root it runs as the `postgres` user, in folders that user owns; authentication is
# scram-sha-256 with a generated password, on 127.0.0.1 only. Nothing outside DIR is touched.
set -euo pipefail

pg_bin() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x $d/$1 ]] && { echo "$d/$1"; return; }
    done
    command -v "$1" || { echo "server.sh: $1 not found; run src/scripts/install-deps.sh --postgres" >&2; exit 1; }
}

as_owner() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

cmd=${1:-}; dir=${2:-}
[[ -n $cmd && -n $dir ]] || { sed -n '2,9p' "$0" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

case $cmd in
start)
    port=${3:-$(free_port)}
    if [[ -s $dir/data/postmaster.pid ]] && kill -0 "$(head -1 "$dir/data/postmaster.pid")" 2>/dev/null; then
        echo "server.sh: a server already runs in $dir" >&2; exit 1
    fi
    rm -rf "$dir/data" "$dir/sock"
    mkdir -p "$dir/sock"
    password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=' )
    umask 077
    printf '%s\n' "$password" > "$dir/pwfile"
    if [[ $(id -u) == 0 ]]; then
        chown postgres: "$dir" "$dir/sock" "$dir/pwfile"
        # Every folder above DIR must be searchable by postgres.
        p=$dir; while [[ $p != / ]]; do p=$(dirname "$p"); chmod o+x "$p" 2>/dev/null || true; done
    fi
    as_owner "$(pg_bin initdb)" -D "$dir/data" --auth=scram-sha-256 --pwfile="$dir/pwfile" \
        -U balsam -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$dir/pwfile"
    as_owner "$(pg_bin pg_ctl)" -D "$dir/data" -l "$dir/data/server.log" -w -t 30 \
        -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null
    url="postgresql://balsam:$password@127.0.0.1:$port/postgres"
    printf '%s\n' "$url" > "$dir/url"
    chmod 600 "$dir/url"
    echo "$url"
    ;;
stop)
    pidfile=$dir/data/postmaster.pid
    [[ -s $pidfile ]] || exit 0
    pid=$(head -1 "$pidfile")
    kill -INT "$pid" 2>/dev/null || exit 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    ;;
*)
    sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
