#!/usr/bin/env bash
# Benchmarks of the Python package, each figure beside its baseline measured in the same run:
#   - BalsamJob.objects.bulk_create of N jobs (default 1,200,000: the case study's campaign)
#     against `balsam job --from-file` of the same jobs (target: at least half its rate);
#   - filter(...).update(state="RESTART_READY") of 500,000 of them;
#   - the CPU a process uses while waiting on 10,000 futures.
#
#   bash src/python/bench/bench.sh [N]      (WORK=dir keeps the files; files are on disk)
#
# Release builds of the CLI and of the package (in a fresh virtual environment).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
n="${1:-1200000}"
work="${WORK:-$(mktemp -d /var/tmp/balsam-python-bench.XXXXXX)}"
cleanup() { [ -n "${WORK:-}" ] || rm -rf "$work"; }
trap cleanup EXIT

(cd "$root" && cargo build --release -p balsam --quiet)
if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/python" -m pip install --quiet "$root/src/python"
fi
BALSAM_BIN="$root/target/release/balsam" "$work/venv/bin/python" "$here/bench.py" "$n" "$work"
