//! `l3hv hook` as libvirt runs it: the real binary, domain XML on stdin,
//! against a real l3hvd in a namespace (over D-Bus and over the control
//! socket). Checks exit codes, stdout/stderr and the kernel state.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn domain(name: &str, tap: &str, n: u8, v4: &str) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <uuid>00000000-0000-4000-8000-0000000000{n:02x}</uuid>
  <metadata>
    <l3hv:vm xmlns:l3hv="https://l3hv.net/xmlns/domain/1">
      <l3hv:interface mac="52:54:00:71:00:{n:02x}" fabric="public">
        <l3hv:ip address="{v4}"/>
        <l3hv:ip address="2001:db8:cb00:7100::{n:x}"/>
        <l3hv:route prefix="198.18.{n}.0/24" via="{v4}"/>
      </l3hv:interface>
    </l3hv:vm>
  </metadata>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='ethernet'>
      <mac address='52:54:00:71:00:{n:02x}'/>
      <target dev='{tap}' managed='no'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"#
    )
}

fn vm1() -> String {
    domain("vm1", "vm1-eth0", 1, "203.0.113.1")
}

/// Runs `l3hv --config CONFIG hook GUEST OP SUBOP -` with `xml` on stdin,
/// with libvirt's minimal environment.
fn hook(config: &Path, guest: &str, op: &str, xml: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l3hv"));
    cmd.arg("--config").arg(config).arg("hook");
    run_hook(cmd, guest, op, xml)
}

/// Runs `cmd` with libvirt's hook arguments for `op` and `xml` on stdin,
/// in libvirt's stripped environment.
fn run_hook(mut cmd: Command, guest: &str, op: &str, xml: &str) -> Output {
    let subop = match op {
        "stopped" | "release" => "end",
        _ => "begin",
    };
    let mut child = cmd
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args([guest, op, subop, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn l3hv hook");
    let mut stdin = child.stdin.take().expect("stdin");
    // The hook may exit without reading (no-op operations).
    let _ = stdin.write_all(xml.as_bytes());
    drop(stdin);
    child.wait_with_output().expect("wait l3hv hook")
}

#[track_caller]
fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "hook failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "hook wrote on stdout");
}

#[track_caller]
fn fails_with(out: &Output, want: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.contains(want), "want {want:?} in {err:?}");
    assert!(out.stdout.is_empty());
}

fn routed(hv: &Netns) -> bool {
    let r = hv.ip(&["route", "show", "table", "90", "proto", "203"]);
    r.contains("203.0.113.1 dev vm1-eth0")
        && r.contains("198.18.1.0/24 via 203.0.113.1 dev vm1-eth0")
}

fn tap_exists(hv: &Netns, name: &str) -> bool {
    hv.try_exec(&["ip", "link", "show", name]).status.success()
}

/// Every operation in the order libvirt runs them for start, migration
/// and destroy.
fn lifecycle(hv: &Netns, config: &Path) {
    let xml = vm1();
    ok(&hook(config, "vm1", "prepare", &xml));
    // The tap is there, configured, before QEMU would open it.
    let link = hv.ip(&["-d", "link", "show", "vm1-eth0"]);
    assert!(
        link.contains("tun type tap pi off vnet_hdr on persist on"),
        "{link}"
    );
    assert!(routed(hv));
    ok(&hook(config, "vm1", "start", &xml));
    ok(&hook(config, "vm1", "started", &xml));
    ok(&hook(config, "vm1", "reconnect", &xml));
    ok(&hook(config, "vm1", "attach", &xml));
    ok(&hook(config, "vm1", "migrate", &xml));
    ok(&hook(config, "vm1", "restore", &xml));
    assert!(routed(hv));
    ok(&hook(config, "vm1", "stopped", &xml));
    // Routes are gone when the hook returns; the tap goes right after
    // (its deletion waits for RCU and is kept off the hook's path).
    assert!(!routed(hv));
    wait_for("tap deleted", Duration::from_secs(5), || {
        !tap_exists(hv, "vm1-eth0")
    });
    ok(&hook(config, "vm1", "release", &xml));
    // Idempotent.
    ok(&hook(config, "vm1", "release", &xml));
    ok(&hook(config, "vm1", "stopped", &xml));
}

#[test]
fn lifecycle_over_the_control_socket() {
    require_root();
    let hv = Netns::new(&unique("hooks"));
    let agent = Agent::start(&hv, HV_CONFIG);
    lifecycle(&hv, &agent.config);
}

/// Installed as libvirt runs it: a link named `50-l3hv` to the binary, no
/// `hook` word and no options, the configuration at the default path.
#[test]
fn called_by_a_hook_name_it_is_the_hook() {
    if std::path::Path::new(l3hv::config::DEFAULT_PATH).exists() {
        eprintln!("skipped: this machine has {}", l3hv::config::DEFAULT_PATH);
        return;
    }
    let dir = std::env::temp_dir().join(format!("l3hv-hookname-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let link = dir.join("50-l3hv");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_l3hv"), &link).expect("link");
    let run = |op: &str, xml: &str| run_hook(Command::new(&link), "vm1", op, xml);
    // A domain of l3hv's: prepare reads the default configuration (absent
    // here) and fails the start with that reason; release never fails.
    fails_with(&run("prepare", &vm1()), l3hv::config::DEFAULT_PATH);
    let out = run("release", &vm1());
    assert!(out.status.success(), "{out:?}");
    // Not l3hv's domain: nothing read, nothing called, exit 0.
    let out = run(
        "prepare",
        "<domain type='qemu'><name>other</name><devices/></domain>",
    );
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lifecycle_over_dbus() {
    require_root();
    let hv = Netns::new(&unique("hookd"));
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    // The agent takes its bus name just after its socket.
    wait_for("bus name", Duration::from_secs(10), || {
        hook(&agent.config, "vm1", "release", &vm1())
            .status
            .success()
            && agent.log().contains("d-bus API ready")
    });
    lifecycle(&hv, &agent.config);
    assert!(agent.log().contains("set vm"));
    // The agent's refusal comes back as its named error, with its reason.
    refused_address(&agent.config);
}

/// An address outside the fabric: the agent refuses it at prepare and
/// started (one line with its reason), release succeeds.
fn refused_address(config: &Path) {
    let bad = domain("vm9", "vm9-eth0", 9, "192.0.2.9");
    for op in ["prepare", "started"] {
        let out = hook(config, "vm9", op, &bad);
        fails_with(&out, "agent refused to route the VM: invalid: ");
        fails_with(&out, "outside the subnets");
    }
    assert!(hook(config, "vm9", "release", &bad).status.success());
}

#[test]
fn agent_down_fails_prepare_only() {
    require_root();
    let hv = Netns::new(&unique("hookx"));
    let mut agent = Agent::start(&hv, HV_CONFIG);
    agent.kill9();
    let xml = vm1();
    fails_with(
        &hook(&agent.config, "vm1", "prepare", &xml),
        "agent unreachable",
    );
    fails_with(
        &hook(&agent.config, "vm1", "start", &xml),
        "agent unreachable",
    );
    for op in [
        "started",
        "reconnect",
        "attach",
        "stopped",
        "release",
        "migrate",
    ] {
        let out = hook(&agent.config, "vm1", op, &xml);
        assert!(out.status.success(), "{op}: {out:?}");
        assert!(out.stdout.is_empty());
    }
    // Same over D-Bus with no agent on the bus.
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let cfg = agent.dir.join("dbus.toml");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&agent.config).expect("config")
            + &format!("\n[dbus]\nenabled = true\nbus = \"{}\"\n", bus.address()),
    )
    .expect("write config");
    fails_with(&hook(&cfg, "vm1", "prepare", &xml), "agent unreachable");
    assert!(hook(&cfg, "vm1", "started", &xml).status.success());
    assert!(hook(&cfg, "vm1", "release", &xml).status.success());
    // No configuration at all.
    let none = Path::new("/nonexistent/l3hv.toml");
    fails_with(&hook(none, "vm1", "prepare", &xml), "agent configuration");
    assert!(hook(none, "vm1", "release", &xml).status.success());
}

#[test]
fn refusals_bad_xml_and_foreign_domains() {
    require_root();
    let hv = Netns::new(&unique("hookr"));
    let agent = Agent::start(&hv, HV_CONFIG);
    let before = hv.snapshot();
    refused_address(&agent.config);
    // Malformed XML and metadata.
    fails_with(
        &hook(&agent.config, "vm9", "prepare", "<domain"),
        "domain XML",
    );
    assert!(
        hook(&agent.config, "vm9", "release", "<domain")
            .status
            .success()
    );
    let broken = vm1().replace("203.0.113.1\"", "203.0.113.300\"");
    fails_with(
        &hook(&agent.config, "vm1", "prepare", &broken),
        "not an IP address",
    );
    // Unknown operation: ignored.
    ok(&hook(&agent.config, "vm1", "frobnicate", &vm1()));
    // A domain without l3hv metadata: ignored, nothing touched.
    let foreign = "<domain type='kvm'><name>other</name><devices><interface type='network'><source network='default'/></interface></devices></domain>";
    for op in ["prepare", "start", "started", "stopped", "release"] {
        ok(&hook(&agent.config, "other", op, foreign));
    }
    assert_eq!(hv.snapshot(), before);
    assert!(!agent.log().contains("set vm"), "{}", agent.log());
}

#[test]
fn fifty_concurrent_hooks() {
    require_root();
    let hv = Netns::new(&unique("hookc"));
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    wait_for("bus name", Duration::from_secs(10), || {
        agent.log().contains("d-bus API ready")
    });
    let socket_cfg = agent.dir.join("socket.toml");
    std::fs::write(
        &socket_cfg,
        HV_CONFIG.replace("@DIR@", &agent.dir.display().to_string()),
    )
    .expect("config");
    concurrent_hooks(&hv, &socket_cfg, &agent);
    concurrent_hooks(&hv, &agent.config, &agent);
}

/// 50 hooks at once prepare 50 VMs, then 50 release them (over the
/// transport `config` names).
fn concurrent_hooks(hv: &Netns, config: &Path, agent: &Agent) {
    let run_all = |op: &'static str| {
        let handles: Vec<_> = (1..=50u8)
            .map(|n| {
                let config = config.to_path_buf();
                std::thread::spawn(move || {
                    let xml = domain(
                        &format!("vm{n}"),
                        &format!("t{n}"),
                        n,
                        &format!("203.0.113.{n}"),
                    );
                    (n, hook(&config, &format!("vm{n}"), op, &xml))
                })
            })
            .collect();
        for h in handles {
            let (n, out) = h.join().expect("hook thread");
            assert!(
                out.status.success(),
                "vm{n} {op}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    run_all("prepare");
    let routes = hv.ip(&["route", "show", "table", "90", "proto", "203"]);
    let missing: Vec<u8> = (1..=50u8)
        .filter(|n| !routes.contains(&format!("203.0.113.{n} dev t{n} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "not routed: {missing:?}\n{routes}\n{}",
        agent.log()
    );
    run_all("release");
    let routes = hv.ip(&["route", "show", "table", "90", "proto", "203"]);
    assert!(!routes.contains("dev t"), "{routes}");
    wait_for("taps deleted", Duration::from_secs(10), || {
        let links = hv.ip(&["link", "show"]);
        (1..=50).all(|n| !links.contains(&format!(" t{n}:")))
    });
}

/// Hook latency, process start to exit (not a pass/fail test):
/// `cargo test --release --test hook -- --ignored --nocapture latency`.
#[test]
#[ignore]
fn latency() {
    require_root();
    let hv = Netns::new(&unique("hookl"));
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    wait_for("bus name", Duration::from_secs(10), || {
        agent.log().contains("d-bus API ready")
    });
    let runs: usize = std::env::var("L3HV_HOOK_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    // Pause after each release: the agent deletes the tap after answering
    // (RCU-bound, tens of ms here); a prepare right behind it would wait.
    let gap = Duration::from_millis(
        std::env::var("L3HV_HOOK_GAP_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(50),
    );
    let socket_cfg = agent.dir.join("socket.toml");
    std::fs::write(
        &socket_cfg,
        HV_CONFIG.replace("@DIR@", &agent.dir.display().to_string()),
    )
    .expect("config");
    for (label, cfg) in [("dbus", agent.config.clone()), ("socket", socket_cfg)] {
        let mut prepare = Vec::new();
        let mut release = Vec::new();
        for i in 0..runs + 10 {
            let n = (i % 200 + 1) as u8;
            let xml = domain(
                &format!("vm{n}"),
                &format!("t{n}"),
                n,
                &format!("203.0.113.{n}"),
            );
            let t = Instant::now();
            let out = hook(&cfg, "vm", "prepare", &xml);
            let p = t.elapsed();
            assert!(out.status.success(), "{out:?}");
            let t = Instant::now();
            let out = hook(&cfg, "vm", "release", &xml);
            let r = t.elapsed();
            assert!(out.status.success(), "{out:?}");
            std::thread::sleep(gap);
            if i >= 10 {
                prepare.push(p);
                release.push(r);
            }
        }
        for (what, mut v) in [("prepare", prepare), ("release", release)] {
            v.sort();
            let pct = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
            println!(
                "{label} {what} (gap {gap:?}): n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
                v.len(),
                pct(0.5).as_secs_f64() * 1e3,
                pct(0.9).as_secs_f64() * 1e3,
                pct(0.99).as_secs_f64() * 1e3,
                v[v.len() - 1].as_secs_f64() * 1e3
            );
        }
    }
    // L3HV_HOOK_LOG=1: the agent's pass lines (dump, sysctls, compute and
    // apply times of every prepare and release) for a breakdown.
    if std::env::var_os("L3HV_HOOK_LOG").is_some() {
        for line in agent.log().lines().filter(|l| l.contains("reconciled")) {
            println!("{line}");
        }
    }
}
