//! Shared harness for integration tests: network namespaces that clean up
//! on drop (also when a test panics), processes started inside them and
//! killed by PID, and an l3hvd runner.
//!
//! SAFETY RULE: everything here runs inside namespaces the test created;
//! nothing touches the root namespace's links, routes, rules or sysctls.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "integration tests need root (they create network namespaces); run them as root or in CI"
    );
}

/// A namespace name unique on this machine: the full PID and a counter,
/// separated, so that two test processes (other checkouts too) never pick
/// the same name (`Netns::new` deletes a namespace of the same name).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("l3t{}x{n}-{tag}", std::process::id())
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", name]);
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command in the namespace; panics on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command in the namespace and returns its output, whatever the
    /// exit status.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    pub fn sh(&self, script: &str) -> String {
        self.exec(&["sh", "-ec", script])
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    pub fn sysctl(&self, key: &str) -> String {
        fs_in_ns(self, &format!("/proc/sys/{}", key.replace('.', "/")))
    }

    pub fn spawn(&self, args: &[&str], log: &Path) -> Child {
        let out = fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn in netns")
    }

    /// `ping` from this namespace; true when every reply came back.
    pub fn ping(&self, dst: &str) -> bool {
        let out = self.try_exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", dst]);
        out.status.success()
    }

    /// Everything `ip` and sysctl can say about this namespace's network
    /// state, for before/after comparison.
    pub fn snapshot(&self) -> String {
        // Addresses still in DAD change by themselves (and take their local
        // routes with them): wait until the kernel is done.
        let start = Instant::now();
        while !self
            .ip(&["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = String::new();
        for args in [
            &["-d", "link", "show"][..],
            &["addr", "show"],
            &["route", "show", "table", "all"],
            &["-6", "route", "show", "table", "all"],
            &["rule", "show"],
            &["-6", "rule", "show"],
            &["neigh", "show", "nud", "permanent"],
            &["neigh", "show", "proxy"],
            &["-6", "neigh", "show", "proxy"],
        ] {
            s.push_str(&format!("## ip {}\n", args.join(" ")));
            // Carrier and operstate follow QEMU (and the kernel's linkwatch
            // delay), not l3hv.
            for line in self.ip(args).lines() {
                let line = line.replace("NO-CARRIER,", "");
                let line = ["UNKNOWN", "DOWN", "UP", "LOWERLAYERDOWN"]
                    .iter()
                    .fold(line, |l, st| l.replace(&format!(" state {st} "), " "));
                s.push_str(&line);
                s.push('\n');
            }
        }
        s.push_str("## sysctl net\n");
        let out = self.try_exec(&["sysctl", "-a"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // Counters and per-boot values move on their own.
            if line.starts_with("net.")
                && !line.contains("stable_secret")
                && !line.contains("conntrack_count")
                && !line.contains("nf_conntrack_buckets")
                && !line.contains(".base_reachable_time")
                && !line.contains("flowlabel")
                && !line.starts_with("net.core.")
            {
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside (only our namespace's PIDs).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill(2) of a PID that lives in our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn fs_in_ns(ns: &Netns, path: &str) -> String {
    ns.exec(&["cat", path]).trim().to_string()
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair between two namespaces, both ends up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    run(
        "ip",
        &[
            "-n", &a.name, "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns",
            &b.name,
        ],
    );
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An l3hvd in a namespace, with its own state directory and socket.
pub struct Agent {
    pub ns_name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    starts: u32,
    /// Extra environment for l3hvd (NOTIFY_SOCKET, WATCHDOG_USEC...).
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Writes `config_toml` (with `@DIR@` replaced by a fresh directory) and
    /// starts the agent; waits until its control socket answers.
    pub fn start(ns: &Netns, config_toml: &str) -> Self {
        Self::start_with_env(ns, config_toml, &[])
    }

    /// [`Agent::start`] with extra environment variables for l3hvd.
    pub fn start_with_env(ns: &Netns, config_toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-agent", ns.name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("agent dir");
        let config = dir.join("l3hv.toml");
        fs::write(
            &config,
            config_toml.replace("@DIR@", &dir.display().to_string()),
        )
        .expect("config");
        let mut a = Self {
            ns_name: ns.name.clone(),
            dir,
            config,
            child: None,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        a.restart();
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("l3hvd.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state/intent.json")
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        for i in 1..=self.starts {
            s.push_str(
                &fs::read_to_string(self.dir.join(format!("l3hvd.{i}.log"))).unwrap_or_default(),
            );
        }
        s
    }

    /// (Re)starts l3hvd and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let _ = fs::remove_file(self.socket());
        let log = self.dir.join(format!("l3hvd.{}.log", self.starts));
        let out = fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns_name,
                env!("CARGO_BIN_EXE_l3hvd"),
                "--config",
            ])
            .arg(&self.config)
            .env("RUST_LOG", "l3hv=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn l3hvd");
        self.child = Some(child);
        let sock = self.socket();
        let start = Instant::now();
        while !sock.exists() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("l3hvd exited with {status}:\n{}", self.log());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "l3hvd not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs the program: the child PID is l3hvd's.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal to the running l3hvd.
    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("agent running");
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    /// True while l3hvd has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait l3hvd")
    }

    /// Runs the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_l3hv"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("spawn l3hv")
    }

    /// Sets a VM from its JSON intent; panics if the agent refuses.
    pub fn set_vm(&self, json: &str) {
        let path = self.dir.join("vm.json");
        fs::write(&path, json).expect("vm json");
        let out = self.cli(&["vm", "set", path.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "vm set failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    pub fn remove_vm(&self, name: &str) {
        let out = self.cli(&["vm", "remove", name]);
        assert!(
            out.status.success(),
            "vm remove: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- l3hvd log ({}) ---\n{}", self.dir.display(), self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A VM namespace on the end of a veth whose hypervisor end the agent
/// adopts: `vm_ifname` in `hv`, `eth0` in the VM.
pub fn vm_ns(hv: &Netns, name: &str, hv_if: &str, v4_cidr: &str, gw: &str) -> Netns {
    let vm = Netns::new(name);
    veth(hv, hv_if, &vm, "eth0");
    vm.ip(&["addr", "add", v4_cidr, "dev", "eth0"]);
    vm.ip(&["route", "add", "default", "via", gw]);
    vm
}

/// The hypervisor configuration used by the tests (`@DIR@` is the agent's
/// directory).
pub const HV_CONFIG: &str = r#"
[hypervisor]
name = "hv-test"
router_id = "198.51.100.101"
state_dir = "@DIR@/state"

[control]
socket = "@DIR@/l3hvd.sock"

[kernel]
reconcile_interval = "1h"

[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24", "2001:db8:cb00:7100::/64"]
gateway_v4 = "203.0.113.254"
ipv6_mode = "prefix-per-vm"

[fabrics.public.paths.a]
interface = "up-a"
addresses = ["198.51.100.101/25", "2001:db8:c633:6400::101/120"]

[fabrics.private]
table = 20
subnets = ["172.22.2.0/24"]
gateway_v4 = "172.22.2.254"

[fabrics.private.paths.a]
interface = "up-p"
addresses = ["172.22.15.101/25"]
"#;

pub fn vm_json(
    name: &str,
    ifname: &str,
    link: &str,
    fabric: &str,
    v4: &str,
    v6: Option<&str>,
) -> String {
    let v6 = v6.map(|a| format!("\"{a}\"")).unwrap_or_default();
    format!(
        r#"{{"name":"{name}","interfaces":[{{"name":"{ifname}","mac":"52:54:00:00:00:{:02x}","fabric":"{fabric}","link":"{link}","ipv4":["{v4}"],"ipv6":[{v6}]}}]}}"#,
        name.bytes().map(u32::from).sum::<u32>() % 250 + 1
    )
}

/// A VM namespace on the end of a veth (`hv_if` in `hv`, `eth0` with `mac`
/// in the VM) and no address at all: it configures itself by DHCP and RA.
pub fn vm_ns_bare(hv: &Netns, name: &str, hv_if: &str, mac: &str) -> Netns {
    let vm = Netns::new(name);
    run(
        "ip",
        &[
            "-n", &hv.name, "link", "add", hv_if, "type", "veth", "peer", "name", "eth0",
            "address", mac, "netns", &vm.name,
        ],
    );
    hv.ip(&["link", "set", hv_if, "up"]);
    vm.ip(&["link", "set", "eth0", "up"]);
    vm
}

/// A private dbus-daemon (type system) listening on a socket in its own
/// directory, started in `ns` and killed by PID on drop. `policy` is the
/// `<policy>`/`<include>` part of its configuration.
pub struct DbusDaemon {
    pub dir: PathBuf,
    pub child: Child,
}

/// A bus that lets anyone own any name and call anything.
pub const OPEN_POLICY: &str = r#"<policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>"#;

impl DbusDaemon {
    pub fn start(ns: &Netns, policy: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-bus", ns.name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("bus dir");
        let config = dir.join("bus.conf");
        fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  {policy}
</busconfig>
"#,
                dir.display()
            ),
        )
        .expect("bus config");
        let log = dir.join("dbus.log");
        let child = ns.spawn(
            &[
                "dbus-daemon",
                "--nofork",
                "--nopidfile",
                &format!("--config-file={}", config.display()),
            ],
            &log,
        );
        let d = Self { dir, child };
        let sock = d.dir.join("bus");
        wait_for("dbus-daemon socket", Duration::from_secs(10), || {
            sock.exists()
        });
        d
    }

    pub fn address(&self) -> String {
        format!("unix:path={}/bus", self.dir.display())
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// HV_CONFIG with the D-Bus API on `bus`.
pub fn config_with_dbus(bus: &str) -> String {
    format!("{HV_CONFIG}\n[dbus]\nenabled = true\nbus = \"{bus}\"\n")
}

/// Two fabric paths: bridges A and B in a switch namespace; rr1 on A
/// (198.51.100.126), rr2 on B (198.51.100.226); hv1 and hv2 with one
/// uplink on each (`a-public`, `b-public`), switch ports `p-hv<N><a|b>`.
pub struct TwoPaths {
    pub sw: Netns,
    pub rr1: Netns,
    pub rr2: Netns,
    pub hv1: Netns,
    pub hv2: Netns,
}

pub fn two_paths() -> TwoPaths {
    require_root();
    let sw = Netns::new(&unique("sw2"));
    for br in ["brA", "brB"] {
        sw.ip(&["link", "add", br, "type", "bridge"]);
        sw.ip(&["link", "set", br, "up"]);
    }
    let rr1 = Netns::new(&unique("rr1"));
    let rr2 = Netns::new(&unique("rr2"));
    let hv1 = Netns::new(&unique("hv1"));
    let hv2 = Netns::new(&unique("hv2"));
    for (ns, ifname, port, br) in [
        (&rr1, "eth0", "p-rr1", "brA"),
        (&rr2, "eth0", "p-rr2", "brB"),
        (&hv1, "a-public", "p-hv1a", "brA"),
        (&hv1, "b-public", "p-hv1b", "brB"),
        (&hv2, "a-public", "p-hv2a", "brA"),
        (&hv2, "b-public", "p-hv2b", "brB"),
    ] {
        veth(&sw, port, ns, ifname);
        sw.ip(&["link", "set", port, "master", br]);
    }
    rr1.ip(&["addr", "add", "198.51.100.126/25", "dev", "eth0"]);
    rr2.ip(&["addr", "add", "198.51.100.226/25", "dev", "eth0"]);
    TwoPaths {
        sw,
        rr1,
        rr2,
        hv1,
        hv2,
    }
}
