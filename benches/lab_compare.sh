#!/usr/bin/env bash
# benches/lab_compare.sh: the lab with l3hvd and with the seed's stack
# (lab/up --baseline: BIRD 2 + ndppd + radvd + dnsmasq per hypervisor),
# one after the other in the same run, on the same topology: cold start
# (lab/up's milestones), each hypervisor's steady-state memory (sum of the
# VmRSS of its stack's processes) and CPU (utime + stime over IDLE seconds
# with nothing happening, from /proc/PID/stat), the reflectors' memory.
#
#   benches/lab_compare.sh [--idle SECONDS] [--settle SECONDS] [--only l3hvd|baseline]
#                          [lab/up arguments, e.g. --hypervisors 24 --vms-per-hv 10]
#
# Takes /tmp/l3hv-quiet.lock for the whole run (the lead's measurements
# take it too), runs lab/down at the end. Results: a markdown table on
# stdout, the raw numbers and each lab/up report in
# ${OUT:-/tmp/l3hv-lab-compare}/. Needs root (the lab's namespaces).
set -euo pipefail

REPO=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
OUT=${OUT:-/tmp/l3hv-lab-compare}
IDLE=60
SETTLE=10
STACKS=(l3hvd baseline)
UP_ARGS=()
while (($#)); do
    case $1 in
        --idle) IDLE=$2 && shift ;;
        --settle) SETTLE=$2 && shift ;;
        --only) STACKS=("$2") && shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" && exit 0 ;;
        *) UP_ARGS+=("$1") ;;
    esac
    shift
done
[[ $EUID -eq 0 ]] || {
    echo "lab_compare: run as root (the lab's namespaces)" >&2
    exit 1
}
mkdir -p "$OUT"
# (Set L3HV_QUIET_LOCK_HELD=1 when the caller already holds it.)
if [[ ${L3HV_QUIET_LOCK_HELD:-0} != 1 ]]; then
    exec 9>/tmp/l3hv-quiet.lock
    flock 9
fi

RUN=/run/l3hv-lab
CLK=$(getconf CLK_TCK)

rss_kb() { # PID
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

cpu_ticks() { # PID: utime + stime
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

pid_of() { # FILE
    head -n 1 "$1" 2>/dev/null || true
}

# "hv name pid" of every hypervisor process of the lab that is up.
hv_processes() {
    local hv d f
    for hv in $(jq -r '.hypervisors[].name' "$RUN/topology.json"); do
        if [[ $(cat "$RUN/stack") == baseline ]]; then
            for d in bird ndppd radvd dnsmasq; do
                echo "$hv $d $(pid_of "$RUN/$hv/$d.pid")"
            done
        else
            echo "$hv l3hvd $(pid_of "$RUN/$hv/l3hvd.pid")"
            f=$RUN/$hv/dbus.pid
            echo "$hv dbus-daemon $(pid_of "$f")"
        fi
    done
}

# median [min-max] (n) of numbers on stdin, with DIGITS decimals.
stats() { # [DIGITS]
    sort -n | awk -v d="${1:-1}" '{a[NR] = $1} END {
        if (NR == 0) { print "-"; exit }
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        f = "%." d "f"
        printf f " [" f "-" f "] (%d)", m, a[1], a[NR], NR }'
}

declare -A RESULT=()
measure() { # STACK
    local stack=$1 rc=0 t0 t1 hv name pid kb line
    local -a args=("${UP_ARGS[@]}")
    [[ $stack == l3hvd ]] || args+=(--baseline)
    echo "== lab/up ${args[*]} --json" >&2
    t0=$EPOCHREALTIME
    "$REPO/lab/up" "${args[@]}" --json >"$OUT/up-$stack.log" 2>&1 || rc=$?
    t1=$EPOCHREALTIME
    cp "$RUN/report.json" "$OUT/report-$stack.json" 2>/dev/null || true
    RESULT[$stack,exit]=$rc
    RESULT[$stack,wall]=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
    RESULT[$stack,timings]=$(jq -c '.timings // {}' "$OUT/report-$stack.json" 2>/dev/null || echo '{}')
    RESULT[$stack,paths]="$(jq -r '"\(.required_ok)/\(.required_total)" + if (.failed_first_pass // 0) > 0 then " (first pass: \(.failed_first_pass) failed)" else "" end' "$OUT/report-$stack.json" 2>/dev/null || echo '?')"
    sleep "$SETTLE"
    # RSS now; CPU over IDLE seconds, every process in the same window.
    local -A before=() rss=()
    hv_processes >"$OUT/processes-$stack.txt"
    while read -r hv name pid; do
        before[$hv,$name]=$(cpu_ticks "$pid")
        rss[$hv,$name]=$(rss_kb "$pid")
    done <"$OUT/processes-$stack.txt"
    sleep "$IDLE"
    : >"$OUT/per-process-$stack.txt"
    while read -r hv name pid; do
        echo "$hv $name $pid rss_kb=${rss[$hv,$name]} cpu_ticks=$(($(cpu_ticks "$pid") - ${before[$hv,$name]}))" >>"$OUT/per-process-$stack.txt"
    done <"$OUT/processes-$stack.txt"
    # Per hypervisor: the stack (l3hvd; or the four daemons), dbus apart.
    RESULT[$stack,rss]=$(awk '$2 != "dbus-daemon" {split($4, r, "="); s[$1] += r[2]} END {for (h in s) printf "%.1f\n", s[h] / 1024}' \
        "$OUT/per-process-$stack.txt" | stats)
    RESULT[$stack,cpu]=$(awk -v clk="$CLK" '$2 != "dbus-daemon" {split($5, c, "="); s[$1] += c[2]} END {for (h in s) printf "%.2f\n", s[h] / clk}' \
        "$OUT/per-process-$stack.txt" | stats 2)
    RESULT[$stack,dbus]=$(awk '$2 == "dbus-daemon" {split($4, r, "="); printf "%.1f\n", r[2] / 1024}' "$OUT/per-process-$stack.txt" | stats)
    for name in bird ndppd radvd dnsmasq l3hvd; do
        RESULT[$stack,rss_$name]=$(awk -v n="$name" '$2 == n {split($4, r, "="); printf "%.1f\n", r[2] / 1024}' "$OUT/per-process-$stack.txt" | stats)
    done
    line=""
    for name in rr1 rr2 internet; do
        pid=$(pid_of "$RUN/$name/bird.pid")
        kb=$(rss_kb "${pid:-0}")
        line+="${line:+, }$name $(awk -v k="$kb" 'BEGIN {printf "%.1f", k / 1024}') MiB"
    done
    RESULT[$stack,rr]=$line
    echo "   exit $rc, ${RESULT[$stack,paths]} paths, wall ${RESULT[$stack,wall]} s, timings ${RESULT[$stack,timings]}" >&2
    "$REPO/lab/down" >/dev/null
}

for s in "${STACKS[@]}"; do
    measure "$s"
done

{
    echo "lab/up ${UP_ARGS[*]}: $(date -u +%Y-%m-%dT%H:%MZ), settle $SETTLE s, CPU over $IDLE s idle; $(nproc) cores"
    echo
    echo "| | ${STACKS[*]/%/ |}"
    echo "|---|$(printf -- '---|%.0s' "${STACKS[@]}")"
    row() { # LABEL KEY
        local l="| $1 |" s
        for s in "${STACKS[@]}"; do l+=" ${RESULT[$s,$2]} |"; done
        echo "$l"
    }
    row "lab/up exit status" exit
    row "required paths ok" paths
    row "lab/up wall time, s (incl. lab/down of nothing, package check)" wall
    row "milestones, s after lab/down (agents_up, vms_attached, vms_addressed, bgp_converged, all_probed)" timings
    row "RSS per hypervisor, MiB: median [min-max] (n)" rss
    row "CPU per hypervisor over ${IDLE} s idle, s: median [min-max] (n)" cpu
    row "  of which bird, MiB" rss_bird
    row "  ndppd, MiB" rss_ndppd
    row "  radvd, MiB" rss_radvd
    row "  dnsmasq, MiB" rss_dnsmasq
    row "  l3hvd, MiB" rss_l3hvd
    row "dbus-daemon per hypervisor (the lab's system bus; not counted above), MiB" dbus
    row "reflectors and internet router (BIRD), RSS" rr
} | tee "$OUT/summary.md"
