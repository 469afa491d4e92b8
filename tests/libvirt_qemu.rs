//! The gold standard: a real libvirtd (and virtlogd) in a network
//! namespace with a private mount namespace, l3hv's hook installed in its
//! own copy of /etc/libvirt, a real l3hvd (D-Bus API on a private
//! dbus-daemon, its own libvirt connection), and a QEMU TCG guest (Debian
//! kernel, busybox initramfs built here) started with `virsh start`.
//!
//! Needs the packages of .ci/run (libvirt-daemon-system, libvirt-clients,
//! qemu-system-x86, busybox-static, linux-image-amd64, dbus). Runs in about
//! a minute. Nothing of the machine's own /etc/libvirt, /run, /var/lib or
//! /var/log is touched: libvirtd sees tmpfs and copies there.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const MODULES: [&str; 8] = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

/// The newest Debian kernel in /boot and its release.
fn guest_kernel() -> (PathBuf, String) {
    let mut kernels: Vec<String> = fs::read_dir("/boot")
        .expect("/boot")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("vmlinuz-") && n.ends_with("-amd64"))
        .collect();
    kernels.sort();
    let k = kernels
        .pop()
        .expect("a Debian kernel in /boot (apt-get install linux-image-amd64)");
    let release = k.trim_start_matches("vmlinuz-").to_string();
    (Path::new("/boot").join(&k), release)
}

/// A busybox initramfs: loads virtio-net, configures eth0 statically
/// (203.0.113.1/24, default via .254), and powers off after a few seconds
/// when the command line says `l3hv_poweroff`.
fn build_initramfs(dir: &Path, release: &str) -> PathBuf {
    let root = dir.join("initramfs");
    fs::create_dir_all(root.join("bin")).expect("initramfs dir");
    fs::create_dir_all(root.join("lib")).expect("initramfs dir");
    for d in ["proc", "sys", "dev"] {
        fs::create_dir_all(root.join(d)).expect("initramfs dir");
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let mut insmods = String::new();
    for m in MODULES {
        let src = Path::new("/lib/modules").join(release).join(m);
        let name = src.file_name().expect("module name").to_owned();
        fs::copy(&src, root.join("lib").join(&name))
            .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        insmods.push_str(&format!("insmod /lib/{}\n", name.to_string_lossy()));
    }
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}
ip link set lo up
ip link set eth0 up
ip addr add 203.0.113.1/24 dev eth0
ip route add default via 203.0.113.254
echo L3HV-GUEST-UP
if grep -q l3hv_poweroff /proc/cmdline; then
    sleep 4
    echo L3HV-GUEST-POWEROFF
    poweroff -f
fi
while true; do sleep 60; done
"#
    );
    let init_path = root.join("init");
    fs::write(&init_path, init).expect("init");
    run("chmod", &["755", init_path.to_str().expect("utf-8")]);
    let img = dir.join("initrd.img");
    run(
        "sh",
        &[
            "-ec",
            &format!(
                "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
                root.display(),
                img.display()
            ),
        ],
    );
    img
}

fn domain_xml(dir: &Path, kernel: &Path, initrd: &Path, poweroff: bool) -> String {
    let extra = if poweroff { " l3hv_poweroff" } else { "" };
    format!(
        r#"<domain type='qemu'>
  <name>vm1</name>
  <uuid>6c3f1b2e-7d1a-4c55-9a0e-13a1b1e0c001</uuid>
  <metadata>
    <l3hv:vm xmlns:l3hv="https://l3hv.net/xmlns/domain/1">
      <l3hv:interface mac="52:54:00:71:00:01" fabric="public">
        <l3hv:ip address="203.0.113.1"/>
        <l3hv:route prefix="203.0.113.10/32" via="203.0.113.1"/>
      </l3hv:interface>
      <l3hv:interface mac="52:54:00:71:00:02" fabric="public">
        <l3hv:ip address="203.0.113.2"/>
      </l3hv:interface>
    </l3hv:vm>
  </metadata>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet{extra}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <interface type='ethernet'>
      <mac address='52:54:00:71:00:01'/>
      <target dev='vm1-eth0' managed='no'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{dir}/console.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        dir = dir.display(),
    )
}

/// The NIC hot-plugged later: libvirt creates the tap (managed), l3hv
/// adopts it through the DEVICE_ADDED event (no hook runs for hotplug).
const HOTPLUG_NIC: &str = "<interface type='ethernet'><mac address='52:54:00:71:00:02'/><target dev='vm1-hp'/><model type='virtio'/></interface>";

/// libvirtd + virtlogd in `ns`, in a private mount namespace.
struct Libvirt {
    ns: String,
    dir: PathBuf,
}

impl Libvirt {
    fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}/sock/libvirt-sock",
            self.dir.display()
        )
    }

    /// Copies /etc/libvirt, configures it (root QEMU, sockets in `dir`,
    /// no auth on the socket) and installs the hook.
    fn prepare(ns: &Netns, dir: &Path, agent_config: &Path, bus: &str) -> Self {
        let etc = dir.join("etc-libvirt");
        run("cp", &["-a", "/etc/libvirt", etc.to_str().expect("utf-8")]);
        let append = |file: &str, text: &str| {
            let p = etc.join(file);
            let mut s = fs::read_to_string(&p).unwrap_or_default();
            s.push_str(text);
            fs::write(&p, s).expect("libvirt config");
        };
        append(
            "qemu.conf",
            "\nuser = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n",
        );
        append(
            "libvirtd.conf",
            &format!(
                "\nunix_sock_dir = \"{}/sock\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                dir.display()
            ),
        );
        fs::create_dir_all(dir.join("sock")).expect("sock dir");
        let hooks = etc.join("hooks/qemu.d");
        fs::create_dir_all(&hooks).expect("hooks dir");
        // The wrapper script of hooks/qemu.d/50-l3hv (the package links the
        // binary instead, which needs the configuration at its default
        // path), with the test's binary and configuration; plus a log of
        // every call for the assertions.
        let hook = hooks.join("50-l3hv");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$@\" >> {log}\nexec {bin} --config {cfg} hook \"$@\"\n",
                log = dir.join("hook-calls.log").display(),
                bin = env!("CARGO_BIN_EXE_l3hv"),
                cfg = agent_config.display()
            ),
        )
        .expect("hook");
        run("chmod", &["755", hook.to_str().expect("utf-8")]);
        let l = Libvirt {
            ns: ns.name.clone(),
            dir: dir.to_path_buf(),
        };
        l.start(bus, true);
        l
    }

    /// Starts virtlogd (first time) and libvirtd in a private mount
    /// namespace of the network namespace; waits until virsh answers.
    fn start(&self, bus: &str, first: bool) {
        let d = self.dir.display();
        let script = format!(
            r#"set -e
mount -t tmpfs l3hv-run /run
mount --bind {d}/etc-libvirt /etc/libvirt
mount -t tmpfs l3hv-lib /var/lib/libvirt
mount -t tmpfs l3hv-cache /var/cache/libvirt
mount -t tmpfs l3hv-log /var/log/libvirt
export DBUS_SYSTEM_BUS_ADDRESS={bus}
virtlogd -d -p {d}/virtlogd.pid
libvirtd -d -p {d}/libvirtd.pid
"#
        );
        let out = if first {
            Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
                .arg(&script)
                .output()
                .expect("start libvirtd")
        } else {
            // Again, in the mount namespace virtlogd still holds.
            let pid = self.pid("virtlogd");
            Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-m", "-n"])
                .arg("sh")
                .arg("-c")
                .arg(format!(
                    "export DBUS_SYSTEM_BUS_ADDRESS={bus}; libvirtd -d -p {d}/libvirtd.pid"
                ))
                .output()
                .expect("restart libvirtd")
        };
        assert!(
            out.status.success(),
            "libvirtd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let start = Instant::now();
        loop {
            if self.virsh(&["version"]).status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "libvirtd never answered: {}",
                String::from_utf8_lossy(&self.virsh(&["version"]).stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn pid(&self, daemon: &str) -> i32 {
        fs::read_to_string(self.dir.join(format!("{daemon}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("{daemon} pid file"))
    }

    /// SIGTERM to libvirtd (by PID); waits until it is gone.
    fn stop_libvirtd(&self) {
        let pid = self.pid("libvirtd");
        // SAFETY: kill(2) of the libvirtd this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_for("libvirtd exit", Duration::from_secs(20), || {
            // SAFETY: signal 0 only checks the PID exists.
            unsafe { libc::kill(pid, 0) != 0 }
        });
        let _ = fs::remove_file(self.dir.join("libvirtd.pid"));
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .args(["-q", "-c", &self.uri()])
            .args(args)
            .output()
            .expect("virsh")
    }

    #[track_caller]
    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {}: {}{}\nhook calls:\n{}\nconsole:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.dir.join("hook-calls.log")).unwrap_or_default(),
            fs::read_to_string(self.dir.join("console.log")).unwrap_or_default(),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn hook_calls(&self) -> String {
        fs::read_to_string(self.dir.join("hook-calls.log")).unwrap_or_default()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // QEMU first, then the daemons, all by PID (the namespace's drop
        // kills whatever is left in it).
        let _ = self.virsh(&["destroy", "vm1"]);
        for daemon in ["libvirtd", "virtlogd"] {
            if let Some(pid) = fs::read_to_string(self.dir.join(format!("{daemon}.pid")))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) of a daemon this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- hook calls ---\n{}\n--- console ---\n{}",
                self.hook_calls(),
                fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn routes(hv: &Netns) -> String {
    hv.ip(&["route", "show", "table", "90", "proto", "203"])
}

#[test]
fn qemu_guest_started_by_libvirtd_through_the_hook() {
    require_root();
    for bin in [
        "libvirtd",
        "virtlogd",
        "virsh",
        "qemu-system-x86_64",
        "dbus-daemon",
    ] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{bin} missing: install the packages listed in .ci/run"
        );
    }
    let t0 = Instant::now();
    let hv = Netns::new(&unique("lvq"));
    let dir = std::env::temp_dir().join(format!("{}-libvirt", hv.name));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("test dir");
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let uri = format!(
        "qemu+unix:///system?socket={}/sock/libvirt-sock",
        dir.display()
    );
    // The agent starts before libvirtd: its first reconcile needs only
    // the persisted intent; its libvirt connection retries.
    let config = format!(
        "{}\n[libvirt]\nenabled = true\nuri = \"{uri}\"\nreconnect_max = \"1s\"\n",
        config_with_dbus(&bus.address())
    );
    let mut agent = Agent::start(&hv, &config);
    let (kernel, release) = guest_kernel();
    let initrd = build_initramfs(&dir, &release);
    let lv = Libvirt::prepare(&hv, &dir, &agent.config, &bus.address());
    eprintln!("libvirtd ready after {:?}", t0.elapsed());
    wait_for(
        "agent's libvirt connection",
        Duration::from_secs(10),
        || agent.log().contains("libvirt reconcile done"),
    );

    // Start: the hook creates and routes the tap before QEMU opens it.
    let xml_path = dir.join("vm1.xml");
    fs::write(&xml_path, domain_xml(&dir, &kernel, &initrd, false)).expect("domain xml");
    lv.virsh_ok(&["define", xml_path.to_str().expect("utf-8")]);
    lv.virsh_ok(&["start", "vm1"]);
    let calls = lv.hook_calls();
    for op in [
        "vm1 prepare begin -",
        "vm1 start begin -",
        "vm1 started begin -",
    ] {
        assert!(calls.contains(op), "hook calls: {calls}");
    }
    let link = hv.ip(&["-d", "link", "show", "vm1-eth0"]);
    assert!(link.contains("LOWER_UP"), "QEMU attached: {link}");
    assert!(link.contains("alias l3hv:tap:vm1"), "{link}");
    let r = routes(&hv);
    assert!(r.contains("203.0.113.1 dev vm1-eth0"), "{r}");
    assert!(
        r.contains("203.0.113.10 via 203.0.113.1 dev vm1-eth0"),
        "{r}"
    );
    assert!(!r.contains("203.0.113.2"), "not plugged yet: {r}");
    let boot = Instant::now();
    wait_for("guest answers ping", Duration::from_secs(90), || {
        hv.try_exec(&["ping", "-c", "1", "-W", "1", "203.0.113.1"])
            .status
            .success()
    });
    eprintln!("guest answered ping {:?} after start", boot.elapsed());

    // NIC hotplug: no hook; the agent follows DEVICE_ADDED/REMOVED.
    let nic = dir.join("nic.xml");
    fs::write(&nic, HOTPLUG_NIC).expect("nic xml");
    lv.virsh_ok(&[
        "attach-device",
        "vm1",
        nic.to_str().expect("utf-8"),
        "--live",
    ]);
    wait_for("hot-plugged NIC routed", Duration::from_secs(20), || {
        routes(&hv).contains("203.0.113.2 dev vm1-hp")
    });
    let _ = lv.virsh(&[
        "detach-device",
        "vm1",
        nic.to_str().expect("utf-8"),
        "--live",
    ]);
    wait_for("unplugged NIC unrouted", Duration::from_secs(30), || {
        !routes(&hv).contains("203.0.113.2")
    });
    assert!(routes(&hv).contains("203.0.113.1 dev vm1-eth0"));

    // The agent restarts while the VM runs: nothing moves.
    agent.kill9();
    assert!(routes(&hv).contains("203.0.113.1 dev vm1-eth0"));
    agent.restart();
    assert!(routes(&hv).contains("203.0.113.1 dev vm1-eth0"));
    assert!(
        hv.try_exec(&["ping", "-c", "1", "-W", "2", "203.0.113.1"])
            .status
            .success()
    );

    // libvirtd restarts while the VM runs: the `reconnect` hook, the
    // agent's connection comes back, the VM stays routed.
    let reconciles = agent.log().matches("libvirt reconcile done").count();
    lv.stop_libvirtd();
    lv.start(&bus.address(), false);
    // libvirtd reconnects to running QEMUs in the background.
    wait_for("reconnect hook", Duration::from_secs(20), || {
        lv.hook_calls().contains("vm1 reconnect begin -")
    });
    assert_eq!(lv.virsh_ok(&["domstate", "vm1"]), "running");
    assert!(routes(&hv).contains("203.0.113.1 dev vm1-eth0"));
    wait_for(
        "agent reconnects to libvirt",
        Duration::from_secs(20),
        || agent.log().matches("libvirt reconcile done").count() > reconciles,
    );

    // Destroy: stopped + release remove everything.
    lv.virsh_ok(&["destroy", "vm1"]);
    let calls = lv.hook_calls();
    assert!(calls.contains("vm1 stopped end -"), "{calls}");
    assert!(calls.contains("vm1 release end"), "{calls}");
    assert!(!routes(&hv).contains("vm1-eth0"), "{}", routes(&hv));
    wait_for("tap deleted", Duration::from_secs(5), || {
        !hv.try_exec(&["ip", "link", "show", "vm1-eth0"])
            .status
            .success()
    });

    // The guest powers itself off: routes go too.
    fs::write(&xml_path, domain_xml(&dir, &kernel, &initrd, true)).expect("domain xml");
    lv.virsh_ok(&["define", xml_path.to_str().expect("utf-8")]);
    lv.virsh_ok(&["start", "vm1"]);
    assert!(routes(&hv).contains("203.0.113.1 dev vm1-eth0"));
    wait_for("guest powers off", Duration::from_secs(90), || {
        lv.virsh(&["domstate", "vm1"])
            .stdout
            .starts_with(b"shut off")
    });
    wait_for(
        "routes removed after poweroff",
        Duration::from_secs(10),
        || !routes(&hv).contains("vm1-eth0"),
    );
    wait_for("tap deleted", Duration::from_secs(5), || {
        !hv.try_exec(&["ip", "link", "show", "vm1-eth0"])
            .status
            .success()
    });
    eprintln!("whole test {:?}", t0.elapsed());
}
