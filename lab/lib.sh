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
