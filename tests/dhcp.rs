//! DHCPv4 and router advertisements end to end: l3hvd in a namespace as
//! the hypervisor, VMs as namespaces on adopted veths running real clients
//! (busybox udhcpc, ISC dhclient, the kernel's SLAAC, rdisc6).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CONFIG: &str = r#"
[hypervisor]
name = "hv-dhcp"
router_id = "198.51.100.101"
state_dir = "@DIR@/state"

[control]
socket = "@DIR@/l3hvd.sock"

[kernel]
reconcile_interval = "1h"

[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24", "2001:db8:cb00:7100::/56"]
gateway_v4 = "203.0.113.254"
ipv6_mode = "prefix-per-vm"

[fabrics.p2p]
table = 20
subnets = ["198.18.0.0/24", "2001:db8:cb00:7200::/64"]
ipv4_mode = "point-to-point"
ipv6_mode = "shared-dhcpv6"

[dhcp]
dns_servers = ["192.0.2.53"]
domain = "example.net"
mtu = 1500

[ra]
rdnss = ["2001:db8::53"]
dnssl = ["example.net"]
"#;

fn intent(vm: &str, ifname: &str, mac: &str, fabric: &str, v4: &str, v6: &[&str]) -> String {
    let prefixes: Vec<String> = v6
        .iter()
        .filter(|p| p.contains('/'))
        .map(|p| format!("\"{p}\""))
        .collect();
    let addrs: Vec<String> = v6
        .iter()
        .filter(|p| !p.contains('/'))
        .map(|p| format!("\"{p}\""))
        .collect();
    format!(
        r#"{{"name":"{vm}","interfaces":[{{"name":"{ifname}","mac":"{mac}","fabric":"{fabric}","link":"adopt","ipv4":["{v4}"],"ipv6":[{}],"ipv6_prefixes":[{}]}}]}}"#,
        addrs.join(","),
        prefixes.join(",")
    )
}

/// The service counters of `ifname` from `l3hv status --json`.
fn counters(agent: &Agent, ifname: &str) -> Value {
    let s = agent.status_json();
    s["services"]["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["interface"] == ifname)
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_listening(agent: &Agent, ifname: &str) {
    wait_for(
        &format!("dhcp and ra listening on {ifname}"),
        Duration::from_secs(10),
        || {
            let c = counters(agent, ifname);
            c["dhcp_listening"] == true && c["ra_listening"] == true
        },
    );
}

/// A client script that records each event's environment in `dir`.
fn recorder(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).expect("dir");
    let script = dir.join("record.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nenv | sort > {}/\"${{1:-$reason}}\".env\nexit 0\n",
            dir.display()
        ),
    )
    .expect("script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

fn env_of(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn udhcpc(vm: &Netns, script: &Path, tries: &str) -> std::process::Output {
    vm.try_exec(&[
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        tries,
        "-T",
        "1",
        "-O",
        "staticroutes",
        "-s",
        script.to_str().expect("utf-8"),
    ])
}

fn served(c: &Value) -> u64 {
    c["dhcp_served"].as_u64().unwrap_or(0)
}

#[test]
fn udhcpc_gets_address_and_gateway_in_one_exchange() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm1", "52:54:00:71:00:05");
    agent.set_vm(&intent(
        "vm1",
        "vm1",
        "52:54:00:71:00:05",
        "public",
        "203.0.113.5",
        &[],
    ));
    wait_listening(&agent, "vm1");
    let dir = agent.dir.join("udhcpc");
    let script = recorder(&dir);
    let out = udhcpc(&vm, &script, "3");
    assert!(
        out.status.success(),
        "udhcpc: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let env = env_of(&dir.join("bound.env"));
    for want in [
        "ip=203.0.113.5",
        "subnet=255.255.255.0",
        "router=203.0.113.254",
        "serverid=203.0.113.254",
        "dns=192.0.2.53",
        "domain=example.net",
        "hostname=vm1",
        "mtu=1500",
        "lease=4294967295",
    ] {
        assert!(env.lines().any(|l| l == want), "missing {want} in\n{env}");
    }
    let c = counters(&agent, "vm1");
    // One DISCOVER/OFFER, one REQUEST/ACK: nothing was retransmitted.
    assert_eq!(served(&c), 2, "{c}");
    assert!(c["dhcp_last_lease_unix"].as_u64().is_some(), "{c}");
    // The unicast replies went through a permanent neighbour entry.
    let neigh = hv.ip(&["neigh", "show", "dev", "vm1", "nud", "permanent"]);
    assert!(
        neigh.contains("203.0.113.5 lladdr 52:54:00:71:00:05"),
        "{neigh}"
    );
    // The human status shows the counters too.
    let text = agent.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("DHCP SERVED"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    // The lease works: the gateway answers on the offered address.
    vm.ip(&["addr", "add", "203.0.113.5/24", "dev", "eth0"]);
    vm.ip(&["route", "add", "default", "via", "203.0.113.254"]);
    assert!(vm.ping("203.0.113.254"));
    // Removing the VM takes our neighbour entry away (the veth stays).
    agent.remove_vm("vm1");
    wait_for("neighbour entry removed", Duration::from_secs(5), || {
        !hv.ip(&["neigh", "show", "dev", "vm1", "nud", "permanent"])
            .contains("203.0.113.5")
    });
}

#[test]
fn point_to_point_gets_a_32_and_classless_routes() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm2", "52:54:00:71:00:06");
    agent.set_vm(&intent(
        "vm2",
        "vm2",
        "52:54:00:71:00:06",
        "p2p",
        "198.18.0.6",
        &[],
    ));
    wait_listening(&agent, "vm2");
    let dir = agent.dir.join("udhcpc");
    let script = recorder(&dir);
    let out = udhcpc(&vm, &script, "3");
    assert!(out.status.success(), "{out:?}");
    let env = env_of(&dir.join("bound.env"));
    for want in [
        "ip=198.18.0.6",
        "subnet=255.255.255.255",
        "serverid=169.254.0.1",
        // RFC 3442: the gateway on-link, then the default via it.
        "staticroutes=169.254.0.1/32 0.0.0.0 0.0.0.0/0 169.254.0.1",
    ] {
        assert!(env.lines().any(|l| l == want), "missing {want} in\n{env}");
    }
    vm.ip(&["addr", "add", "198.18.0.6/32", "dev", "eth0"]);
    vm.ip(&["route", "add", "169.254.0.1/32", "dev", "eth0"]);
    vm.ip(&["route", "add", "default", "via", "169.254.0.1"]);
    assert!(vm.ping("169.254.0.1"));
}

#[test]
fn dhclient_gets_address_and_gateway_in_one_exchange() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm3", "52:54:00:71:00:07");
    agent.set_vm(&intent(
        "vm3",
        "vm3",
        "52:54:00:71:00:07",
        "public",
        "203.0.113.7",
        &[],
    ));
    wait_listening(&agent, "vm3");
    let dir = agent.dir.join("dhclient");
    let script = recorder(&dir);
    let lease = dir.join("leases");
    let pid = dir.join("pid");
    // -1: one attempt, exit non-zero without a lease; then it forks into
    // the background (killed with the namespace).
    let out = vm.try_exec(&[
        "dhclient",
        "-1",
        "-v",
        "-sf",
        script.to_str().unwrap(),
        "-lf",
        lease.to_str().unwrap(),
        "-pf",
        pid.to_str().unwrap(),
        "eth0",
    ]);
    assert!(
        out.status.success(),
        "dhclient: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let env = env_of(&dir.join("BOUND.env"));
    for want in [
        "new_ip_address=203.0.113.7",
        "new_subnet_mask=255.255.255.0",
        "new_routers=203.0.113.254",
        "new_domain_name_servers=192.0.2.53",
        "new_domain_name=example.net",
        "new_dhcp_server_identifier=203.0.113.254",
    ] {
        assert!(env.lines().any(|l| l == want), "missing {want} in\n{env}");
    }
    assert_eq!(served(&counters(&agent, "vm3")), 2);
}

#[test]
fn wrong_mac_gets_no_answer() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm4", "52:54:00:71:00:99");
    agent.set_vm(&intent(
        "vm4",
        "vm4",
        "52:54:00:71:00:08",
        "public",
        "203.0.113.8",
        &[],
    ));
    wait_listening(&agent, "vm4");
    let script = recorder(&agent.dir.join("udhcpc"));
    let out = udhcpc(&vm, &script, "2");
    assert!(!out.status.success(), "a wrong MAC got a lease");
    let c = counters(&agent, "vm4");
    assert_eq!(served(&c), 0, "{c}");
    assert!(c["dropped"]["dhcp.wrong_mac"].as_u64() >= Some(2), "{c}");
}

/// Sends garbage from the VM: DHCP-ish datagrams of every kind of wrong,
/// and router solicitations that are malformed or come with a bad hop
/// limit.
const FLOOD: &str = r#"
import random, socket, sys
n = int(sys.argv[1]); mac = bytes.fromhex(sys.argv[2].replace(":", ""))
r = random.Random(4861)
rnd = lambda k: bytes(r.getrandbits(8) for _ in range(k))
hdr = bytes([1, 1, 6, 0]) + rnd(4) + bytes(20) + mac + bytes(10 + 192)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
u.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: fragment
i6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
i6.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
ifi = socket.if_nametoindex("eth0")
sent = 0
for i in range(n):
    k = i % 6
    if k == 0:   p = rnd(r.randrange(0, 240))                      # too short
    elif k == 1: p = hdr + rnd(4) + rnd(r.randrange(0, 300))        # bad cookie
    elif k == 2: p = hdr + bytes([99, 130, 83, 99, 53, 1]) + bytes([r.choice([0, 2, 5, 6, 9, 200])]) + bytes([121, 250]) + rnd(20)
    elif k == 3: p = rnd(r.randrange(1501, 3000))                   # oversized
    elif k == 4: p = bytes([2]) + hdr[1:] + bytes([99, 130, 83, 99, 53, 1, 1, 255])  # a BOOTREPLY
    else:
        rs = bytes([133, r.choice([0, 1]), 0, 0, 0, 0, 0, 0]) + rnd(r.randrange(0, 40))
        i6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, r.choice([1, 64, 255]))
        try: i6.sendto(rs, ("ff02::2", 0, 0, ifi)); sent += 1
        except OSError: pass
        continue
    try: u.sendto(p, ("255.255.255.255", 67)); sent += 1
    except OSError: pass
print(sent)
"#;

#[test]
fn ten_thousand_malformed_packets_leave_the_next_client_served_at_once() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let mut agent = Agent::start(&hv, CONFIG);
    let mac = "52:54:00:71:00:09";
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm5", mac);
    agent.set_vm(&intent(
        "vm5",
        "vm5",
        mac,
        "public",
        "203.0.113.9",
        &["2001:db8:cb00:7109::/64"],
    ));
    wait_listening(&agent, "vm5");
    // Solicitations need a usable link-local source: wait for SLAAC.
    slaac_address(&vm, "2001:db8:cb00:7109:");
    let flood = agent.dir.join("flood.py");
    fs::write(&flood, FLOOD).expect("flood script");
    let out = vm.try_exec(&["python3", flood.to_str().unwrap(), "10000", mac]);
    assert!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(sent >= 9000, "only {sent} sent");
    let before = counters(&agent, "vm5");

    // The next valid client: answered on its first DISCOVER.
    let dir = agent.dir.join("udhcpc");
    let script = recorder(&dir);
    let t = Instant::now();
    let out = udhcpc(&vm, &script, "1");
    let took = t.elapsed();
    assert!(out.status.success(), "{out:?}\n{}", agent.log());
    assert!(env_of(&dir.join("bound.env")).contains("ip=203.0.113.9"));
    let after = counters(&agent, "vm5");
    assert_eq!(served(&after) - served(&before), 2, "{after}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // And a router solicitation still gets its RA.
    let rd = vm.try_exec(&["rdisc6", "-1", "-r", "1", "-w", "1000", "eth0"]);
    assert!(rd.status.success(), "{rd:?}");

    eprintln!("after {sent} bad packets, next client in {took:?}: {after}");
    let d = &after["dropped"];
    let n = |k: &str| d[k].as_u64().unwrap_or(0);
    let dhcp = n("dhcp.malformed") + n("dhcp.oversized") + n("dhcp.not_request");
    assert!(dhcp >= 5000, "{after}");
    assert!(n("ra.hop_limit") + n("ra.malformed") > 500, "{after}");
    // Still the same process.
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "l3hvd died"
    );
    // Log lines are bounded: one per interface and protocol per 10 s.
    let warnings = agent.log().matches("malformed packet").count();
    assert!(warnings <= 4, "{warnings} warnings");
}

/// The first global address of eth0 in `prefix`, once it is usable.
fn slaac_address(vm: &Netns, prefix: &str) -> String {
    let mut addr = String::new();
    wait_for(
        &format!("a SLAAC address in {prefix}"),
        Duration::from_secs(15),
        || {
            let out = vm.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
            addr = out
                .lines()
                .filter(|l| !l.contains("tentative"))
                .find_map(|l| {
                    let a = l.trim().strip_prefix("inet6 ")?.split('/').next()?;
                    a.starts_with(prefix).then(|| a.to_string())
                })
                .unwrap_or_default();
            !addr.is_empty()
        },
    );
    addr
}

#[test]
fn vms_autoconfigure_ipv6_from_ra_and_reach_the_gateway_and_each_other() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let a = vm_ns_bare(&hv, &unique("vma"), "vm6", "52:54:00:71:00:0a");
    let b = vm_ns_bare(&hv, &unique("vmb"), "vm7", "52:54:00:71:00:0b");
    for (name, mac, v4, p) in [
        (
            "vm6",
            "52:54:00:71:00:0a",
            "203.0.113.10",
            "2001:db8:cb00:7106::/64",
        ),
        (
            "vm7",
            "52:54:00:71:00:0b",
            "203.0.113.11",
            "2001:db8:cb00:7107::/64",
        ),
    ] {
        agent.set_vm(&intent(name, name, mac, "public", v4, &[p]));
    }
    let a6 = slaac_address(&a, "2001:db8:cb00:7106:");
    let b6 = slaac_address(&b, "2001:db8:cb00:7107:");
    let route = a.ip(&["-6", "route", "show", "default"]);
    assert!(route.contains("via fe80::1 dev eth0 proto ra"), "{route}");
    assert!(a.ping("fe80::1%eth0"), "vm -> fe80::1");
    assert!(a.ping(&b6), "vm a -> vm b");
    assert!(b.ping(&a6), "vm b -> vm a");

    // What rdisc6 sees: the prefix, RDNSS, DNSSL, from fe80::1.
    let out = a.exec(&["rdisc6", "-1", "-r", "1", "-w", "1000", "eth0"]);
    for want in [
        "2001:db8:cb00:7106::/64",
        "2001:db8::53",
        "example.net",
        "from fe80::1",
        "1800 (0x00000708) seconds",
    ] {
        assert!(out.contains(want), "missing {want} in\n{out}");
    }
    let c = counters(&agent, "vm6");
    assert!(c["rs_answered"].as_u64() >= Some(1), "{c}");
}

const LISTEN_FINAL_RA: &str = r#"
import socket, sys, time
# AF_PACKET: every frame that reaches eth0, whatever the VM's kernel does.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86dd))
s.bind(("eth0", 0))
s.settimeout(1)
print("ready", flush=True)
end = time.time() + 10
while time.time() < end:
    try: d, a = s.recvfrom(3000)
    except socket.timeout: continue
    if a[2] == 4 or len(d) < 62 or d[20] != 58: continue
    src = socket.inet_ntop(socket.AF_INET6, d[22:38])
    print("icmpv6", d[54], d[60:62].hex(), "from", src, flush=True)
    if d[54] == 134 and d[60:62] == b"\0\0":
        print("final from", src, flush=True); sys.exit(0)
sys.exit(1)
"#;

#[test]
fn a_removed_interface_sends_a_final_ra_with_router_lifetime_zero() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm8", "52:54:00:71:00:0c");
    agent.set_vm(&intent(
        "vm8",
        "vm8",
        "52:54:00:71:00:0c",
        "public",
        "203.0.113.12",
        &["2001:db8:cb00:7108::/64"],
    ));
    wait_listening(&agent, "vm8");
    let script = agent.dir.join("listen.py");
    fs::write(&script, LISTEN_FINAL_RA).expect("script");
    let log = agent.dir.join("listen.log");
    let mut child = vm.spawn(&["python3", "-u", script.to_str().unwrap()], &log);
    wait_for("listener ready", Duration::from_secs(10), || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready")
    });
    agent.remove_vm("vm8");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "listener hung");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "no final RA: {text}");
    assert!(text.contains("final from fe80::1"), "{text}");
}

#[test]
fn stable_privacy_guest_gets_exactly_its_address_by_dhcpv6_on_a_shared_64() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm9", "52:54:00:71:00:0d");
    // As the seed's VM3: stable-privacy link-local, temporary addresses.
    vm.ip(&["link", "set", "eth0", "addrgenmode", "random"]);
    vm.exec(&["sysctl", "-qw", "net.ipv6.conf.eth0.use_tempaddr=2"]);
    agent.set_vm(&intent(
        "vm9",
        "vm9",
        "52:54:00:71:00:0d",
        "p2p",
        "198.18.0.13",
        &["2001:db8:cb00:7200::13"],
    ));
    wait_listening(&agent, "vm9");
    // The RA arrived (router known) with A=0 M=1: no SLAAC address.
    wait_for("default route from the RA", Duration::from_secs(15), || {
        vm.ip(&["-6", "route", "show", "default"])
            .contains("via fe80::1")
    });
    wait_for(
        "a usable link-local address",
        Duration::from_secs(15),
        || {
            let a = vm.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "link"]);
            a.contains("inet6 fe80:") && !a.contains("tentative")
        },
    );
    let rd = vm.exec(&["rdisc6", "-1", "-r", "1", "-w", "1000", "eth0"]);
    let flat = rd.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "Stateful address conf. : Yes",
        "Prefix : 2001:db8:cb00:7200::/64",
        "On-link : Yes",
        "Autonomous address conf.: No",
    ] {
        assert!(flat.contains(want), "missing {want} in\n{rd}");
    }
    let dir = agent.dir.join("dhclient6");
    let script = recorder(&dir);
    let out = vm.try_exec(&[
        "dhclient",
        "-6",
        "-1",
        "-v",
        "-sf",
        script.to_str().unwrap(),
        "-lf",
        dir.join("leases").to_str().unwrap(),
        "-pf",
        dir.join("pid").to_str().unwrap(),
        "eth0",
    ]);
    assert!(
        out.status.success(),
        "dhclient -6: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let env = env_of(&dir.join("BOUND6.env"));
    assert!(
        env.lines()
            .any(|l| l == "new_ip6_address=2001:db8:cb00:7200::13"),
        "{env}"
    );
    assert!(
        env.lines()
            .any(|l| l == "new_dhcp6_name_servers=2001:db8::53"),
        "{env}"
    );
    let c = counters(&agent, "vm9");
    assert!(c["dhcpv6_last_lease_unix"].as_u64().is_some(), "{c}");
    // The guest configures it as dhclient-script would; it is reachable
    // on exactly that address, and autoconfigured nothing else there.
    vm.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:cb00:7200::13/128",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert!(hv.ping("2001:db8:cb00:7200::13"), "hv -> guest");
    let addrs = vm.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    assert_eq!(addrs.matches("2001:db8:cb00:7200:").count(), 1, "{addrs}");
}

fn wait_link_local(vm: &Netns) {
    wait_for(
        "a usable link-local address",
        Duration::from_secs(15),
        || {
            let a = vm.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "link"]);
            a.contains("inet6 fe80:") && !a.contains("tentative")
        },
    );
}

/// What `vm`'s kernel resolved `target` to after one ping (the ping
/// itself may fail: only neighbour resolution matters).
fn resolve(vm: &Netns, target: &str) -> Option<String> {
    vm.try_exec(&["ping", "-c", "1", "-W", "1", target]);
    let n = vm
        .ip(&["-6", "neigh", "show", target, "dev", "eth0"])
        .to_lowercase();
    Some(
        n.split_whitespace()
            .skip_while(|t| *t != "lladdr")
            .nth(1)?
            .to_string(),
    )
}

/// Sends a raw Ethernet frame `n` times out of `vm`'s eth0 (python3,
/// AF_PACKET).
fn send_frames(vm: &Netns, hex: &str, n: usize) {
    vm.exec(&[
        "python3",
        "-c",
        &format!(
            "import socket\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
             s.bind(('eth0', 0))\nf = bytes.fromhex('{hex}')\n\
             for _ in range({n}): s.send(f)\n"
        ),
    ]);
}

#[test]
fn neighbour_solicitations_are_answered_for_the_whole_shared_64_but_the_vms_own_addresses() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vm = vm_ns_bare(&hv, &unique("vm"), "vm8", "52:54:00:71:00:08");
    agent.set_vm(&intent(
        "vm8",
        "vm8",
        "52:54:00:71:00:08",
        "p2p",
        "198.18.0.8",
        &["2001:db8:cb00:7200::8"],
    ));
    wait_for("nd responder", Duration::from_secs(10), || {
        counters(&agent, "vm8")["nd_listening"] == true
    });
    wait_link_local(&vm);
    // The VM's own address goes through duplicate address detection
    // unanswered (a solicitation from :: is never answered).
    vm.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:cb00:7200::8/64",
        "dev",
        "eth0",
    ]);
    wait_for(
        "DAD of the VM's own address",
        Duration::from_secs(10),
        || {
            let a = vm.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
            a.contains("2001:db8:cb00:7200::8/64") && !a.contains("tentative")
        },
    );
    let a = vm.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    assert!(!a.contains("dadfailed"), "{a}");
    let tap = hv.ip(&["link", "show", "vm8"]).to_lowercase();
    // Routed nowhere and without a kernel proxy entry: resolved at once to
    // the tap's MAC by l3hv's responder.
    assert!(hv.ip(&["-6", "neigh", "show", "proxy"]).trim().is_empty());
    let mac = resolve(&vm, "2001:db8:cb00:7200::77").unwrap_or_else(|| {
        panic!(
            "::77 unresolved\n{}",
            serde_json::to_string_pretty(&counters(&agent, "vm8")).unwrap_or_default()
        )
    });
    assert!(tap.contains(&mac), "{mac} is not the tap's\n{tap}");
    assert!(counters(&agent, "vm8")["nd_answered"].as_u64() >= Some(1));
    // A guest on the prefix-per-vm fabric gets no such answers.
    let other = vm_ns_bare(&hv, &unique("vm"), "vm7", "52:54:00:71:00:07");
    agent.set_vm(&intent(
        "vm7",
        "vm7",
        "52:54:00:71:00:07",
        "public",
        "203.0.113.7",
        &["2001:db8:cb00:7100::7"],
    ));
    wait_listening(&agent, "vm7");
    wait_link_local(&other);
    other.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:cb00:7100::7/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert_eq!(resolve(&other, "2001:db8:cb00:7100::77"), None);
    assert_ne!(counters(&agent, "vm7")["nd_listening"], true);
    // Malformed solicitations are counted and dropped; the next valid one
    // is answered at once.
    let truncated = "3333ff00007752540071000886dd6000000000203aff\
        20010db8cb0072000000000000000008ff0200000000000000000001ff000077\
        87000000000000002001"; // 32 bytes announced, 6 sent
    send_frames(&vm, truncated, 100);
    wait_for(
        "truncated solicitations counted",
        Duration::from_secs(5),
        || counters(&agent, "vm8")["dropped"]["nd.truncated"].as_u64() >= Some(100),
    );
    assert!(resolve(&vm, "2001:db8:cb00:7200::78").is_some());
}

/// VMs `vm<n>` on the p2p fabric (shared-dhcpv6), each on its own adopted
/// veth with 198.18.0.<n> and 2001:db8:cb00:7200::<n>/64 on-link, as a
/// DHCPv6 guest with the RA's on-link prefix would have.
fn shared_64_vms<const N: usize>(hv: &Netns, agent: &Agent, ids: [u8; N]) -> Vec<Netns> {
    ids.iter()
        .map(|n| {
            let name = format!("vm{n}");
            let mac = format!("52:54:00:71:00:{n:02x}");
            let vm = vm_ns_bare(hv, &unique(&name), &name, &mac);
            agent.set_vm(&intent(
                &name,
                &name,
                &mac,
                "p2p",
                &format!("198.18.0.{n}"),
                &[&format!("2001:db8:cb00:7200::{n}")],
            ));
            wait_link_local(&vm);
            vm.ip(&[
                "-6",
                "addr",
                "add",
                &format!("2001:db8:cb00:7200::{n}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            vm
        })
        .collect()
}

#[test]
fn without_kernel_proxy_entries_the_responder_alone_connects_two_vms_on_the_shared_64() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let config = CONFIG.replace(
        "ipv6_mode = \"shared-dhcpv6\"",
        "ipv6_mode = \"shared-dhcpv6\"\nnd_proxy_entries = false",
    );
    assert_ne!(config, CONFIG);
    let agent = Agent::start(&hv, &config);
    let vms = shared_64_vms(&hv, &agent, [5, 6]);
    wait_for("both responders", Duration::from_secs(10), || {
        counters(&agent, "vm5")["nd_listening"] == true
            && counters(&agent, "vm6")["nd_listening"] == true
    });
    assert!(vms[0].ping("2001:db8:cb00:7200::6"), "vm5 -> vm6");
    assert!(vms[1].ping("2001:db8:cb00:7200::5"), "vm6 -> vm5");
    // Constant kernel state: no proxy entry, no solicited-node group per
    // address on the taps.
    assert!(hv.ip(&["-6", "neigh", "show", "proxy"]).trim().is_empty());
    assert!(counters(&agent, "vm5")["nd_answered"].as_u64() >= Some(1));
}

/// With kernel proxy entries and the responder both answering, a guest
/// gets two advertisements per solicitation: they must agree on the
/// Router flag, or Linux takes the target for a router turned host and
/// deletes the routes via the answer's source, fe80::1: the default route.
#[test]
fn the_responder_and_the_kernel_entries_never_cost_a_guest_its_default_route() {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let agent = Agent::start(&hv, CONFIG);
    let vms = shared_64_vms(&hv, &agent, [3, 4]);
    wait_for(
        "vm3's default route from the RA",
        Duration::from_secs(15),
        || {
            vms[0]
                .ip(&["-6", "route", "show", "default"])
                .contains("via fe80::1")
        },
    );
    wait_for(
        "the kernel entry for vm4 on vm3's tap",
        Duration::from_secs(10),
        || {
            hv.ip(&["-6", "neigh", "show", "proxy", "dev", "vm3"])
                .contains("2001:db8:cb00:7200::4")
        },
    );
    assert!(vms[0].ping("2001:db8:cb00:7200::4"), "vm3 -> vm4");
    // More multicast solicitations for the same target, each answered by
    // the kernel entry and by the responder.
    vms[0].try_exec(&[
        "ndisc6",
        "-r",
        "5",
        "-w",
        "200",
        "2001:db8:cb00:7200::4",
        "eth0",
    ]);
    vms[0].try_exec(&[
        "ndisc6",
        "-r",
        "5",
        "-w",
        "200",
        "2001:db8:cb00:7200::4",
        "eth0",
    ]);
    let route = vms[0].ip(&["-6", "route", "show", "default"]);
    assert!(
        route.contains("via fe80::1"),
        "default route lost: {route:?}"
    );
    assert!(counters(&agent, "vm3")["nd_answered"].as_u64() >= Some(1));
}
