#!/usr/bin/env bash
# Runs every check and test of balsam, installing what they need first (idempotent):
# formatting, clippy, the unit tests, and the end-to-end tests that drive the real binaries under
# MPICH's mpiexec, a real SQLite file and a real Slurm cluster on loopback; then the end-to-end
# suites again on a real PostgreSQL server.
#
#   bash src/scripts/test.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash src/scripts/install-deps.sh --slurm --postgres
export PATH="$HOME/.cargo/bin:$PATH"

# The end-to-end tests run binaries of several workspace packages; build them all first.
cargo build --workspace --all-targets --locked
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every MPI job a test starts is bounded by MPIEXEC_TIMEOUT as well as by its own timeout.
export MPIEXEC_TIMEOUT="${MPIEXEC_TIMEOUT:-120}"
threads="${BALSAM_TEST_THREADS:-2}"
cargo test --workspace --locked -- --test-threads="$threads"

# The store and the end-to-end suites again, on PostgreSQL: one throwaway server (each test
# makes a database of its own on it), stopped by its pid whatever happens.
pgdir=$(mktemp -d /tmp/balsam-test-pg.XXXXXX)
trap 'bash tests/pg/server.sh stop "$pgdir"; rm -rf "$pgdir"' EXIT
BALSAM_TEST_PG_URL=$(bash tests/pg/server.sh start "$pgdir")
export BALSAM_TEST_PG_URL BALSAM_TEST_BACKEND=postgres
cargo test --locked -p balsam-store --test store -- --test-threads="$threads"
cargo test --locked -p balsam --test cli --test attack --test launcher --test batch --test slurm -- --test-threads="$threads"
