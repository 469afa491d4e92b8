//! l3hvd as a systemd service and a Prometheus target, in network
//! namespaces: READY=1 / WATCHDOG=1 / RELOADING=1 on a NOTIFY_SOCKET the
//! test listens on, SIGHUP reloads (a bad file refused, a good one
//! applied), and the metrics endpoint scraped and compared with
//! `l3hv status --json` (and checked by `promtool` when installed).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Messages received on the notify socket until `until` says stop or the
/// timeout passes.
fn receive(
    sock: &UnixDatagram,
    timeout: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stop = until(&m);
            out.push(m);
            if stop {
                break;
            }
        }
    }
    out
}

/// The hypervisor namespace with its public uplink to `ext`.
fn hv_with_uplink() -> (Netns, Netns) {
    require_root();
    let hv = Netns::new(&unique("svc"));
    let ext = Netns::new(&unique("sext"));
    veth(&hv, "up-a", &ext, "eth0");
    ext.ip(&["addr", "add", "198.51.100.126/25", "dev", "eth0"]);
    (hv, ext)
}

#[test]
fn notify_ready_watchdog_and_reload() {
    let (hv, _ext) = hv_with_uplink();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    let notify = path.display().to_string();
    let mut agent = Agent::start_with_env(
        &hv,
        HV_CONFIG,
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "200000")],
    );

    // READY=1, once the first reconcile is done.
    let first = receive(&sock, Duration::from_secs(10), |m| m.contains("READY=1"));
    let ready = first.iter().find(|m| m.contains("READY=1"));
    assert!(ready.is_some(), "no READY=1: {first:?}\n{}", agent.log());
    assert!(ready.is_some_and(|m| m.contains("STATUS=first reconcile done")));
    let log = agent.log();
    let done = log
        .find("initial reconcile done")
        .expect("initial reconcile logged");
    let ready_at = log.find(" ready ").expect("ready logged");
    assert!(done < ready_at, "{log}");
    assert!(!agent.status_json()["last_reconcile"].is_null());

    // WATCHDOG=1 every 100ms (half of WATCHDOG_USEC).
    let start = Instant::now();
    let pings = receive(&sock, Duration::from_secs(1), |_| false);
    let watchdogs = pings.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        (5..=15).contains(&watchdogs),
        "{watchdogs} watchdog pings in {:?}: {pings:?}",
        start.elapsed()
    );

    // A bad file: refused, the agent keeps running and answering.
    let good = std::fs::read_to_string(&agent.config).expect("config");
    let bad = good.replace("table = 90", "table = 254");
    std::fs::write(&agent.config, &bad).expect("write bad config");
    agent.signal(libc::SIGHUP);
    let msgs = receive(&sock, Duration::from_secs(5), |m| m.contains("READY=1"));
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC=")),
        "{msgs:?}"
    );
    let ready = msgs
        .iter()
        .find(|m| m.contains("READY=1"))
        .expect("READY=1 after reload");
    assert!(ready.contains("reload refused"), "{ready}");
    let log = agent.log();
    let file = agent.config.display().to_string();
    assert!(
        log.contains(&format!("{file}:")) && log.contains("field `fabrics.public.table`"),
        "the refusal names file, line and field:\n{log}"
    );
    assert!(agent.running());
    // (The CLI cannot read the bad file either: name the socket.)
    let socket = agent.socket().display().to_string();
    let out = agent.cli(&["--socket", &socket, "status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["hypervisor"], "hv-test");
    assert!(
        hv.ip(&["route", "show", "table", "90"])
            .contains("blackhole default")
    );

    // A good file: applied live (the bottom of table 90 changes), and a
    // change of the BGP port is reported as needing a restart.
    let changed = good.replace(
        "ipv6_mode = \"prefix-per-vm\"",
        "ipv6_mode = \"prefix-per-vm\"\ndefault_route = \"unreachable\"",
    ) + "\n[bgp]\nport = 1179\n";
    std::fs::write(&agent.config, &changed).expect("write good config");
    agent.signal(libc::SIGHUP);
    let msgs = receive(&sock, Duration::from_secs(5), |m| m.contains("READY=1"));
    let ready = msgs
        .iter()
        .find(|m| m.contains("READY=1"))
        .expect("READY=1 after reload");
    assert!(ready.contains("configuration reloaded"), "{ready}");
    let table = hv.ip(&["route", "show", "table", "90"]);
    assert!(table.contains("unreachable default"), "{table}");
    assert!(!table.contains("blackhole default"), "{table}");
    assert!(agent.log().contains("restart l3hvd to apply it"));
    assert!(agent.running());

    // The watchdog keeps ticking after the reloads.
    let pings = receive(&sock, Duration::from_millis(500), |_| false);
    assert!(pings.iter().any(|m| m == "WATCHDOG=1"), "{pings:?}");

    // SIGTERM: STOPPING=1 and a clean exit.
    let status = agent.sigterm();
    assert!(status.success(), "{status}");
    let msgs = receive(&sock, Duration::from_secs(2), |m| m == "STOPPING=1");
    assert!(msgs.iter().any(|m| m == "STOPPING=1"), "{msgs:?}");
}

/// The value of an unlabelled sample, or of the labelled one whose labels
/// contain `labels`.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let ok = if labels.is_empty() {
            key == name
        } else {
            key.starts_with(&format!("{name}{{")) && key.contains(labels)
        };
        ok.then(|| value.parse().ok()).flatten()
    })
}

#[test]
fn metrics_match_status() {
    let (hv, _ext) = hv_with_uplink();
    let config = HV_CONFIG.replace(
        "addresses = [\"198.51.100.101/25\", \"2001:db8:c633:6400::101/120\"]",
        "addresses = [\"198.51.100.101/25\", \"2001:db8:c633:6400::101/120\"]\nreflectors = [\"198.51.100.126\"]",
    ) + "\n[metrics]\nlisten = \"127.0.0.1:9475\"\n";
    let agent = Agent::start(&hv, &config);
    let _vm = vm_ns(&hv, &unique("vm"), "vm1", "203.0.113.1/24", "203.0.113.254");
    agent.set_vm(&vm_json(
        "vm1",
        "vm1",
        "adopt",
        "public",
        "203.0.113.1",
        Some("2001:db8:cb00:7100::1"),
    ));
    let scrape = || {
        let out = hv.try_exec(&["curl", "-sf", "http://127.0.0.1:9475/metrics"]);
        assert!(out.status.success(), "curl: {out:?}\n{}", agent.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = scrape();
    let status = agent.status_json();
    let f = |v: &serde_json::Value| v.as_f64().expect("number");
    assert_eq!(
        sample(&text, "l3hv_vms", ""),
        Some(f(&status["vms"])),
        "{text}"
    );
    assert_eq!(
        sample(&text, "l3hv_routes_installed", ""),
        Some(f(&status["routes_programmed"]))
    );
    assert!(f(&status["routes_programmed"]) > 0.0);
    assert_eq!(
        sample(&text, "l3hv_routes_failed", ""),
        Some(f(&status["routes_failed"]))
    );
    assert_eq!(
        sample(&text, "l3hv_routes_pending", ""),
        Some(f(&status["routes_pending"]))
    );
    assert_eq!(
        sample(&text, "l3hv_rib_paths", ""),
        Some(f(&status["rib_paths"]))
    );
    // Every pass is counted; at least the first and the one for vm1.
    let runs = sample(&text, "l3hv_reconcile_runs_total", "").expect("runs");
    assert!(runs >= 2.0, "{text}");
    assert_eq!(
        sample(&text, "l3hv_reconcile_duration_seconds_count", ""),
        Some(runs)
    );
    assert_eq!(
        sample(
            &text,
            "l3hv_reconcile_duration_seconds_bucket",
            "le=\"+Inf\""
        ),
        Some(runs)
    );
    // The one intent change (set vm1) was answered and timed.
    assert_eq!(
        sample(&text, "l3hv_intent_call_duration_seconds_count", ""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "l3hv_intent_call_duration_seconds_bucket",
            "le=\"+Inf\""
        ),
        Some(1.0)
    );
    let applied = sample(
        &text,
        "l3hv_reconcile_operations_total",
        "result=\"applied\"",
    );
    assert!(applied.is_some_and(|a| a > 0.0), "{text}");

    // The session to the (silent) reflector: down, with the state status shows.
    let peers = status["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 1);
    let name = peers[0]["peer"]["name"].as_str().expect("session name");
    let state = peers[0]["state"].as_str().expect("state");
    let l = format!("session=\"{name}\"");
    assert_eq!(
        sample(&text, "l3hv_bgp_session_up", &l),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "l3hv_bgp_prefixes_received", &l),
        Some(f(&peers[0]["prefixes_received"]))
    );
    assert_eq!(
        sample(&text, "l3hv_bgp_notifications_sent_total", &l),
        Some(f(&peers[0]["counters"]["notifications_out"]))
    );
    // The state may move between the two reads; it is one of the RFC's.
    let current: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("l3hv_bgp_session_state{") && l.ends_with(" 1"))
        .collect();
    assert_eq!(current.len(), 1, "{text}");
    assert!(["Idle", "Connect", "Active"].contains(&state), "{state}");

    // OpenMetrics for scrapers that ask for it (Prometheus does).
    let out = hv.try_exec(&[
        "curl",
        "-sf",
        "-H",
        "Accept: application/openmetrics-text;version=1.0.0",
        "http://127.0.0.1:9475/metrics",
    ]);
    let om = String::from_utf8_lossy(&out.stdout);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE l3hv_reconcile_runs counter"), "{om}");

    // Other paths and methods.
    let out = hv.try_exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9475/",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // promtool (Debian package `prometheus`), when installed.
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok()
    {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: metrics text not linted");
    }
}
