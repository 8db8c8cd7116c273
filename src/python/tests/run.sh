#!/usr/bin/env bash
# The Python package's tests, as a new user would meet the package: a fresh virtual
# environment, `pip install ./src/python` (maturin builds the Rust store in release mode),
# then pytest against SQLite and against a throwaway PostgreSQL server.
#
#   bash src/python/tests/run.sh            # both backends
#   BALSAM_PY_BACKENDS=sqlite bash src/python/tests/run.sh
#
# The tests drive the workspace's `balsam` and `balsam-mpi-launcher` binaries from
# BALSAM_BIN_DIR (default target/debug: `cargo build --workspace` first). Every pytest run is
# bounded by a timeout, and the PostgreSQL server is stopped however the run ends.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$root"
export BALSAM_BIN_DIR="${BALSAM_BIN_DIR:-$root/target/debug}"
export MPIEXEC_TIMEOUT="${MPIEXEC_TIMEOUT:-300}"
backends="${BALSAM_PY_BACKENDS:-sqlite postgres}"
suite_timeout="${BALSAM_PY_TIMEOUT:-1800}"

work=$(mktemp -d /tmp/balsam-python-tests.XXXXXX)
pg_dir="$work/pg"
cleanup() {
    [[ -d $pg_dir ]] && bash tests/pg/server.sh stop "$pg_dir" || true
    rm -rf "$work"
}
trap cleanup EXIT

venv="$work/venv"
if ! python3 -m venv "$venv" 2>"$work/venv.err"; then
    # Debian's own python3 keeps venv in a package of its own.
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get install -y -q python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv"
    else
        cat "$work/venv.err" >&2
        echo "run.sh: python3 cannot make a virtual environment; install python3-venv" >&2
        exit 1
    fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$root/src/python" pytest numpy

for backend in $backends; do
    echo "== Python package tests on $backend"
    env=(BALSAM_TEST_BACKEND="$backend")
    if [[ $backend == postgres ]]; then
        url=$(bash tests/pg/server.sh start "$pg_dir")
        env+=(BALSAM_TEST_PG_URL="$url")
    fi
    # The tests run from outside the checkout, so `import balsam` is the installed package.
    (cd "$work" && env "${env[@]}" timeout --signal=TERM --kill-after=30 "$suite_timeout" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/src/python/tests")
    if [[ $backend == postgres ]]; then
        bash tests/pg/server.sh stop "$pg_dir"
    fi
done
