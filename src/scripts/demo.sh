#!/usr/bin/env bash
# The demo campaign: the talk's Hello World and its error example, run by the real pilot
# launcher under MPICH's mpiexec on the embedded SQLite store.
#
#   bash src/scripts/demo.sh [DB_DIR]      (default: a new temporary directory)
#
# It installs what it needs (MPICH, libclang, python3), builds balsam, creates a database, adds
# ten `say-hello` jobs and one job of `fail.py`, runs `balsam launcher` until the work is done,
# and ends with `balsam ls` (ten JOB_FINISHED, the failer FAILED) and the failer's history.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bash "$here/install-deps.sh"
export PATH="$HOME/.cargo/bin:$PATH"
(cd "$root" && cargo build --release --workspace --locked --quiet)
export PATH="$root/target/release:$here:$PATH"

db="${1:-$(mktemp -d /tmp/balsam-demo.XXXXXX)/test-db}"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step balsam init "$db"
# shellcheck disable=SC1091
source balsamactivate "$db"
step balsam app --name say-hello --executable "echo Hello,"
step balsam job --name test1 --workflow test --app say-hello --args "world!" --yes
printf '\n$ for i in {2..10}; do balsam job --name test$i --workflow test --app say-hello --args "world $i!" --yes; done\n'
for i in $(seq 2 10); do
    balsam job --name "test$i" --workflow test --app say-hello --args "world $i!" --yes >/dev/null
done
cp "$here/demo/fail.py" "$db/qsubmit/fail.py"
step balsam app --name failer --executable "$db/qsubmit/fail.py"
step balsam job --name testfail --workflow test --app failer --yes
step balsam ls

# The pilot: rank 0 and two worker ranks under mpiexec; it exits once nothing is left to run.
export MPIEXEC_TIMEOUT="${MPIEXEC_TIMEOUT:-300}"
step balsam launcher --job-mode mixed --num-workers 2 --consume-all

step balsam ls
step balsam ls --name test5 --history
step balsam ls --state FAILED --history
echo
echo "Output of test1 ($db/data/test/test1_*/test1.out):"
cat "$db"/data/test/test1_*/test1.out
finished=$(balsam ls --state JOB_FINISHED --json | grep -c '"job_id"' || true)
failed=$(balsam ls --state FAILED --json | grep -c '"job_id"' || true)
echo
echo "demo: $finished jobs JOB_FINISHED, $failed FAILED (expected 10 and 1); database at $db"
[ "$finished" = 10 ] && [ "$failed" = 1 ]
