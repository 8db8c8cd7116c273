#!/usr/bin/env bash
# Three "hosts" on this machine, joined only by TCP over veth links, as a login node and two
# compute nodes of a site (network namespaces; needs root and iproute2):
#
#   bash tests/netns/hosts.sh setup N      # N in 1..200 names the set and its addresses
#   bash tests/netns/hosts.sh teardown N   # kills what runs in them, removes them
#   bash tests/netns/hosts.sh run N HOST CMD...   # HOST: login, c1 or c2
#   bash tests/netns/hosts.sh link N HOST down|up # cut or restore a compute host's link
#   bash tests/netns/hosts.sh addr N       # prints the login host's address
#
# Set N is the namespaces balsam-N-login, balsam-N-c1 and balsam-N-c2, in 10.233.N.0/24 (a
# private range no other test uses):
#   login: 10.233.N.1/32 on its loopback (the address the database server is known by), and
#          one link per compute host: 10.233.N.5/30 to c1, 10.233.N.9/30 to c2;
#   c1:    10.233.N.6/30, route to 10.233.N.1 through its link;
#   c2:    10.233.N.10/30, likewise.
# The compute hosts reach only the login host, and only through their own link. The file system
# is shared, as on a site. `run` also gives the command its own host name (HOST), so launchers
# record which host they ran on.
#
# setup removes a set of the same N first, so it is idempotent; teardown removes only the
# namespaces and links of set N, by name, after killing the processes inside them (every
# process in them was started by the test).
set -euo pipefail

cmd=${1:-}; n=${2:-}
usage() { sed -n '2,9p' "$0" >&2; exit 2; }
[[ -n $cmd && $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 200)) || usage
[[ $(id -u) == 0 ]] || { echo "hosts.sh: network namespaces need root" >&2; exit 1; }
command -v ip >/dev/null || { echo "hosts.sh: no ip; run src/scripts/install-deps.sh --postgres" >&2; exit 1; }

ns() { echo "balsam-$n-$1"; }
net=10.233.$n
HOSTS=(login c1 c2)

exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

teardown() {
    local h name pid
    for h in "${HOSTS[@]}"; do
        name=$(ns "$h")
        exists "$name" || continue
        # A namespace lives as long as a process in it: stop them first.
        for pid in $(ip netns pids "$name" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        for _ in $(seq 50); do
            [[ -z $(ip netns pids "$name" 2>/dev/null) ]] && break
            sleep 0.1
        done
        # Deleting a namespace deletes the veth ends inside it, and with them their peers.
        ip netns del "$name"
    done
}

setup() {
    teardown
    local login c i
    login=$(ns login)
    ip netns add "$login"
    ip -n "$login" link set lo up
    ip -n "$login" addr add "$net.1/32" dev lo
    i=0
    for c in c1 c2; do
        i=$((i + 1))
        local name peer_ip my_ip
        name=$(ns "$c")
        peer_ip="$net.$((i * 4 + 1))"
        my_ip="$net.$((i * 4 + 2))"
        ip netns add "$name"
        ip -n "$name" link set lo up
        ip link add "b$n$c" netns "$login" type veth peer name eth0 netns "$name"
        ip -n "$login" addr add "$peer_ip/30" dev "b$n$c"
        ip -n "$login" link set "b$n$c" up
        ip -n "$name" addr add "$my_ip/30" dev eth0
        ip -n "$name" link set eth0 up
        ip -n "$name" route add "$net.1/32" via "$peer_ip"
    done
}

case $cmd in
setup) setup ;;
teardown) teardown ;;
addr) echo "$net.1" ;;
run)
    host=${3:-}; shift 3 || usage
    [[ " ${HOSTS[*]} " == *" $host "* ]] || usage
    # Its own host name too (a UTS namespace), as a real host has.
    exec ip netns exec "$(ns "$host")" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$host" "$@"
    ;;
link)
    host=${3:-}; state=${4:-}
    [[ $host == c1 || $host == c2 ]] && [[ $state == up || $state == down ]] || usage
    i=1; [[ $host == c2 ]] && i=2
    login_ip="$net.$((i * 4 + 1))"; host_ip="$net.$((i * 4 + 2))"
    # Down: both ends send their frames to an address nobody has, so every packet vanishes
    # without a word, as when a node's network dies somewhere on the way: connections hang
    # until their timeouts. (`ip link set down` would fail them at once with "No route to
    # host", the easier case.)
    nobody=02:00:00:00:00:01
    if [[ $state == down ]]; then
        ip -n "$(ns "$host")" neigh replace "$login_ip" lladdr $nobody dev eth0 nud permanent
        ip -n "$(ns login)" neigh replace "$host_ip" lladdr $nobody dev "b$n$host" nud permanent
    else
        ip -n "$(ns "$host")" neigh del "$login_ip" dev eth0 2>/dev/null || true
        ip -n "$(ns login)" neigh del "$host_ip" dev "b$n$host" 2>/dev/null || true
    fi
    ;;
*) usage ;;
esac
