#!/usr/bin/env bash
# Reconcile benchmark: l3hvd creating the kernel state of N VM interfaces
# (cold), a no-op pass of a running agent (warm), and the first pass of a
# restarted agent over a converged kernel (restart), next to `ip -batch`
# plus one `sysctl -p` creating the same objects (the kernel's own cost
# through iproute2, the anchor).
#
#   sudo benches/reconcile.sh [N ...]      default: 1 100 1000
#
# Everything runs in a network namespace it creates (l3b-*), deleted on exit.
# Timings come from the agent's own report (dump + plan + apply) and from
# wall-clock around the ip/sysctl processes. Results go to stdout as a
# Markdown table.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1 100 1000)
RUNS=${RUNS:-3}
WORK=$(mktemp -d /tmp/l3b.XXXXXX)
NS=l3b-hv$$
PID=

cleanup() {
    [ -z "$PID" ] || kill -9 "$PID" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "run as root (creates network namespaces)" >&2; exit 1; }
[ -x target/release/l3hvd ] || cargo build --release

cat >"$WORK/l3hv.toml" <<EOF
[hypervisor]
name = "bench"
router_id = "198.18.0.1"
state_dir = "$WORK/state"
[control]
socket = "$WORK/l3hvd.sock"
[log]
level = "warn"
[kernel]
reconcile_interval = "1h"
[fabrics.public]
table = 90
catch_all = true
# RFC 2544 benchmarking range: 198.18.0.0/15.
subnets = ["198.18.0.0/15", "2001:db8:cb00:7100::/64"]
gateway_v4 = "198.19.255.254"
ipv6_mode = "prefix-per-vm"
EOF

v4() { echo "198.18.$(($1 / 250)).$(($1 % 250 + 1))"; }

intent() { # N -> intent.json with N one-interface VMs on created taps
    python3 - "$1" >"$WORK/state/intent.json" <<'PY'
import json, sys
n = int(sys.argv[1])
vms = {}
for i in range(n):
    name = f"vm{i}"
    vms[name] = {"name": name, "interfaces": [{
        "name": f"t{i}", "mac": "52:54:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255 or 1),
        "fabric": "public", "link": "tap",
        "ipv4": [f"198.18.{i // 250}.{i % 250 + 1}"],
        "ipv6": [f"2001:db8:cb00:7100::{i + 1:x}"]}]}
print(json.dumps({"version": 1, "vms": vms}))
PY
}

start_agent() {
    rm -f "$WORK/l3hvd.sock"
    ip netns exec "$NS" target/release/l3hvd --config "$WORK/l3hv.toml" >>"$WORK/l3hvd.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 600); do [ -S "$WORK/l3hvd.sock" ] && return; sleep 0.05; done
    echo "agent did not start" >&2; cat "$WORK/l3hvd.log" >&2; exit 1
}
stop_agent() { kill -9 "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; }
last_ms() { target/release/l3hv --socket "$WORK/l3hvd.sock" status --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["last_reconcile"]; assert not r["failed"], r["failed"]; print(r["duration_ms"], r["planned"])'; }
noop_ms() { target/release/l3hv --socket "$WORK/l3hvd.sock" reconcile --json | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["planned"]==0, r; print(r["duration_ms"]); print(r, file=sys.stderr) if __import__("os").environ.get("STAGES") else None'; }
fresh_ns() { ip netns del "$NS" 2>/dev/null || true; ip netns add "$NS"; ip -n "$NS" link set lo up; }

batch_files() { # N -> ip.batch + sysctl.conf creating the same objects
    local n=$1 i t
    : >"$WORK/ip.batch"; : >"$WORK/sysctl.conf"
    {
        echo "route add blackhole default table 90 metric 4294967295 proto 203"
        echo "route add blackhole default table 100 metric 4294967295 proto 203"
        echo "rule add iif lo lookup main suppress_prefixlength 0 priority 21 protocol 203"
        echo "rule add iif lo lookup 100 priority 22 protocol 203"
        echo "rule add lookup 90 priority 99 protocol 203"
    } >>"$WORK/ip.batch"
    {
        echo "route add blackhole default table 90 metric 4294967295 proto 203"
        echo "route add blackhole default table 100 metric 4294967295 proto 203"
        echo "rule add iif lo lookup main suppress_prefixlength 0 priority 51 protocol 203"
        echo "rule add iif lo lookup 100 priority 52 protocol 203"
        echo "rule add lookup 90 priority 99 protocol 203"
    } >"$WORK/ip6.batch"
    for ((i = 0; i < n; i++)); do
        t=t$i
        echo "tuntap add $t mode tap vnet_hdr" >>"$WORK/ip.batch"
        cat >>"$WORK/sysctl.conf" <<EOF
net.ipv6.conf.$t.addr_gen_mode=1
net.ipv4.conf.$t.proxy_arp=1
net.ipv4.conf.$t.rp_filter=1
net.ipv4.conf.$t.forwarding=1
net.ipv4.conf.$t.send_redirects=0
net.ipv4.neigh.$t.proxy_delay=0
net.ipv6.neigh.$t.proxy_delay=0
net.ipv6.conf.$t.accept_ra=0
net.ipv6.conf.$t.force_forwarding=1
EOF
    done
    : >"$WORK/ip2.batch"
    for ((i = 0; i < n; i++)); do
        t=t$i
        cat >>"$WORK/ip2.batch" <<EOF
link set $t up alias l3hv:tap:vm$i
addr add 198.19.255.254/32 dev $t scope link
addr add fe80::1/128 dev $t nodad
route add $(v4 "$i")/32 dev $t table 90 metric 16 proto 203
route add $(v4 "$i")/32 dev $t table 100 metric 16 proto 203
route add 2001:db8:cb00:7100::$(printf %x $((i + 1)))/128 dev $t table 90 metric 16 proto 203
route add 2001:db8:cb00:7100::$(printf %x $((i + 1)))/128 dev $t table 100 metric 16 proto 203
EOF
    done
}

now() { date +%s.%N; }
ms() { python3 -c "print(round(($2 - $1) * 1000, 1))"; }
median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "| interfaces | ip -batch + sysctl -p (ms) | l3hvd cold (ms) | cold / ip | l3hvd no-op warm (ms) | l3hvd no-op after restart (ms) |"
echo "|---:|---:|---:|---:|---:|---:|"
for n in "${SIZES[@]}"; do
    batch_files "$n"
    ipt=(); cold=(); warm=(); restart=()
    for _ in $(seq 1 "$RUNS"); do
        fresh_ns
        t0=$(now)
        ip -n "$NS" -batch "$WORK/ip.batch"
        ip -n "$NS" -6 -batch "$WORK/ip6.batch"
        ip netns exec "$NS" sysctl -q -p "$WORK/sysctl.conf"
        ip -n "$NS" -batch "$WORK/ip2.batch"
        t1=$(now)
        ipt+=("$(ms "$t0" "$t1")")

        fresh_ns
        rm -rf "$WORK/state"; mkdir -p "$WORK/state"; intent "$n"
        start_agent
        read -r c planned < <(last_ms)
        cold+=("$c")
        w=()
        for _ in 1 2 3 4 5; do w+=("$(noop_ms)"); done
        warm+=("$(median "${w[@]}")")
        stop_agent
        start_agent
        read -r r planned2 < <(last_ms)
        [ "$planned2" = 0 ] || { echo "restart planned $planned2 changes" >&2; exit 1; }
        restart+=("$r")
        stop_agent
    done
    i=$(median "${ipt[@]}"); c=$(median "${cold[@]}")
    printf '| %d | %s | %s | %s | %s | %s |\n' "$n" "$i" "$c" \
        "$(python3 -c "print(round($c / $i, 2))")" "$(median "${warm[@]}")" "$(median "${restart[@]}")"
done
