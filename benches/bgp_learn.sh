#!/usr/bin/env bash
# Bulk learn: a BIRD 2 route reflector holds N static routes, half IPv4 /32s
# (10.0.0.0/8) and half IPv6 /128s (2001:db8:1000::/36), both inside the VM
# subnets of the fabric, and reflects them to one hypervisor over one MP-BGP
# session (IPv4 transport, IPv6 next hops in MP_REACH). Measures, for l3hvd
# and for BIRD 2 as the hypervisor-side client (the seed's setup, `import
# table yes` so it keeps an Adj-RIB-In like l3hv), the time from the
# client's start to its RIB being complete (l3hvd: End-of-RIB of both
# families received, `l3hv peers`; BIRD: all N routes imported, `birdc show
# protocols all`), to the last route in table 90 of the kernel, the routes/s
# that makes, and the client's resident memory after convergence (VmRSS,
# and the peak VmHWM) and CPU time. The anchor is `ip -batch` installing the
# same N routes on one nexthop group per family in the same namespace.
#
#   sudo benches/bgp_learn.sh [N ...]      default: 100000
#
# L3HVD_LOG=info (or debug) runs the agent at that log level and keeps its
# log in /tmp/l3bg-l3hvd-<N>.log. L3HVD_HOLD=3s proposes that hold time
# (KEEPALIVEs every second; the default is 90 s): BIRD 2.0.12 as reflector
# can sit out its 3 s poll() timeout before the last UPDATEs and End-of-RIB
# of the initial feed to a peer that sends nothing meanwhile (BENCHMARKS.md).
# L3HVD_KEEPALIVES=1 captures l3hvd's BGP segments on its uplink (tcpdump
# in the namespace) and reports the longest gap between its KEEPALIVEs
# (19-byte messages) from Established to convergence. Each client gets 60 s + N/5,000 s to converge (BGP_LEARN_TIMEOUT=<s>
# overrides). The kernel is polled every 100 ms through cheap counters
# (/proc/<pid>/net/fib_triestat for IPv4 table 90, rt6_stats for IPv6) and
# confirmed with a full dump, so the poll does not dump 1,000,000 routes ten
# times a second on the cores the client runs on.
#
# Everything runs in namespaces it creates (l3bg<pid>-*), deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(100000)
WORK=$(mktemp -d /tmp/l3bg.XXXXXX)
P=l3bg$$
PIDS=()
RR_V4=198.51.100.126
HV_V4=198.51.100.101
NH_V4=198.51.100.102              # hv2, the (absent) origin of every route
RR_V6=2001:db8:c633:6400::126
HV_V6=2001:db8:c633:6400::101
NH_V6=2001:db8:c633:6400::102

cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for f in "$WORK"/*.pid; do
        if [ -f "$f" ]; then kill -9 "$(cat "$f")" 2>/dev/null || true; fi
    done
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
    ip -n "$P-rr" addr add "$RR_V4/25" dev eth0
    ip -n "$P-rr" -6 addr add "$RR_V6/120" dev eth0 nodad
    # The hypervisor's uplink addresses, present for every client (l3hvd
    # finds them in place; BIRD and ip -batch need them for the next hops).
    ip -n "$P-hv" addr add "$HV_V4/25" dev a-public
    ip -n "$P-hv" -6 addr add "$HV_V6/120" dev a-public nodad
    # A process that stays in the hypervisor's namespace: its
    # /proc/<pid>/net is that namespace's, read without entering it.
    ip netns exec "$P-hv" sleep infinity >/dev/null 2>&1 &
    ANCHOR=$!; PIDS+=("$ANCHOR"); disown "$ANCHOR"
}

# The N prefixes: the first half IPv4 (10.0.0.1 up), the rest IPv6
# (2001:db8:1000::1 up). $1: N, $2: format (bird4 | bird6 | batch).
prefixes() {
    python3 - "$@" <<'PY'
import sys
n, fmt = int(sys.argv[1]), sys.argv[2]
n4 = n // 2
v4 = [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(1, n4 + 1)]
v6 = [f"2001:db8:1000::{i >> 16:x}:{i & 0xffff:x}" for i in range(1, n - n4 + 1)]
out = sys.stdout
if fmt == "bird4":
    out.writelines(f"route {p}/32 via 198.51.100.102;\n" for p in v4)
elif fmt == "bird6":
    out.writelines(f"route {p}/128 via 2001:db8:c633:6400::102;\n" for p in v6)
else:  # the same attributes l3hvd gives learned routes (proto 203, metric 32)
    out.writelines(f"route add {p}/32 nhid 10 table 90 proto 203 metric 32\n" for p in v4)
    out.writelines(f"route add {p}/128 nhid 11 table 90 proto 203 metric 32\n" for p in v6)
PY
}

cat >"$WORK/poll.py" <<'PY'
# Waits until table 90 of the hypervisor's namespace holds the n4 IPv4 and
# n6 IPv6 bench prefixes and the BGP client's RIB is complete (kind: l3hv or
# bird).
# Prints one line of key=value pairs; times in ms from t0.
import json, re, subprocess, sys, threading, time
ns, anchor, n4, n6, timeout, t0, kind, sock, pid = sys.argv[1:]
n4, n6, timeout, t0, pid = int(n4), int(n6), float(timeout), float(t0), int(pid)

def cheap():
    with open(f"/proc/{anchor}/net/fib_triestat") as f:
        m = re.search(r"^Id 90:\n(?:\t.*\n)*?\tPrefixes:\s+(\d+)", f.read(), re.M)
    with open(f"/proc/{anchor}/net/rt6_stats") as f:
        c6 = int(f.read().split()[3], 16)
    return (int(m.group(1)) if m else 0), c6

def dump():
    def count(fam, start):
        out = subprocess.run(["ip", "-n", ns, fam, "-o", "route", "show", "table", "90"],
                             capture_output=True, text=True).stdout
        return sum(1 for l in out.splitlines()
                   if l.startswith(start) and "/" not in l.split()[0])
    return count("-4", "10."), count("-6", "2001:db8:1")

def rib():
    """The client's view: (RIB complete, paths received, session
    established). Complete is End-of-RIB of both families for l3hvd, all
    routes imported for BIRD."""
    if kind == "l3hv":
        r = subprocess.run(["target/release/l3hv", "--socket", sock, "peers", "--json"],
                           capture_output=True, text=True)
        try:
            p = json.loads(r.stdout)[0]
        except (ValueError, IndexError):
            return False, 0, False
        eor = p.get("end_of_rib_received", [])
        return ("ipv4" in eor and "ipv6" in eor), p.get("prefixes_received", 0), \
            p.get("state") == "Established"
    if kind == "bird":
        r = subprocess.run(["birdc", "-s", sock, "show", "protocols", "all", "upstream"],
                           capture_output=True, text=True)
        got = sum(int(x) for x in re.findall(r"Routes:\s+(\d+) imported", r.stdout))
        return got >= n4 + n6, got, bool(re.search(r"BGP state:\s+Established", r.stdout))
    raise ValueError(kind)

def proc(pid):
    st = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for l in f:
                k, _, v = l.partition(":")
                st[k] = v.split()[0] if v.split() else ""
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / 100  # utime + stime, USER_HZ
    except OSError:
        return {}
    return {"rss_kb": st.get("VmRSS"), "hwm_kb": st.get("VmHWM"), "cpu_s": cpu}

# The client's RIB is polled in its own thread: a control socket answering
# late must not hold up the kernel samples.
state = {"up_t": None, "rib_t": None}
def rib_poll():
    while time.time() < deadline and state["rib_t"] is None:
        complete, _, up = rib()
        if up and state["up_t"] is None:
            state["up_t"] = time.time()
        if complete:
            state["rib_t"] = time.time()
        time.sleep(0.1)
deadline = t0 + timeout
threading.Thread(target=rib_poll, daemon=True).start()
series = []  # (t, IPv4 prefixes in table 90, IPv6 routes in the namespace)
done = None
next_dump = 0.0
while time.time() < deadline:
    t = time.time()
    c4, c6 = cheap()
    series.append((t, c4, c6))
    # The counts include routes that are not bench prefixes (a catch-all
    # route in table 90, IPv6 local and multicast routes): a full dump
    # confirms, at most once a second.
    if not done and c4 >= n4 and c6 >= n6 and time.time() >= next_dump:
        d4, d6 = dump()
        if d4 >= n4 and d6 >= n6:
            e4, e6 = cheap()
            done = (time.time(), d4, d6, e4 - d4, e6 - d6)
        else:
            next_dump = time.time() + 1
    if done and state["rib_t"] is not None:
        break
    time.sleep(0.1)
rib_t, up_t = state["rib_t"], state["up_t"]
cpu_at_done = proc(pid).get("cpu_s")
res = {}
if done:
    tdone, d4, d6, x4, x6 = done
    # Every count beyond the bench prefixes (the catch-all route, local and
    # multicast IPv6 routes) was there by the end; the first sample where
    # both counts minus those reach n is when the kernel had them all.
    inst = next((t for t, c4, c6 in series if c4 - x4 >= n4 and c6 - x6 >= n6), tdone)
    res["installed_ms"] = round((inst - t0) * 1000)
    res["routes_per_s"] = round((n4 + n6) / (inst - t0))
else:
    d4, d6 = dump()
    res["installed_ms"] = f"NOT_CONVERGED_within_{timeout:.0f}s"
res["rib_ms"] = round((rib_t - t0) * 1000) if rib_t else f"NOT_within_{timeout:.0f}s"
res["established_ms"] = round((up_t - t0) * 1000) if up_t else "-"
res["rib_received"] = rib()[1]
res["kernel_v4"] = d4
res["kernel_v6"] = d6
res["cpu_s_at_convergence"] = cpu_at_done
res["counts"] = f"{series[-1][1]},{series[-1][2]}" if series else "-"
print(" ".join(f"{k}={v}" for k, v in res.items()))
PY

poll() { # kind sock pid t0 N
    local to=${BGP_LEARN_TIMEOUT:-$((60 + $5 / 5000))}
    python3 "$WORK/poll.py" "$P-hv" "$ANCHOR" $(($5 / 2)) $(($5 - $5 / 2)) "$to" "$4" "$1" "$2" "$3"
}

# Memory and CPU once converged and idle, not in the middle of the last pass.
after() { # pid
    sleep 3
    python3 - "$1" <<'PY' || echo "rss_kb=- (process $1 gone)"
import sys
st = dict(l.split(":", 1) for l in open(f"/proc/{sys.argv[1]}/status"))
f = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
print(f"rss_kb={st['VmRSS'].split()[0]} hwm_kb={st['VmHWM'].split()[0]}"
      f" cpu_s={(int(f[11]) + int(f[12])) / 100} (user {int(f[11]) / 100}"
      f" sys {int(f[12]) / 100})")
PY
}

# Empties table 90 of the hypervisor (a killed client leaves its routes).
flush_hv() {
    ip -n "$P-hv" nexthop flush >/dev/null 2>&1 || true
    ip -n "$P-hv" -4 route flush table 90 2>/dev/null || true
    ip -n "$P-hv" -6 route flush table 90 2>/dev/null || true
    sleep 1
}

reflector() { # N; (re)started for each client, so no session state carries over
    if [ -f "$WORK/rr.pid" ]; then
        kill -9 "$(cat "$WORK/rr.pid")" 2>/dev/null || true
        rm -f "$WORK/rr.pid" "$WORK/rr.ctl"
        sleep 0.5
    fi
    if [ ! -f "$WORK/rr.conf" ] || [ "$(cat "$WORK/rr.n")" != "$1" ]; then
        prefixes "$1" bird4 >"$WORK/rr4.routes"
        prefixes "$1" bird6 >"$WORK/rr6.routes"
        cat >"$WORK/rr.conf" <<EOF
router id $RR_V4;
protocol device {}
protocol static s4 {
    ipv4;
    include "$WORK/rr4.routes";
}
protocol static s6 {
    ipv6;
    include "$WORK/rr6.routes";
}
protocol bgp hv {
    local $RR_V4 as 65000; neighbor $HV_V4 as 65000;
    rr client; direct; ttl security on;
    ipv4 { import all; export all; next hop keep; };
    ipv6 { import all; export all; next hop keep; };
}
EOF
        echo "$1" >"$WORK/rr.n"
    fi
    ip netns exec "$P-rr" bird -c "$WORK/rr.conf" -s "$WORK/rr.ctl" -P "$WORK/rr.pid"
    # Ready once it holds all N routes (parsing 1,000,000 static routes
    # takes a while; that is not the client's time).
    for _ in $(seq 1 600); do
        if birdc -s "$WORK/rr.ctl" show route count 2>/dev/null |
            awk -v n="$1" '/^Total:/ {t = $2} END {exit !(t >= n)}'; then
            return 0
        fi
        sleep 0.2
    done
    echo "reflector did not load $1 routes" >&2
    return 1
}

run_batch() { # N label
    flush_hv
    prefixes "$1" batch >"$WORK/batch"
    grep ' nhid 10 ' "$WORK/batch" >"$WORK/batch4"
    grep ' nhid 11 ' "$WORK/batch" >"$WORK/batch6"
    ip -n "$P-hv" nexthop add id 1 via "$NH_V4" dev a-public onlink proto 203
    ip -n "$P-hv" nexthop add id 2 via "$NH_V6" dev a-public onlink proto 203
    ip -n "$P-hv" nexthop add id 10 group 1 proto 203
    ip -n "$P-hv" nexthop add id 11 group 2 proto 203
    # One batch per family, back to back, so each family's rate shows too.
    local t0 t1 t2
    t0=$(now)
    ip -n "$P-hv" -batch "$WORK/batch4"
    t1=$(now)
    ip -n "$P-hv" -batch "$WORK/batch6"
    t2=$(now)
    echo "$2 $1 installed_ms=$(ms "$t0" "$t2")" \
        "routes_per_s=$(python3 -c "print(round($1 / ($t2 - $t0)))")" \
        "v4_ms=$(ms "$t0" "$t1") v6_ms=$(ms "$t1" "$t2")" \
        "kernel_v4=$(ip -n "$P-hv" -4 -o route show table 90 | grep -c '^10\.')" \
        "kernel_v6=$(ip -n "$P-hv" -6 -o route show table 90 | grep -c '^2001:db8:1')"
    rm -f "$WORK"/batch*
}

run_l3hv() { # N
    flush_hv
    mkdir -p "$WORK/state"; rm -f "$WORK/state/intent.json"
    cat >"$WORK/l3hv.toml" <<EOF
[hypervisor]
name = "bench"
router_id = "$HV_V4"
state_dir = "$WORK/state"
[control]
socket = "$WORK/l3hvd.sock"
[log]
level = "${L3HVD_LOG:-warn}"
[kernel]
reconcile_interval = "1h"
[metrics]
listen = "127.0.0.1:9475"
[bgp]
connect_retry = "100ms"
$([ -n "${L3HVD_HOLD:-}" ] && echo "hold_time = \"$L3HVD_HOLD\"")
# The default (1,000,000 per session) is the 1M run's exact size.
max_prefixes = $(($1 + 1000))
[fabrics.public]
table = 90
catch_all = true
subnets = ["10.0.0.0/8", "2001:db8:1000::/36"]
gateway_v4 = "10.255.255.254"
[fabrics.public.paths.a]
interface = "a-public"
addresses = ["$HV_V4/25", "$HV_V6/120"]
reflectors = ["$RR_V4"]
EOF
    local t0 pid cap=""
    if [ -n "${L3HVD_KEEPALIVES:-}" ]; then
        ip netns exec "$P-hv" tcpdump -n -tt -l -i a-public \
            "src host $HV_V4 and tcp port 179 and (ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2)) == 19" \
            >"$WORK/keepalives.txt" 2>/dev/null &
        cap=$!; PIDS+=("$cap")
        sleep 0.5
    fi
    t0=$(now)
    # L3HVD_WRAP="heaptrack -o /tmp/l3hvd" profiles the agent (stopped with
    # SIGTERM then, so the profiler can write its data).
    # shellcheck disable=SC2086
    ip netns exec "$P-hv" ${L3HVD_WRAP:-} target/release/l3hvd --config "$WORK/l3hv.toml" >"$WORK/l3hvd.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    local agent="" p
    for _ in $(seq 1 100); do
        # (not a pipeline ending in a failed test: with pipefail and set -e
        # that ended the script whenever the agent's pid sorted before the
        # namespace's other processes, after the pids wrapped around)
        for p in $(ip netns pids "$P-hv"); do
            if [ "$(cat /proc/"$p"/comm 2>/dev/null)" = l3hvd ]; then agent=$p; break; fi
        done
        [ -n "$agent" ] && break
        sleep 0.02
    done
    local r
    r=$(poll l3hv "$WORK/l3hvd.sock" "${agent:-$pid}" "$t0" "$1")
    if [ -n "${BGP_LEARN_DEBUG:-}" ]; then
        ip -n "$P-hv" nexthop show
        ip -n "$P-hv" route show table 90 | sed -n 1,3p
        ip -n "$P-hv" -6 -o route show table 90 | sed -n 1,3p
        ip -n "$P-hv" route show table 90 | grep -v '^10\.[0-9.]* ' || true
    fi
    echo "l3hvd $1 $r $(after "${agent:-$pid}")" "$(l3hv_passes)"
    if [ -n "$cap" ]; then
        kill -INT "$cap" 2>/dev/null || true; wait "$cap" 2>/dev/null || true
        awk '{ if (n++) { g = $1 - last; if (g > max) max = g } last = $1 }
             END { printf "l3hvd keepalives=%d longest_gap_s=%.3f\n", n, max }' "$WORK/keepalives.txt"
    fi
    if ! kill -0 "${agent:-$pid}" 2>/dev/null; then echo "l3hvd exited:"; tail -n 20 "$WORK/l3hvd.log"; fi
    if [ -n "${L3HVD_LOG:-}" ]; then
        cp "$WORK/l3hvd.log" "/tmp/l3bg-l3hvd-$1.log"
        echo "l3hvd log: /tmp/l3bg-l3hvd-$1.log (t0 $(date -u -d "@$t0" +%T.%N))"
    elif grep -q . "$WORK/l3hvd.log"; then
        echo "l3hvd log (warn and above):"; tail -n 10 "$WORK/l3hvd.log"
    fi
    if [ -n "${L3HVD_WRAP:-}" ] && [ -n "$agent" ]; then
        kill -TERM "$agent"; wait "$pid" 2>/dev/null || true
    fi
    kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
}

# The agent's reconcile passes so far, their total time and kernel
# operations (its metrics endpoint, on the namespace's loopback).
l3hv_passes() {
    ip netns exec "$P-hv" curl -s --max-time 5 http://127.0.0.1:9475/metrics | awk '
        /^l3hv_reconcile_runs_total / {r = $2}
        /^l3hv_reconcile_duration_seconds_sum / {d = $2}
        /^l3hv_reconcile_operations_total\{result="applied"\}/ {a = $2}
        END {printf "passes=%s passes_s=%.2f ops_applied=%s", r, d, a}'
}

run_bird() { # N
    flush_hv
    cat >"$WORK/hv.conf" <<EOF
router id $HV_V4;
protocol device {}
ipv4 table t90;
ipv6 table t90v6;
protocol kernel { ipv4 { table t90; export all; }; kernel table 90; merge paths yes; }
protocol kernel { ipv6 { table t90v6; export all; }; kernel table 90; merge paths yes; }
protocol bgp upstream {
    local $HV_V4 as 65000; neighbor $RR_V4 as 65000;
    direct; ttl security on;
    # BIRD waits 5 s after start before its first connect by default (the
    # reflector, whose connect-retry timer runs, waits for it): 1 s, the
    # least it takes, keeps that timer out of the learn time.
    connect delay time 1;
    ipv4 { table t90; import all; export none; import table yes; };
    ipv6 { table t90v6; import all; export none; import table yes; };
}
EOF
    local t0 pid
    t0=$(now)
    ip netns exec "$P-hv" bird -c "$WORK/hv.conf" -s "$WORK/hv.ctl" -P "$WORK/hv.pid"
    pid=""
    for _ in $(seq 1 100); do  # written by the daemonized child
        pid=$(cat "$WORK/hv.pid" 2>/dev/null || true)
        [ -n "$pid" ] && break
        sleep 0.01
    done
    local r
    r=$(poll bird "$WORK/hv.ctl" "$pid" "$t0" "$1")
    echo "bird2 $1 $r $(after "$pid")"
    kill -9 "$pid" || true
    rm -f "$WORK/hv.pid"
}

setup
echo "# $(date -u '+%F %T UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet HEAD 2>/dev/null || echo +dirty) $(bird --version 2>&1 | head -n 1) kernel $(uname -r)"
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg); l3hvd hold_time ${L3HVD_HOLD:-90s (default)}"
RUN=${BGP_LEARN_RUN:-batch bird l3hv}  # a subset for a quick check
for n in "${SIZES[@]}"; do
    # The kernel anchor first and again last: the first to put N routes in
    # the kernel may pay for growing its caches, and the load can change
    # during a run.
    case " $RUN " in *" batch "*) run_batch "$n" ip-batch ;; esac
    case " $RUN " in *" bird "*) reflector "$n"; run_bird "$n" ;; esac
    case " $RUN " in *" l3hv "*) reflector "$n"; run_l3hv "$n" ;; esac
    case " $RUN " in *" batch "*) run_batch "$n" ip-batch-again ;; esac
    echo "# load average after N=$n: $(cut -d' ' -f1-3 /proc/loadavg)"
done
