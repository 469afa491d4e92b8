# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts sourcing this
# lab/lib.sh: the lab's topology and the helpers lab/up, lab/down and
# lab/status share. Sourced, never executed.
#
# The TOPOLOGY section below is the one description of the lab: lab/up builds
# the namespaces, veths and bridges from it and generates every hypervisor's
# l3hv.toml and every VM's intent from it; lab/down and lab/status read the
# namespace list from it. Change the lab here and nowhere else.
#
# SAFETY: everything the lab does happens inside the namespaces named here.
# Nothing touches the root namespace's links, routes, rules or sysctls, and
# only processes the lab started are killed, by PID.

# ================================================================ TOPOLOGY ==

# Where the lab keeps its configs, state, logs and PID files.
LAB_RUN=/run/l3hv-lab

# Fabric paths: two independent L2 fabrics, each a "switch" namespace.
PATHS=(a b)
declare -A SWITCH=([a]=swA [b]=swB)

# The networks (the seed's VLANs public 90 and private 20) every path
# carries. The kernel here has no 8021q: each (path, network) is one bridge
# "br-<network>" in the path's switch namespace, and each host on it has one
# veth "<path>-<network>" (e.g. a-public) plugged into that bridge.
NETWORKS=(public private)
# Short names for the switch ports ("<host>-<short>", at most 15 characters).
declare -A NETWORK_SHORT=([public]=pub [private]=priv)

# One l3hv fabric per network, as written into every l3hv.toml.
declare -A FABRIC_TABLE=([public]=90 [private]=20)
declare -A FABRIC_CATCH_ALL=([public]=true [private]=false)
declare -A FABRIC_SUBNETS=(
    [public]="203.0.113.0/24 2001:db8:cb00:7100::/64 2001:db8:cb00:7104::/64"
    [private]="172.22.2.0/24"
)
declare -A FABRIC_GATEWAY_V4=([public]=203.0.113.254 [private]=172.22.2.254)
# Empty: the agent's default.
declare -A FABRIC_IPV6_MODE=([public]=shared-dhcpv6 [private]="")
GATEWAY_V6=fe80::1
ASN=65000
# The agents' log filter (RUST_LOG syntax).
LOG_LEVEL="l3hv=debug,info"

# Hypervisors and their uplink addresses per (network, path). The lab only
# creates and ups the veths: l3hvd adds these addresses itself. The router
# id is the private path-a address.
HVS=(hv1 hv2 hv3)
declare -A UPLINK=(
    [hv1,public,a]="198.51.100.101/25 2001:db8:c633:6400::101/120"
    [hv1,public,b]="198.51.100.201/25 2001:db8:c633:6401::201/120"
    [hv1,private,a]="172.22.15.101/25"
    [hv1,private,b]="172.22.15.201/25"
    [hv2,public,a]="198.51.100.102/25 2001:db8:c633:6400::102/120"
    [hv2,public,b]="198.51.100.202/25 2001:db8:c633:6401::202/120"
    [hv2,private,a]="172.22.15.102/25"
    [hv2,private,b]="172.22.15.202/25"
    [hv3,public,a]="198.51.100.103/25 2001:db8:c633:6400::103/120"
    [hv3,public,b]="198.51.100.203/25 2001:db8:c633:6401::203/120"
    [hv3,private,a]="172.22.15.103/25"
    [hv3,private,b]="172.22.15.203/25"
)

# Route reflectors: one per path, on every network of that path. Their
# IPv4 addresses (without the length) are the reflectors of the
# hypervisors' paths: one MP-BGP session (IPv4 + IPv6 unicast) per path and
# network. Their IPv6 addresses are never listed as reflectors (that would
# open a second session); they only serve the IPv6 next hops.
#
# The implementation (lab/up --rr): bird (default: one BIRD 2 per rr, one
# pair of tables and one set of sessions per network), frr or gobgp (one
# bgpd / gobgpd per rr and network, bound to that network's address).
# Every network's clients are reflected to each other only.
RRS=(rr1 rr2)
declare -A RR_PATH=([rr1]=a [rr2]=b)
declare -A RR_ADDR=(
    [rr1,public]="198.51.100.126/25 2001:db8:c633:6400::126/120"
    [rr1,private]="172.22.15.126/25"
    [rr2,public]="198.51.100.226/25 2001:db8:c633:6401::226/120"
    [rr2,private]="172.22.15.226/25"
)

# The "internet" router: on the public network of both paths, with the
# internet host's addresses on its lo. Note the IPv6 uplink /120s: the
# host parts are hexadecimal, so path a (::101-::103, ::126) is really
# 2001:db8:c633:6400::100/120 and path b (::201-::203, ::226) is
# 2001:db8:c633:6401::200/120; ::1 would be off-link. The router is ::1fe
# and ::2fe.
INTERNET=internet
INTERNET_NETWORK=public
declare -A INTERNET_ADDR=(
    [a]="198.51.100.1/25 2001:db8:c633:6400::1fe/120"
    [b]="198.51.100.129/25 2001:db8:c633:6401::2fe/120"
)
INTERNET_HOST_V4=192.0.2.8
INTERNET_HOST_V6=2001:db8:ffff::8
# The internet router runs BIRD 2 whatever --rr says: an iBGP client of the
# reflector of each path on INTERNET_NETWORK, announcing 0.0.0.0/0 and ::/0
# with itself (that path's address) as next hop, and installing what it
# learns (the VM routes) into its kernel.
INTERNET_ROUTER_ID=198.51.100.1

# The BGP hold time (seconds) of every session: agents, reflectors and the
# internet router. Short, so that a path fault that keeps the carrier up
# (no BFD yet) is detected in seconds; keepalives every third of it.
BGP_HOLD=9
# And after a session's end, the reflectors and the internet router try
# again within seconds: BIRD's defaults (error wait 60-300 s, connect retry
# 120 s) would keep a repaired path out of the ECMP sets for minutes (two
# BIRDs, the internet router and a reflector, wait for each other).
BGP_RETRY=3
BIRD_RETRY="connect delay time 1; connect retry time $BGP_RETRY; error wait time 1, 10;"

# How long lab/up waits for every BGP session to be Established and every
# learned route to be installed (with a next hop on each path) before it
# probes.
BGP_WAIT=30

# VMs: a namespace each, eth0 on a veth whose hypervisor end is named after
# the VM (adopted by l3hvd). VM_V6 is the address configured in the VM;
# VM_V6_PREFIX, when set, is routed to the VM as a /64 of its own (IPv6 mode
# 1, "ipv6_prefixes"), otherwise the address alone is (mode 2, "ipv6").
VMS=(vm1 vm2 vm3 vm4)
declare -A VM_HV=([vm1]=hv1 [vm2]=hv1 [vm3]=hv2 [vm4]=hv3)
declare -A VM_FABRIC=([vm1]=public [vm2]=public [vm3]=public [vm4]=public)
declare -A VM_MAC=(
    [vm1]=52:54:33:00:00:01 [vm2]=52:54:33:00:00:02
    [vm3]=52:54:33:00:00:03 [vm4]=52:54:33:00:00:04
)
declare -A VM_V4=(
    [vm1]=203.0.113.1/24 [vm2]=203.0.113.2/24
    [vm3]=203.0.113.3/24 [vm4]=203.0.113.4/24
)
declare -A VM_V6=(
    [vm1]=2001:db8:cb00:7100::1/64 [vm2]=2001:db8:cb00:7100::2/64
    [vm3]=2001:db8:cb00:7100::3/64 [vm4]=2001:db8:cb00:7104::4/64
)
declare -A VM_V6_PREFIX=([vm4]=2001:db8:cb00:7104::/64)
# Anycast: on the VM's lo, routed via the VM's own address.
ANYCAST_V4=203.0.113.10
ANYCAST_V6=2001:db8:cb00:7100:5254:33ff:fe00:100
declare -A VM_ANYCAST=([vm1]=1 [vm3]=1)

# What the agent can do today; lab/up's matrix expects the paths that need
# a missing feature to fail. Flip these as the features land.
HAVE_BGP=1        # cross-hypervisor and internet routes (issue 5)
HAVE_NDP_PROXY=1  # NTF_PROXY entries for the shared /64 (DESIGN.md "IPv6 neighbour proxy")

# ================================================================= helpers ==

SWITCHES=()
for _p in "${PATHS[@]}"; do SWITCHES+=("${SWITCH[$_p]}"); done
unset _p
# Every namespace the lab creates, and the only ones lab/down deletes.
LAB_NAMESPACES=("${SWITCHES[@]}" "${HVS[@]}" "${RRS[@]}" "$INTERNET" "${VMS[@]}")

die() {
    echo "lab: $*" >&2
    exit 1
}

log() {
    printf '[%(%H:%M:%S)T] %s\n' -1 "$*"
}

# Re-executes the calling script as root (sudo), or fails clearly.
# Usage: lab_require_root "$@"
lab_require_root() {
    [[ $EUID -eq 0 ]] && return 0
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- "$(readlink -f "$0")" "$@"
    fi
    die "must run as root (it creates network namespaces) and sudo is not installed"
}

ns_exists() {
    [[ -e /run/netns/$1 ]]
}

# True when PID is alive and lives in network namespace NS.
pid_in_ns() {
    local pid=$1 ns=$2
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    ip netns identify "$pid" 2>/dev/null | grep -qx -- "$ns"
}

# SIGTERM, then SIGKILL after 3 s. Only ever called on PIDs the lab started
# (its PID files) or found inside its own namespaces.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# The address part of "a/len".
addr_of() {
    echo "${1%/*}"
}

# The first IPv4 address (without the length) of a list of "a/len".
ipv4_of() {
    local a
    for a in "$@"; do
        [[ $a == *:* ]] || {
            echo "${a%/*}"
            return 0
        }
    done
}

# The first IPv6 address (without the length) of a list of "a/len".
ipv6_of() {
    local a
    for a in "$@"; do
        [[ $a != *:* ]] || {
            echo "${a%/*}"
            return 0
        }
    done
}

# The configuration file of hypervisor HV.
hv_config() {
    echo "$LAB_RUN/$1/l3hv.toml"
}

# `l3hv status` without the per-route lines.
status_short() { # $1 = l3hv binary, $2 = hv
    local out
    if ! out=$("$1" --config "$(hv_config "$2")" --timeout 2 status 2>&1); then
        echo "  (no answer: $out)"
        return 1
    fi
    grep -v '^    table ' <<<"$out" | sed 's/^/  /'
}

# The agent's BGP sessions, one line each, from `l3hv peers --json` (the
# text form of `l3hv peers` prints nothing in this l3hv build).
peers_short() { # $1 = l3hv binary, $2 = hv
    local out
    if ! out=$("$1" --config "$(hv_config "$2")" --timeout 2 peers --json 2>&1); then
        echo "  (no answer: $out)"
        return 1
    fi
    printf '  %-26s %-16s %-12s %5s %5s %7s  %s\n' SESSION LOCAL STATE RECV ADV REFUSED "HOLD, ADD-PATH RX, LAST ERROR"
    jq -r '.[] | [
        .peer.name, .peer.local, .state,
        (.prefixes_received | tostring), (.prefixes_advertised | tostring),
        ((.counters.refused // {}) | [.[]] | add // 0 | tostring),
        ((if .negotiated then "hold \(.negotiated.hold_time.secs)s, add-path rx \(.negotiated.add_path_rx | join("+"))" else "" end)
            + (if .last_error then ", last error: \(.last_error)" else "" end))
    ] | @tsv' <<<"$out" |
        while IFS=$'\t' read -r name local state recv adv refused rest; do
            printf '  %-26s %-16s %-12s %5s %5s %7s  %s\n' "$name" "$local" "$state" "$recv" "$adv" "$refused" "$rest"
        done
}

# The reflector processes of RR, one "label pidfile" per line, for the
# implementation in $LAB_RUN/rr (bird: one process; frr, gobgp: one per
# network).
rr_processes() { # RR
    local rr=$1 impl net
    impl=$(cat "$LAB_RUN/rr" 2>/dev/null || echo bird)
    case $impl in
        bird) echo "bird $LAB_RUN/$rr/bird.pid" ;;
        frr | gobgp)
            local d=bgpd
            [[ $impl == frr ]] || d=gobgpd
            for net in "${NETWORKS[@]}"; do
                echo "$d($net) $LAB_RUN/$rr/$d-$net.pid"
            done
            ;;
        *) ;;
    esac
}

# ============================================== building and probing ==
#
# What lab/up does, step by step, shared with lab/test (which restarts
# agents and reflectors the way lab/up started them, and probes the same
# matrix). They use L3HV, L3HVD (below) and RR (the reflector
# implementation: lab/up's --rr, or $LAB_RUN/rr).

LAB_REPO=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
L3HVD=$LAB_REPO/target/release/l3hvd
L3HV=$LAB_REPO/target/release/l3hv
RR=${RR:-bird}

# ------------------------------------------------------------- topology --

nsx() { # NS COMMAND...: run COMMAND in namespace NS
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

addr_add() { # NS DEV CIDR (IPv6 without DAD: nothing else uses these)
    if [[ $3 == *:* ]]; then
        ip -n "$1" -6 addr add "$3" dev "$2" nodad
    else
        ip -n "$1" addr add "$3" dev "$2"
    fi
}

# A veth "<path>-<network>" in HOST, its peer "<host>-<short>" plugged into
# the bridge br-<network> of the path's switch. Both ends up.
plug() { # HOST PATH NETWORK
    local host=$1 path=$2 net=$3
    local sw=${SWITCH[$path]} port="$1-${NETWORK_SHORT[$3]}"
    ip -n "$host" link add "$path-$net" type veth peer name "$port" netns "$sw"
    ip -n "$sw" link set "$port" master "br-$net" up
    ip -n "$host" link set "$path-$net" up
}

build_topology() {
    local ns p net rr a
    for ns in "${LAB_NAMESPACES[@]}"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done

    # Switches: one bridge per (path, network); no IPv6 host stack, no
    # multicast snooping (NS/RA multicast reaches every port).
    for p in "${PATHS[@]}"; do
        ns=${SWITCH[$p]}
        nsx "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        for net in "${NETWORKS[@]}"; do
            ip -n "$ns" link add "br-$net" type bridge mcast_snooping 0
            ip -n "$ns" link set "br-$net" up
        done
    done

    # Hypervisors: the uplink veths only. Addresses, sysctls, rules and
    # routes are l3hvd's job.
    for ns in "${HVS[@]}"; do
        for p in "${PATHS[@]}"; do
            for net in "${NETWORKS[@]}"; do
                plug "$ns" "$p" "$net"
            done
        done
    done

    # Route reflectors: every network of their path.
    for rr in "${RRS[@]}"; do
        p=${RR_PATH[$rr]}
        for net in "${NETWORKS[@]}"; do
            plug "$rr" "$p" "$net"
            for a in ${RR_ADDR[$rr,$net]}; do
                addr_add "$rr" "$p-$net" "$a"
            done
        done
    done

    # The internet router: the public network of both paths, the internet
    # host on lo. Its BGP (BIRD) is started by start_internet.
    nsx "$INTERNET" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    for p in "${PATHS[@]}"; do
        plug "$INTERNET" "$p" "$INTERNET_NETWORK"
        for a in ${INTERNET_ADDR[$p]}; do
            addr_add "$INTERNET" "$p-$INTERNET_NETWORK" "$a"
        done
    done
    addr_add "$INTERNET" lo "$INTERNET_HOST_V4/32"
    addr_add "$INTERNET" lo "$INTERNET_HOST_V6/128"
}

# --------------------------------------------------------------- config --

toml_list() { # WORD... -> ["WORD", ...]
    local out="" w
    for w in "$@"; do
        out+="${out:+, }\"$w\""
    done
    echo "[$out]"
}

# The reflector addresses of (network, path): the IPv4 address of every RR
# on that path (one MP-BGP session each: an IPv6 address would open a
# second session).
reflectors_of() { # NETWORK PATH
    local rr
    local -a out=()
    for rr in "${RRS[@]}"; do
        [[ ${RR_PATH[$rr]} == "$2" ]] || continue
        # shellcheck disable=SC2086
        out+=("$(ipv4_of ${RR_ADDR[$rr,$1]})")
    done
    echo "${out[*]}"
}

write_config() { # HV
    local hv=$1 dir=$LAB_RUN/$1 net p
    local router_id
    router_id=$(addr_of "${UPLINK[$hv,private,a]%% *}")
    mkdir -p "$dir/state"
    {
        cat <<EOF
# Generated by lab/up from the topology in lab/lib.sh: edit that, not this.
# Format: packaging/l3hv.toml.

[hypervisor]
name = "$hv"
router_id = "$router_id"
asn = $ASN
state_dir = "$dir/state"

[control]
socket = "$dir/l3hvd.sock"

[log]
level = "$LOG_LEVEL"
format = "human"

[bgp]
# Short, so that a silent path fault (lab/test fabric-down) is detected in
# seconds without BFD; the reflectors use the same.
hold_time = "${BGP_HOLD}s"
EOF
        for net in "${NETWORKS[@]}"; do
            echo
            echo "[fabrics.$net]"
            echo "table = ${FABRIC_TABLE[$net]}"
            [[ ${FABRIC_CATCH_ALL[$net]} != true ]] || echo "catch_all = true"
            # shellcheck disable=SC2086 # lists are space-separated words
            echo "subnets = $(toml_list ${FABRIC_SUBNETS[$net]})"
            echo "gateway_v4 = \"${FABRIC_GATEWAY_V4[$net]}\""
            [[ -z ${FABRIC_IPV6_MODE[$net]} ]] || echo "ipv6_mode = \"${FABRIC_IPV6_MODE[$net]}\""
            for p in "${PATHS[@]}"; do
                echo
                echo "[fabrics.$net.paths.$p]"
                echo "interface = \"$p-$net\""
                # shellcheck disable=SC2086
                echo "addresses = $(toml_list ${UPLINK[$hv,$net,$p]})"
                # shellcheck disable=SC2046
                echo "reflectors = $(toml_list $(reflectors_of "$net" "$p"))"
            done
        done
    } >"$dir/l3hv.toml"
    "$L3HVD" --check-config "$dir/l3hv.toml" >/dev/null ||
        die "$dir/l3hv.toml: refused by l3hvd --check-config (see above)"
}

# --------------------------------------------------------------- agents --

start_agent() { # HV
    local hv=$1 dir=$LAB_RUN/$1
    # Not a process-group leader (no job control here): setsid execs in
    # place, and `ip netns exec` execs l3hvd, so $! is l3hvd's PID.
    NO_COLOR=1 setsid ip netns exec "$hv" "$L3HVD" --config "$dir/l3hv.toml" \
        </dev/null >>"$dir/l3hvd.log" 2>&1 &
    echo "$!" >"$dir/l3hvd.pid"
}

wait_agent() { # HV
    local hv=$1 dir=$LAB_RUN/$1 pid i
    pid=$(<"$dir/l3hvd.pid")
    for ((i = 0; i < 200; i++)); do
        if "$L3HV" --config "$dir/l3hv.toml" --timeout 1 status >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$dir/l3hvd.log" >&2 || true
            die "$hv: l3hvd (pid $pid) exited; log: $dir/l3hvd.log"
        fi
        sleep 0.1
    done
    tail -n 20 "$dir/l3hvd.log" >&2 || true
    die "$hv: l3hvd does not answer 'l3hv status' after 20 s; log: $dir/l3hvd.log"
}

# (Re)starts the agent of HV the way lab/up does and waits until it answers
# (lab/test, after killing it). Its intent (the VMs) is persisted in its
# state directory.
restart_agent() { # HV
    start_agent "$1"
    wait_agent "$1"
}

# ------------------------------------------------ reflectors, internet --

# The clients of reflector RR on NETWORK, "name address" per line: every
# hypervisor's uplink on that network and path, and the internet router on
# INTERNET_NETWORK. IPv4 only: one MP-BGP session per (path, network).
rr_clients() { # RR NETWORK
    local rr=$1 net=$2 p=${RR_PATH[$1]} hv
    for hv in "${HVS[@]}"; do
        # shellcheck disable=SC2086
        echo "$hv $(ipv4_of ${UPLINK[$hv,$net,$p]})"
    done
    if [[ $net == "$INTERNET_NETWORK" ]]; then
        # shellcheck disable=SC2086
        echo "$INTERNET $(ipv4_of ${INTERNET_ADDR[$p]})"
    fi
}

rr_local4() { # RR NETWORK
    # shellcheck disable=SC2086
    ipv4_of ${RR_ADDR[$1,$2]}
}

# The router id (and cluster id) of RR: its address on the first network.
rr_id() { # RR
    rr_local4 "$1" "${NETWORKS[0]}"
}

# BIRD 2: one process per reflector. Each network has its own pair of
# tables and its own sessions, so a network's routes never reach another
# network's clients.
write_rr_bird() { # RR
    local rr=$1 dir=$LAB_RUN/$1 net name addr id
    id=$(rr_id "$rr")
    {
        echo "# Generated by lab/up (--rr bird) from lab/lib.sh."
        echo "router id $id;"
        echo "log \"$dir/bird.log\" all;"
        echo "protocol device {}"
        for net in "${NETWORKS[@]}"; do
            echo "ipv4 table ${net}4;"
            echo "ipv6 table ${net}6;"
        done
        for net in "${NETWORKS[@]}"; do
            while read -r name addr; do
                cat <<EOF
protocol bgp ${net}_$name {
    description "$net: $name";
    local $(rr_local4 "$rr" "$net") as $ASN;
    neighbor $addr as $ASN;
    rr client;
    rr cluster id $id;
    direct;
    ttl security on;
    hold time $BGP_HOLD;
    $BIRD_RETRY
    ipv4 { table ${net}4; import all; export all; add paths tx; next hop keep; };
    ipv6 { table ${net}6; import all; export all; add paths tx; next hop keep; };
}
EOF
            done < <(rr_clients "$rr" "$net")
        done
    } >"$dir/bird.conf"
}

start_rr_bird() { # RR
    local rr=$1 dir=$LAB_RUN/$1 out
    write_rr_bird "$rr"
    out=$(nsx "$rr" bird -p -c "$dir/bird.conf" 2>&1) || die "$rr: $dir/bird.conf: $out"
    # Daemonizes; writes its PID file.
    nsx "$rr" bird -c "$dir/bird.conf" -s "$dir/bird.ctl" -P "$dir/bird.pid" ||
        die "$rr: bird did not start (config $dir/bird.conf)"
}

# FRR bgpd without zebra: one process per (reflector, network), listening
# on that network's address only.
start_rr_frr() { # RR
    local rr=$1 dir=$LAB_RUN/$1 net name addr local4 conf vty af
    for net in "${NETWORKS[@]}"; do
        local4=$(rr_local4 "$rr" "$net")
        conf=$dir/bgpd-$net.conf
        vty=$dir/frr-$net
        mkdir -p "$vty"
        {
            echo "! Generated by lab/up (--rr frr) from lab/lib.sh."
            echo "frr defaults traditional"
            echo "hostname $rr-$net"
            echo "log file $dir/bgpd-$net.log"
            echo "router bgp $ASN"
            echo " bgp router-id $local4"
            echo " bgp cluster-id $(rr_id "$rr")"
            echo " no bgp ebgp-requires-policy"
            echo " no bgp network import-check"
            while read -r name addr; do
                echo " neighbor $addr remote-as $ASN"
                echo " neighbor $addr description $net-$name"
                echo " neighbor $addr ttl-security hops 1"
                echo " neighbor $addr timers $((BGP_HOLD / 3)) $BGP_HOLD"
                echo " neighbor $addr timers connect $BGP_RETRY"
            done < <(rr_clients "$rr" "$net")
            for af in ipv4 ipv6; do
                echo " address-family $af unicast"
                while read -r name addr; do
                    echo "  neighbor $addr activate"
                    echo "  neighbor $addr route-reflector-client"
                    echo "  neighbor $addr addpath-tx-all-paths"
                done < <(rr_clients "$rr" "$net")
                echo " exit-address-family"
            done
        } >"$conf"
        # -Z no zebra, -S no privilege switch, -P 0 no vty TCP port,
        # -l listen on this network's address only. Daemonizes (-d).
        nsx "$rr" /usr/lib/frr/bgpd -d -Z -S -P 0 -l "$local4" -f "$conf" \
            --vty_socket "$vty" -i "$dir/bgpd-$net.pid" \
            >>"$dir/bgpd-$net.log" 2>&1 ||
            die "$rr: bgpd ($net) did not start; see $dir/bgpd-$net.log"
    done
}

# GoBGP: one gobgpd per (reflector, network), bound to that network's
# address, its API on 127.0.0.1:GOBGP_API_PORT + network index.
GOBGP_API_PORT=50051

gobgp_port() { # NETWORK
    local i
    for i in "${!NETWORKS[@]}"; do
        [[ ${NETWORKS[$i]} != "$1" ]] || echo $((GOBGP_API_PORT + i))
    done
}

start_rr_gobgp() { # RR
    local rr=$1 dir=$LAB_RUN/$1 net name addr local4 conf af
    for net in "${NETWORKS[@]}"; do
        local4=$(rr_local4 "$rr" "$net")
        conf=$dir/gobgpd-$net.toml
        {
            echo "# Generated by lab/up (--rr gobgp) from lab/lib.sh."
            echo "[global.config]"
            echo "  as = $ASN"
            echo "  router-id = \"$local4\""
            echo "  port = 179"
            echo "  local-address-list = [\"$local4\"]"
            while read -r name addr; do
                cat <<EOF

[[neighbors]]
  [neighbors.config]
    neighbor-address = "$addr"
    peer-as = $ASN
    description = "$net-$name"
  [neighbors.transport.config]
    local-address = "$local4"
  [neighbors.ttl-security.config]
    enabled = true
    ttl-min = 255
  [neighbors.timers.config]
    hold-time = $BGP_HOLD
    keepalive-interval = $((BGP_HOLD / 3))
    connect-retry = $BGP_RETRY
    idle-hold-time-after-reset = 1
  [neighbors.route-reflector.config]
    route-reflector-client = true
    route-reflector-cluster-id = "$(rr_id "$rr")"
EOF
                for af in ipv4-unicast ipv6-unicast; do
                    cat <<EOF
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "$af"
    [neighbors.afi-safis.add-paths.config]
      send-max = 8
      receive = true
EOF
                done
            done < <(rr_clients "$rr" "$net")
        } >"$conf"
        # Does not daemonize: setsid, and `ip netns exec` execs gobgpd, so
        # $! is gobgpd's PID.
        setsid ip netns exec "$rr" gobgpd -f "$conf" -t toml -p \
            --api-hosts "127.0.0.1:$(gobgp_port "$net")" --pprof-disable \
            </dev/null >>"$dir/gobgpd-$net.log" 2>&1 &
        echo "$!" >"$dir/gobgpd-$net.pid"
    done
}

# Waits (up to 10 s) until every reflector process of RR is alive and
# listens on port 179.
wait_rr() { # RR
    local rr=$1 i label pidfile pid ok want=0 listening
    while read -r label pidfile; do want=$((want + 1)); done < <(rr_processes "$rr")
    for ((i = 0; i < 100; i++)); do
        ok=1
        while read -r label pidfile; do
            pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
            pid_in_ns "$pid" "$rr" || ok=0
        done < <(rr_processes "$rr")
        # BIRD listens on the wildcard (one socket per family), bgpd and
        # gobgpd on their address.
        listening=$(nsx "$rr" ss -Htln 'sport = :179' 2>/dev/null | wc -l)
        ((ok && listening >= want)) && return 0
        sleep 0.1
    done
    local f
    for f in "$LAB_RUN/$rr"/*.log; do
        [[ -e $f ]] && tail -n 10 "$f" >&2
    done
    die "$rr: the reflector ($RR) is not running or not listening on port 179 after 10 s (logs in $LAB_RUN/$rr)"
}

start_reflectors() {
    local rr
    for rr in "${RRS[@]}"; do
        mkdir -p "$LAB_RUN/$rr"
        "start_rr_$RR" "$rr"
    done
    for rr in "${RRS[@]}"; do
        wait_rr "$rr"
        log "$rr: $RR running, pid(s) $(rr_pids "$rr")"
    done
}

# (Re)starts reflector RR the way start_reflectors does (lab/test, after
# killing it): same configuration, same PID files.
restart_rr() { # RR
    mkdir -p "$LAB_RUN/$1"
    "start_rr_$RR" "$1"
    wait_rr "$1"
}

rr_pids() { # RR
    local label pidfile out=""
    while read -r label pidfile; do
        out+="${out:+ }$label=$(head -n 1 "$pidfile" 2>/dev/null || echo '?')"
    done < <(rr_processes "$1")
    echo "$out"
}

# The internet router: BIRD 2, iBGP client of the reflector of each path on
# INTERNET_NETWORK. Announces the default routes with itself as next hop
# (its IPv4 address on that path for 0.0.0.0/0, its IPv6 address for ::/0),
# learns every path of the VM routes (ADD-PATH) and installs them into its
# kernel, ECMP over both paths.
start_internet() {
    local dir=$LAB_RUN/$INTERNET rr p net=$INTERNET_NETWORK out
    mkdir -p "$dir"
    {
        cat <<EOF
# Generated by lab/up from lab/lib.sh.
router id $INTERNET_ROUTER_ID;
log "$dir/bird.log" all;
protocol device {}
protocol static default4 { ipv4; route 0.0.0.0/0 blackhole; }
protocol static default6 { ipv6; route ::/0 blackhole; }
protocol kernel kernel4 {
    merge paths on;
    ipv4 { import none; export where source = RTS_BGP; };
}
protocol kernel kernel6 {
    merge paths on;
    ipv6 { import none; export where source = RTS_BGP; };
}
EOF
        for rr in "${RRS[@]}"; do
            p=${RR_PATH[$rr]}
            # shellcheck disable=SC2086
            cat <<EOF
protocol bgp $rr {
    description "reflector $rr, path $p ($net)";
    local $(ipv4_of ${INTERNET_ADDR[$p]}) as $ASN;
    neighbor $(rr_local4 "$rr" "$net") as $ASN;
    direct;
    ttl security on;
    hold time $BGP_HOLD;
    $BIRD_RETRY
    ipv4 { import all; export where source = RTS_STATIC; next hop self; add paths rx; };
    # The IPv6 next hop set in the filter, not by "next hop self": that
    # would add the interface's link-local address (a 32-byte next hop),
    # which FRR's bgpd without zebra cannot resolve (it withdraws, then
    # resets the session with "wrong prefix length").
    ipv6 {
        import all; add paths rx;
        export filter {
            if source != RTS_STATIC then reject;
            bgp_next_hop = $(ipv6_of ${INTERNET_ADDR[$p]});
            accept;
        };
    };
}
EOF
        done
    } >"$dir/bird.conf"
    out=$(nsx "$INTERNET" bird -p -c "$dir/bird.conf" 2>&1) || die "$INTERNET: $dir/bird.conf: $out"
    nsx "$INTERNET" bird -c "$dir/bird.conf" -s "$dir/bird.ctl" -P "$dir/bird.pid" ||
        die "$INTERNET: bird did not start (config $dir/bird.conf)"
    # The PID file is written by the daemonized child.
    local i pid=""
    for ((i = 0; i < 50; i++)); do
        pid=$(head -n 1 "$dir/bird.pid" 2>/dev/null || true)
        pid_in_ns "$pid" "$INTERNET" && break
        sleep 0.1
    done
    pid_in_ns "$pid" "$INTERNET" || die "$INTERNET: bird is not running after 5 s; log: $dir/bird.log"
    log "$INTERNET: bird running, pid $pid"
}

# ---------------------------------------------------------- convergence --

# A prefix as learned_routes prints it: no /32 or /128.
kernel_dst() {
    case $1 in
        */32 | */128) echo "${1%/*}" ;;
        *) echo "$1" ;;
    esac
}

# The prefixes hypervisor HV must learn by BGP on FABRIC: the default
# routes, and every VM prefix of that fabric held by another hypervisor
# only (a prefix also held locally is routed to the local VM).
expected_learned() { # HV FABRIC
    local hv=$1 fab=$2 vm h
    local -A mine=() all=()
    [[ $fab != "$INTERNET_NETWORK" ]] || echo "0.0.0.0/0 ::/0"
    for vm in "${VMS[@]}"; do
        [[ ${VM_FABRIC[$vm]} == "$fab" ]] || continue
        local -a p=("$(addr_of "${VM_V4[$vm]}")/32")
        if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
            p+=("${VM_V6_PREFIX[$vm]}")
        else
            p+=("$(addr_of "${VM_V6[$vm]}")/128")
        fi
        [[ -z ${VM_ANYCAST[$vm]:-} ]] || p+=("$ANYCAST_V4/32" "$ANYCAST_V6/128")
        for h in "${p[@]}"; do
            all[$h]=1
            [[ ${VM_HV[$vm]} != "$hv" ]] || mine[$h]=1
        done
    done
    for h in "${!all[@]}"; do
        [[ -n ${mine[$h]:-} ]] || echo "$h"
    done
}

# The uplink interface names ("<path>-<network>") as one regex.
uplink_re() {
    local p net out=""
    for p in "${PATHS[@]}"; do
        for net in "${NETWORKS[@]}"; do
            out+="${out:+|}$p-$net"
        done
    done
    echo "^($out)\$"
}

# "dst gateway@dev,gateway@dev..." per route of table TABLE in NS, of
# protocol PROTO (l3hvd's: 203), with a next hop over an uplink: the routes
# learned by BGP (the agent's own routes to its VMs and its blackholes
# share the protocol). IPv4 then IPv6.
learned_routes() { # NS TABLE [PROTO]
    local ns=$1 table=$2 proto=${3:-203} fam def re
    re=$(uplink_re)
    for fam in -4 -6; do
        def=0.0.0.0/0
        [[ $fam == -4 ]] || def=::/0
        ip -j -n "$ns" "$fam" route show table "$table" proto "$proto" 2>/dev/null |
            jq -r --arg re "$re" --arg dflt "$def" '.[]
                | (.nexthops // [{gateway: .gateway, dev: .dev}]) as $nh
                | select($nh | map(.dev // "" | test($re)) | any)
                | "\(if .dst == "default" then $dflt else .dst end) \($nh | map("\(.gateway // "-")@\(.dev // "-")") | join(","))"'
    done
}

# What is still missing, one line each; nothing when BGP has converged:
# every agent session Established, every expected route installed with a
# next hop on each path, every VM route in the internet router's kernel.
bgp_missing() {
    local hv fab net p n want got dst nh
    local -A routes
    for hv in "${HVS[@]}"; do
        want=$((${#NETWORKS[@]} * ${#PATHS[@]}))
        got=$("$L3HV" --config "$(hv_config "$hv")" --timeout 2 peers --json 2>/dev/null |
            jq '[.[] | select(.state == "Established")] | length' 2>/dev/null || echo 0)
        ((got >= want)) || echo "$hv: $got/$want sessions Established"
        for fab in "${NETWORKS[@]}"; do
            routes=()
            while read -r dst nh; do
                [[ -n $dst ]] && routes[$dst]=$nh
            done < <(learned_routes "$hv" "${FABRIC_TABLE[$fab]}")
            # shellcheck disable=SC2046
            for p in $(expected_learned "$hv" "$fab"); do
                dst=$(kernel_dst "$p")
                nh=${routes[$dst]:-}
                if [[ -z $nh ]]; then
                    echo "$hv: $p not in table ${FABRIC_TABLE[$fab]}"
                    continue
                fi
                n=$(tr ',' '\n' <<<"$nh" | wc -l)
                ((n >= ${#PATHS[@]})) || echo "$hv: $p has $n next hop(s) in table ${FABRIC_TABLE[$fab]}"
            done
        done
    done
    routes=()
    while read -r dst nh; do
        [[ -n $dst ]] && routes[$dst]=$nh
    done < <(learned_routes "$INTERNET" main bird)
    for p in $(expected_learned "$INTERNET" "$INTERNET_NETWORK"); do
        [[ $p != 0.0.0.0/0 && $p != ::/0 ]] || continue
        [[ -n ${routes[$(kernel_dst "$p")]:-} ]] || echo "$INTERNET: $p not in its kernel"
    done
}

# Waits (up to BGP_WAIT s) for the sessions and routes; carries on (the
# report shows what is missing) when they do not converge.
BGP_CONVERGED=0
wait_bgp() {
    local start=$SECONDS missing
    while :; do
        missing=$(bgp_missing)
        if [[ -z $missing ]]; then
            BGP_CONVERGED=1
            log "BGP converged in $((SECONDS - start)) s: every session Established, every route on both paths"
            return 0
        fi
        if ((SECONDS - start >= BGP_WAIT)); then
            log "BGP NOT converged after $BGP_WAIT s:"
            printf '    %s\n' "${missing//$'\n'/$'\n'    }" >&2
            return 0
        fi
        sleep 0.5
    done
}

# ------------------------------------------------------------------ VMs --

vm_intent() { # VM -> JSON intent for `l3hv vm set`
    local vm=$1
    local v4 v6 v4s="" v6s="" prefixes="" routed=""
    v4=$(addr_of "${VM_V4[$vm]}")
    v6=$(addr_of "${VM_V6[$vm]}")
    v4s="\"$v4\""
    if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
        prefixes="\"${VM_V6_PREFIX[$vm]}\""
    else
        v6s="\"$v6\""
    fi
    if [[ -n ${VM_ANYCAST[$vm]:-} ]]; then
        routed="{\"prefix\":\"$ANYCAST_V4/32\",\"via\":\"$v4\"}"
        routed+=",{\"prefix\":\"$ANYCAST_V6/128\",\"via\":\"$v6\"}"
    fi
    printf '{"name":"%s","interfaces":[{"name":"%s","mac":"%s","fabric":"%s","link":"adopt",' \
        "$vm" "$vm" "${VM_MAC[$vm]}" "${VM_FABRIC[$vm]}"
    printf '"ipv4":[%s],"ipv6":[%s],"ipv6_prefixes":[%s],"routed":[%s]}]}\n' \
        "$v4s" "$v6s" "$prefixes" "$routed"
}

add_vm() { # VM
    local vm=$1 hv=${VM_HV[$1]}
    local gw4=${FABRIC_GATEWAY_V4[${VM_FABRIC[$1]}]}
    ip -n "$hv" link add "$vm" type veth peer name eth0 netns "$vm"
    # The guest's own link-local is usable at once (no DAD wait).
    nsx "$vm" sysctl -qw net.ipv6.conf.eth0.accept_dad=0
    ip -n "$vm" link set eth0 address "${VM_MAC[$vm]}"
    ip -n "$vm" link set eth0 up
    ip -n "$hv" link set "$vm" up

    # TODO(dhcp, ra): static for now. These will come from the agent: the
    # IPv4 address, mask and router from its DHCPv4 server; the IPv6
    # address from DHCPv6 (shared /64, A=0) or SLAAC in the VM's own /64,
    # and the default route from its router advertisements.
    ip -n "$vm" addr add "${VM_V4[$vm]}" dev eth0
    ip -n "$vm" route add default via "$gw4"
    ip -n "$vm" -6 addr add "${VM_V6[$vm]}" dev eth0 nodad
    ip -n "$vm" -6 route add default via "$GATEWAY_V6" dev eth0
    if [[ -n ${VM_ANYCAST[$vm]:-} ]]; then
        ip -n "$vm" addr add "$ANYCAST_V4/32" dev lo
        ip -n "$vm" -6 addr add "$ANYCAST_V6/128" dev lo nodad
    fi

    local file=$LAB_RUN/$hv/vm-$vm.json out
    vm_intent "$vm" >"$file"
    out=$("$L3HV" --config "$(hv_config "$hv")" vm set "$file" 2>&1) ||
        die "$hv: l3hv vm set $file: $out"
}

# --------------------------------------------------------------- matrix --

COLUMNS_=("${VMS[@]}" anycast gateway internet)
FAMILIES=(ipv4 ipv6)

anycast_holders() {
    local vm
    for vm in "${VMS[@]}"; do
        [[ -z ${VM_ANYCAST[$vm]:-} ]] || echo "$vm"
    done
}

# The destination address of (family, source, column).
target_of() { # FAMILY SRC COLUMN
    local fam=$1 src=$2 col=$3
    local i=0
    [[ $fam == ipv4 ]] || i=1
    case $col in
        anycast) local -a a=("$ANYCAST_V4" "$ANYCAST_V6") ;;
        gateway) local -a a=("${FABRIC_GATEWAY_V4[${VM_FABRIC[$src]}]}" "$GATEWAY_V6%eth0") ;;
        internet) local -a a=("$INTERNET_HOST_V4" "$INTERNET_HOST_V6") ;;
        *) local -a a=("$(addr_of "${VM_V4[$col]}")" "$(addr_of "${VM_V6[$col]}")") ;;
    esac
    echo "${a[$i]}"
}

# What (family, source, column) needs that the agent lacks: "" (nothing:
# the path must work), "bgp", "ndp", "bgp,ndp", or "-" (not probed).
needs_of() { # FAMILY SRC COLUMN
    local fam=$1 src=$2 col=$3 hv=${VM_HV[$2]}
    local bgp=0 ndp=0 h holder=0 local_holder=0
    # Mode 2 (no /64 of its own): the source resolves its whole /64 on-link,
    # so another address of that /64 needs a proxy NA from the hypervisor.
    local shared_src=0
    [[ -n ${VM_V6_PREFIX[$src]:-} ]] || shared_src=1
    case $col in
        "$src") echo - && return 0 ;;
        gateway) ;;
        internet) bgp=1 ;;
        anycast)
            for h in $(anycast_holders); do
                [[ $h != "$src" ]] || holder=1
                [[ ${VM_HV[$h]} != "$hv" ]] || local_holder=1
            done
            ((holder || local_holder)) || bgp=1
            [[ $fam == ipv6 ]] && ((shared_src && !holder)) && ndp=1
            ;;
        *)
            [[ ${VM_HV[$col]} == "$hv" ]] || bgp=1
            [[ $fam == ipv6 ]] && ((shared_src)) && [[ -z ${VM_V6_PREFIX[$col]:-} ]] && ndp=1
            ;;
    esac
    ((HAVE_BGP)) && bgp=0
    ((HAVE_NDP_PROXY)) && ndp=0
    local -a why=()
    ((bgp)) && why+=(bgp)
    ((ndp)) && why+=(ndp)
    local IFS=,
    echo "${why[*]}"
}

# The hypervisors' underlay targets, "label address" per line: every
# reflector address and the internet router on each path.
underlay_targets() {
    local rr net p a fam
    for rr in "${RRS[@]}"; do
        for net in "${NETWORKS[@]}"; do
            for a in ${RR_ADDR[$rr,$net]}; do
                fam=4
                [[ $a != *:* ]] || fam=6
                echo "$rr/${NETWORK_SHORT[$net]}$fam $(addr_of "$a")"
            done
        done
    done
    for p in "${PATHS[@]}"; do
        for a in ${INTERNET_ADDR[$p]}; do
            fam=4
            [[ $a != *:* ]] || fam=6
            echo "$INTERNET/$p$fam $(addr_of "$a")"
        done
    done
}

# Waits (up to 5 s) until no IPv6 address of the hypervisors is still
# tentative: l3hvd adds the uplink addresses with DAD, as it should on a
# real L2 fabric, and the probes would otherwise race it.
wait_dad() {
    local hv i pending
    for ((i = 0; i < 50; i++)); do
        pending=0
        for hv in "${HVS[@]}"; do
            if ip -n "$hv" -6 addr show tentative | grep -v dadfailed | grep -q inet6; then
                pending=1
            fi
        done
        ((pending)) || return 0
        sleep 0.1
    done
    log "IPv6 DAD still pending on a hypervisor after 5 s"
}

PROBE_PIDS=()

# One ping in the background; "ok" or "FAIL" in FILE.
probe() { # NS ADDRESS FILE
    (
        if ip netns exec "$1" ping -c1 -W1 -q "$2" >/dev/null 2>&1; then
            echo ok
        else
            echo FAIL
        fi >"$3"
    ) &
    PROBE_PIDS+=("$!")
}

# Runs every ping of the report in parallel; results in $LAB_RUN/matrix/.
probe_all() {
    local dir=$LAB_RUN/matrix fam src col hv label addr
    rm -rf "$dir"
    mkdir -p "$dir"
    for fam in "${FAMILIES[@]}"; do
        for src in "${VMS[@]}"; do
            for col in "${COLUMNS_[@]}"; do
                [[ $(needs_of "$fam" "$src" "$col") != - ]] || continue
                probe "$src" "$(target_of "$fam" "$src" "$col")" "$dir/$fam.$src.$col"
            done
        done
    done
    for hv in "${HVS[@]}"; do
        while read -r label addr; do
            probe "$hv" "$addr" "$dir/underlay.$hv.${label//\//_}"
        done < <(underlay_targets)
    done
    # Only the pings: the agents are children of this shell too.
    wait "${PROBE_PIDS[@]}"
}
