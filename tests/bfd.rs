//! BFD (issue 8) in namespaces, against BIRD 2's BFD and FRR's bfdd on the
//! reflector side. Two fabric paths: bridge A (rr1) and bridge B (rr2) in a
//! switch namespace, two hypervisors (l3hvd) with one uplink on each, a VM
//! behind each. A fault is an nftables bridge rule in the switch namespace
//! that drops every frame of one hypervisor port: no carrier loss, so only
//! BFD can see it.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

/// A daemon tree started by the test, killed by PID on drop.
struct Daemons {
    pid_files: Vec<std::path::PathBuf>,
    dir: std::path::PathBuf,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for p in &self.pid_files {
            if let Ok(pid) = fs::read_to_string(p) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill(2) of a daemon this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const BFD_MS: u32 = 200;
const BFD_MULT: u32 = 3;

/// BIRD 2 as the reflector of one path, with BFD on both sessions.
fn bird(rr: &Netns, me: &str, clients: [&str; 2], auth: &str, bgp_extra: &str) -> Daemons {
    let dir = std::env::temp_dir().join(format!("{}-bird", rr.name));
    let _ = fs::create_dir_all(&dir);
    let conf = dir.join("bird.conf");
    fs::write(
        &conf,
        format!(
            r#"
router id {me};
protocol device {{}}
protocol bfd {{
    interface "*" {{
        min rx interval {BFD_MS} ms;
        min tx interval {BFD_MS} ms;
        multiplier {BFD_MULT};
        {auth}
    }};
}}
template bgp rrc {{
    local {me} as 65000;
    rr client;
    rr cluster id 192.0.2.1;
    direct;
    ttl security on;
    hold time 9;
    bfd on;
    error wait time 1,5;
    {bgp_extra}
    ipv4 {{ import all; export all; add paths tx; next hop keep; }};
}}
protocol bgp hv1 from rrc {{ neighbor {} as 65000; }}
protocol bgp hv2 from rrc {{ neighbor {} as 65000; }}
"#,
            clients[0], clients[1]
        ),
    )
    .unwrap();
    let pid = dir.join("bird.pid");
    let sock = dir.join("bird.ctl");
    rr.exec(&[
        "bird",
        "-c",
        conf.to_str().unwrap(),
        "-s",
        sock.to_str().unwrap(),
        "-P",
        pid.to_str().unwrap(),
    ]);
    Daemons {
        pid_files: vec![pid],
        dir,
    }
}

/// BIRD on both reflectors (`auth`: BFD authentication lines, `bgp_extra`:
/// lines for the BGP protocols).
fn bird_pair(t: &TwoPaths, auth: &str, bgp_extra: &str) -> (Daemons, Daemons) {
    (
        bird(
            &t.rr1,
            "198.51.100.126",
            ["198.51.100.101", "198.51.100.102"],
            auth,
            bgp_extra,
        ),
        bird(
            &t.rr2,
            "198.51.100.226",
            ["198.51.100.201", "198.51.100.202"],
            auth,
            bgp_extra,
        ),
    )
}

/// FRR (zebra, bfdd, bgpd) on both reflectors.
fn frr_pair(t: &TwoPaths) -> (Daemons, Daemons) {
    (
        frr(
            &t.rr1,
            "198.51.100.126",
            ["198.51.100.101", "198.51.100.102"],
        ),
        frr(
            &t.rr2,
            "198.51.100.226",
            ["198.51.100.201", "198.51.100.202"],
        ),
    )
}

fn birdc(rr: &Netns, d: &Daemons, cmd: &str) -> String {
    let sock = d.dir.join("bird.ctl");
    let mut args = vec!["birdc", "-s", sock.to_str().unwrap()];
    args.extend(cmd.split(' '));
    rr.exec(&args)
}

/// FRR as the reflector of one path: zebra (which relays BFD requests),
/// bfdd and bgpd with `neighbor X bfd`, all on private sockets.
fn frr(rr: &Netns, me: &str, clients: [&str; 2]) -> Daemons {
    let dir = std::env::temp_dir().join(format!("{}-frr", rr.name));
    let _ = fs::create_dir_all(&dir);
    let d = dir.to_str().unwrap().to_string();
    let mut neighbors = String::new();
    let mut af = String::new();
    for n in clients {
        neighbors.push_str(&format!(
            " neighbor {n} remote-as 65000\n neighbor {n} ttl-security hops 1\n neighbor {n} timers 3 9\n neighbor {n} bfd\n neighbor {n} bfd profile fast\n"
        ));
        af.push_str(&format!(
            "  neighbor {n} activate\n  neighbor {n} route-reflector-client\n  neighbor {n} addpath-tx-all-paths\n"
        ));
    }
    fs::write(dir.join("zebra.conf"), "hostname rr\n").unwrap();
    fs::write(
        dir.join("bfdd.conf"),
        format!(
            "bfd\n profile fast\n  receive-interval {BFD_MS}\n  transmit-interval {BFD_MS}\n  detect-multiplier {BFD_MULT}\n exit\nexit\n"
        ),
    )
    .unwrap();
    fs::write(
        dir.join("bgpd.conf"),
        format!(
            "frr defaults traditional\nhostname rr\nrouter bgp 65000\n bgp router-id {me}\n bgp cluster-id 192.0.2.1\n no bgp ebgp-requires-policy\n{neighbors} address-family ipv4 unicast\n{af} exit-address-family\n"
        ),
    )
    .unwrap();
    let zsock = format!("{d}/zserv.api");
    let mut pid_files = vec![];
    // zebra and bfdd have no --skip_runas: they run as frr, so the directory must
    // be writable by it.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    for (daemon, extra) in [
        (
            "zebra",
            vec!["-u".to_string(), "frr".into(), "-g".into(), "frr".into()],
        ),
        (
            "bfdd",
            vec![
                "-u".to_string(),
                "frr".into(),
                "-g".into(),
                "frr".into(),
                "--bfdctl".into(),
                format!("{d}/bfdd.sock"),
            ],
        ),
        ("bgpd", vec!["-S".to_string()]),
    ] {
        let pid = format!("{d}/{daemon}.pid");
        let conf = format!("{d}/{daemon}.conf");
        let mut args = vec![
            format!("/usr/lib/frr/{daemon}"),
            "-d".into(),
            "-f".into(),
            conf,
            "--vty_socket".into(),
            d.clone(),
            "-i".into(),
            pid.clone(),
            "-z".into(),
            zsock.clone(),
        ];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        rr.exec(&refs);
        pid_files.push(pid.into());
        if daemon == "zebra" {
            wait_for("zebra socket", Duration::from_secs(10), || {
                std::path::Path::new(&zsock).exists()
            });
        }
    }
    Daemons { pid_files, dir }
}

fn vtysh(rr: &Netns, d: &Daemons, cmd: &str) -> String {
    rr.exec(&["vtysh", "--vty_socket", d.dir.to_str().unwrap(), "-c", cmd])
}

fn config(n: u8, bfd_extra: &str) -> String {
    format!(
        r#"
[hypervisor]
name = "hv{n}"
router_id = "198.51.100.10{n}"
state_dir = "@DIR@/state"

[control]
socket = "@DIR@/l3hvd.sock"

[bgp]
hold_time = "9s"
connect_retry = "200ms"

[bfd]
min_tx = "{BFD_MS}ms"
min_rx = "{BFD_MS}ms"
multiplier = {BFD_MULT}
{bfd_extra}

[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24"]
gateway_v4 = "203.0.113.254"

[fabrics.public.paths.a]
interface = "a-public"
addresses = ["198.51.100.10{n}/25"]
reflectors = ["198.51.100.126"]

[fabrics.public.paths.b]
interface = "b-public"
addresses = ["198.51.100.20{n}/25"]
reflectors = ["198.51.100.226"]
"#
    )
}

/// VM1 (203.0.113.1) behind hv1 and VM3 (203.0.113.3) behind hv2.
fn two_vms(t: &TwoPaths, a1: &Agent, a2: &Agent) -> (Netns, Netns) {
    let vms = [(&t.hv1, a1, "1"), (&t.hv2, a2, "3")].map(|(hv, a, n)| {
        let vm = vm_ns(
            hv,
            &unique(&format!("bvm{n}")),
            &format!("vm{n}e0"),
            &format!("203.0.113.{n}/24"),
            "203.0.113.254",
        );
        a.set_vm(&vm_json(
            &format!("vm{n}"),
            &format!("vm{n}e0"),
            "adopt",
            "public",
            &format!("203.0.113.{n}"),
            None,
        ));
        vm
    });
    let [vm1, vm3] = vms;
    (vm1, vm3)
}

fn peers(agent: &Agent) -> serde_json::Value {
    let out = agent.cli(&["peers", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The session of `agent` on path `path` ("a" or "b").
fn session(agent: &Agent, path: &str) -> serde_json::Value {
    peers(agent)
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"]["path"] == path)
        .cloned()
        .unwrap_or_default()
}

fn all_up(agent: &Agent) -> bool {
    let p = peers(agent);
    let p = p.as_array().unwrap();
    p.len() == 2
        && p.iter()
            .all(|s| s["state"] == "Established" && s["bfd"]["state"] == "up")
}

/// (rx_packets, tx_packets) of a switch port.
fn port_counters(sw: &Netns, port: &str) -> (u64, u64) {
    let read = |what: &str| {
        sw.exec(&["cat", &format!("/sys/class/net/{port}/statistics/{what}")])
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    (read("rx_packets"), read("tx_packets"))
}

/// Drops every frame to and from `port` on its bridge (no carrier loss).
fn fault(sw: &Netns, port: &str) {
    sw.sh(&format!(
        "nft -f - <<'EOF'
table bridge fault {{
    chain forwarding {{
        type filter hook forward priority 0;
        iifname \"{port}\" drop
        oifname \"{port}\" drop
    }}
}}
EOF"
    ));
}

fn clear_fault(sw: &Netns) {
    sw.sh("nft delete table bridge fault");
}

fn ping_loss(log: &std::path::Path) -> (u32, u32) {
    let text = fs::read_to_string(log).unwrap();
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

/// The whole scenario: sessions and BFD up and staying up; a silent fault
/// of the path the flow uses is detected by BFD, BGP on that path goes
/// down with Cease/BFD Down, the route keeps only the other path and a
/// continuous ping loses no more than the detection window; the fault
/// removed, BFD and BGP come back and the route has both paths again.
fn fault_scenario(t: &TwoPaths, bfd_state_on_rr: &dyn Fn() -> String) {
    let a1 = Agent::start(&t.hv1, &config(1, ""));
    let a2 = Agent::start(&t.hv2, &config(2, ""));
    let (vm1, _vm3) = two_vms(t, &a1, &a2);
    wait_for(
        "BGP established and BFD up on both paths of both hypervisors",
        Duration::from_secs(40),
        || all_up(&a1) && all_up(&a2),
    );
    let route = |hv: &Netns, dst: &str| hv.ip(&["route", "show", "table", "90", dst]);
    wait_for("ECMP over both paths", Duration::from_secs(30), || {
        let r = route(&t.hv1, "203.0.113.3");
        r.contains("dev a-public") && r.contains("dev b-public")
    });
    // The reflector's own view.
    let rr_view = bfd_state_on_rr();
    assert!(rr_view.contains("198.51.100.101"), "{rr_view}");
    // Sessions stay up: no failure over several detection times.
    std::thread::sleep(Duration::from_secs(3));
    for a in [&a1, &a2] {
        for p in peers(a).as_array().unwrap() {
            assert_eq!(p["bfd"]["state"], "up", "{p}");
            assert_eq!(p["bfd"]["failures"], 0, "{p}");
            assert_eq!(p["bfd"]["tx_interval_ms"], BFD_MS as f64, "{p}");
            assert_eq!(
                p["bfd"]["detection_time_ms"],
                (BFD_MS * BFD_MULT) as f64,
                "{p}"
            );
        }
    }

    // A continuous ping; find the path its requests take from hv1.
    let log = a1.dir.join("ping.log");
    let mut ping = vm1.spawn(&["ping", "-i", "0.02", "-W", "1", "203.0.113.3"], &log);
    let before = [
        port_counters(&t.sw, "p-hv1a"),
        port_counters(&t.sw, "p-hv1b"),
    ];
    std::thread::sleep(Duration::from_secs(1));
    let after = [
        port_counters(&t.sw, "p-hv1a"),
        port_counters(&t.sw, "p-hv1b"),
    ];
    // Frames hv1 sends arrive as rx on its switch port.
    let sent = [after[0].0 - before[0].0, after[1].0 - before[1].0];
    let (path, port, other) = if sent[0] >= sent[1] {
        ("a", "p-hv1a", "b-public")
    } else {
        ("b", "p-hv1b", "a-public")
    };
    assert!(
        sent[0].max(sent[1]) >= 40,
        "the flow crossed the path to fail before the fault: {sent:?}"
    );

    let failed_at = Instant::now();
    fault(&t.sw, port);
    wait_for(
        "BFD down on the failed path",
        Duration::from_secs(10),
        || session(&a1, path)["bfd"]["state"] == "down",
    );
    let detected = failed_at.elapsed();
    let s = session(&a1, path);
    assert_eq!(s["bfd"]["diag"], "control-detection-time-expired", "{s}");
    assert_eq!(s["bfd"]["failures"], 1, "{s}");
    wait_for(
        "hv1 routes over the other path only",
        Duration::from_secs(10),
        || {
            let r = route(&t.hv1, "203.0.113.3");
            r.contains(&format!("dev {other}")) && r.matches("dev ").count() == 1
        },
    );
    wait_for(
        "hv2 routes to hv1 over the other path only (the reflector's BFD)",
        Duration::from_secs(10),
        || {
            let r = route(&t.hv2, "203.0.113.1");
            r.contains(&format!("dev {other}")) && r.matches("dev ").count() == 1
        },
    );
    let s = session(&a1, path);
    assert!(
        s["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("cease / bfd down"),
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(ping.id() as i32, libc::SIGINT) };
    let _ = ping.wait();
    let (tx, rx) = ping_loss(&log);
    let lost = tx - rx;
    eprintln!(
        "path {path} failed: detected in {detected:?}, ping lost {lost} of {tx} (every 20 ms)"
    );
    // The detection window is 600 ms (30 pings); hv2's reflector detects
    // in parallel. Without BFD the 9 s hold time would lose ~450.
    assert!(
        lost <= 75,
        "lost {lost} of {tx} pings, more than the detection window allows"
    );

    // The fault removed: BFD, BGP and both paths return.
    let cleared = Instant::now();
    clear_fault(&t.sw);
    wait_for("BFD and BGP back", Duration::from_secs(30), || all_up(&a1));
    wait_for("ECMP again", Duration::from_secs(30), || {
        let r1 = route(&t.hv1, "203.0.113.3");
        let r2 = route(&t.hv2, "203.0.113.1");
        r1.matches("dev ").count() == 2 && r2.matches("dev ").count() == 2
    });
    eprintln!(
        "recovered {:?} after the fault was removed",
        cleared.elapsed()
    );
    assert!(vm1.ping("203.0.113.3"));
}

#[test]
fn bird_bfd_fault_is_detected_and_the_other_path_carries_on() {
    let t = two_paths();
    let (r1, _r2) = bird_pair(&t, "", "");
    fault_scenario(&t, &|| birdc(&t.rr1, &r1, "show bfd sessions"));
}

#[test]
fn frr_bfdd_fault_is_detected_and_the_other_path_carries_on() {
    let t = two_paths();
    let (r1, _r2) = frr_pair(&t);
    fault_scenario(&t, &|| vtysh(&t.rr1, &r1, "show bfd peers brief"));
}

/// Keyed SHA1 with BIRD: the right key comes up; a wrong key never does,
/// and a BFD session that never came up never takes BGP down.
#[test]
fn sha1_authentication_with_bird_and_a_wrong_key_never_tears_bgp_down() {
    let t = two_paths();
    let auth = r#"authentication meticulous keyed sha1; password "s3cret" { id 5; };"#;
    let (_r1, _r2) = bird_pair(&t, auth, "");
    let good = Agent::start(
        &t.hv1,
        &config(
            1,
            "[bfd.auth]\ntype = \"meticulous-keyed-sha1\"\nkey_id = 5\nkey = \"s3cret\"",
        ),
    );
    let bad = Agent::start(
        &t.hv2,
        &config(
            2,
            "[bfd.auth]\ntype = \"meticulous-keyed-sha1\"\nkey_id = 5\nkey = \"wrong\"",
        ),
    );
    wait_for("authenticated BFD up", Duration::from_secs(40), || {
        all_up(&good)
    });
    wait_for("BGP up without BFD", Duration::from_secs(40), || {
        peers(&bad)
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "Established")
    });
    std::thread::sleep(Duration::from_secs(3));
    for p in peers(&bad).as_array().unwrap() {
        assert_ne!(p["bfd"]["state"], "up", "{p}");
        assert_eq!(p["state"], "Established", "{p}");
        assert_eq!(p["counters"]["established_transitions"], 1, "{p}");
    }
    for p in peers(&good).as_array().unwrap() {
        assert_eq!(p["bfd"]["auth"], "meticulous-keyed-sha1", "{p}");
        assert_eq!(p["bfd"]["failures"], 0, "{p}");
    }
}

/// A killed agent restarted within the peer's detection time resumes its
/// BFD sessions with the same discriminators: FRR's bfdd, whose sessions
/// live on while bgpd reconnects, never sees the session go down
/// (docs/bfd-and-graceful-restart.md).
#[test]
fn a_fast_agent_restart_resumes_bfd_without_frr_noticing() {
    let t = two_paths();
    let (r1, _r2) = frr_pair(&t);
    // A generous detection time (1 s x 5 on our side, as the reflector
    // sees it) so that the restart of a debug build fits in it.
    let slow = "[bfd]\nmin_tx = \"1s\"\nmin_rx = \"1s\"\nmultiplier = 5\n";
    let cfg = config(1, "").replace(
        &format!(
            "[bfd]\nmin_tx = \"{BFD_MS}ms\"\nmin_rx = \"{BFD_MS}ms\"\nmultiplier = {BFD_MULT}\n"
        ),
        slow,
    );
    assert!(cfg.contains("multiplier = 5"));
    let mut a1 = Agent::start(&t.hv1, &cfg);
    wait_for("BFD up", Duration::from_secs(40), || all_up(&a1));
    let disc = session(&a1, "a")["bfd"]["local_discriminator"].clone();
    let rr = || -> serde_json::Value {
        serde_json::from_str(&vtysh(&t.rr1, &r1, "show bfd peer 198.51.100.101 json"))
            .unwrap_or_default()
    };
    let before = rr();
    assert_eq!(before["status"], "up", "{before}");
    assert_eq!(before["remote-id"], disc, "{before}");
    a1.kill9();
    a1.restart();
    let s = session(&a1, "a");
    assert_eq!(s["bfd"]["local_discriminator"], disc, "{s}");
    wait_for("resumed session confirmed", Duration::from_secs(10), || {
        session(&a1, "a")["bfd"]["resumed"] == false
    });
    let s = session(&a1, "a");
    assert_eq!(s["bfd"]["state"], "up", "{s}");
    assert_eq!(s["bfd"]["failures"], 0, "{s}");
    assert_eq!(s["bfd"]["up_transitions"], 0, "never went down: {s}");
    wait_for("BGP back", Duration::from_secs(30), || all_up(&a1));
    let after = rr();
    assert_eq!(after["status"], "up", "{after}");
    assert_eq!(after["id"], before["id"], "{after}");
    assert!(
        after["uptime"].as_u64() >= before["uptime"].as_u64(),
        "bfdd's session restarted: {before} / {after}"
    );
}

/// With BIRD reflectors as graceful-restart helpers (`graceful restart on;
/// bfd graceful;`), a killed agent loses neither its remote paths nor a
/// ping: BIRD treats the BFD Down of a C=0 speaker as a restart, keeps the
/// paths stale, and the restarted agent refreshes them.
#[test]
fn bird_keeps_paths_across_an_agent_kill_with_graceful_restart() {
    let t = two_paths();
    let gr = "graceful restart on; bfd graceful;";
    let (_r1, _r2) = bird_pair(&t, "", gr);
    let with_gr = |n| {
        config(n, "").replace(
            "connect_retry = \"200ms\"",
            "connect_retry = \"200ms\"\ngraceful_restart = \"120s\"",
        )
    };
    let mut a1 = Agent::start(&t.hv1, &with_gr(1));
    let a2 = Agent::start(&t.hv2, &with_gr(2));
    let (_vm1, vm3) = two_vms(&t, &a1, &a2);
    wait_for("sessions and BFD up", Duration::from_secs(40), || {
        all_up(&a1) && all_up(&a2)
    });
    let route = || t.hv2.ip(&["route", "show", "table", "90", "203.0.113.1"]);
    wait_for("ECMP to vm1 on hv2", Duration::from_secs(30), || {
        route().matches("dev ").count() == 2
    });
    assert_eq!(
        session(&a2, "a")["negotiated"]["graceful_restart"],
        120,
        "reflector helper"
    );
    let log = a2.dir.join("gr-ping.log");
    let mut ping = vm3.spawn(&["ping", "-i", "0.02", "-W", "1", "203.0.113.1"], &log);
    std::thread::sleep(Duration::from_millis(500));
    a1.kill9();
    // Well past BFD detection (600 ms): the paths stay.
    std::thread::sleep(Duration::from_secs(3));
    let r = route();
    assert_eq!(
        r.matches("dev ").count(),
        2,
        "paths kept while hv1 is away: {r}"
    );
    a1.restart();
    wait_for("hv1 back", Duration::from_secs(40), || all_up(&a1));
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(ping.id() as i32, libc::SIGINT) };
    let _ = ping.wait();
    let (tx, rx) = ping_loss(&log);
    eprintln!("graceful restart: ping lost {} of {tx}", tx - rx);
    assert!(tx > 150, "{tx}");
    assert!(tx - rx <= 1, "lost {} of {tx} across the restart", tx - rx);
    assert_eq!(route().matches("dev ").count(), 2);
}

/// Graceful restart helper (RFC 4724): a reflector that restarts (killed:
/// its TCP connections end without a NOTIFICATION) leaves its paths in the
/// kernel, stale, until it is back and has sent End-of-RIB; one that does
/// not come back loses them after its restart time. BFD is off on the
/// hypervisors here: a reflector's BFD dies with it, and a BFD failure is a
/// hard down by design.
#[test]
fn a_restarting_reflector_keeps_its_paths_stale_until_end_of_rib_or_its_restart_time() {
    let t = two_paths();
    let gr = "graceful restart on; graceful restart time 5;";
    let rr1 = |extra| {
        bird(
            &t.rr1,
            "198.51.100.126",
            ["198.51.100.101", "198.51.100.102"],
            "",
            extra,
        )
    };
    let r1 = rr1(gr);
    let _r2 = bird(
        &t.rr2,
        "198.51.100.226",
        ["198.51.100.201", "198.51.100.202"],
        "",
        gr,
    );
    let no_bfd = |n| config(n, "").replace("[bfd]\nmin_tx", "[bfd]\nenabled = false\nmin_tx");
    let a1 = Agent::start(&t.hv1, &no_bfd(1));
    let a2 = Agent::start(&t.hv2, &no_bfd(2));
    let (vm1, _vm3) = two_vms(&t, &a1, &a2);
    let established = |a: &Agent| {
        peers(a)
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "Established")
    };
    wait_for("sessions up", Duration::from_secs(40), || {
        established(&a1) && established(&a2)
    });
    assert!(session(&a1, "a")["bfd"].is_null());
    let route = || t.hv1.ip(&["route", "show", "table", "90", "203.0.113.3"]);
    wait_for("ECMP", Duration::from_secs(30), || {
        route().matches("dev ").count() == 2
    });
    let n = session(&a1, "a")["negotiated"].clone();
    assert_eq!(n["graceful_restart"], 5, "{n}");
    assert_eq!(
        n["graceful_restart_families"],
        serde_json::json!(["ipv4"]),
        "{n}"
    );

    let log = a1.dir.join("rr-ping.log");
    let mut ping = vm1.spawn(&["ping", "-i", "0.02", "-W", "1", "203.0.113.3"], &log);
    // The reflector of path A dies and comes back.
    drop(r1);
    wait_for("session A down", Duration::from_secs(10), || {
        session(&a1, "a")["state"] != "Established"
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        route().matches("dev ").count(),
        2,
        "stale path kept: {}",
        route()
    );
    let r1 = rr1(gr);
    wait_for("session A back", Duration::from_secs(30), || {
        session(&a1, "a")["state"] == "Established"
            && session(&a1, "a")["end_of_rib_received"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });
    // A reflector restarted from scratch may send End-of-RIB before hv2
    // has re-announced to it (that sweeps path A for a moment: correct,
    // and path B carries on); then path A is back.
    wait_for("ECMP again", Duration::from_secs(30), || {
        route().matches("dev ").count() == 2
    });
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(ping.id() as i32, libc::SIGINT) };
    let _ = ping.wait();
    let (tx, rx) = ping_loss(&log);
    assert_eq!(tx, rx, "pings lost across the reflector's restart");

    // It dies for good: its paths go after its restart time (5 s).
    drop(r1);
    let gone = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(route().matches("dev ").count(), 2, "still within 5 s");
    wait_for("stale path A swept", Duration::from_secs(15), || {
        let r = route();
        r.matches("dev ").count() == 1 && r.contains("b-public")
    });
    let after = gone.elapsed();
    assert!(after >= Duration::from_secs(4), "{after:?}");
}

/// `systemctl reload` (SIGHUP) applies BGP and BFD changes live, touching
/// only what changed: a new fabric path's session starts, BFD timers change
/// by a poll sequence without a BGP flap, a hold time change restarts the
/// sessions (Cease / Other Configuration Change), a removed reflector's
/// session stops (Cease / Peer De-configured) and its paths go.
#[test]
fn reload_adds_retimes_restarts_and_removes_sessions_live() {
    let t = two_paths();
    let (_r1, r2) = bird_pair(&t, "", "");
    let full = config(1, "");
    let a_only = full.replace("reflectors = [\"198.51.100.226\"]", "reflectors = []");
    assert_ne!(full, a_only);
    let a1 = Agent::start(&t.hv1, &a_only);
    let a2 = Agent::start(&t.hv2, &config(2, ""));
    let _vms = two_vms(&t, &a1, &a2);
    wait_for("path A up", Duration::from_secs(40), || {
        let p = peers(&a1);
        p.as_array().unwrap().len() == 1 && p[0]["state"] == "Established"
    });
    let pid = a1.child.as_ref().unwrap().id();
    let reload = |text: &str| {
        fs::write(
            &a1.config,
            text.replace("@DIR@", &a1.dir.display().to_string()),
        )
        .unwrap();
        a1.signal(libc::SIGHUP);
    };
    let route = || t.hv1.ip(&["route", "show", "table", "90", "203.0.113.3"]);

    // 1. Path B's reflector added.
    reload(&full);
    wait_for("both paths up, ECMP", Duration::from_secs(40), || {
        all_up(&a1) && route().matches("dev ").count() == 2
    });
    let a = session(&a1, "a");
    assert_eq!(
        a["counters"]["established_transitions"], 1,
        "A untouched: {a}"
    );

    // 2. BFD timers: a poll sequence, no BGP flap.
    reload(&full.replace(&format!("min_tx = \"{BFD_MS}ms\""), "min_tx = \"300ms\""));
    wait_for("BFD retimed", Duration::from_secs(20), || {
        session(&a1, "a")["bfd"]["tx_interval_ms"] == 300.0
    });
    let a = session(&a1, "a");
    assert_eq!(a["counters"]["established_transitions"], 1, "{a}");
    assert_eq!(a["bfd"]["failures"], 0, "{a}");

    // 3. Hold time: the sessions restart with it.
    let held = full.replace("hold_time = \"9s\"", "hold_time = \"6s\"");
    reload(&held);
    wait_for(
        "sessions back with hold 6s",
        Duration::from_secs(40),
        || {
            all_up(&a1)
                && peers(&a1)
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| p["negotiated"]["hold_time"]["secs"] == 6)
        },
    );

    // 4. Path B's reflector removed: its session stops and its path goes.
    reload(&held.replace("reflectors = [\"198.51.100.226\"]", "reflectors = []"));
    wait_for("path B gone", Duration::from_secs(20), || {
        peers(&a1).as_array().unwrap().len() == 1 && route().matches("dev ").count() == 1
    });
    assert!(route().contains("a-public"), "{}", route());
    let rr2 = birdc(&t.rr2, &r2, "show protocols all hv1");
    assert!(
        rr2.contains("Peer de-configured") || rr2.contains("Received: Cease"),
        "{rr2}"
    );
    assert_eq!(a1.child.as_ref().unwrap().id(), pid, "never restarted");
    assert!(a1.log().contains("bgp session removed"));
}
