#!/usr/bin/env bash
# Bulk learn: a BIRD 2 route reflector holds N static IPv4 /32 routes inside
# the VM subnet and reflects them to one hypervisor. Measures, for l3hvd and
# for BIRD 2 as the hypervisor-side client (the seed's setup, `import table
# yes` so it keeps an Adj-RIB-In like l3hv), the time from session start to
# End-of-RIB received, to the last route in the kernel, and the client's
# resident memory after convergence.
#
#   sudo benches/bgp_learn.sh [N ...]      default: 100000
#
# Everything runs in namespaces it creates (l3bg-*), deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(100000)
WORK=$(mktemp -d /tmp/l3bg.XXXXXX)
P=l3bg$$
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    for ns in sw rr hv; do ip netns del "$P-$ns" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x target/release/l3hvd ] || cargo build --release

now() { date +%s.%N; }
ms() { python3 -c "print(round(($2 - $1) * 1000))"; }

setup() {
    for ns in sw rr hv; do ip netns add "$P-$ns"; ip -n "$P-$ns" link set lo up; done
    ip -n "$P-sw" link add br0 type bridge; ip -n "$P-sw" link set br0 up
    for x in rr:eth0 hv:a-public; do
        ns=${x%%:*}; ifn=${x#*:}
        ip -n "$P-sw" link add "p-$ns" type veth peer name "$ifn" netns "$P-$ns"
        ip -n "$P-sw" link set "p-$ns" master br0 up
        ip -n "$P-$ns" link set "$ifn" up
    done
    ip -n "$P-rr" addr add 198.51.100.126/25 dev eth0
}

reflector() { # N
    python3 - "$1" >"$WORK/routes.conf" <<'PY'
import sys
n = int(sys.argv[1])
for i in range(n):
    print(f"route 198.18.{(i >> 8) & 255}.{i & 255}/32 via 198.51.100.102;" if i < 65536 else
          f"route 198.19.{(i >> 8) & 255}.{i & 255}/32 via 198.51.100.102;")
PY
    cat >"$WORK/rr.conf" <<EOF
router id 198.51.100.126;
protocol device {}
protocol static {
    ipv4;
$(cat "$WORK/routes.conf")
}
protocol bgp hv {
    local 198.51.100.126 as 65000; neighbor 198.51.100.101 as 65000;
    rr client; direct; ttl security on;
    ipv4 { import all; export all; next hop keep; };
}
EOF
    ip netns exec "$P-rr" bird -c "$WORK/rr.conf" -s "$WORK/rr.ctl" -P "$WORK/rr.pid"
}

kernel_count() { ip -n "$P-hv" route show table 90 | wc -l; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

run_l3hv() { # N
    mkdir -p "$WORK/state"; rm -f "$WORK/state/intent.json"
    cat >"$WORK/l3hv.toml" <<EOF
[hypervisor]
name = "bench"
router_id = "198.51.100.101"
state_dir = "$WORK/state"
[control]
socket = "$WORK/l3hvd.sock"
[log]
level = "warn"
[kernel]
reconcile_interval = "1h"
[bgp]
connect_retry = "100ms"
[fabrics.public]
table = 90
catch_all = true
subnets = ["198.18.0.0/15"]
gateway_v4 = "198.19.255.254"
[fabrics.public.paths.a]
interface = "a-public"
addresses = ["198.51.100.101/25"]
reflectors = ["198.51.100.126"]
EOF
    local t0 pid
    t0=$(now)
    # L3HVD_WRAP="heaptrack -o /tmp/l3hvd" profiles the agent (stopped with
    # SIGTERM then, so the profiler can write its data).
    # shellcheck disable=SC2086
    ip netns exec "$P-hv" ${L3HVD_WRAP:-} target/release/l3hvd --config "$WORK/l3hv.toml" >"$WORK/l3hvd.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    local eor="" inst=""
    for _ in $(seq 1 1200); do
        if [ -z "$eor" ] && target/release/l3hv --socket "$WORK/l3hvd.sock" peers --json 2>/dev/null |
            python3 -c 'import json,sys; p=json.load(sys.stdin)[0]; sys.exit(0 if "ipv4" in p["end_of_rib_received"] else 1)' 2>/dev/null; then
            eor=$(now)
        fi
        if [ -z "$inst" ] && [ "$(kernel_count)" -ge "$1" ]; then inst=$(now); fi
        [ -n "$eor" ] && [ -n "$inst" ] && break
        sleep 0.05
    done
    # Memory once converged and idle, not in the middle of the last pass.
    sleep 3
    local agent
    agent=$(ip netns pids "$P-hv" | while read -r p; do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" = l3hvd ] && echo "$p"; done | head -n 1)
    echo "l3hvd $1 eor_ms=$(ms "$t0" "${eor:-0}") installed_ms=$(ms "$t0" "${inst:-0}") rss_kb=$(rss_kb "${agent:-$pid}")"
    if [ -n "${L3HVD_WRAP:-}" ] && [ -n "$agent" ]; then
        kill -TERM "$agent"; wait "$pid" 2>/dev/null || true
    fi
    kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

run_bird() { # N
    cat >"$WORK/hv.conf" <<EOF
router id 198.51.100.101;
protocol device {}
ipv4 table t90;
protocol kernel { ipv4 { table t90; export all; }; kernel table 90; merge paths yes; }
protocol bgp upstream {
    local 198.51.100.101 as 65000; neighbor 198.51.100.126 as 65000;
    direct; ttl security on;
    ipv4 { table t90; import all; export none; import table yes; };
}
EOF
    ip -n "$P-hv" route flush table 90 2>/dev/null || true
    ip -n "$P-hv" addr add 198.51.100.101/25 dev a-public 2>/dev/null || true
    local t0 pid inst=""
    t0=$(now)
    ip netns exec "$P-hv" bird -c "$WORK/hv.conf" -s "$WORK/hv.ctl" -P "$WORK/hv.pid"
    for _ in $(seq 1 1200); do
        if [ "$(kernel_count)" -ge "$1" ]; then inst=$(now); break; fi
        sleep 0.05
    done
    pid=$(cat "$WORK/hv.pid")
    sleep 3
    echo "bird2  $1 installed_ms=$(ms "$t0" "${inst:-0}") rss_kb=$(rss_kb "$pid")"
    kill -9 "$pid" || true
}

setup
for n in "${SIZES[@]}"; do
    [ -f "$WORK/rr.pid" ] && kill -9 "$(cat "$WORK/rr.pid")" 2>/dev/null || true
    reflector "$n"
    run_bird "$n"
    ip -n "$P-hv" route flush table 90 2>/dev/null || true
    ip -n "$P-hv" addr flush dev a-public 2>/dev/null || true
    run_l3hv "$n"
done
