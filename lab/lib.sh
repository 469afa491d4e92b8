# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts sourcing this
# lab/lib.sh: the helpers lab/up, lab/down, lab/status and lab/test share,
# and the reader of the lab's topology. Sourced, never executed.
#
# The topology (paths and their switches, fabrics, hypervisors and their
# uplinks, reflectors, the internet router, VMs) is one description,
# lab/topology.json (the seed's lab). `lab/up --hypervisors N --vms-per-hv
# M` derives a larger one from it (gen_topology). lab/up keeps the one it
# built in $LAB_RUN/topology.json; load_topology reads a description into
# the arrays below, from which lab/up builds the namespaces, veths and
# bridges and generates every hypervisor's l3hv.toml and every VM's domain
# XML; lab/down, lab/status and lab/test read the lab that is up the same
# way. Change the seed lab in lab/topology.json and nowhere else.
#
# SAFETY: everything the lab does happens inside the namespaces of its
# description (and lab/down also sweeps the lab's own name patterns, see
# lab_namespaces_present). Nothing touches the root namespace's links,
# routes, rules or sysctls, and only processes the lab started are killed,
# by PID.

# ================================================================ TOPOLOGY ==

# Where the lab keeps its configs, state, logs and PID files.
LAB_RUN=/run/l3hv-lab

# The seed's description, and the one of the lab that is up.
LAB_TOPOLOGY_SEED=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)/topology.json
LAB_TOPOLOGY_UP=$LAB_RUN/topology.json

# Filled by load_topology from the description (lab/README.md describes
# every field). Paths: independent L2 fabrics, each a "switch" namespace.
# Networks (the seed's VLANs public 90 and private 20): every path carries
# each of them; the kernel here has no 8021q, so each (path, network) is
# one bridge "br-<network>" in the path's switch namespace, and each host
# on it has one veth "<path>-<network>" (e.g. a-public) plugged into that
# bridge, whose switch end is "<host>-<short>" (at most 15 characters).
# Each network is one l3hv fabric (FABRIC_*) in every l3hv.toml.
PATHS=()
declare -A SWITCH=()
NETWORKS=()
declare -A NETWORK_SHORT=() FABRIC_TABLE=() FABRIC_CATCH_ALL=() FABRIC_SUBNETS=()
declare -A FABRIC_GATEWAY_V4=() FABRIC_IPV6_MODE=()
GATEWAY_V6=""
ASN=""
# Hypervisors and their uplink addresses per (hv,network,path): the lab
# only creates and ups the veths, l3hvd adds these addresses itself. The
# router id is the private path-a address.
HVS=()
declare -A UPLINK=()
# Route reflectors: one per path, on every network of that path. Their
# IPv4 addresses (without the length) are the reflectors of the
# hypervisors' paths: one MP-BGP session (IPv4 + IPv6 unicast) per path and
# network. Their IPv6 addresses are never listed as reflectors (that would
# open a second session); they only serve the IPv6 next hops. The
# implementation (lab/up --rr): bird (default: one BIRD 2 per rr, one pair
# of tables and one set of sessions per network), frr or gobgp (one bgpd /
# gobgpd per rr and network, bound to that network's address). Every
# network's clients are reflected to each other only.
RRS=()
declare -A RR_PATH=() RR_ADDR=()
# The "internet" router: on INTERNET_NETWORK of every path, the internet
# host's addresses on its lo. It runs BIRD 2 whatever --rr says: an iBGP
# client of the reflector of each path, announcing 0.0.0.0/0 and ::/0 with
# itself (that path's address) as next hop, and installing what it learns
# (the VM routes) into its kernel. Note the seed's IPv6 uplink /120s: the
# host parts are hexadecimal, so path a (::101-::103, ::126) is really
# 2001:db8:c633:6400::100/120; the router is ::1fe and ::2fe.
INTERNET=""
INTERNET_NETWORK=""
declare -A INTERNET_ADDR=()
INTERNET_HOST_V4=""
INTERNET_HOST_V6=""
INTERNET_ROUTER_ID=""
# VMs: a namespace each, eth0 on a veth whose hypervisor end is named after
# the VM (adopted by l3hvd). VM_V4 and VM_V6 are the addresses the VM ends
# up with: by default it gets them from the agent (DHCPv4; DHCPv6 on the
# shared /64, SLAAC in a /64 of its own), with `lab/up --static` lab/up
# configures them. VM_V6_PREFIX ("ipv6": "prefix" in the description) is
# routed to the VM as a /64 of its own (IPv6 mode 1, "ipv6_prefixes"; the
# VM's address is then its SLAAC EUI-64 address, from its MAC), otherwise
# ("ipv6": "address") the address alone is (mode 2, "ipv6": the RAs say
# A=0 M=1 and DHCPv6 hands it out). VM_SYSCTLS: IPv6 sysctls of the VM's
# eth0, set before the link comes up (the seed's vm3: temporary addresses
# and a random stable-privacy interface id, still reachable on its
# intended DHCPv6 address). VM_ANYCAST: the anycast addresses on the VM's
# lo, routed via the VM's own address. V4A / V6A: the addresses without
# their length; VM_INDEX: the VM's position (from 0).
VMS=()
declare -A VM_HV=() VM_FABRIC=() VM_MAC=() VM_V4=() VM_V6=() VM_V6_PREFIX=()
declare -A VM_SYSCTLS=() VM_ANYCAST=() V4A=() V6A=() VM_INDEX=()
ANYCAST_V4=""
ANYCAST_V6=""
SWITCHES=()
# Every namespace the lab creates, and the only ones lab/down deletes
# (with lab_namespaces_present's sweep).
LAB_NAMESPACES=()
# The matrix's columns.
COLUMNS_=()

# The agents' log filter (RUST_LOG syntax).
LOG_LEVEL="l3hv=debug,info"

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

# What the agent can do today; lab/up's matrix expects the paths that need
# a missing feature to fail. Flip these as the features land.
HAVE_BGP=1        # cross-hypervisor and internet routes (issue 5)
HAVE_NDP_PROXY=1  # NTF_PROXY entries for the shared /64 (DESIGN.md "IPv6 neighbour proxy")
# lab/up --qemu only: IPv6 to a QEMU guest on the shared /64 needs the
# agent's DHCPv6 replies and solicited RAs to reach the guest's link-local
# on the tap l3hvd creates (managed='no', addrgenmode none): the tap's
# fe80::1/64 gives the kernel its fe80::/64 route there (was fe80::1/128:
# ENETUNREACH, counter dhcpv6.send_failed).
HAVE_TAP_LL_ROUTE=1

# ================================================================= helpers ==


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

# True while PID runs (a zombie does not: this machine's init reaps the
# lab's orphaned daemons only every 2 s or so).
pid_alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# SIGTERM, then SIGKILL after 3 s. Only ever called on PIDs the lab started
# (its PID files) or found inside its own namespaces.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 30; i++)); do
        pid_alive "$pid" || return 0
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

# ================================================== topology description ==

# The jq program turning a description into bash assignments (for eval:
# every value goes through @sh). It checks what the rest of lib.sh
# relies on and stops with a message otherwise.
# shellcheck disable=SC2016 # jq, not shell
TOPOLOGY_JQ='
def sh: tostring | @sh;
def words: map(tostring) | join(" ") | @sh;
def need(c; msg): if c then . else error(msg) end;
. as $t
| need(([.paths[].name] | length) >= 1; "no paths")
| need(([.vms[].name] | unique | length) == (.vms | length); "duplicate VM names")
| need(([.hypervisors[].name] | unique | length) == (.hypervisors | length); "duplicate hypervisor names")
| need(([.vms[].mac] | unique | length) == (.vms | length); "duplicate VM MACs")
| need(([.vms[].v4] | unique | length) == (.vms | length); "duplicate VM IPv4 addresses")
| need(all(.vms[]; (.name | length) <= 15 and (.name | test("^vm[0-9a-z-]*$"))); "VM names must start with vm, at most 15 characters")
| need(all(.vms[]; .hv as $h | any($t.hypervisors[]; .name == $h)); "a VM on an unknown hypervisor")
| need(all(.vms[]; (.ipv6 == "prefix" and (.v6_prefix | type) == "string") or (.ipv6 == "address" and .v6_prefix == null)); "ipv6 must be \"address\" (no v6_prefix) or \"prefix\" (with v6_prefix)")
| "ASN=\(.asn | sh)",
  "GATEWAY_V6=\(.gateway_v6 | sh)",
  "PATHS=(\([.paths[].name] | map(@sh) | join(" ")))",
  (.paths[] | "SWITCH[\(.name | sh)]=\(.switch | sh)"),
  "NETWORKS=(\([.fabrics[].name] | map(@sh) | join(" ")))",
  (.fabrics[] | .name as $n
    | "NETWORK_SHORT[\($n | sh)]=\(.short | sh)",
      "FABRIC_TABLE[\($n | sh)]=\(.table | sh)",
      "FABRIC_CATCH_ALL[\($n | sh)]=\(.catch_all // false | sh)",
      "FABRIC_SUBNETS[\($n | sh)]=\(.subnets | words)",
      "FABRIC_GATEWAY_V4[\($n | sh)]=\(.gateway_v4 | sh)",
      "FABRIC_IPV6_MODE[\($n | sh)]=\(.ipv6_mode // "" | sh)"),
  "HVS=(\([.hypervisors[].name] | map(@sh) | join(" ")))",
  (.hypervisors[] | .name as $h | .uplinks | to_entries[] | .key as $n | .value | to_entries[]
    | "UPLINK[\("\($h),\($n),\(.key)" | sh)]=\(.value | words)"),
  "RRS=(\([.reflectors[].name] | map(@sh) | join(" ")))",
  (.reflectors[] | .name as $r
    | "RR_PATH[\($r | sh)]=\(.path | sh)",
      (.addresses | to_entries[] | "RR_ADDR[\("\($r),\(.key)" | sh)]=\(.value | words)")),
  "INTERNET=\(.internet.name | sh)",
  "INTERNET_NETWORK=\(.internet.fabric | sh)",
  "INTERNET_ROUTER_ID=\(.internet.router_id | sh)",
  "INTERNET_HOST_V4=\(.internet.host_v4 | sh)",
  "INTERNET_HOST_V6=\(.internet.host_v6 | sh)",
  (.internet.addresses | to_entries[] | "INTERNET_ADDR[\(.key | sh)]=\(.value | words)"),
  "ANYCAST_V4=\(.anycast.v4 | sh)",
  "ANYCAST_V6=\(.anycast.v6 | sh)",
  "VMS=(\([.vms[].name] | map(@sh) | join(" ")))",
  (.vms | to_entries[] | .key as $i | .value | .name as $v
    | "VM_INDEX[\($v | sh)]=\($i)",
      "VM_HV[\($v | sh)]=\(.hv | sh)",
      "VM_FABRIC[\($v | sh)]=\(.fabric | sh)",
      "VM_MAC[\($v | sh)]=\(.mac | sh)",
      "VM_V4[\($v | sh)]=\(.v4 | sh)",
      "V4A[\($v | sh)]=\(.v4 | split("/")[0] | sh)",
      "VM_V6[\($v | sh)]=\(.v6 | sh)",
      "V6A[\($v | sh)]=\(.v6 | split("/")[0] | sh)",
      (select(.ipv6 == "prefix") | "VM_V6_PREFIX[\($v | sh)]=\(.v6_prefix | sh)"),
      (select((.sysctls // []) | length > 0) | "VM_SYSCTLS[\($v | sh)]=\(.sysctls | words)"),
      (select(.anycast == true) | "VM_ANYCAST[\($v | sh)]=1"))
'

# The jq program deriving a larger lab from the seed's description
# ($hvs hypervisors, $per VMs on each): the same paths, fabrics,
# reflectors and internet router; hypervisors hv1..hvN whose uplink
# addresses are hv1's plus N-1 (the last IPv4 octet, and the last IPv6
# group read as the decimal digits the seed writes: hv24 is .124 and
# ::124); VMs vm-<h>-<v>, numbered g = 1, 2, ... across the hypervisors,
# with the seed's pattern of four: g%4 == 0 has a /64 of its own ("prefix",
# allocated as the shared /64's 4th group + g and added to the fabric's
# subnets; its address is the SLAAC EUI-64 of its MAC), g%4 == 3 the seed
# vm3's stable-privacy sysctls, the others a DHCPv6 address (the shared
# /64 + g, in hex) on the shared /64. IPv4: the g-th free host of the
# fabric's IPv4 subnet (neither its gateway nor the anycast address). MAC
# 52:54:33:00:<h>:<v>. The anycast on vm-1-1 and vm-2-1. Every VM on the
# first fabric (the seed's VMs are all on public).
# shellcheck disable=SC2016 # jq, not shell
GEN_TOPOLOGY_JQ='
def ip4int: split(".") | map(tonumber) | .[0] * 16777216 + .[1] * 65536 + .[2] * 256 + .[3];
def int2ip4: [(. / 16777216 | floor) % 256, (. / 65536 | floor) % 256, (. / 256 | floor) % 256, . % 256]
    | map(tostring) | join(".");
def hex: if . == 0 then "0" else [recurse(if . >= 16 then (. / 16 | floor) else empty end) | . % 16]
    | reverse | map("0123456789abcdef"[.:.+1]) | join("") end;
def hex2: hex | if length < 2 then "0" + . else . end;
def unhex: ascii_downcase | explode | reduce .[] as $c (0; . * 16 + (if $c >= 97 then $c - 87 else $c - 48 end));
def need(c; msg): if c then . else error(msg) end;
# An uplink address "A/len" of hypervisor k, from hv1s.
def shift($k): split("/") as [$a, $len]
    | if ($a | contains(":")) then
        ($a | split(":")) as $g
        | ($g[:-1] + [($g[-1] | tonumber) + $k - 1 | tostring]) | join(":") + "/" + $len
      else
        (($a | ip4int) + $k - 1) as $n
        | ($len | tonumber) as $l | (pow(2; 32 - $l)) as $size
        | need(($n / $size | floor) == (($a | ip4int) / $size | floor);
            "hypervisor \($k): \($n | int2ip4) is outside \($a)/\($len)")
        | ($n | int2ip4) + "/" + $len
      end;
. as $seed
| ($seed.fabrics[0]) as $fab
| ($fab.subnets | map(select(contains(":") | not))[0]) as $sub4
| ($fab.subnets | map(select(contains(":")))[0]) as $sub6
| need($sub4 != null and $sub6 != null and ($sub6 | test("::/64$")); "fabric \($fab.name): needs an IPv4 subnet and an IPv6 \"X::/64\"")
| ($sub4 | split("/")) as [$net4, $len4]
| (($net4 | ip4int)) as $base4
| ([$fab.gateway_v4, $seed.anycast.v4] | map(ip4int)) as $reserved
| [range(1; pow(2; 32 - ($len4 | tonumber)) - 1) | $base4 + . | select(. as $x | $reserved | index($x) | not)] as $hosts
| ($sub6 | sub("/64$"; "")) as $pre6
| ($pre6 | split(":") | map(select(. != ""))) as $g6
| ($g6[-1] | unhex) as $g6last
| need($hvs >= 1 and $per >= 1; "--hypervisors and --vms-per-hv must be at least 1")
| need($hvs * $per <= ($hosts | length); "\($hvs * $per) VMs do not fit in \($sub4) (\($hosts | length) free addresses)")
| need($hvs <= 255 and $per <= 255; "at most 255 hypervisors and 255 VMs per hypervisor")
| ($seed.hypervisors[0]) as $hv1
| .hypervisors = [range(1; $hvs + 1) as $k
    | {name: "hv\($k)", uplinks: ($hv1.uplinks | map_values(map_values(map(shift($k)))))}]
| .vms = [range(1; $hvs + 1) as $h | range(1; $per + 1) as $v
    | (($h - 1) * $per + $v) as $g
    | "52:54:33:00:\($h | hex2):\($v | hex2)" as $mac
    | {name: "vm-\($h)-\($v)", hv: "hv\($h)", fabric: $fab.name, mac: $mac,
       v4: "\($hosts[$g - 1] | int2ip4)/\($len4)"}
    + if $g % 4 == 0 then
        (($g6[:-1] + [($g6last + $g) | hex]) | join(":")) as $p
        | {ipv6: "prefix", v6_prefix: "\($p)::/64", v6: "\($p):5054:33ff:fe00:\($h * 256 + $v | hex)/64",
           sysctls: ["addr_gen_mode=0"]}
      else {ipv6: "address", v6: "\($pre6)\($g | hex)/64"} end
    + if $g % 4 == 3 then {sysctls: ["use_tempaddr=2", "addr_gen_mode=3"]} else {} end
    + if ($h <= 2 and $v == 1) then {anycast: true} else {} end]
| .fabrics[0].subnets = ($fab.subnets + [.vms[] | .v6_prefix // empty | select(. as $p | $fab.subnets | index($p) | not)])
| .comment = "Generated by lab/up --hypervisors \($hvs) --vms-per-hv \($per) from lab/topology.json (lab/lib.sh gen_topology)."
| ([.hypervisors[].uplinks[][][]] + [.reflectors[].addresses[][]] + [.internet.addresses[][]]
    | map(split("/")[0])) as $all
| need(($all | unique | length) == ($all | length); "\($hvs) hypervisors: an uplink address collides with a reflector or the internet router (at most 25 with the seed addressing)")
'

# Writes the description of a lab of HVS hypervisors with PER VMs each,
# derived from the seed's, to OUT.
gen_topology() { # HVS PER OUT
    jq --argjson hvs "$1" --argjson per "$2" "$GEN_TOPOLOGY_JQ" "$LAB_TOPOLOGY_SEED" >"$3.tmp" ||
        die "--hypervisors $1 --vms-per-hv $2: cannot derive the topology (above)"
    mv "$3.tmp" "$3"
}

# Reads the description FILE into the TOPOLOGY arrays (replacing what
# they held) and derives SWITCHES, LAB_NAMESPACES and COLUMNS_.
load_topology() { # FILE
    local file=$1 code p
    [[ -r $file ]] || die "no topology description $file"
    command -v jq >/dev/null 2>&1 || die "jq is needed to read $file (apt-get install jq)"
    code=$(jq -r "$TOPOLOGY_JQ" "$file") || die "$file: not a valid topology description (above)"
    PATHS=() NETWORKS=() HVS=() RRS=() VMS=()
    SWITCH=() NETWORK_SHORT=() FABRIC_TABLE=() FABRIC_CATCH_ALL=() FABRIC_SUBNETS=()
    FABRIC_GATEWAY_V4=() FABRIC_IPV6_MODE=() UPLINK=() RR_PATH=() RR_ADDR=() INTERNET_ADDR=()
    VM_HV=() VM_FABRIC=() VM_MAC=() VM_V4=() VM_V6=() VM_V6_PREFIX=() VM_SYSCTLS=()
    VM_ANYCAST=() V4A=() V6A=() VM_INDEX=()
    eval "$code"
    SWITCHES=()
    for p in "${PATHS[@]}"; do SWITCHES+=("${SWITCH[$p]}"); done
    LAB_NAMESPACES=("${SWITCHES[@]}" "${HVS[@]}" "${RRS[@]}" "$INTERNET" "${VMS[@]}")
    COLUMNS_=("${VMS[@]}" anycast gateway internet)
    LAB_TOPOLOGY=$file
}

# The description of the lab that is up ($LAB_RUN/topology.json, written
# by lab/up), or the seed's when none is (lab/down, lab/status, lab/test).
load_lab_topology() {
    if [[ -r $LAB_TOPOLOGY_UP ]]; then
        load_topology "$LAB_TOPOLOGY_UP"
    elif command -v jq >/dev/null 2>&1; then
        load_topology "$LAB_TOPOLOGY_SEED"
    fi
}

# True when the lab's description is larger than the seed's matrix is
# meant to print: the report then gives counts and failures, not every
# cell (lab/README.md "The report at scale").
SCALE_REPORT_MIN_VMS=9
scale_report() {
    ((${#VMS[@]} >= SCALE_REPORT_MIN_VMS))
}

# The namespaces of the lab that exist: those of its description, and any
# other of the lab's own names (hvN, rrN, vmN, vm-N-M, swA, swB, internet:
# a larger lab whose description is gone). Never another name.
lab_namespaces_present() {
    local ns
    local -A seen=()
    for ns in "${LAB_NAMESPACES[@]}"; do
        if [[ -z ${seen[$ns]:-} ]] && ns_exists "$ns"; then
            seen[$ns]=1
            echo "$ns"
        fi
    done
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        [[ $ns =~ ^(hv[0-9]+|rr[0-9]+|vm[0-9]+|vm-[0-9]+-[0-9]+|swA|swB|internet)$ ]] || continue
        [[ -n ${seen[$ns]:-} ]] && continue
        seen[$ns]=1
        echo "$ns"
    done
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
        ! is_qemu_vm "$ns" || continue
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
# Generated by lab/up from the lab's topology ($LAB_TOPOLOGY): edit that, not this.
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

[dbus]
# The hypervisor's own system bus (a dbus-daemon lab/up starts in $hv):
# the libvirt hook (l3hv hook, run by lab/up as libvirt would) reads this
# and calls the agent over D-Bus.
enabled = true
bus = "$(bus_address "$hv")"
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

# ------------------------------------------------------------ D-Bus --

# Each hypervisor has its own system bus: a dbus-daemon in its namespace,
# configured like the machine's system bus (EXTERNAL authentication, deny
# by default) plus l3hv's own policy file, packaging/dbus/net.l3hv.Agent1.conf
# (root owns net.l3hv.Agent1 and calls SetVm / RemoveVm: the agent and the
# hook both run as root).
bus_address() { # HV
    echo "unix:path=$LAB_RUN/$1/bus"
}

start_bus() { # HV
    local hv=$1 dir=$LAB_RUN/$1 i pid
    mkdir -p "$dir"
    cat >"$dir/dbus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Generated by lab/up: $hv's system bus. -->
<busconfig>
  <type>system</type>
  <listen>unix:path=$dir/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  <include>$LAB_REPO/packaging/dbus/net.l3hv.Agent1.conf</include>
</busconfig>
EOF
    rm -f "$dir/bus"
    setsid ip netns exec "$hv" dbus-daemon --nofork --nopidfile --config-file="$dir/dbus.conf" \
        </dev/null >>"$dir/dbus.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/dbus.pid"
    for ((i = 0; i < 100; i++)); do
        [[ -S $dir/bus ]] && return 0
        pid_alive "$pid" || break
        sleep 0.1
    done
    die "$hv: dbus-daemon did not start (log: $dir/dbus.log)"
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
        echo "# Generated by lab/up (--rr bird) from the lab's topology ($LAB_TOPOLOGY)."
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
            echo "! Generated by lab/up (--rr frr) from the lab's topology ($LAB_TOPOLOGY)."
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
            echo "# Generated by lab/up (--rr gobgp) from the lab's topology ($LAB_TOPOLOGY)."
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
# Generated by lab/up from the lab's topology ($LAB_TOPOLOGY).
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
    # No graceful restart: FRR's bgpd announces it with its forwarding
    # state preserved, and BIRD then keeps a dead reflector's paths as
    # stale routes (its restart time, 120 s) when the hold timer expires:
    # the return traffic of a silently dead fabric stays in it.
    graceful restart off;
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
# only (a prefix also held locally is routed to the local VM). No
# subshell per VM: 24 hypervisors x 240 VMs are checked every 0.5 s.
expected_learned() { # HV FABRIC
    local hv=$1 fab=$2 vm h
    local -A mine=() all=()
    local -a p=()
    [[ $fab != "$INTERNET_NETWORK" ]] || echo "0.0.0.0/0 ::/0"
    for vm in "${VMS[@]}"; do
        [[ ${VM_FABRIC[$vm]} == "$fab" ]] || continue
        p=("${V4A[$vm]}/32" "${VM_V6_PREFIX[$vm]:-${V6A[$vm]}/128}")
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

# The number of next hops of a "gw@dev,gw@dev" list.
nh_count() { # NEXTHOPS
    local c=${1//[^,]/}
    echo $((${#c} + 1))
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
    local ns=$1 table=$2 proto=${3:-$HV_PROTO} fam def re
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
        got=$(hv_sessions_established "$hv")
        ((got >= want)) || echo "$hv: $got/$want sessions Established"
        for fab in "${NETWORKS[@]}"; do
            routes=()
            while read -r dst nh; do
                [[ -n $dst ]] && routes[$dst]=$nh
            done < <(learned_routes "$hv" "${FABRIC_TABLE[$fab]}")
            # shellcheck disable=SC2046
            for p in $(expected_learned "$hv" "$fab"); do
                case $p in
                    */32 | */128) dst=${p%/*} ;;
                    *) dst=$p ;;
                esac
                nh=${routes[$dst]:-}
                if [[ -z $nh ]]; then
                    echo "$hv: $p not in table ${FABRIC_TABLE[$fab]}"
                    continue
                fi
                nh=${nh//[^,]/}
                n=$((${#nh} + 1))
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
        case $p in
            */32 | */128) dst=${p%/*} ;;
            *) dst=$p ;;
        esac
        [[ -n ${routes[$dst]:-} ]] || echo "$INTERNET: $p not in its kernel"
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

# How the VMs get their addresses: "agent" (default: DHCPv4 from the
# agent, IPv6 from its RAs, plus DHCPv6 on the shared /64) or "static"
# (lab/up --static: lab/up configures VM_V4 / VM_V6 and the default
# routes itself). lab/up keeps the choice in $LAB_RUN/addressing.
ADDRESSING=${ADDRESSING:-agent}
CONFIGURE_JOBS=${CONFIGURE_JOBS:-24}

# The VM "hardware": its namespace's eth0 on a veth whose other end, in the
# hypervisor, is named after the VM (the agent adopts it, as it adopts a
# libvirt-managed tap); the per-VM IPv6 sysctls; the anycast on its lo (a
# guest's own configuration: the agent only routes it via the VM).
create_vm() { # VM
    local vm=$1 hv=${VM_HV[$1]} kv
    mkdir -p "$LAB_RUN/$vm"
    ip -n "$hv" link add "$vm" type veth peer name eth0 netns "$vm"
    ip -n "$vm" link set eth0 address "${VM_MAC[$vm]}"
    # The guest's link-local is usable at once (no DAD wait): router
    # solicitations and DHCPv6 go out immediately.
    nsx "$vm" sysctl -qw net.ipv6.conf.eth0.accept_dad=0
    for kv in ${VM_SYSCTLS[$vm]:-}; do
        nsx "$vm" sysctl -qw "net.ipv6.conf.eth0.$kv"
    done
    if [[ -n ${VM_ANYCAST[$vm]:-} ]]; then
        ip -n "$vm" addr add "$ANYCAST_V4/32" dev lo
        ip -n "$vm" -6 addr add "$ANYCAST_V6/128" dev lo nodad
    fi
    ip -n "$vm" link set eth0 up
    # --baseline: fe80::1 only (radvd's source address), as the seed.
    [[ $STACK != baseline ]] || ip -n "$hv" link set dev "$vm" addrgenmode none
    ip -n "$hv" link set "$vm" up
}

# The domain XML libvirt would hand the qemu hook for VM: one
# type='ethernet' NIC whose target is the VM's veth in the hypervisor
# (managed='yes': "libvirt" created it, the agent adopts it), and l3hv's
# metadata (hooks/README.md): the fabric, the addresses (an IPv6 address
# on the shared /64, or the VM's own /64 as a prefix), the anycast routed
# via the VM. Kept in $LAB_RUN/<hv>/domain-<vm>.xml.
domain_xml() { # VM
    local vm=$1 v4=${V4A[$1]} v6=${V6A[$1]} i=${VM_INDEX[$1]}
    cat <<EOF
<!-- Generated by lab/up from the lab's topology: what libvirt gives the hook. -->
<domain type='qemu'>
  <name>$vm</name>
  <uuid>$(printf '6c3f1b2e-7d1a-4c55-9a0e-13a1b1e0c%03x' "$((i + 1))")</uuid>
  <metadata>
    <l3hv:vm xmlns:l3hv="https://l3hv.net/xmlns/domain/1">
      <l3hv:interface mac="${VM_MAC[$vm]}" fabric="${VM_FABRIC[$vm]}">
        <l3hv:ip address="$v4"/>
EOF
    if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
        echo "        <l3hv:prefix address=\"${VM_V6_PREFIX[$vm]}\"/>"
    else
        echo "        <l3hv:ip address=\"$v6\"/>"
    fi
    if [[ -n ${VM_ANYCAST[$vm]:-} ]]; then
        echo "        <l3hv:route prefix=\"$ANYCAST_V4/32\" via=\"$v4\"/>"
        echo "        <l3hv:route prefix=\"$ANYCAST_V6/128\" via=\"$v6\"/>"
    fi
    cat <<EOF
      </l3hv:interface>
    </l3hv:vm>
  </metadata>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <interface type='ethernet'>
      <mac address='${VM_MAC[$vm]}'/>
      <target dev='$vm' managed='yes'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
EOF
}

# Runs the hook as libvirt does: `l3hv hook <guest> <op> <subop> <extra>`,
# the domain XML on stdin, the agent found from the configuration (D-Bus).
# Every call and its stderr go to $LAB_RUN/<hv>/hook.log; exit status the
# hook's.
hook() { # VM OP SUBOP EXTRA
    local vm=$1 hv=${VM_HV[$1]} rc=0 out
    shift
    out=$("$L3HV" --config "$(hv_config "$hv")" hook "$vm" "$@" \
        <"$LAB_RUN/$hv/domain-$vm.xml" 2>&1) || rc=$?
    printf '[%(%H:%M:%S)T] %s %s: exit %s%s\n' -1 "$vm" "$*" "$rc" "${out:+: $out}" >>"$LAB_RUN/$hv/hook.log"
    [[ -z $out ]] || echo "$out" >&2
    return "$rc"
}

# Starts VM as `virsh start` would call the hook: prepare, start, started
# (each "begin -"). A failing prepare or start would stop the domain.
start_vm() { # VM
    local vm=$1 op
    domain_xml "$vm" >"$LAB_RUN/${VM_HV[$vm]}/domain-$vm.xml"
    for op in prepare start started; do
        hook "$vm" "$op" begin - || {
            echo "$vm: hook $op failed (exit $?, see $LAB_RUN/${VM_HV[$vm]}/hook.log)" >&2
            return 1
        }
    done
}

# Stops VM as libvirt does when the domain ends (destroy, shutdown):
# stopped, then release (each "end -"). They never fail.
stop_vm() { # VM
    hook "$1" stopped end - && hook "$1" release end -
}

# ---------------------------------------------------- VM addressing --

# True when every VM interface of HV has its DHCP and RA sockets open.
services_ready() { # HV
    local hv=$1 vm n=0
    local -a want=()
    for vm in "${VMS[@]}"; do
        [[ ${VM_HV[$vm]} != "$hv" ]] || want+=("$vm")
    done
    ((${#want[@]})) || return 0
    n=$("$L3HV" --config "$(hv_config "$hv")" --timeout 2 status --json 2>/dev/null |
        jq --argjson want "$(printf '%s\n' "${want[@]}" | jq -R . | jq -s -c .)" \
            '[.services.interfaces[]? | select(.interface as $i | $want | index($i))
              | select(.dhcp_listening and .ra_listening)] | length' 2>/dev/null || echo 0)
    ((n == ${#want[@]}))
}

wait_services() {
    local hv i
    for hv in "${HVS[@]}"; do
        for ((i = 0; i < 100; i++)); do
            services_ready "$hv" && break
            sleep 0.1
        done
        services_ready "$hv" || log "$hv: DHCP/RA not listening on every VM interface after 10 s"
    done
}

# The clients' event scripts, in VM's directory: they configure exactly
# what the lease says on eth0 (never /etc/resolv.conf or anything else
# outside the namespace, which dhclient-script would touch) and record the
# lease.
write_vm_scripts() { # VM
    local dir=$LAB_RUN/$1
    cat >"$dir/udhcpc.sh" <<EOF
#!/bin/sh
# udhcpc event script (lab/up): the lease on \$interface, default route.
case \$1 in
    deconfig) ip -4 addr flush dev "\$interface" ;;
    bound | renew)
        ip -4 addr replace "\$ip/\${mask:-\$subnet}" dev "\$interface"
        [ -z "\$router" ] || ip -4 route replace default via "\${router%% *}" dev "\$interface"
        for v in ip mask subnet router serverid lease hostname dns domain mtu; do
            eval "echo \$v=\\\$\$v"
        done >"$dir/dhcp4.lease"
        ;;
esac
exit 0
EOF
    cat >"$dir/dhclient6.sh" <<EOF
#!/bin/sh
# dhclient -6 event script (lab/up): the leased address on \$interface.
case \$reason in
    BOUND6 | RENEW6 | REBIND6 | REBOOT6)
        [ -z "\$new_ip6_address" ] || {
            ip -6 addr replace "\$new_ip6_address/\${new_ip6_prefixlen:-128}" dev "\$interface" nodad
            env | grep -E '^(new_ip6|new_dhcp6|new_max_life|new_preferred_life)' | sort >"$dir/dhcp6.lease"
        }
        ;;
    EXPIRE6 | RELEASE6 | STOP6)
        [ -z "\$old_ip6_address" ] ||
            ip -6 addr del "\$old_ip6_address/\${old_ip6_prefixlen:-128}" dev "\$interface" 2>/dev/null
        ;;
esac
exit 0
EOF
    chmod 755 "$dir/udhcpc.sh" "$dir/dhclient6.sh"
}

# True when VM has ADDRESS (without length) on eth0, not tentative.
vm_has_addr() { # VM ADDRESS
    ip -n "$1" -o addr show dev eth0 2>/dev/null | grep -v tentative |
        grep -qE "inet6? $2/"
}

vm_has_ra_default() { # VM
    ip -n "$1" -6 route show default 2>/dev/null | grep -q "via $GATEWAY_V6 dev eth0 proto ra"
}

# The guest's boot-time network configuration, as a DHCP/SLAAC guest does
# it: IPv4 by DHCP (busybox udhcpc, one lease, exits), IPv6 from the RA
# (default route; SLAAC in a /64 of its own) and, on the shared /64 (RA
# M=1, A=0), DHCPv6 (dhclient -6, which stays to renew; PID in
# $LAB_RUN/<vm>/dhclient6.pid). One line on stdout: what it got, or
# "FAILED: ..." (and exit 1).
vm_dhcp() { # VM
    local vm=$1 dir=$LAB_RUN/$1 i v4 v6 bad=() got
    v4=$(addr_of "${VM_V4[$vm]}")
    v6=$(addr_of "${VM_V6[$vm]}")
    write_vm_scripts "$vm"
    nsx "$vm" busybox udhcpc -i eth0 -q -n -f -t 5 -T 1 -s "$dir/udhcpc.sh" \
        >"$dir/udhcpc.log" 2>&1 || bad+=("no DHCPv4 lease (see $dir/udhcpc.log)")
    vm_has_addr "$vm" "$v4" || bad+=("not $v4 by DHCPv4: $(paste -sd ' ' "$dir/dhcp4.lease" 2>/dev/null)")
    for ((i = 0; i < 100; i++)); do
        vm_has_ra_default "$vm" && break
        # A solicitation of our own (the kernel's RS went out before the
        # agent listened; its next one backs off): the kernel takes the
        # answer too.
        ((i % 20 != 10)) || nsx "$vm" rdisc6 -1 -r 1 -w 300 eth0 >/dev/null 2>&1 || true
        sleep 0.1
    done
    vm_has_ra_default "$vm" || bad+=("no IPv6 default route from an RA after 10 s")
    if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
        for ((i = 0; i < 100; i++)); do
            vm_has_addr "$vm" "$v6" && break
            sleep 0.1
        done
        vm_has_addr "$vm" "$v6" || bad+=("no SLAAC address $v6 after 10 s")
        got="SLAAC"
    else
        # -1: one try; forks into the background with its lease.
        nsx "$vm" dhclient -6 -1 -v -sf "$dir/dhclient6.sh" -lf "$dir/dhclient6.leases" \
            -pf "$dir/dhclient6.pid" eth0 >"$dir/dhclient6.log" 2>&1 ||
            bad+=("no DHCPv6 lease (see $dir/dhclient6.log)")
        vm_has_addr "$vm" "$v6" || bad+=("not $v6 by DHCPv6: $(paste -sd ' ' "$dir/dhcp6.lease" 2>/dev/null)")
        got="DHCPv6"
    fi
    if ((${#bad[@]})); then
        echo "FAILED: ${bad[*]}"
        return 1
    fi
    echo "$v4 (DHCPv4), $v6 ($got), default routes via $(ip -n "$vm" -4 route show default | awk '{print $3}') (DHCP) and $GATEWAY_V6 (RA);" \
        "global IPv6 on eth0: $(ip -n "$vm" -6 -o addr show dev eth0 scope global | awk '{print $4}' | paste -sd ' ' -)"
}

# lab/up --static: what lab/up did before the agent had DHCP and RAs.
vm_static() { # VM
    local vm=$1
    ip -n "$vm" addr replace "${VM_V4[$vm]}" dev eth0
    ip -n "$vm" route replace default via "${FABRIC_GATEWAY_V4[${VM_FABRIC[$vm]}]}"
    ip -n "$vm" -6 addr replace "${VM_V6[$vm]}" dev eth0 nodad
    ip -n "$vm" -6 route replace default via "$GATEWAY_V6" dev eth0
    echo "${VM_V4[$vm]} ${VM_V6[$vm]} (static)"
}

# Configures the VMs' addresses (ADDRESSING), all VMs in parallel; one log
# line per VM. Returns 1 when a VM did not get what it should (the matrix
# will show it).
configure_vms() { # [VM...] (default: all)
    local vm rc=0
    local -a vms=("$@") pids=()
    ((${#vms[@]})) || vms=("${VMS[@]}")
    if [[ $ADDRESSING == static ]]; then
        for vm in "${vms[@]}"; do
            log "$vm: $(vm_static "$vm")"
        done
        return 0
    fi
    [[ $STACK == baseline ]] || wait_services
    # In batches of CONFIGURE_JOBS (each VM polls for its RA and address:
    # 240 at once would starve 2 cores); the seed's VMs in one.
    local i j n=0
    for ((i = 0; i < ${#vms[@]}; i += CONFIGURE_JOBS)); do
        pids=()
        for vm in "${vms[@]:i:CONFIGURE_JOBS}"; do
            vm_dhcp "$vm" >"$LAB_RUN/$vm/addressing" 2>&1 &
            pids+=("$!")
        done
        for j in "${!pids[@]}"; do
            vm=${vms[$((i + j))]}
            if ! wait "${pids[$j]}"; then
                rc=1
                log "$vm: $(<"$LAB_RUN/$vm/addressing")"
            elif ! scale_report; then
                log "$vm: $(<"$LAB_RUN/$vm/addressing")"
            else
                n=$((n + 1))
            fi
        done
    done
    ! scale_report || log "$n/${#vms[@]} VMs got their addresses ($ADDRESSING; each VM's in $LAB_RUN/<vm>/addressing)"
    return "$rc"
}

# Stops VM's DHCP client(s) and removes what they configured: the guest
# is off. (lab/test vm-stop-start)
vm_unconfigure() { # VM
    local vm=$1 pid
    pid=$(head -n 1 "$LAB_RUN/$vm/dhclient6.pid" 2>/dev/null || true)
    if pid_in_ns "$pid" "$vm"; then
        stop_pid "$pid"
    fi
    rm -f "$LAB_RUN/$vm/dhclient6.pid" "$LAB_RUN/$vm/dhcp4.lease" "$LAB_RUN/$vm/dhcp6.lease"
    ip -n "$vm" -4 addr flush dev eth0
    ip -n "$vm" -6 addr flush dev eth0 scope global
    ip -n "$vm" -6 route flush dev eth0 proto ra 2>/dev/null || true
}

# ----------------------------------------------------------------- QEMU --

# lab/up --qemu: the VMs of QEMU_VMS are real QEMU guests (TCG: KVM is
# unusable here) started by a real libvirtd in their hypervisor's
# namespace, through l3hv's hook installed in that libvirtd's own copy of
# /etc/libvirt. lab/up keeps the list in $LAB_RUN/qemu. Their namespaces
# are not created: the matrix probes them as destinations only.
QEMU_VMS=()
QEMU_CANDIDATES=(vm1)

is_qemu_vm() { # VM
    local v
    for v in "${QEMU_VMS[@]}"; do
        [[ $v != "$1" ]] || return 0
    done
    return 1
}

# The guest kernel (the newest Debian kernel in /boot) and its release.
guest_kernel() {
    local k
    k=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $k ]] || die "--qemu: no Debian kernel in /boot (apt-get install linux-image-amd64)"
    echo "$k ${k#/boot/vmlinuz-}"
}

GUEST_MODULES="kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko
kernel/drivers/virtio/virtio_pci.ko kernel/net/core/failover.ko kernel/drivers/net/net_failover.ko
kernel/drivers/net/virtio_net.ko"

# A busybox initramfs for VM: virtio-net, the anycast on lo, then what a
# DHCP guest does at boot: udhcpc (IPv4 lease and default route), the RA
# (IPv6 default route), dhclient -6 (copied in with its libc) on the
# shared /64. Everything it got is printed on the serial console.
build_initramfs() { # VM RELEASE OUT
    local vm=$1 release=$2 out=$3 root m lib f
    root=$(dirname "$out")/initramfs
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,lib,lib64,proc,sys,dev,run,tmp,etc/dhcp,var/lib/dhcp}
    cp /bin/busybox "$root/bin/busybox"
    for m in $GUEST_MODULES; do
        cp "/lib/modules/$release/$m" "$root/lib/" || die "--qemu: /lib/modules/$release/$m missing"
    done
    cp /usr/sbin/dhclient "$root/sbin/dhclient"
    for lib in $(ldd /usr/sbin/dhclient | grep -o '/[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    touch "$root/etc/dhcp/dhclient.conf"
    cat >"$root/udhcpc.sh" <<'EOF'
#!/bin/sh
case $1 in
    deconfig) ip -4 addr flush dev "$interface" ;;
    bound | renew)
        ip -4 addr replace "$ip/${mask:-$subnet}" dev "$interface"
        [ -z "$router" ] || ip -4 route replace default via "${router%% *}" dev "$interface"
        echo "L3HV-GUEST-DHCPV4 ip=$ip mask=$mask router=$router lease=$lease" >/dev/console
        ;;
esac
exit 0
EOF
    cat >"$root/dhclient6.sh" <<'EOF'
#!/bin/sh
case $reason in
    BOUND6 | RENEW6 | REBIND6 | REBOOT6)
        [ -z "$new_ip6_address" ] || {
            ip -6 addr replace "$new_ip6_address/${new_ip6_prefixlen:-128}" dev "$interface"
            echo "L3HV-GUEST-DHCPV6 $new_ip6_address/$new_ip6_prefixlen" >/dev/console
        } ;;
esac
exit 0
EOF
    # shellcheck disable=SC2016 # the guest's /init: expanded in the guest
    {
        echo '#!/bin/busybox sh'
        echo '/bin/busybox --install -s /bin'
        echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
        for m in $GUEST_MODULES; do
            echo "insmod /lib/${m##*/}"
        done
        echo 'sysctl -qw net.ipv6.conf.eth0.accept_dad=0'
        echo 'ip link set lo up'
        if [[ -n ${VM_ANYCAST[$vm]:-} ]]; then
            echo "ip addr add $ANYCAST_V4/32 dev lo"
            # (busybox ip has no nodad; lo does no DAD anyway)
            echo "ip -6 addr add $ANYCAST_V6/128 dev lo"
        fi
        echo 'ip link set eth0 up'
        echo 'udhcpc -i eth0 -q -n -f -t 10 -T 1 -s /udhcpc.sh 2>&1'
        echo 'i=0; while [ $i -lt 100 ] && ! ip -6 route show default | grep -q "via fe80::1"; do sleep 0.1; i=$((i+1)); done'
        echo 'echo "L3HV-GUEST-RA $(ip -6 route show default)"'
        if [[ -z ${VM_V6_PREFIX[$vm]:-} ]]; then
            # -nw: in the background at once, soliciting until it binds
            # (as a guest's dhclient does); 20 s for the console report.
            echo 'dhclient -6 -nw -sf /dhclient6.sh -lf /var/lib/dhcp/dhclient6.leases -pf /run/dhclient6.pid eth0'
            echo 'i=0; while [ $i -lt 200 ] && ! ip -6 addr show dev eth0 scope global | grep -q inet6; do sleep 0.1; i=$((i+1)); done'
            echo 'ip -6 addr show dev eth0 scope global | grep -q inet6 || echo "L3HV-GUEST-DHCPV6 none after 20 s (dhclient keeps trying)"'
        fi
        echo 'ip -o addr show; ip route; ip -6 route'
        echo 'echo L3HV-GUEST-UP'
        echo 'while true; do sleep 60; done'
    } >"$root/init"
    chmod 755 "$root/init" "$root/udhcpc.sh" "$root/dhclient6.sh"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 >"$out")
}

libvirt_dir() { # HV
    echo "$LAB_RUN/$1/libvirt"
}

libvirt_uri() { # HV
    echo "qemu+unix:///system?socket=$(libvirt_dir "$1")/sock/libvirt-sock"
}

lab_virsh() { # HV ARGS...
    local hv=$1
    shift
    virsh -q -c "$(libvirt_uri "$hv")" "$@"
}

# libvirtd and virtlogd in HV, in a private mount namespace: /run, the
# libvirt state and logs are tmpfs there, /etc/libvirt a copy with the
# hook installed (a wrapper running `l3hv --config <hv's l3hv.toml> hook`,
# as hooks/qemu.d/50-l3hv does with the default configuration), and
# $LAB_RUN moved back under the new /run (the hook's configuration, the
# agent's bus). Root QEMU, no security driver, no auth on the socket.
start_libvirt() { # HV
    local hv=$1 dir etc out i
    dir=$(libvirt_dir "$hv")
    etc=$dir/etc-libvirt
    for i in libvirtd virtlogd virsh qemu-system-x86_64 cpio; do
        command -v "$i" >/dev/null 2>&1 ||
            die "--qemu: $i missing (apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86 cpio)"
    done
    rm -rf "$dir"
    mkdir -p "$dir/sock"
    cp -a /etc/libvirt "$etc"
    printf '\nuser = "root"\ngroup = "root"\nsecurity_driver = "none"\n' >>"$etc/qemu.conf"
    printf '\nunix_sock_dir = "%s"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n' "$dir/sock" >>"$etc/libvirtd.conf"
    mkdir -p "$etc/hooks/qemu.d"
    cat >"$etc/hooks/qemu.d/50-l3hv" <<EOF
#!/bin/sh
# hooks/qemu.d/50-l3hv with the lab's binary and $hv's configuration.
echo "\$(date +%T) \$*" >>$dir/hook-calls.log
exec $L3HV --config $(hv_config "$hv") hook "\$@"
EOF
    chmod 755 "$etc/hooks/qemu.d/50-l3hv"
    out=$(ip netns exec "$hv" unshare -m --propagation private sh -ec "
mount --bind $LAB_RUN /mnt
mount -t tmpfs l3hv-lab-run /run
mkdir -p $LAB_RUN
mount --move /mnt $LAB_RUN
mount --bind $etc /etc/libvirt
mount -t tmpfs l3hv-lab-lib /var/lib/libvirt
mount -t tmpfs l3hv-lab-cache /var/cache/libvirt
mount -t tmpfs l3hv-lab-log /var/log/libvirt
virtlogd -d -p $LAB_RUN/$hv/virtlogd.pid
libvirtd -d -p $LAB_RUN/$hv/libvirtd.pid
" 2>&1) || die "$hv: libvirtd did not start: $out"
    for ((i = 0; i < 240; i++)); do
        lab_virsh "$hv" version >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "$hv: libvirtd does not answer after 60 s"
}

# The domain XML of a QEMU guest: as domain_xml, with a tap the agent
# creates at prepare (managed='no'), direct kernel boot of the initramfs,
# the serial console in a file.
qemu_domain_xml() { # VM KERNEL INITRD CONSOLE
    local vm=$1
    domain_xml "$vm" | sed -e "s|<target dev='$vm' managed='yes'/>|<target dev='$vm' managed='no'/>|" \
        -e "s|<type arch='x86_64' machine='pc'>hvm</type>|&\n    <kernel>$2</kernel>\n    <initrd>$3</initrd>\n    <cmdline>console=ttyS0 quiet</cmdline>|" \
        -e "s|  </devices>|    <serial type='file'>\n      <source path='$4'/>\n      <target port='0'/>\n    </serial>\n    <memballoon model='none'/>\n  </devices>|" \
        -e "s|^  <devices>|  <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff>\n  <devices>|"
}

# Defines and starts VM in its hypervisor's libvirtd (`virsh start`: the
# hook's prepare creates the tap and routes it, start, started).
qemu_start_vm() { # VM
    local vm=$1 hv=${VM_HV[$1]} dir kernel release out
    dir=$(libvirt_dir "$hv")
    read -r kernel release <<<"$(guest_kernel)"
    build_initramfs "$vm" "$release" "$dir/$vm-initrd.img"
    qemu_domain_xml "$vm" "$kernel" "$dir/$vm-initrd.img" "$dir/$vm-console.log" >"$LAB_RUN/$hv/domain-$vm.xml"
    out=$(lab_virsh "$hv" define "$LAB_RUN/$hv/domain-$vm.xml" 2>&1) || die "$hv: virsh define $vm: $out"
    out=$(lab_virsh "$hv" start "$vm" 2>&1) ||
        die "$hv: virsh start $vm: $out (hook calls: $(paste -sd ';' "$dir/hook-calls.log" 2>/dev/null))"
}

# Waits (up to 120 s) for VM's guest to have booted and configured itself
# (its console says so) and to answer a ping from its hypervisor.
qemu_wait_vm() { # VM
    local vm=$1 hv=${VM_HV[$1]} console i start=$SECONDS
    console=$(libvirt_dir "$hv")/$vm-console.log
    for ((i = 0; i < 240; i++)); do
        if grep -q L3HV-GUEST-UP "$console" 2>/dev/null &&
            nsx "$hv" ping -c1 -W1 -q "$(addr_of "${VM_V4[$vm]}")" >/dev/null 2>&1; then
            log "$vm: QEMU guest up after $((SECONDS - start)) s: $(grep -ao 'L3HV-GUEST-[A-Z0-9]* .*' "$console" | tr -d '\r' | paste -sd ';' -)"
            return 0
        fi
        sleep 0.5
    done
    log "$vm: the QEMU guest is not up after 120 s; console: $console"
    return 1
}

# Destroys the lab's QEMU guests (lab/down, before it kills the daemons):
# libvirt then runs the hook's stopped and release.
qemu_destroy_all() {
    local sock hv vm
    for sock in "$LAB_RUN"/*/libvirt/sock/libvirt-sock; do
        [[ -S $sock ]] || continue
        hv=$(basename "$(dirname "$(dirname "$(dirname "$sock")")")")
        for vm in $(timeout 10 virsh -q -c "$(libvirt_uri "$hv")" list --name 2>/dev/null); do
            timeout 20 virsh -q -c "$(libvirt_uri "$hv")" destroy "$vm" >/dev/null 2>&1 || true
        done
    done
}

# --------------------------------------------------------------- matrix --

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
    # A QEMU guest (lab/up --qemu) is probed as a destination only.
    ! is_qemu_vm "$src" || {
        echo -
        return 0
    }
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
    # IPv6 to a QEMU guest's DHCPv6 address (or an anycast it may hold).
    local tap6=0
    if [[ $fam == ipv6 ]] && ((${#QEMU_VMS[@]})); then
        case $col in
            anycast)
                for h in $(anycast_holders); do
                    if is_qemu_vm "$h" && [[ -z ${VM_V6_PREFIX[$h]:-} && $h != "$src" ]]; then
                        tap6=1
                    fi
                done
                # A holder of its own reaches itself.
                [[ -z ${VM_ANYCAST[$src]:-} ]] || tap6=0
                ;;
            gateway | internet) ;;
            *) if is_qemu_vm "$col" && [[ -z ${VM_V6_PREFIX[$col]:-} ]]; then tap6=1; fi ;;
        esac
    fi
    ((HAVE_BGP)) && bgp=0
    ((HAVE_NDP_PROXY)) && ndp=0
    ((HAVE_TAP_LL_ROUTE)) && tap6=0
    local -a why=()
    ((bgp)) && why+=(bgp)
    ((ndp)) && why+=(ndp)
    ((tap6)) && why+=(tap6)
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
    probe_underlay
    # Only the pings: the agents are children of this shell too.
    wait "${PROBE_PIDS[@]}"
}

# The hypervisors' underlay pings (in the background, PROBE_PIDS).
probe_underlay() {
    local dir=$LAB_RUN/matrix hv label addr
    mkdir -p "$dir"
    for hv in "${HVS[@]}"; do
        while read -r label addr; do
            probe "$hv" "$addr" "$dir/underlay.$hv.${label//\//_}"
        done < <(underlay_targets)
    done
}

# ------------------------------------------------------- matrix at scale --
#
# With many VMs (scale_report) lab/up measures every pair too, but not
# with one `ping` process per cell (24 x 10 VMs: 2 x 240 x 243 probes):
# one fping per source VM and family, the sources one after the other.
# Why one after the other: the kernel's neighbour tables (ARP and NDP) are
# shared by every network namespace of the machine, with a hard limit of
# gc_thresh3 entries (1024 here), which can only be raised in the root
# namespace, and which the lab leaves alone. The VMs' /24 and shared /64
# are on-link: a source resolves each destination (the hypervisor answers
# by proxy), and each destination resolves the source for its reply. So
# one source creates about 2 x 240 entries, and the lab deletes them
# before the next source starts: its own table right after its fping, and
# the destinations' entries for it through one `ip -batch` per VM fed by
# a FIFO (neigh_workers_start); and a source probes its targets in chunks
# of PROBE_CHUNK (30), each followed by those flushes. All pairs are
# probed, none sampled. What failed is probed once more at the end, one
# ping each (retry_scale_failures), as lab/test retries a failed probe:
# the report gives both counts.

declare -A NEIGH_FD=()

# One `ip -n VM -force -batch` per VM, reading commands from a FIFO the
# lab keeps open (NEIGH_FD): a command for 240 namespaces costs 240
# writes, not 240 processes. They end with lab/up (EOF on the FIFO).
neigh_workers_start() {
    local vm fifo fd
    for vm in "${VMS[@]}"; do
        ! is_qemu_vm "$vm" || continue
        fifo=$LAB_RUN/$vm/neigh.fifo
        rm -f "$fifo"
        mkfifo "$fifo"
        ip -n "$vm" -force -batch - <"$fifo" >/dev/null 2>&1 &
        exec {fd}>"$fifo"
        NEIGH_FD[$vm]=$fd
    done
}

neigh_workers_stop() {
    local vm fd
    for vm in "${!NEIGH_FD[@]}"; do
        fd=${NEIGH_FD[$vm]}
        exec {fd}>&-
    done
    NEIGH_FD=()
}

# The addresses SRC probes in FAMILY, "column address" per line: every
# other VM, the anycast, its gateway and the internet host.
scale_targets() { # FAMILY SRC
    local fam=$1 src=$2 vm
    for vm in "${VMS[@]}"; do
        [[ $vm != "$src" ]] || continue
        if [[ $fam == ipv4 ]]; then echo "$vm ${V4A[$vm]}"; else echo "$vm ${V6A[$vm]}"; fi
    done
    if [[ $fam == ipv4 ]]; then
        echo "anycast $ANYCAST_V4"
        echo "gateway ${FABRIC_GATEWAY_V4[${VM_FABRIC[$src]}]}"
        echo "internet $INTERNET_HOST_V4"
    else
        echo "anycast $ANYCAST_V6"
        echo "gateway $GATEWAY_V6%eth0"
        echo "internet $INTERNET_HOST_V6"
    fi
}

# Probes every (source, target) of FAMILY...: "FAMILY SRC COLUMN ADDRESS"
# of each failure in $LAB_RUN/matrix/failed, the counts in SCALE_TOTAL /
# SCALE_OK. fping: 2 tries (timeout 1 s, then 1.5 s), 1 ms between
# targets. Needs neigh_workers_start.
SCALE_TOTAL=0
SCALE_OK=0
PROBE_CHUNK=${PROBE_CHUNK:-30}
probe_scale() { # FAMILY...
    local dir=$LAB_RUN/matrix fam src col addr line vm fl i
    local -A col_of=()
    local -a addrs=() tgts=()
    mkdir -p "$dir"
    : >"$dir/failed"
    local t total0 ok0 last_hv=""
    for fam in "$@"; do
        fl=-4
        [[ $fam == ipv4 ]] || fl=-6
        t=$SECONDS
        total0=$SCALE_TOTAL
        ok0=$SCALE_OK
        for src in "${VMS[@]}"; do
            ! is_qemu_vm "$src" || continue
            if [[ ${VM_HV[$src]} != "$last_hv" ]]; then
                last_hv=${VM_HV[$src]}
                ((${#HVS[@]} < 8)) || [[ $last_hv != "${HVS[$((${#HVS[@]} / 2))]}" ]] ||
                    log "$fam: probing from the VMs of $last_hv ($((SCALE_OK - ok0))/$((SCALE_TOTAL - total0)) ok so far)"
            fi
            tgts=()
            while read -r col addr; do
                ! is_qemu_vm "$col" || continue
                tgts+=("$col $addr")
            done < <(scale_targets "$fam" "$src")
            # In chunks of PROBE_CHUNK targets, each followed by the
            # flushes, so that at most about 2 x PROBE_CHUNK entries are
            # added to the shared table at once.
            for ((i = 0; i < ${#tgts[@]}; i += PROBE_CHUNK)); do
                col_of=()
                addrs=()
                for line in "${tgts[@]:i:PROBE_CHUNK}"; do
                    col_of[${line#* }]=${line%% *}
                    addrs+=("${line#* }")
                done
                while read -r line; do
                    addr=${line%% *}
                    [[ -n ${col_of[$addr]:-} ]] || continue
                    SCALE_TOTAL=$((SCALE_TOTAL + 1))
                    case $line in
                        *" is alive"*) SCALE_OK=$((SCALE_OK + 1)) ;;
                        *) echo "$fam $src ${col_of[$addr]} $addr" >>"$dir/failed" ;;
                    esac
                    unset "col_of[$addr]"
                done < <(nsx "$src" fping "$fl" -r 1 -t 1000 -i 1 "${addrs[@]}" 2>/dev/null)
                # What fping did not report at all is a failure too.
                for addr in "${!col_of[@]}"; do
                    SCALE_TOTAL=$((SCALE_TOTAL + 1))
                    echo "$fam $src ${col_of[$addr]} $addr (no answer from fping)" >>"$dir/failed"
                done
                ip -n "$src" "$fl" neigh flush dev eth0 2>/dev/null || true
                if [[ $fam == ipv4 ]]; then addr=${V4A[$src]}; else addr=${V6A[$src]}; fi
                for line in "${tgts[@]:i:PROBE_CHUNK}"; do
                    vm=${line%% *}
                    [[ -z ${NEIGH_FD[$vm]:-} ]] || echo "neigh flush to $addr" >&"${NEIGH_FD[$vm]}"
                done
            done
        done
        log "$fam: $((SCALE_OK - ok0))/$((SCALE_TOTAL - total0)) probes ok in $((SECONDS - t)) s"
    done
}

# The failures of probe_scale, probed once more one at a time (ping -c1
# -W2), sources one after the other, their tables flushed after each:
# those that answer leave $LAB_RUN/matrix/failed for
# $LAB_RUN/matrix/failed-first (the first pass's failures stay there).
SCALE_RETRIED_OK=0
retry_scale_failures() {
    local dir=$LAB_RUN/matrix fam src col addr rest fl
    cp "$dir/failed" "$dir/failed-first"
    : >"$dir/failed.new"
    while read -r fam src col addr rest; do
        fl=-4
        [[ $fam == ipv4 ]] || fl=-6
        if nsx "$src" ping "$fl" -c1 -W2 -q "$addr" >/dev/null 2>&1; then
            SCALE_RETRIED_OK=$((SCALE_RETRIED_OK + 1))
            SCALE_OK=$((SCALE_OK + 1))
        else
            echo "$fam $src $col $addr${rest:+ $rest}" >>"$dir/failed.new"
        fi
        ip -n "$src" "$fl" neigh flush dev eth0 2>/dev/null || true
    done <"$dir/failed-first"
    mv "$dir/failed.new" "$dir/failed"
}

# The fabric's hosts on (path, network), "host interface address..." per
# line: the hypervisors, the path's reflectors, the internet router.
fabric_hosts() { # PATH NETWORK
    local p=$1 net=$2 h
    for h in "${HVS[@]}"; do
        echo "$h $p-$net ${UPLINK[$h,$net,$p]}"
    done
    for h in "${RRS[@]}"; do
        [[ ${RR_PATH[$h]} != "$p" ]] || echo "$h $p-$net ${RR_ADDR[$h,$net]}"
    done
    [[ $net != "$INTERNET_NETWORK" ]] || echo "$INTERNET $p-$net ${INTERNET_ADDR[$p]}"
}

# A larger lab only (lab/up, before its probes): every host of a fabric
# gets a permanent neighbour entry for every other host's uplink addresses
# on it (IPv4 and IPv6), as a static ARP / NDP table, in its own namespace.
# Why: the kernel's neighbour tables are shared by every namespace of the
# machine (gc_thresh3 = 1024 entries, only settable in the root namespace,
# which the lab leaves alone), and with 24 hypervisors the all-pairs
# traffic makes every hypervisor resolve every other one on both paths
# (24 x 46 entries): the first 24 x 10 run overflowed the table ("neighbor
# table overflow!", 389 failed probes). Permanent entries are exempt from
# that limit. In production each hypervisor has its own table. The VMs
# and the hypervisors' VM-side entries stay dynamic (proxy ARP / NDP is
# what the probes check).
static_underlay_neighbours() {
    local p net h dev addrs mac a line
    local -A batch=() macs=()
    # shellcheck disable=SC2034 # addrs: the rest of the line
    for p in "${PATHS[@]}"; do
        for net in "${NETWORKS[@]}"; do
            while read -r h dev addrs; do
                macs[$h,$dev]=$(ip -n "$h" -j link show dev "$dev" | jq -r '.[0].address')
            done < <(fabric_hosts "$p" "$net")
            # In each host h: every other host's addresses, with its MAC.
            while read -r h dev addrs; do
                while read -r line; do
                    # shellcheck disable=SC2086 # line = "host dev addresses..."
                    set -- $line
                    [[ $1 != "$h" ]] || continue
                    mac=${macs[$1,$2]}
                    for a in "${@:3}"; do
                        batch[$h]+="neigh replace ${a%/*} lladdr $mac dev $dev nud permanent"$'\n'
                    done
                done < <(fabric_hosts "$p" "$net")
            done < <(fabric_hosts "$p" "$net")
        done
    done
    for h in "${!batch[@]}"; do
        ip -n "$h" -batch - <<<"${batch[$h]}" || die "$h: static underlay neighbours refused"
    done
}

# ============================================================= baseline ==
#
# lab/up --baseline: the seed's per-hypervisor stack instead of l3hvd, for
# the comparison in BENCHMARKS.md: BIRD 2 (BGP to the reflectors, the
# kernel tables 90 and 20), ndppd (NDP proxy on the VM interfaces), radvd
# (RAs) and dnsmasq (DHCPv4, and DHCPv6 on the shared /64 where the seed's
# VMs used SLAAC: the lab's VMs expect their DHCPv6 addresses), after the
# seed's lab-l3-hyperv `setup` (network-lab) and its BIRD configs. What
# the seed's shell script did by hand, lab/up does: the uplink addresses,
# the sysctls, the ip rules, the fallback blackholes, and per VM the
# gateway addresses on its interface and its host routes in table 90
# (metric 10, which BIRD learns from the kernel and announces). The VMs
# are not attached through l3hv's hook (there is no agent); the reflectors
# and the internet router are the same. lab/up keeps the choice in
# $LAB_RUN/stack.
STACK=${STACK:-l3hvd}
# The protocol of the learned routes in the hypervisors' tables.
HV_PROTO=203

set_stack() { # l3hvd | baseline
    STACK=$1
    if [[ $1 == baseline ]]; then HV_PROTO=bird; else HV_PROTO=203; fi
}

# The hypervisor itself: forwarding, no redirects, the uplink addresses,
# the seed's rules (local traffic in main, the private uplinks in table
# 20, everything else in 90) and the fallback blackholes.
baseline_hv_setup() { # HV
    local hv=$1 net p a
    nsx "$hv" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.all.accept_redirects=0 \
        net.ipv6.conf.all.accept_redirects=0 net.ipv4.conf.all.send_redirects=0 \
        net.ipv4.conf.default.send_redirects=0
    for net in "${NETWORKS[@]}"; do
        for p in "${PATHS[@]}"; do
            for a in ${UPLINK[$hv,$net,$p]}; do
                addr_add "$hv" "$p-$net" "$a"
            done
            nsx "$hv" sysctl -qw "net.ipv4.conf.$p-$net.send_redirects=0"
        done
    done
    ip -n "$hv" rule add iif lo lookup main priority 21
    # IPv6: main first for everything (the seed's rule): the kernel checks
    # an IPv6 next hop in the route's table, then by the rules, and table
    # 90's default (via path a) would refuse path b's next hops.
    ip -n "$hv" -6 rule add lookup main priority 51
    for p in "${PATHS[@]}"; do
        ip -n "$hv" rule add iif "$p-private" lookup "${FABRIC_TABLE[private]}" priority 26
        ip -n "$hv" -6 rule add iif "$p-private" lookup "${FABRIC_TABLE[private]}" priority 56
    done
    ip -n "$hv" rule add lookup "${FABRIC_TABLE[public]}" priority 99
    ip -n "$hv" -6 rule add lookup "${FABRIC_TABLE[public]}" priority 99
    for net in "${NETWORKS[@]}"; do
        ip -n "$hv" route add blackhole default metric 4294967294 table "${FABRIC_TABLE[$net]}"
        ip -n "$hv" -6 route add blackhole default metric 4294967294 table "${FABRIC_TABLE[$net]}"
    done
}

# A VM's interface on its hypervisor, as the seed's script set it up: the
# gateway 203.0.113.254/24 noprefixroute (dnsmasq needs the netmask; no
# route), fe80::1 as the only link-local (radvd's source, the VMs' IPv6
# gateway) and the shared /64's ::fe/64 noprefixroute (dnsmasq's DHCPv6
# context; BIRD then takes the IPv6 anycast's next hop for a neighbour), proxy
# ARP without delay, rp_filter, and the host routes (and the anycast via
# the VM) in the fabric's table, metric 10.
baseline_vm_attach() { # VM
    local vm=$1 hv=${VM_HV[$1]} fab=${VM_FABRIC[$1]} t
    t=${FABRIC_TABLE[$fab]}
    ip -n "$hv" addr add "${FABRIC_GATEWAY_V4[$fab]}/${VM_V4[$vm]#*/}" dev "$vm" scope link noprefixroute
    ip -n "$hv" -6 addr add "$GATEWAY_V6/64" dev "$vm" nodad
    ip -n "$hv" -6 addr add "$(baseline_v6_server "$fab")/64" dev "$vm" nodad noprefixroute
    nsx "$hv" sysctl -qw "net.ipv4.conf.$vm.proxy_arp=1" "net.ipv4.neigh.$vm.proxy_delay=0" \
        "net.ipv4.conf.$vm.rp_filter=1" "net.ipv4.conf.$vm.send_redirects=0" \
        "net.ipv4.conf.$vm.promote_secondaries=1"
    ip -n "$hv" route add "${V4A[$vm]}/32" dev "$vm" table "$t" metric 10
    if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
        ip -n "$hv" -6 route add "${VM_V6_PREFIX[$vm]}" dev "$vm" table "$t" metric 10
    else
        ip -n "$hv" -6 route add "${V6A[$vm]}/128" dev "$vm" table "$t" metric 10
    fi
    if [[ -n ${VM_ANYCAST[$vm]:-} ]]; then
        ip -n "$hv" route add "$ANYCAST_V4/32" via "${V4A[$vm]}" dev "$vm" onlink table "$t" metric 10
        ip -n "$hv" -6 route add "$ANYCAST_V6/128" via "${V6A[$vm]}" dev "$vm" onlink table "$t" metric 10
    fi
}

# The shared /64 of FABRIC (its first IPv6 subnet) and the hypervisors'
# ::fe in it.
baseline_shared64() { # FABRIC
    local s
    for s in ${FABRIC_SUBNETS[$1]}; do
        [[ $s != *:* ]] || {
            echo "$s"
            return 0
        }
    done
}

baseline_v6_server() { # FABRIC
    local s
    s=$(baseline_shared64 "$1")
    echo "${s%%::/*}::fe"
}

baseline_hv_vms() { # HV: its VMs
    local vm
    for vm in "${VMS[@]}"; do
        [[ ${VM_HV[$vm]} != "$1" ]] || echo "$vm"
    done
}

# BIRD 2 on HV: one session per (network, path) to the path's reflector
# (IPv4 + IPv6 on public, as the agent's MP-BGP sessions; IPv4 on
# private, which has no IPv6 uplinks), next hop self, ADD-PATH rx, and
# one kernel protocol per (network, family) that learns the lab's VM
# routes (metric 10; not the blackholes) and installs the learned ones,
# merged into ECMP routes. The seed's 'rr_client' and 'kernel1' templates
# (BFD off: the agent's lab sessions have none either).
write_baseline_bird() { # HV
    local hv=$1 dir=$LAB_RUN/$1 net p rr v4 v6 t
    {
        echo "# Generated by lab/up --baseline from the lab's topology ($LAB_TOPOLOGY)."
        echo "router id $(addr_of "${UPLINK[$hv,private,a]%% *}");"
        echo "log \"$dir/bird.log\" all;"
        echo "protocol device { scan time 10; }"
        for net in "${NETWORKS[@]}"; do
            t=${FABRIC_TABLE[$net]}
            cat <<EOF2
ipv4 table ${net}4;
ipv6 table ${net}6;
protocol kernel k_${net}4 {
    ipv4 { table ${net}4; import where krt_metric < 4294967294; export where source = RTS_BGP; };
    kernel table $t; learn; persist; scan time 10; merge paths on;
}
protocol kernel k_${net}6 {
    ipv6 { table ${net}6; import where krt_metric < 4294967294; export where source = RTS_BGP; };
    kernel table $t; learn; persist; scan time 10; merge paths on;
}
EOF2
            for p in "${PATHS[@]}"; do
                # shellcheck disable=SC2086
                v4=$(ipv4_of ${UPLINK[$hv,$net,$p]})
                # shellcheck disable=SC2086
                v6=$(ipv6_of ${UPLINK[$hv,$net,$p]})
                for rr in "${RRS[@]}"; do
                    [[ ${RR_PATH[$rr]} == "$p" ]] || continue
                    echo "protocol bgp ${net}_${p}_$rr {"
                    echo "    local $v4 as $ASN;"
                    echo "    neighbor $(rr_local4 "$rr" "$net") as $ASN;"
                    echo "    direct; ttl security on; hold time $BGP_HOLD;"
                    echo "    $BIRD_RETRY"
                    echo "    ipv4 { table ${net}4; import all; export where source = RTS_INHERIT; next hop self; add paths rx; };"
                    [[ -z $v6 ]] ||
                        echo "    ipv6 { table ${net}6; import all; export where source = RTS_INHERIT; next hop self; next hop address $v6; add paths rx; };"
                    echo "}"
                done
            done
        done
    } >"$dir/bird.conf"
}

# ndppd: every VM interface answers neighbour solicitations for the
# shared /64 (the seed's 'static' rule: stateless, it answers what it has
# no route for too).
write_baseline_ndppd() { # HV
    local hv=$1 vm
    for vm in $(baseline_hv_vms "$hv"); do
        cat <<EOF2
proxy $vm {
    router yes
    rule $(baseline_shared64 "${VM_FABRIC[$vm]}") {
        static
    }
}
EOF2
    done >"$LAB_RUN/$hv/ndppd.conf"
}

# radvd: the seed's intervals (3-10 s); on the shared /64 M=1, A=0 (the
# address by DHCPv6, as the agent's 'shared-dhcpv6'), a VM's own /64 with
# A=1 (SLAAC).
write_baseline_radvd() { # HV
    local hv=$1 vm
    for vm in $(baseline_hv_vms "$hv"); do
        echo "interface $vm {"
        echo "    AdvSendAdvert on; MinRtrAdvInterval 3; MaxRtrAdvInterval 10;"
        if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
            echo "    prefix ${VM_V6_PREFIX[$vm]} { AdvOnLink on; AdvAutonomous on; AdvRouterAddr off; };"
        else
            echo "    AdvManagedFlag on;"
            echo "    prefix $(baseline_shared64 "${VM_FABRIC[$vm]}") { AdvOnLink on; AdvAutonomous off; AdvRouterAddr off; };"
        fi
        echo "};"
    done >"$LAB_RUN/$hv/radvd.conf"
}

# dnsmasq: the seed's options (no DNS, static DHCPv4 leases by MAC, the
# gateway as router) plus static DHCPv6 leases on the shared /64.
write_baseline_dnsmasq() { # HV
    local hv=$1 dir=$LAB_RUN/$1 vm fab shared
    fab=${NETWORKS[0]}
    shared=$(baseline_shared64 "$fab")
    {
        echo "# Generated by lab/up --baseline (the seed's dnsmasq options, plus DHCPv6)."
        echo "port=0"
        echo "no-resolv"
        echo "no-hosts"
        echo "no-ping"
        echo "dhcp-authoritative"
        echo "bind-interfaces"
        echo "except-interface=lo"
        echo "user=root"
        echo "group=root"
        echo "pid-file=$dir/dnsmasq.pid"
        echo "dhcp-leasefile=$dir/dnsmasq.leases"
        echo "log-facility=$dir/dnsmasq.log"
        echo "dhcp-range=tag:known,$(addr_of "${FABRIC_SUBNETS[$fab]%% *}"),static,255.255.255.0,infinite"
        echo "dhcp-range=tag:known,${shared%/*},static,64,infinite"
        echo "dhcp-option=option:router,${FABRIC_GATEWAY_V4[$fab]}"
        for vm in $(baseline_hv_vms "$hv"); do
            echo "interface=$vm"
            if [[ -n ${VM_V6_PREFIX[$vm]:-} ]]; then
                echo "dhcp-host=${VM_MAC[$vm]},${V4A[$vm]},$vm"
            else
                echo "dhcp-host=${VM_MAC[$vm]},${V4A[$vm]},[${V6A[$vm]}],$vm"
            fi
        done
    } >"$dir/dnsmasq.conf"
}

# Starts HV's four daemons (each writes its PID file in $LAB_RUN/<hv>/,
# which lab/down kills by).
baseline_start() { # HV
    local hv=$1 dir=$LAB_RUN/$1 out
    write_baseline_bird "$hv"
    write_baseline_ndppd "$hv"
    write_baseline_radvd "$hv"
    write_baseline_dnsmasq "$hv"
    out=$(nsx "$hv" bird -p -c "$dir/bird.conf" 2>&1) || die "$hv: $dir/bird.conf: $out"
    nsx "$hv" bird -c "$dir/bird.conf" -s "$dir/bird.ctl" -P "$dir/bird.pid" ||
        die "$hv: bird did not start (config $dir/bird.conf)"
    nsx "$hv" ndppd -d -c "$dir/ndppd.conf" -p "$dir/ndppd.pid" >>"$dir/ndppd.log" 2>&1 ||
        die "$hv: ndppd did not start (log $dir/ndppd.log)"
    nsx "$hv" radvd -C "$dir/radvd.conf" -p "$dir/radvd.pid" -m logfile -l "$dir/radvd.log" ||
        die "$hv: radvd did not start (log $dir/radvd.log)"
    nsx "$hv" dnsmasq -C "$dir/dnsmasq.conf" ||
        die "$hv: dnsmasq did not start (log $dir/dnsmasq.log)"
}

# The baseline daemons of HV, "name pidfile" per line.
baseline_processes() { # HV
    local d
    for d in bird ndppd radvd dnsmasq; do
        echo "$d $LAB_RUN/$1/$d.pid"
    done
}

# Waits (10 s) until HV's four daemons run (their PID files).
baseline_wait() { # HV
    local hv=$1 i ok name pidfile pid
    for ((i = 0; i < 100; i++)); do
        ok=1
        while read -r name pidfile; do
            pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
            pid_in_ns "$pid" "$hv" || ok=0
        done < <(baseline_processes "$hv")
        ((ok)) && return 0
        sleep 0.1
    done
    die "$hv: the baseline daemons are not all running after 10 s (logs in $LAB_RUN/$hv)"
}

# Established BGP sessions of HV (the agent's, or its BIRD's).
hv_sessions_established() { # HV
    if [[ $STACK == baseline ]]; then
        nsx "$1" birdc -s "$LAB_RUN/$1/bird.ctl" show protocols 2>/dev/null |
            awk '$2 == "BGP" && /Established/ {n++} END {print n + 0}'
    else
        "$L3HV" --config "$(hv_config "$1")" --timeout 2 peers --json 2>/dev/null |
            jq '[.[] | select(.state == "Established")] | length' 2>/dev/null || echo 0
    fi
}
