//! The agent's libvirt connection against libvirt's `test:///default`
//! driver (in-process, no daemon): reconcile of running domains at
//! connect, then lifecycle and metadata events, with a recording sink in
//! place of the agent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use l3hv::agent::ApiError;
use l3hv::config::LibvirtConfig;
use l3hv::intent::VmIntent;
use l3hv::libvirt::events::{self, Sink};
use virt::connect::Connect;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Set(VmIntent),
    Remove(String),
    /// A set left alone: the VM was removed after the caller's count.
    Skipped(VmIntent),
}

/// Removals so far, and the count at each VM's removal.
#[derive(Default)]
struct Removals {
    count: u64,
    at: Vec<(String, u64)>,
}

/// Records the calls, counting removals as the agent does.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    known: Arc<Mutex<Vec<String>>>,
    removals: Arc<Mutex<Removals>>,
    /// A VM whose release races the next count: removed right after it.
    release_after_count: Arc<Mutex<Option<String>>>,
}

impl Sink for Recorder {
    async fn set_vm_unless_removed(&self, vm: VmIntent, since: u64) -> Result<(), ApiError> {
        let removed = self
            .removals
            .lock()
            .unwrap()
            .at
            .iter()
            .any(|(name, at)| *name == vm.name && *at > since);
        if removed {
            self.calls.lock().unwrap().push(Call::Skipped(vm));
            return Ok(());
        }
        self.known.lock().unwrap().push(vm.name.clone());
        self.calls.lock().unwrap().push(Call::Set(vm));
        Ok(())
    }
    async fn removals(&self) -> Result<u64, ApiError> {
        let count = self.removals.lock().unwrap().count;
        let racing = self.release_after_count.lock().unwrap().take();
        if let Some(name) = racing {
            self.remove_vm(name).await?;
        }
        Ok(count)
    }
    async fn remove_vm(&self, name: String) -> Result<(), ApiError> {
        let mut r = self.removals.lock().unwrap();
        r.count += 1;
        let at = r.count;
        r.at.push((name.clone(), at));
        drop(r);
        self.calls.lock().unwrap().push(Call::Remove(name));
        Ok(())
    }
    async fn vm_names(&self) -> Result<Vec<String>, ApiError> {
        Ok(self.known.lock().unwrap().clone())
    }
}

impl Recorder {
    async fn wait_for(&self, what: &str, f: impl Fn(&[Call]) -> bool) {
        let start = Instant::now();
        loop {
            if f(&self.calls.lock().unwrap()) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}: {:?}",
                self.calls.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn domain(name: &str, mac: &str, v4: &str) -> String {
    format!(
        r#"<domain type='test'>
  <name>{name}</name>
  <metadata>
    <l3hv:vm xmlns:l3hv="https://l3hv.net/xmlns/domain/1">
      <l3hv:interface mac="{mac}" fabric="public"><l3hv:ip address="{v4}"/></l3hv:interface>
    </l3hv:vm>
  </metadata>
  <memory>65536</memory>
  <os><type>hvm</type></os>
  <devices>
    <interface type='ethernet'>
      <mac address='{mac}'/>
      <target dev='{name}-e0' managed='no'/>
    </interface>
  </devices>
</domain>"#
    )
}

fn set_of(calls: &[Call], name: &str) -> Option<VmIntent> {
    calls.iter().rev().find_map(|c| match c {
        Call::Set(vm) if vm.name == name => Some(vm.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_then_follow_events_on_the_test_driver() {
    // The event loop must exist before the first connection.
    events::start_event_loop().expect("event loop");
    let uri = "test:///default";
    // test:///default is one shared in-process hypervisor: this connection
    // plays the operator (virsh), the agent's is opened by `run`.
    let admin = Connect::open(Some(uri)).expect("open test driver");
    let before = admin
        .create_domain_xml(&domain("early", "52:54:00:00:00:11", "203.0.113.11"), 0)
        .expect("start early");

    let rec = Recorder::default();
    let config = LibvirtConfig {
        enabled: true,
        uri: uri.into(),
        reconnect_max: Duration::from_secs(1),
    };
    let task = tokio::spawn(events::run(config, rec.clone()));

    // Reconcile at connect: the domain running before the agent looked.
    rec.wait_for("reconcile of `early`", |c| set_of(c, "early").is_some())
        .await;
    let early = set_of(&rec.calls.lock().unwrap(), "early").expect("early");
    assert_eq!(early.interfaces[0].name, "early-e0");
    assert_eq!(early.interfaces[0].ipv4[0].to_string(), "203.0.113.11");
    // The driver's own `test` domain has no l3hv metadata: never set.
    assert!(set_of(&rec.calls.lock().unwrap(), "test").is_none());

    // STARTED.
    let late = admin
        .create_domain_xml(&domain("late", "52:54:00:00:00:12", "203.0.113.12"), 0)
        .expect("start late");
    rec.wait_for("STARTED of `late`", |c| set_of(c, "late").is_some())
        .await;

    // METADATA_CHANGE: a new address, live.
    late.set_metadata(
        virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(r#"<vm><interface mac="52:54:00:00:00:12" fabric="public"><ip address="203.0.113.42"/></interface></vm>"#),
        Some("l3hv"),
        Some(l3hv::libvirt::metadata::NAMESPACE),
        virt::sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .expect("set metadata");
    rec.wait_for("METADATA_CHANGE of `late`", |c| {
        set_of(c, "late").is_some_and(|vm| vm.interfaces[0].ipv4[0].to_string() == "203.0.113.42")
    })
    .await;

    // Another change whose domain is released by its hook (`virsh
    // destroy`) after the agent's count and before the set: the XML read
    // for the event is not set again.
    *rec.release_after_count.lock().unwrap() = Some("late".into());
    late.set_metadata(
        virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(r#"<vm><interface mac="52:54:00:00:00:12" fabric="public"><ip address="203.0.113.43"/></interface></vm>"#),
        Some("l3hv"),
        Some(l3hv::libvirt::metadata::NAMESPACE),
        virt::sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .expect("set metadata");
    rec.wait_for("the stale set left alone", |c| {
        c.iter()
            .any(|c| matches!(c, Call::Skipped(vm) if vm.name == "late"))
    })
    .await;
    assert!(
        set_of(&rec.calls.lock().unwrap(), "late")
            .is_some_and(|vm| vm.interfaces[0].ipv4[0].to_string() == "203.0.113.42"),
        "{:?}",
        rec.calls.lock().unwrap()
    );

    // STOPPED (destroy): removed (a second time: the release above was
    // the recorder's own).
    late.destroy().expect("destroy late");
    rec.wait_for("STOPPED of `late`", |c| {
        c.iter()
            .filter(|c| **c == Call::Remove("late".into()))
            .count()
            >= 2
    })
    .await;
    before.destroy().expect("destroy early");
    rec.wait_for("STOPPED of `early`", |c| {
        c.contains(&Call::Remove("early".into()))
    })
    .await;
    // A domain without metadata stopping is none of l3hv's business.
    let plain = admin
        .create_domain_xml(
            "<domain type='test'><name>plain</name><memory>65536</memory><os><type>hvm</type></os></domain>",
            0,
        )
        .expect("start plain");
    plain.destroy().expect("destroy plain");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = rec.calls.lock().unwrap().clone();
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Set(v) if v.name == "plain")
                || *c == Call::Remove("plain".into())),
        "{calls:?}"
    );
    task.abort();
}
