//! The foundation, end to end on the real kernel: l3hvd in a network
//! namespace acting as the hypervisor, VMs as namespaces on veths (or taps
//! the agent creates), a host beyond an uplink.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

/// hv with an uplink `up-a` to `ext` (198.51.100.126, 2001:db8:c633:6400::126)
/// and a private uplink `up-p` to `extp` (172.22.15.126).
struct World {
    hv: Netns,
    /// Kept alive for the test's duration (dropped = deleted).
    ext: Netns,
    _extp: Netns,
}

fn world() -> World {
    require_root();
    let hv = Netns::new(&unique("hv"));
    let ext = Netns::new(&unique("ext"));
    let extp = Netns::new(&unique("extp"));
    veth(&hv, "up-a", &ext, "eth0");
    ext.ip(&["addr", "add", "198.51.100.126/25", "dev", "eth0"]);
    ext.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:c633:6400::126/120",
        "dev",
        "eth0",
        "nodad",
    ]);
    ext.ip(&["route", "add", "203.0.113.0/24", "via", "198.51.100.101"]);
    ext.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:cb00:7100::/64",
        "via",
        "2001:db8:c633:6400::101",
    ]);
    veth(&hv, "up-p", &extp, "eth0");
    extp.ip(&["addr", "add", "172.22.15.126/25", "dev", "eth0"]);
    extp.ip(&["route", "add", "172.22.2.0/24", "via", "172.22.15.101"]);
    World {
        hv,
        ext,
        _extp: extp,
    }
}

/// Stands in for the default route BGP will bring: a foreign (proto static)
/// route the agent must leave alone.
fn default_via_uplink(w: &World) {
    w.hv.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.51.100.126",
        "table",
        "90",
    ]);
    // onlink: the IPv6 gateway check looks the gateway up in table 90
    // itself, where only the blackhole default is.
    w.hv.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:c633:6400::126",
        "dev",
        "up-a",
        "table",
        "90",
        "onlink",
    ]);
}

#[test]
fn add_and_remove_create_and_remove_exactly_the_kernel_state() {
    let w = world();
    let agent = Agent::start(&w.hv, HV_CONFIG);
    let before = w.hv.snapshot();

    agent.set_vm(&vm_json(
        "vm1",
        "tap1",
        "tap",
        "public",
        "203.0.113.1",
        Some("2001:db8:cb00:7100::1"),
    ));

    // The tap, as libvirt will open it with managed='no'.
    let link = w.hv.ip(&["-d", "link", "show", "tap1"]);
    assert!(
        link.contains("tun type tap pi off vnet_hdr on persist on"),
        "{link}"
    );
    assert!(link.contains(",UP"), "{link}");
    assert!(link.contains("alias l3hv:tap:vm1"), "{link}");
    assert!(link.contains("addrgenmode none"), "{link}");
    let addr = w.hv.ip(&["addr", "show", "tap1"]);
    assert!(addr.contains("inet 203.0.113.254/32 scope link"), "{addr}");
    assert!(addr.contains("inet6 fe80::1/64 scope link nodad"), "{addr}");
    assert_eq!(addr.matches("inet").count(), 2, "{addr}");
    // The /64 gives the kernel its link-local route on the tap: unicast
    // DHCPv6 replies and solicited RAs to the guest need it.
    let ll =
        w.hv.ip(&["-6", "route", "show", "table", "main", "dev", "tap1"]);
    assert!(ll.contains("fe80::/64"), "{ll}");
    for (key, want) in [
        ("net.ipv4.conf.tap1.proxy_arp", "1"),
        ("net.ipv4.conf.tap1.rp_filter", "1"),
        ("net.ipv4.conf.tap1.forwarding", "1"),
        ("net.ipv4.conf.tap1.send_redirects", "0"),
        ("net.ipv4.neigh.tap1.proxy_delay", "0"),
        ("net.ipv6.neigh.tap1.proxy_delay", "0"),
        ("net.ipv6.conf.tap1.accept_ra", "0"),
        ("net.ipv6.conf.tap1.force_forwarding", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.icmp_errors_use_inbound_ifaddr", "1"),
        ("net.ipv4.conf.up-a.forwarding", "1"),
        ("net.ipv4.conf.up-a.rp_filter", "0"),
    ] {
        assert_eq!(w.hv.sysctl(key), want, "{key}");
    }
    for table in ["90", "100"] {
        let r4 = w.hv.ip(&["route", "show", "table", table, "proto", "203"]);
        assert!(
            r4.contains("203.0.113.1 dev tap1 scope link metric 16"),
            "table {table}: {r4}"
        );
        assert!(
            r4.contains("blackhole default metric 4294967295"),
            "table {table}: {r4}"
        );
        let r6 =
            w.hv.ip(&["-6", "route", "show", "table", table, "proto", "203"]);
        assert!(
            r6.contains("2001:db8:cb00:7100::1 dev tap1 metric 16"),
            "table {table}: {r6}"
        );
    }
    let r20 = w.hv.ip(&["route", "show", "table", "20"]);
    assert!(!r20.contains("tap1"), "{r20}");
    let rules = w.hv.ip(&["rule", "show"]);
    for want in [
        "21:\tfrom all iif lo lookup main suppress_prefixlength 0 proto 203",
        "22:\tfrom all iif lo lookup 100 proto 203",
        "26:\tfrom all iif up-p lookup 20 proto 203",
        "40:\tfrom 172.22.2.0/24 lookup 20 proto 203",
        "99:\tfrom all lookup 90 proto 203",
    ] {
        assert!(rules.contains(want), "missing {want:?} in\n{rules}");
    }
    let status = agent.status_json();
    assert_eq!(status["interfaces"][0]["name"], "tap1");
    assert_eq!(status["routes_failed"], 0);

    agent.remove_vm("vm1");
    // Routes go before the answer; the tap (an RCU-bound netdev
    // deletion) right after it.
    wait_for("tap1 deleted", Duration::from_secs(5), || {
        !w.hv
            .try_exec(&["ip", "link", "show", "tap1"])
            .status
            .success()
    });
    let after = w.hv.snapshot();
    assert_eq!(
        diff(&before, &after),
        "",
        "state after removal differs from before"
    );
    // Removing again is not an error.
    agent.remove_vm("vm1");
}

fn diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let mut out = String::new();
    for l in &a {
        if !b.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &b {
        if !a.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    out
}

fn two_vms(w: &World) -> (Agent, Netns, Netns) {
    let agent = Agent::start(&w.hv, HV_CONFIG);
    let vm1 = vm_ns(
        &w.hv,
        &unique("vm1"),
        "vm1e0",
        "203.0.113.1/24",
        "203.0.113.254",
    );
    let vm2 = vm_ns(
        &w.hv,
        &unique("vm2"),
        "vm2e0",
        "203.0.113.2/24",
        "203.0.113.254",
    );
    vm1.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:cb00:7100::1/128",
        "dev",
        "eth0",
        "nodad",
    ]);
    vm1.ip(&[
        "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ]);
    agent.set_vm(&vm_json(
        "vm1",
        "vm1e0",
        "adopt",
        "public",
        "203.0.113.1",
        Some("2001:db8:cb00:7100::1"),
    ));
    agent.set_vm(&vm_json(
        "vm2",
        "vm2e0",
        "adopt",
        "public",
        "203.0.113.2",
        None,
    ));
    (agent, vm1, vm2)
}

#[test]
fn two_vms_reach_each_other_the_gateway_and_beyond_via_proxy_arp() {
    let w = world();
    let (_agent, vm1, vm2) = two_vms(&w);
    default_via_uplink(&w);
    assert!(vm1.ping("203.0.113.2"), "vm1 -> vm2");
    assert!(vm2.ping("203.0.113.1"), "vm2 -> vm1");
    assert!(vm1.ping("203.0.113.254"), "vm1 -> gateway");
    assert!(vm1.ping("198.51.100.126"), "vm1 -> host beyond the uplink");
    assert!(
        vm1.ping("2001:db8:c633:6400::126"),
        "vm1 -> v6 host beyond the uplink"
    );
    // The VM believes it shares the /24: vm2's address resolves on-link,
    // answered by the hypervisor (proxy ARP) with the tap's MAC.
    let neigh = vm1.ip(&["neigh", "show", "203.0.113.2"]);
    let hv_mac = w.hv.ip(&["link", "show", "vm1e0"]);
    let mac = neigh
        .split_whitespace()
        .skip_while(|t| *t != "lladdr")
        .nth(1)
        .expect("lladdr");
    assert!(hv_mac.contains(mac), "{neigh} / {hv_mac}");
}

/// Starts `ping` in the background; returns (child, log path).
fn continuous_ping(
    ns: &Netns,
    dst: &str,
    dir: &std::path::Path,
    tag: &str,
) -> (std::process::Child, std::path::PathBuf) {
    let log = dir.join(format!("ping-{tag}.log"));
    let child = ns.spawn(&["ping", "-i", "0.05", "-W", "1", dst], &log);
    (child, log)
}

/// Stops a background ping with SIGINT and returns (sent, received).
fn stop_ping(mut child: std::process::Child, log: &std::path::Path) -> (u32, u32) {
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let text = fs::read_to_string(log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn kill9_keeps_forwarding_and_restart_converges_without_flap() {
    let w = world();
    let (mut agent, vm1, _vm2) = two_vms(&w);
    default_via_uplink(&w);
    // A third VM on a tap that will go away while the agent is down.
    agent.set_vm(&vm_json(
        "vm3",
        "tap3",
        "tap",
        "public",
        "203.0.113.3",
        None,
    ));
    assert!(vm1.ping("203.0.113.2"));

    let (p1, l1) = continuous_ping(&vm1, "203.0.113.2", &agent.dir, "vm2");
    let (p2, l2) = continuous_ping(&vm1, "198.51.100.126", &agent.dir, "ext");
    std::thread::sleep(Duration::from_millis(300));
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));

    // While it is down, vm3 goes from the persisted intent.
    let path = agent.state_file();
    let mut state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    state["vms"].as_object_mut().unwrap().remove("vm3");
    fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();

    // Let the kernel finish DAD of the veths' own link-local addresses, so
    // the monitor only sees what the agent does.
    wait_for("DAD", Duration::from_secs(10), || {
        w.hv.ip(&["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
    });
    let monitor_log = agent.dir.join("monitor.log");
    let mut monitor = w.hv.spawn(
        &["ip", "monitor", "link", "address", "route", "rule", "neigh"],
        &monitor_log,
    );
    std::thread::sleep(Duration::from_millis(300));
    agent.restart();
    let out = agent.cli(&["reconcile", "--json"]);
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let _ = monitor.wait();
    std::thread::sleep(Duration::from_millis(300));
    let (sent1, got1) = stop_ping(p1, &l1);
    let (sent2, got2) = stop_ping(p2, &l2);

    let events = fs::read_to_string(&monitor_log).unwrap();
    // Everything that changed concerns tap3 (swept); nothing else moved.
    for line in events.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("tap3")
                || line.contains("203.0.113.3")
                // The kernel ages its own multicast (NOARP) neighbours.
                || (line.contains("Deleted ff02::") && line.contains("NOARP"))
                // Neighbour cache state the kernel learns from traffic (the
                // VMs answering RAs and pings), not anything l3hv programs.
                || ["REACHABLE", "STALE", "DELAY", "PROBE", "INCOMPLETE", "FAILED"]
                    .iter()
                    .any(|st| line.ends_with(&format!("{st} ")) || line.ends_with(st))
                || line.starts_with(' ')
                || line.contains("link/ether")
                // The kernel re-announces l3hv's carrier-less sink tun now
                // and then with nothing changed (still UP): not a flap.
                || (line.contains("l3hv-sink:") && line.contains(",UP>")),
            "unexpected kernel change during restart: {line}\nall events:\n{events}"
        );
    }
    assert!(events.contains("Deleted"), "tap3 was not swept: {events}");
    assert!(w.hv.try_exec(&["ip", "link", "show", "tap3"]).status.code() != Some(0));
    assert_eq!(
        sent1, got1,
        "vm1 -> vm2 lost packets across kill -9 and restart"
    );
    assert_eq!(
        sent2, got2,
        "vm1 -> beyond the uplink lost packets across kill -9 and restart"
    );
    assert!(sent1 > 20, "ping ran too briefly: {sent1}");
}

#[test]
fn sigterm_and_kill9_leave_routes_rules_and_neighbours_in_place() {
    let w = world();
    let (mut agent, vm1, vm2) = two_vms(&w);
    default_via_uplink(&w);
    // A permanent neighbour and a proxy entry that forwarding may rely on.
    let vm2_mac = vm2.exec(&["cat", "/sys/class/net/eth0/address"]);
    w.hv.ip(&[
        "neigh",
        "replace",
        "203.0.113.2",
        "lladdr",
        vm2_mac.trim(),
        "dev",
        "vm2e0",
        "nud",
        "permanent",
    ]);
    w.hv.ip(&[
        "-6",
        "neigh",
        "add",
        "proxy",
        "2001:db8:cb00:7100::2",
        "dev",
        "vm1e0",
    ]);
    assert!(vm1.ping("203.0.113.254"));
    // The kernel's own DAD of link-local addresses must not show as a
    // difference.
    wait_for("DAD", Duration::from_secs(10), || {
        w.hv.ip(&["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
    });
    let before = w.hv.snapshot();
    let status = agent.sigterm();
    assert!(status.success(), "l3hvd exit on SIGTERM: {status}");
    assert_eq!(
        diff(&before, &w.hv.snapshot()),
        "",
        "SIGTERM changed the kernel"
    );
    assert!(vm1.ping("198.51.100.126"), "vm1 -> beyond after SIGTERM");
    assert!(vm2.ping("203.0.113.254"), "vm2 -> gateway after SIGTERM");
    agent.restart();
    let before = w.hv.snapshot();
    agent.kill9();
    assert_eq!(
        diff(&before, &w.hv.snapshot()),
        "",
        "kill -9 changed the kernel"
    );
    assert!(vm1.ping("198.51.100.126"), "vm1 -> beyond after kill -9");
}

#[test]
fn private_fabric_uses_its_table_and_strict_rp_filter_passes_with_a_main_default() {
    let w = world();
    // A management interface with a default route in main.
    let mgmt = Netns::new(&unique("mgmt"));
    veth(&w.hv, "mgmt0", &mgmt, "eth0");
    w.hv.ip(&["addr", "add", "192.0.2.10/24", "dev", "mgmt0"]);
    mgmt.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    w.hv.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let agent = Agent::start(&w.hv, HV_CONFIG);
    // What BGP will bring on the private fabric.
    w.hv.ip(&[
        "route",
        "add",
        "default",
        "via",
        "172.22.15.126",
        "table",
        "20",
    ]);
    let vm = vm_ns(
        &w.hv,
        &unique("vmp"),
        "vmpe0",
        "172.22.2.1/24",
        "172.22.2.254",
    );
    agent.set_vm(&vm_json(
        "vmp",
        "vmpe0",
        "adopt",
        "private",
        "172.22.2.1",
        None,
    ));
    assert_eq!(w.hv.sysctl("net.ipv4.conf.vmpe0.rp_filter"), "1");

    let route = w.hv.ip(&[
        "route",
        "get",
        "172.22.15.126",
        "from",
        "172.22.2.1",
        "iif",
        "vmpe0",
    ]);
    assert!(route.contains("table 20"), "{route}");
    assert!(route.contains("dev up-p"), "{route}");
    assert!(vm.ping("172.22.2.254"), "vm -> its gateway");
    assert!(
        vm.ping("172.22.15.126"),
        "vm -> host beyond the private uplink"
    );
    // Private traffic never falls through to public or main.
    let public = w.hv.try_exec(&[
        "ip",
        "route",
        "get",
        "203.0.113.1",
        "from",
        "172.22.2.1",
        "iif",
        "vmpe0",
    ]);
    let text = String::from_utf8_lossy(&public.stdout).to_string()
        + &String::from_utf8_lossy(&public.stderr);
    assert!(
        !public.status.success() || !text.contains("dev mgmt0"),
        "{text}"
    );
    drop(mgmt);
}

const BAD_CONFIGS: &[(&str, &str, &str, &str)] = &[
    // (what, from, to, expected in message)
    ("syntax", "[fabrics.public]", "[fabrics.public", ":13:"),
    (
        "unknown field",
        "table = 90",
        "table = 90\ntabel = 9",
        "tabel",
    ),
    (
        "wrong type",
        "table = 90",
        "table = \"ninety\"",
        "field `fabrics.public.table`",
    ),
    (
        "bad address",
        "router_id = \"198.51.100.101\"",
        "router_id = \"198.51.100.300\"",
        "field `hypervisor.router_id`",
    ),
    (
        "missing field",
        "router_id = \"198.51.100.101\"\n",
        "",
        "router_id",
    ),
    (
        "reserved table",
        "table = 20",
        "table = 254",
        "field `fabrics.private.table`",
    ),
    (
        "duplicate table",
        "table = 20",
        "table = 90",
        "table 90 is also used by",
    ),
    (
        "gateway outside subnet",
        "gateway_v4 = \"172.22.2.254\"",
        "gateway_v4 = \"10.0.0.1\"",
        "field `fabrics.private.gateway_v4`",
    ),
    (
        "bad interface name",
        "interface = \"up-p\"",
        "interface = \"a/b\"",
        "field `fabrics.private.paths.a.interface`",
    ),
    (
        "duplicate uplink",
        "interface = \"up-p\"",
        "interface = \"up-a\"",
        "is also the uplink of",
    ),
    (
        "bad duration",
        "reconcile_interval = \"1h\"",
        "reconcile_interval = \"soon\"",
        "field `kernel.reconcile_interval`",
    ),
    (
        "two catch-alls",
        "table = 20",
        "table = 20\ncatch_all = true",
        "catch_all",
    ),
    (
        "bad subnet",
        "subnets = [\"172.22.2.0/24\"]",
        "subnets = [\"172.22.2.1/24\"]",
        "field `fabrics.private.subnets[0]`",
    ),
    (
        "relative state dir",
        "state_dir = \"@DIR@/state\"",
        "state_dir = \"state\"",
        "field `hypervisor.state_dir`",
    ),
    (
        "bad log level",
        "[control]",
        "[log]\nlevel = \"l3hv=loud\"\n[control]",
        "field `log.level`",
    ),
    (
        "unknown section",
        "[control]",
        "[contorl]\n[control]",
        "contorl",
    ),
];

#[test]
fn every_class_of_config_error_names_file_line_field_and_leaves_the_kernel_alone() {
    require_root();
    let ns = Netns::new(&unique("cfg"));
    let dir = std::env::temp_dir().join(format!("{}-cfg", ns.name));
    fs::create_dir_all(&dir).unwrap();
    let before = ns.snapshot();
    for (what, from, to, expect) in BAD_CONFIGS {
        assert!(HV_CONFIG.contains(from), "{what}: test text not found");
        let text = HV_CONFIG
            .replacen(from, to, 1)
            .replace("@DIR@", &dir.display().to_string());
        let path = dir.join("bad.toml");
        fs::write(&path, &text).unwrap();
        for args in [
            vec!["--check-config", path.to_str().unwrap()],
            vec!["--config", path.to_str().unwrap()],
        ] {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_l3hvd")])
                .args(&args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: accepted");
            let loc = format!("{}:", path.display());
            assert!(err.contains(&loc), "{what}: no file:line in {err}");
            let line: usize = err
                .split(&loc)
                .nth(1)
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(line >= 1, "{what}: no line number in {err}");
            assert!(err.contains(expect), "{what}: expected {expect:?} in {err}");
        }
    }
    // A valid file passes the check.
    let good = dir.join("good.toml");
    fs::write(
        &good,
        HV_CONFIG.replace("@DIR@", &dir.display().to_string()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_l3hvd"))
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A missing file is an error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_l3hvd"))
        .args(["--config", "/nonexistent/l3hv.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/l3hv.toml"));
    assert_eq!(
        diff(&before, &ns.snapshot()),
        "",
        "a bad configuration touched the kernel"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_intent_refuses_to_start_and_keeps_the_kernel() {
    let w = world();
    let mut agent = Agent::start(&w.hv, HV_CONFIG);
    agent.set_vm(&vm_json(
        "vm1",
        "tap1",
        "tap",
        "public",
        "203.0.113.1",
        None,
    ));
    agent.kill9();
    fs::write(agent.state_file(), b"{\"version\": 1, \"vms\": {\"vm1\": ").unwrap();
    let before = w.hv.snapshot();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &w.hv.name,
            env!("CARGO_BIN_EXE_l3hvd"),
            "--config",
        ])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt") && err.contains("intent.json"),
        "{err}"
    );
    assert_eq!(
        diff(&before, &w.hv.snapshot()),
        "",
        "refused start touched the kernel"
    );
    // The file is kept as it was, and a copy set aside.
    assert!(
        fs::read_to_string(agent.state_file())
            .unwrap()
            .ends_with("\"vm1\": ")
    );
    let kept = fs::read_dir(agent.state_file().parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".bad-"));
    assert!(kept);
}

#[test]
fn outside_changes_are_repaired_by_the_next_reconcile() {
    let w = world();
    let agent = Agent::start(&w.hv, HV_CONFIG);
    agent.set_vm(&vm_json(
        "vm1",
        "tap1",
        "tap",
        "public",
        "203.0.113.1",
        None,
    ));
    let want = w.hv.snapshot();
    w.hv.ip(&["route", "del", "203.0.113.1", "table", "90"]);
    w.hv.ip(&["rule", "del", "priority", "99"]);
    w.hv.ip(&["addr", "del", "203.0.113.254/32", "dev", "tap1"]);
    w.hv.exec(&["sysctl", "-qw", "net.ipv4.conf.all.send_redirects=1"]);
    w.hv.ip(&["link", "set", "tap1", "down"]);
    let out = agent.cli(&["reconcile", "--json"]);
    assert!(out.status.success());
    assert_eq!(diff(&want, &w.hv.snapshot()), "");
}

#[test]
fn an_adopted_interface_created_after_its_intent_is_configured_at_once() {
    let w = world();
    // The periodic pass is an hour away in HV_CONFIG: only the link
    // notification can bring the agent back.
    let agent = Agent::start(&w.hv, HV_CONFIG);
    settled(&agent);
    agent.set_vm(&vm_json(
        "vm9",
        "vm9e0",
        "adopt",
        "public",
        "203.0.113.9",
        None,
    ));
    assert!(
        w.hv.try_exec(&["ip", "link", "show", "vm9e0"])
            .status
            .code()
            != Some(0)
    );
    // Its routes wait for it, and say so.
    let st = agent.status_json();
    assert!(st["routes_pending"].as_u64().unwrap_or(0) > 0, "{st}");
    assert_eq!(st["routes_programmed"], 0, "{st}");
    let full_before = st["reconcile_full_passes"].clone();
    let vm = vm_ns(
        &w.hv,
        &unique("vm9"),
        "vm9e0",
        "203.0.113.9/24",
        "203.0.113.254",
    );
    wait_for(
        "the late interface is configured",
        Duration::from_secs(10),
        || {
            w.hv.ip(&["route", "show", "table", "90"])
                .contains("203.0.113.9 dev vm9e0")
        },
    );
    assert_eq!(w.hv.sysctl("net.ipv4.conf.vm9e0.proxy_arp"), "1");
    assert!(vm.ping("203.0.113.254"));
    let st = agent.status_json();
    assert_eq!(st["routes_pending"], 0, "{st}");
    assert!(st["routes_programmed"].as_u64().unwrap_or(0) > 0, "{st}");
    // A VM's link appearing dumps links, addresses and rules, never the
    // whole kernel (with 100,000 learned routes that held the next hook
    // up 0.1-0.3 s); an uplink changing does (its nexthop objects).
    assert_eq!(st["reconcile_full_passes"], full_before, "{st}");
    w.hv.ip(&["link", "set", "up-a", "down"]);
    w.hv.ip(&["link", "set", "up-a", "up"]);
    wait_for(
        "an uplink's change dumps everything",
        Duration::from_secs(10),
        || agent.status_json()["reconcile_full_passes"].as_u64() > full_before.as_u64(),
    );
}

#[test]
fn an_uplinks_notifications_take_the_full_pass_only_when_it_loses_carrier() {
    let w = world();
    // The periodic pass is an hour away in HV_CONFIG.
    let agent = Agent::start(&w.hv, HV_CONFIG);
    let passes = || agent.status_json()["reconcile_passes"].as_u64().unwrap();
    let full = || {
        agent.status_json()["reconcile_full_passes"]
            .as_u64()
            .unwrap()
    };
    let last = settled(&agent);
    let full_before = full();
    // Notifications about an uplink that stays up with carrier (an MTU
    // change, the IPv6 state that follows it): no pass at all, where each
    // dumped every learned route.
    w.hv.ip(&["link", "set", "up-a", "mtu", "1400"]);
    w.hv.ip(&["link", "set", "up-a", "mtu", "1500"]);
    w.hv.ip(&["link", "set", "up-a", "txqueuelen", "999"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(passes(), last, "{}", agent.status_json());
    // Its peer going down takes its carrier (and the kernel its nexthop
    // objects): the full pass.
    w.ext.ip(&["link", "set", "eth0", "down"]);
    wait_for(
        "an uplink losing carrier dumps everything",
        Duration::from_secs(10),
        || full() > full_before,
    );
    let lost = settled(&agent);
    let full_lost = full();
    // Carrier back: the full pass again (the objects are to be made again).
    w.ext.ip(&["link", "set", "eth0", "up"]);
    wait_for(
        "an uplink getting carrier back dumps everything",
        Duration::from_secs(10),
        || full() > full_lost,
    );
    assert!(passes() > lost);
    // And steady again afterwards.
    let last = settled(&agent);
    w.hv.ip(&["link", "set", "up-a", "mtu", "1400"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(passes(), last, "{}", agent.status_json());
    // Under 1280 the kernel takes IPv6 off the uplink: the full pass.
    let full_steady = full();
    w.hv.ip(&["link", "set", "up-a", "mtu", "1200"]);
    wait_for(
        "an uplink's MTU under IPv6's minimum dumps everything",
        Duration::from_secs(10),
        || full() > full_steady,
    );
}

/// Waits until the agent has run no pass for 1.5 s (start-up's link
/// notifications are over); returns its pass count.
fn settled(agent: &Agent) -> u64 {
    let passes = || agent.status_json()["reconcile_passes"].as_u64().unwrap();
    let mut last = passes();
    let mut quiet = 0;
    while quiet < 5 {
        std::thread::sleep(Duration::from_millis(300));
        let now = passes();
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    last
}

#[test]
fn the_agents_own_taps_take_no_pass_of_their_own() {
    let w = world();
    let agent = Agent::start(&w.hv, HV_CONFIG);
    let passes = || agent.status_json()["reconcile_passes"].as_u64().unwrap();
    // Whatever start-up left to do, done.
    let last = settled(&agent);
    // Creating, configuring and deleting its tap fires link notifications
    // the agent's mirror already accounts for: one pass per change, none
    // for the notifications (the next VM's hook would wait behind it).
    agent.set_vm(&vm_json(
        "vm1",
        "tap1",
        "tap",
        "public",
        "203.0.113.1",
        None,
    ));
    assert!(w.hv.ip(&["link", "show", "tap1"]).contains("UP"));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(passes(), last + 1, "{}", agent.log());
    agent.remove_vm("vm1");
    wait_for("tap deleted", Duration::from_secs(5), || {
        w.hv.try_exec(&["ip", "link", "show", "tap1"]).status.code() != Some(0)
    });
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(passes(), last + 2, "{}", agent.log());
    // Someone else's change to it is still seen at once.
    agent.set_vm(&vm_json(
        "vm1",
        "tap1",
        "tap",
        "public",
        "203.0.113.1",
        None,
    ));
    w.hv.ip(&["link", "set", "tap1", "down"]);
    wait_for("tap1 up again", Duration::from_secs(5), || {
        w.hv.ip(&["link", "show", "tap1"]).contains(",UP")
    });
    // Down and up again at once (one burst of notifications, the last one
    // "up" as the mirror has it): the kernel deleted its routes and IPv6
    // gateway address meanwhile, and they come back.
    let configured = || {
        w.hv.ip(&["route", "show", "table", "90"])
            .contains("203.0.113.1 dev tap1")
            && w.hv
                .ip(&["-6", "addr", "show", "dev", "tap1"])
                .contains("fe80::1/64")
    };
    wait_for("tap1 configured", Duration::from_secs(5), configured);
    w.hv.sh("ip link set tap1 down && ip link set tap1 up");
    assert!(!configured(), "the kernel keeps routes over down/up?");
    wait_for(
        "tap1's routes and address back",
        Duration::from_secs(5),
        configured,
    );
}

/// `busybox arping` from `vm` for `target`: the MAC that answered, if any.
fn arp_answer(vm: &Netns, target: &str) -> Option<String> {
    let out = vm.try_exec(&[
        "busybox", "arping", "-c", "1", "-w", "1", "-I", "eth0", target,
    ]);
    // "Unicast reply from 203.0.113.77 [92:8c:...]  0.05ms"
    let out = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let line = out.lines().find(|l| l.contains("reply from"))?;
    Some(line.split(['[', ']']).nth(1)?.to_string())
}

fn sink_tx_dropped(hv: &Netns) -> u64 {
    hv.sh("cat /sys/class/net/l3hv-sink/statistics/tx_dropped")
        .trim()
        .parse()
        .expect("l3hv-sink tx_dropped")
}

fn lo_tx_packets(hv: &Netns) -> u64 {
    hv.sh("cat /sys/class/net/lo/statistics/tx_packets")
        .trim()
        .parse()
        .expect("lo tx_packets")
}

#[test]
fn proxy_arp_answers_the_whole_shared_subnet_and_drops_what_is_not_routed() {
    let w = world();
    let (_agent, vm1, _vm2) = two_vms(&w);
    // Routed nowhere (yet): answered at once with the tap's MAC, so a VM
    // that ARPs before the route arrives does not wait a second to retry.
    let tap = w.hv.ip(&["link", "show", "vm1e0"]);
    for target in ["203.0.113.77", "203.0.113.2"] {
        let mac = arp_answer(&vm1, target).unwrap_or_else(|| panic!("{target}: no answer"));
        assert!(
            tap.contains(&mac),
            "{target}: {mac} is not the tap's\n{tap}"
        );
    }
    // What the catch-all route takes is dropped by l3hv's sink (a tun
    // nobody opens), once per packet: no loop (`lo` would loop it).
    let lo_before = lo_tx_packets(&w.hv);
    let before = sink_tx_dropped(&w.hv);
    assert!(
        !vm1.ping("203.0.113.77"),
        "nothing answers an unrouted address"
    );
    let dropped = sink_tx_dropped(&w.hv) - before;
    assert!((1..=3).contains(&dropped), "{dropped} dropped by the sink");
    assert!(lo_tx_packets(&w.hv) - lo_before <= 3, "looped through lo");
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.0/24"]);
    assert!(t90.contains("dev l3hv-sink proto 203"), "{t90}");
    let sink = w.hv.ip(&["-d", "link", "show", "l3hv-sink"]);
    assert!(
        sink.contains("tun") && sink.contains("alias l3hv:sink"),
        "{sink}"
    );
    assert!(vm1.ping("203.0.113.2"), "vm1 -> vm2 still");
}

#[test]
fn without_arp_whole_subnet_only_routed_addresses_are_answered() {
    let w = world();
    let config = HV_CONFIG
        .replace(
            "gateway_v4 = \"203.0.113.254\"",
            "gateway_v4 = \"203.0.113.254\"\narp_whole_subnet = false",
        )
        .replace(
            "gateway_v4 = \"172.22.2.254\"",
            "gateway_v4 = \"172.22.2.254\"\narp_whole_subnet = false",
        );
    assert_eq!(config.matches("arp_whole_subnet = false").count(), 2);
    let agent = Agent::start(&w.hv, &config);
    let vm1 = vm_ns(
        &w.hv,
        &unique("vm1"),
        "vm1e0",
        "203.0.113.1/24",
        "203.0.113.254",
    );
    agent.set_vm(&vm_json(
        "vm1",
        "vm1e0",
        "adopt",
        "public",
        "203.0.113.1",
        None,
    ));
    assert!(vm1.ping("203.0.113.254"), "vm1 -> gateway");
    assert_eq!(
        arp_answer(&vm1, "203.0.113.77"),
        None,
        "the seed's behaviour"
    );
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.0/24"]);
    assert!(t90.trim().is_empty(), "{t90}");
    let sink = w.hv.try_exec(&["ip", "link", "show", "l3hv-sink"]);
    assert!(!sink.status.success(), "no fabric needs the sink");
}

#[test]
fn an_intent_that_cannot_be_written_is_refused_and_undone_in_the_kernel() {
    let w = world();
    let agent = Agent::start(&w.hv, HV_CONFIG);
    let _vm1 = vm_ns(
        &w.hv,
        &unique("vm1"),
        "vm1e0",
        "203.0.113.1/24",
        "203.0.113.254",
    );
    // A directory where the store writes its temporary file: the write
    // fails even for root. The kernel pass runs beside the write, so the
    // VM's state reaches the kernel first and must be taken out again.
    let tmp = agent.state_file().with_extension("json.tmp");
    fs::create_dir_all(&tmp).expect("blocking directory");
    let json = vm_json("vm1", "vm1e0", "adopt", "public", "203.0.113.1", None);
    let path = agent.dir.join("vm1.json");
    fs::write(&path, &json).expect("vm json");
    let out = agent.cli(&["vm", "set", path.to_str().expect("utf-8")]);
    assert!(
        !out.status.success(),
        "the agent accepted an unwritten intent"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("intent"), "{err}");
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.1"]);
    assert!(t90.trim().is_empty(), "route left behind: {t90}");
    let link = w.hv.ip(&["link", "show", "vm1e0"]);
    assert!(!link.contains("alias"), "interface still claimed: {link}");
    let list = agent.cli(&["vm", "list"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("vm1"));
    // Once the disk takes it, the same call works.
    fs::remove_dir(&tmp).expect("unblock");
    agent.set_vm(&json);
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.1"]);
    assert!(t90.contains("dev vm1e0"), "{t90}");
}

#[test]
fn a_notification_overrun_is_survived_and_later_link_events_still_reconcile() {
    let w = world();
    let agent = Agent::start(&w.hv, HV_CONFIG);
    // A burst of link notifications beyond the agent's socket buffer:
    // 500 veth pairs created and deleted in two `ip -batch` runs.
    let mut add = String::new();
    let mut del = String::new();
    for i in 0..500 {
        add.push_str(&format!("link add st{i}a type veth peer name st{i}b\n"));
        del.push_str(&format!("link del st{i}a\n"));
    }
    // The agent is stopped meanwhile, so its socket cannot keep up.
    let batch = agent.dir.join("storm.batch");
    let _vm1 = vm_ns(
        &w.hv,
        &unique("vm1"),
        "vm1e0",
        "203.0.113.1/24",
        "203.0.113.254",
    );
    agent.set_vm(&vm_json(
        "vm1",
        "vm1e0",
        "adopt",
        "public",
        "203.0.113.1",
        None,
    ));
    agent.signal(libc::SIGSTOP);
    // Meanwhile the kernel loses one of the agent's routes (no link event
    // says so): the pass after the overrun finds it.
    w.hv.ip(&["route", "del", "203.0.113.1/32", "table", "90"]);
    fs::write(&batch, &add).expect("batch");
    w.hv.exec(&["ip", "-batch", batch.to_str().expect("utf-8")]);
    fs::write(&batch, &del).expect("batch");
    w.hv.exec(&["ip", "-batch", batch.to_str().expect("utf-8")]);
    agent.signal(libc::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("overran") {
        assert!(
            std::time::Instant::now() < deadline,
            "no overrun reported:\n{}",
            agent
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panick"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("the lost route restored", Duration::from_secs(5), || {
        w.hv.ip(&["route", "show", "table", "90", "203.0.113.1"])
            .contains("dev vm1e0")
    });
    // Link events still reach the agent: an adopted interface created after
    // its intent is configured at once, without the periodic pass (1 h).
    agent.set_vm(&vm_json(
        "late",
        "late0",
        "adopt",
        "public",
        "203.0.113.9",
        None,
    ));
    let _late = vm_ns(
        &w.hv,
        &unique("late"),
        "late0",
        "203.0.113.9/24",
        "203.0.113.254",
    );
    wait_for("late0 routed", Duration::from_secs(5), || {
        w.hv.ip(&["route", "show", "table", "90", "203.0.113.9"])
            .contains("dev late0")
    });
}

/// How many "reconciled" passes that changed something the agent logged
/// planning against `observed` (full, host or cache).
fn passes(agent: &Agent, observed: &str) -> usize {
    // The log is colored: drop the escape sequences first.
    let plain: String = {
        let mut out = String::new();
        let mut esc = false;
        for c in agent.log().chars() {
            match (esc, c) {
                (false, '\u{1b}') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    };
    plain
        .lines()
        .filter(|l| {
            l.contains("reconciled")
                && (l.contains(&format!("observed={observed}"))
                    || l.contains(&format!("observed=\"{observed}\"")))
        })
        .count()
}

#[test]
fn intent_changes_dump_links_not_routes_and_an_outside_route_change_is_still_repaired() {
    let w = world();
    let (agent, vm1, _vm2) = two_vms(&w);
    // Each VM's pass planned against the routes as the previous pass left
    // them: no route dump (the agent's first pass is a full one). Against
    // links, addresses and rules dumped ("host"), or against the whole
    // cache when the pass before changed only routes ("cache").
    let cached = |agent: &Agent| passes(agent, "host") + passes(agent, "cache");
    let host = cached(&agent);
    assert!(host >= 1, "{}", agent.log());
    let _vm3 = vm_ns(
        &w.hv,
        &unique("vm3"),
        "vm3e0",
        "203.0.113.3/24",
        "203.0.113.254",
    );
    agent.set_vm(&vm_json(
        "vm3",
        "vm3e0",
        "adopt",
        "public",
        "203.0.113.3",
        None,
    ));
    assert_eq!(cached(&agent), host + 1, "{}", agent.log());
    assert!(vm1.ping("203.0.113.3"), "vm1 -> vm3");
    // What an intent pass cannot see (a route deleted behind the agent's
    // back, no link event) the full pass repairs: `l3hv reconcile`.
    w.hv.ip(&["route", "del", "203.0.113.3/32", "table", "90"]);
    let full = passes(&agent, "full");
    let out = agent.cli(&["reconcile"]);
    assert!(out.status.success());
    assert_eq!(passes(&agent, "full"), full + 1, "{}", agent.log());
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.3"]);
    assert!(t90.contains("dev vm3e0"), "{t90}");
    // And the next intent pass works from that full view.
    // The full pass restored one route: its mirror is whole, so this
    // intent pass plans against the cache alone.
    let cache = passes(&agent, "cache");
    agent.remove_vm("vm3");
    assert_eq!(passes(&agent, "cache"), cache + 1, "{}", agent.log());
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.3"]);
    assert!(t90.trim().is_empty(), "{t90}");
}

#[test]
fn vm_starts_and_stops_in_a_row_plan_against_the_mirror_and_leave_exactly_the_kernel_state() {
    let w = world();
    let agent = Agent::start(&w.hv, HV_CONFIG);
    let start = |n: u32| {
        agent.set_vm(&vm_json(
            &format!("vm{n}"),
            &format!("tap{n}"),
            "tap",
            "public",
            &format!("203.0.113.{n}"),
            Some(&format!("2001:db8:cb00:7100::{n}")),
        ))
    };
    start(1);
    // Each start and stop below follows a pass that created or deleted a
    // tap, gave it addresses and routes: the agent's mirror of links,
    // addresses and rules follows its own changes, so none of them dumps
    // (before: a host dump each, 0.3 ms of every VM start).
    let cache = passes(&agent, "cache");
    start(2);
    agent.remove_vm("vm2");
    // The tap deletion is deferred after the answer; the mirror follows it.
    start(2);
    start(3);
    assert_eq!(passes(&agent, "cache"), cache + 4, "{}", agent.log());
    for n in 1..=3 {
        let link = w.hv.ip(&["-d", "link", "show", &format!("tap{n}")]);
        assert!(link.contains(",UP"), "{link}");
        assert!(link.contains(&format!("alias l3hv:tap:vm{n}")), "{link}");
        let addr = w.hv.ip(&["addr", "show", &format!("tap{n}")]);
        assert!(addr.contains("inet 203.0.113.254/32 scope link"), "{addr}");
        assert!(addr.contains("inet6 fe80::1/64 scope link nodad"), "{addr}");
        let t90 =
            w.hv.ip(&["route", "show", "table", "90", &format!("203.0.113.{n}")]);
        assert!(t90.contains(&format!("dev tap{n}")), "{t90}");
    }
    // The mirror was the kernel: a full pass from a dump finds nothing to do.
    let out = agent.cli(&["reconcile", "--json"]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["observed"], "full", "{report}");
    assert_eq!(report["planned"], 0, "{report}");
}

#[test]
fn an_adopted_interface_made_again_under_the_agent_is_configured_by_the_next_change() {
    let w = world();
    let (agent, _vm1, _vm2) = two_vms(&w);
    // vm1's interface deleted and made again (a new ifindex) by someone
    // else; the agent's change to vm1 comes before that link event's pass
    // (50 ms of debounce): it must not trust its mirror's entry of the
    // same name.
    w.hv.ip(&["link", "del", "vm1e0"]);
    let _vm1b = vm_ns(
        &w.hv,
        &unique("vm1b"),
        "vm1e0",
        "203.0.113.1/24",
        "203.0.113.254",
    );
    agent.set_vm(&vm_json(
        "vm1",
        "vm1e0",
        "adopt",
        "public",
        "203.0.113.1",
        Some("2001:db8:cb00:7100::11"),
    ));
    let addr = w.hv.ip(&["addr", "show", "vm1e0"]);
    assert!(addr.contains("inet 203.0.113.254/32 scope link"), "{addr}");
    assert_eq!(w.hv.sysctl("net.ipv4.conf.vm1e0.proxy_arp"), "1");
    let t90 = w.hv.ip(&["route", "show", "table", "90", "203.0.113.1"]);
    assert!(t90.contains("dev vm1e0"), "{t90}");
}
