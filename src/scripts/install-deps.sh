#!/usr/bin/env bash
# install-deps.sh [--slurm] [--postgres] [--quiet]
#
# Idempotent installer of the system packages balsam builds, tests and benchmarks with, on
# Debian 12. Run it (`bash src/scripts/install-deps.sh`) or source it (`. install-deps.sh`);
# when sourced it also puts ~/.cargo/bin on the caller's PATH and never exits the caller.
#
# What it ensures:
#   always:   build-essential pkg-config libclang-dev  (the `mpi` crate runs bindgen, which needs
#             libclang and its builtin headers; libclang-dev pulls both in, the `clang` binary is
#             not needed), mpich libmpich-dev, python3, parallel (baseline for benchmarks),
#             procps (ps/pkill), util-linux (flock/setsid, used by the fixtures)
#   --slurm:  slurmctld slurmd slurm-client munge (for tests/slurm/cluster.sh)
#   --postgres: postgresql (server and client; `balsam init --postgres`, tests/pg/server.sh) and
#             iproute2 (`ip netns`, for the many-hosts tests)
#   and a Rust toolchain (cargo on PATH or in ~/.cargo/bin), which it does not install.
#
# Why it looks the way it does:
# - Checks with one `dpkg-query` call first, so a second run takes a few milliseconds and runs no
#   `apt-get update` (the test scripts call it every time).
# - `apt-get update` runs only when something is missing: a fresh machine has no package lists.
# - Package installs must not start services (no systemd here; Debian's maintainer scripts would
#   start munged/slurmctld with the system config): a temporary /usr/sbin/policy-rc.d exiting 101
#   blocks them. A pre-existing policy-rc.d (Docker images ship one) is moved aside and put back
#   by a trap, whatever happens.
# - Never purges or removes anything: Debian's mpich depends on libslurm38, so removing Slurm
#   packages would take MPICH with it.
# - Never installs Open MPI: with both present Debian's alternatives may point mpicc/mpiexec at
#   Open MPI and the build and the launcher silently disagree. If Open MPI is already there it
#   only warns (use MPICC=mpicc.mpich and mpiexec.mpich).
# - Parallel callers (tests started together) serialise on a lock file so only one runs apt.
# - Prints one line per thing it installs, nothing when everything is present.

_balsam_install_deps_main() {
    set -euo pipefail

    local want_slurm=0 want_pg=0 quiet=0 arg
    for arg in "$@"; do
        case "$arg" in
            --slurm) want_slurm=1 ;;
            --postgres) want_pg=1 ;;
            --quiet|-q) quiet=1 ;;
            -h|--help)
                sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
                return 0 ;;
            *)
                # Sourced without arguments, bash hands us the caller's own arguments: ignore
                # what is not ours then, instead of failing the caller.
                [[ -n ${BALSAM_INSTALL_DEPS_SOURCED:-} ]] && continue
                echo "install-deps: unknown argument: $arg" >&2; return 2 ;;
        esac
    done

    say() { [[ $quiet == 1 ]] || echo "install-deps: $*"; }

    # --- Rust toolchain: required, never installed from here (the machines always have it;
    # rustup downloads a toolchain from outside the package registries).
    if ! command -v cargo >/dev/null 2>&1 && [[ ! -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
        cat >&2 <<'EOF'
install-deps: no Rust toolchain: `cargo` is neither on PATH nor in ~/.cargo/bin.
install-deps: install one with rustup (https://rustup.rs):
install-deps:     curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
install-deps:     . "$HOME/.cargo/env"
EOF
        return 1
    fi

    local -a pkgs=(build-essential pkg-config libclang-dev mpich libmpich-dev python3 parallel
                   procps util-linux)
    if [[ $want_slurm == 1 ]]; then
        pkgs+=(slurmctld slurmd slurm-client munge)
    fi
    if [[ $want_pg == 1 ]]; then
        pkgs+=(postgresql iproute2)
    fi

    # Prints the packages of "$@" that are not fully installed. dpkg-query exits 1 when a name
    # is unknown to dpkg (never installed), so its status is ignored and absence is what counts.
    missing_pkgs() {
        local -A ok=()
        local name status
        while read -r name status; do
            [[ $status == installed ]] && ok[$name]=1
        done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null || true)
        local p
        for p in "$@"; do
            [[ -n ${ok[$p]:-} ]] || echo "$p"
        done
    }

    local -a missing
    mapfile -t missing < <(missing_pkgs "${pkgs[@]}")

    if ((${#missing[@]} > 0)); then
        local sudo=()
        if [[ $(id -u) != 0 ]]; then
            if command -v sudo >/dev/null 2>&1; then
                sudo=(sudo -n)
            else
                echo "install-deps: missing packages (${missing[*]}) and not root, no sudo" >&2
                return 1
            fi
        fi

        # One installer at a time on this machine; re-check after the wait, since the holder
        # may have installed what we miss.
        local lockfile=/var/lock/balsam-install-deps.lock
        [[ -w /var/lock ]] || lockfile=/tmp/balsam-install-deps.lock
        exec {lockfd}>>"$lockfile"
        flock -w 900 "$lockfd" || { echo "install-deps: could not lock $lockfile" >&2; return 1; }
        mapfile -t missing < <(missing_pkgs "${pkgs[@]}")
    fi

    if ((${#missing[@]} > 0)); then
        local log
        log=$(mktemp /tmp/balsam-install-deps.XXXXXX.log)

        # The EXIT trap runs after this function has returned, so what it needs lives in
        # globals (a `local` would be gone: `set -u` then aborts the trap and the policy file
        # is never restored -- seen here). It restores exactly what was there before.
        _BID_POLICY=/usr/sbin/policy-rc.d
        _BID_BACKUP=""
        _BID_SUDO=("${sudo[@]}")
        _bid_restore_policy() {
            if [[ -n ${_BID_BACKUP:-} && -e ${_BID_BACKUP:-} ]]; then
                "${_BID_SUDO[@]}" mv -f "$_BID_BACKUP" "$_BID_POLICY"
            else
                "${_BID_SUDO[@]}" rm -f "$_BID_POLICY"
            fi
        }
        if [[ -e $_BID_POLICY || -L $_BID_POLICY ]]; then
            _BID_BACKUP="$_BID_POLICY.balsam-install-deps.$$"
            "${sudo[@]}" mv -f "$_BID_POLICY" "$_BID_BACKUP"
        fi
        trap _bid_restore_policy EXIT
        trap 'exit 130' INT TERM HUP
        printf '#!/bin/sh\n# temporary, from balsam install-deps.sh: no service starts\nexit 101\n' \
            | "${sudo[@]}" tee "$_BID_POLICY" >/dev/null
        "${sudo[@]}" chmod 755 "$_BID_POLICY"

        export DEBIAN_FRONTEND=noninteractive
        local -a apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
                      -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
                      -o Dpkg::Options::=--force-confold)
        say "apt-get update (missing: ${missing[*]})"
        if ! "${apt[@]}" update >>"$log" 2>&1; then
            echo "install-deps: apt-get update failed; last lines of $log:" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
        local p
        for p in "${missing[@]}"; do say "installing $p"; done
        if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
            echo "install-deps: apt-get install failed; last lines of $log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        rm -f "$log"
        _bid_restore_policy
        trap - EXIT INT TERM HUP
    fi

    # Open MPI beside MPICH: warn only (never remove anything).
    if [[ -z $(missing_pkgs openmpi-bin) ]]; then
        echo "install-deps: warning: Open MPI is installed beside MPICH; build with" \
             "MPICC=mpicc.mpich and launch with mpiexec.mpich" >&2
    fi
    return 0
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: run as a child bash, so `set -euo pipefail`, traps and helpers do not leak into
    # the caller, a failure returns instead of exiting the caller's shell, and `set -e` really
    # applies (inside `if ( ... )` bash would silently ignore it).
    if BALSAM_INSTALL_DEPS_SOURCED=1 bash "${BASH_SOURCE[0]}" "$@"; then
        _balsam_install_deps_rc=0
        if [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]] && ! command -v cargo >/dev/null 2>&1; then
            export PATH="${HOME:-/root}/.cargo/bin:$PATH"
        fi
    else
        _balsam_install_deps_rc=$?
    fi
    unset -f _balsam_install_deps_main
    return $_balsam_install_deps_rc
else
    set -euo pipefail
    _balsam_install_deps_main "$@"
fi
