//! The D-Bus API against a real dbus-daemon the test starts (never the
//! machine's system bus): methods, signals, named errors, introspection
//! (checked against packaging/) and the shipped bus policy.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use l3hv::dbus::client::{self, Agent1Proxy};

const IFACES: &str = r#"[{"name":"tap1","mac":"52:54:00:00:00:01","fabric":"public","link":"tap","ipv4":["203.0.113.1"],"ipv6":["2001:db8:cb00:7100::1"]}]"#;

async fn ready(bus: &str, agent: &Agent) -> zbus::Connection {
    let conn = client::connect(bus, Duration::from_secs(5))
        .await
        .expect("connect to the test bus");
    let start = std::time::Instant::now();
    loop {
        let proxy = Agent1Proxy::new(&conn).await.expect("proxy");
        let r = proxy.list_vms().await;
        if r.is_ok() {
            return conn;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "agent never appeared on the bus: {r:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_name(e: &l3hv::dbus::DbusError) -> String {
    use zbus::DBusError as _;
    e.name().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_signals_and_named_errors() {
    require_root();
    let hv = Netns::new(&unique("dbus"));
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    let conn = ready(&bus.address(), &agent).await;
    let proxy = Agent1Proxy::new(&conn).await.expect("proxy");
    let mut changes = proxy.receive_vm_changed().await.expect("subscribe");

    proxy.set_vm("vm1", IFACES).await.expect("SetVm");
    let link = hv.ip(&["-d", "link", "show", "tap1"]);
    assert!(link.contains("tun type tap"), "{link}");
    let routes = hv.ip(&["route", "show", "table", "90", "proto", "203"]);
    assert!(routes.contains("203.0.113.1 dev tap1"), "{routes}");

    let sig = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("VmChanged in time")
        .expect("signal stream");
    let args = sig.args().expect("signal args");
    assert_eq!((args.name(), args.state()), (&"vm1", &"added"));

    let vms: serde_json::Value =
        serde_json::from_str(&proxy.list_vms().await.expect("ListVms")).expect("json");
    assert_eq!(vms[0]["name"], "vm1");
    assert_eq!(vms[0]["interfaces"][0]["ipv4"][0], "203.0.113.1");
    let status: serde_json::Value =
        serde_json::from_str(&proxy.get_status().await.expect("GetStatus")).expect("json");
    assert_eq!(status["interfaces"][0]["name"], "tap1");
    let report: serde_json::Value =
        serde_json::from_str(&proxy.reconcile().await.expect("Reconcile")).expect("json");
    assert_eq!(report["planned"], 0, "{report}");

    // Named errors with clear messages; nothing changes.
    let e = proxy.set_vm("vm2", "not json").await.unwrap_err();
    assert_eq!(error_name(&e), "net.l3hv.Error.Invalid");
    assert!(e.to_string().contains("interfaces:"), "{e}");
    let bad_fabric = IFACES
        .replace("public", "nope")
        .replace("tap1", "tap2")
        .replace(":01", ":02");
    let e = proxy.set_vm("vm2", &bad_fabric).await.unwrap_err();
    assert_eq!(error_name(&e), "net.l3hv.Error.Invalid");
    assert!(
        e.to_string().contains("fabric `nope` is not configured"),
        "{e}"
    );
    // Another VM may not take vm1's address.
    let clash = IFACES.replace("tap1", "tap2").replace(":01\"", ":02\"");
    let e = proxy.set_vm("vm2", &clash).await.unwrap_err();
    assert_eq!(error_name(&e), "net.l3hv.Error.Invalid");
    assert!(e.to_string().contains("already belongs to vm vm1"), "{e}");
    assert!(hv.try_exec(&["ip", "link", "show", "tap2"]).status.code() != Some(0));

    proxy.remove_vm("vm1").await.expect("RemoveVm");
    wait_for("tap1 deleted", Duration::from_secs(5), || {
        !hv.ip(&["link", "show"]).contains("tap1")
    });
    let routes = hv.ip(&["route", "show", "table", "90", "proto", "203"]);
    assert!(!routes.contains("203.0.113.1"), "{routes}");
    let sig = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("VmChanged in time")
        .expect("signal stream");
    let args = sig.args().expect("signal args");
    assert_eq!((args.name(), args.state()), (&"vm1", &"removed"));
    // Idempotent.
    proxy.remove_vm("vm1").await.expect("RemoveVm again");
}

/// The agent checks callers itself: on an open bus, a non-root caller may
/// read but not change intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_callers_may_only_read() {
    require_root();
    let hv = Netns::new(&unique("dbusu"));
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    let _conn = ready(&bus.address(), &agent).await;
    let call = |member: &str, arg: Option<&str>| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "dbus-send",
        ])
        .arg(format!("--bus={}", bus.address()))
        .args(["--print-reply", "--dest=net.l3hv.Agent1", "/net/l3hv/Agent"])
        .arg(format!("net.l3hv.Agent1.{member}"));
        if let Some(a) = arg {
            c.arg(format!("string:{a}"));
        }
        c.output().expect("dbus-send")
    };
    let out = call("ListVms", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = call("RemoveVm", Some("vm1"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("net.l3hv.Error.AccessDenied") && err.contains("not root"),
        "{err}"
    );
}

/// The shipped policy: only root may own the name and mutate; anyone may
/// read. Uses the system bus policy file as shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_bus_policy_denies_mutation_to_others() {
    require_root();
    let hv = Netns::new(&unique("dbusp"));
    // The default policy of Debian's /usr/share/dbus-1/system.conf.
    let policy = format!(
        r#"<policy context="default">
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
  </policy>
  <include>{}/packaging/dbus/net.l3hv.Agent1.conf</include>"#,
        env!("CARGO_MANIFEST_DIR")
    );
    let bus = DbusDaemon::start(&hv, &policy);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    let conn = ready(&bus.address(), &agent).await;
    // Root may mutate.
    let proxy = Agent1Proxy::new(&conn).await.expect("proxy");
    proxy.remove_vm("nothing").await.expect("root may RemoveVm");
    let send = |member: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "dbus-send",
            ])
            .arg(format!("--bus={}", bus.address()))
            .args(["--print-reply", "--dest=net.l3hv.Agent1", "/net/l3hv/Agent"])
            .arg(format!("net.l3hv.Agent1.{member}"))
            .arg("string:x")
            .output()
            .expect("dbus-send")
    };
    let out = send("RemoveVm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{err}"
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "dbus-send",
        ])
        .arg(format!("--bus={}", bus.address()))
        .args([
            "--print-reply",
            "--dest=net.l3hv.Agent1",
            "/net/l3hv/Agent",
            "net.l3hv.Agent1.GetStatus",
        ])
        .output()
        .expect("dbus-send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// packaging/dbus/net.l3hv.Agent1.xml is what the service introspects to.
/// `L3HV_UPDATE_EXPECTED=1` rewrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_matches_packaging() {
    require_root();
    let hv = Netns::new(&unique("dbusi"));
    let bus = DbusDaemon::start(&hv, OPEN_POLICY);
    let agent = Agent::start(&hv, &config_with_dbus(&bus.address()));
    let conn = ready(&bus.address(), &agent).await;
    let intro = zbus::fdo::IntrospectableProxy::builder(&conn)
        .destination("net.l3hv.Agent1")
        .path("/net/l3hv/Agent")
        .build()
        .await
        .expect("introspectable proxy")
        .introspect()
        .await
        .expect("Introspect");
    let start = intro
        .find("<interface name=\"net.l3hv.Agent1\">")
        .expect("our interface");
    let end = intro[start..].find("</interface>").expect("end") + start + "</interface>".len();
    let body: String = format!("  {}", &intro[start..end])
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    let got = format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<!-- net.l3hv.Agent1 at /net/l3hv/Agent on bus name net.l3hv.Agent1. Generated: L3HV_UPDATE_EXPECTED=1 cargo test --test dbus introspection -->\n<node name=\"/net/l3hv/Agent\">\n{body}</node>\n"
    );
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/dbus/net.l3hv.Agent1.xml"
    );
    if std::env::var_os("L3HV_UPDATE_EXPECTED").is_some() {
        std::fs::write(path, &got).expect("write introspection");
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        want, got,
        "{path} is out of date; run L3HV_UPDATE_EXPECTED=1 cargo test --test dbus"
    );
}

/// `[dbus] group`: a member of the configured group may change intent
/// through the shipped policy (with its group set to the same one) and the
/// agent's own check; a user outside it may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_the_configured_group_may_mutate() {
    require_root();
    let hv = Netns::new(&unique("dbusg"));
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/dbus/net.l3hv.Agent1.conf"
    ))
    .unwrap();
    assert!(shipped.contains(r#"<policy group="l3hv">"#));
    let dir = std::env::temp_dir().join(format!("{}-policy", hv.name));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("net.l3hv.Agent1.conf");
    // nogroup stands for the operators' group: it exists everywhere.
    std::fs::write(
        &conf,
        shipped.replace(r#"<policy group="l3hv">"#, r#"<policy group="nogroup">"#),
    )
    .unwrap();
    let policy = format!(
        r#"<policy context="default">
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
  </policy>
  <include>{}</include>"#,
        conf.display()
    );
    let bus = DbusDaemon::start(&hv, &policy);
    let agent = Agent::start(
        &hv,
        &format!("{}group = \"nogroup\"\n", config_with_dbus(&bus.address())),
    );
    let _conn = ready(&bus.address(), &agent).await;
    let remove_as = |user: &str, group: &str| {
        Command::new("setpriv")
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={group}"))
            .args(["--clear-groups", "dbus-send"])
            .arg(format!("--bus={}", bus.address()))
            .args([
                "--print-reply",
                "--dest=net.l3hv.Agent1",
                "/net/l3hv/Agent",
                "net.l3hv.Agent1.RemoveVm",
                "string:nothing",
            ])
            .output()
            .expect("dbus-send")
    };
    let member = remove_as("nobody", "nogroup");
    assert!(
        member.status.success(),
        "a group member was refused: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    let other = remove_as("daemon", "daemon");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("AccessDenied"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
