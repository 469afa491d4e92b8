//! VM-facing services (DHCPv4, RA, DHCPv6): what they share.
//!
//! Owns the per-interface counters shown in `l3hv status` ([`Registry`]),
//! the token bucket and log limiter that bound the work a VM can cause, and
//! [`spawn`], which starts the DHCP, ND and RA supervisors on a thread of
//! their own, following the agent's read-only intent watch. The services never write intent and never touch
//! an interface they were not given by it; the agent only reads the
//! counters when it builds its status.

pub mod limit;
pub mod sockopt;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::intent::Intent;

/// Counters of one VM interface. Written by the interface's service tasks,
/// read by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceCounters {
    pub interface: String,
    /// A DHCPv4 socket is open on the interface.
    pub dhcp_listening: bool,
    /// OFFERs, ACKs and NAKs sent.
    pub dhcp_served: u64,
    /// When the last ACK with a lease went out (Unix seconds).
    pub dhcp_last_lease_unix: Option<u64>,
    /// An ICMPv6 socket is open and RAs go out.
    pub ra_listening: bool,
    /// Router advertisements sent (periodic, solicited and final).
    pub ra_sent: u64,
    /// Router solicitations answered.
    pub rs_answered: u64,
    /// DHCPv6 replies sent.
    pub dhcpv6_served: u64,
    /// When the last DHCPv6 REPLY with an address went out (Unix seconds).
    pub dhcpv6_last_lease_unix: Option<u64>,
    /// A neighbour solicitation responder runs (`nd_whole_subnet`).
    pub nd_listening: bool,
    /// Neighbour solicitations answered for the shared subnet.
    pub nd_answered: u64,
    /// Packets dropped, by `protocol.reason` (`dhcp.malformed`, `ra.hop_limit`…).
    pub dropped: BTreeMap<String, u64>,
}

/// What `l3hv status` shows of the services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServicesStatus {
    pub interfaces: Vec<InterfaceCounters>,
}

/// The counters of every interface a service runs on. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<String, Counters>>>,
}

/// One interface's counters, shared by its DHCP, RA and DHCPv6 tasks.
#[derive(Debug, Clone)]
pub struct Counters {
    inner: Arc<Mutex<InterfaceCounters>>,
}

impl Registry {
    /// The counters of `ifname`, created on first use.
    pub fn interface(&self, ifname: &str) -> Counters {
        let mut map = lock(&self.inner);
        map.entry(ifname.to_string())
            .or_insert_with(|| Counters {
                inner: Arc::new(Mutex::new(InterfaceCounters {
                    interface: ifname.to_string(),
                    ..Default::default()
                })),
            })
            .clone()
    }

    /// Forgets interfaces no service runs on any more.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.inner).retain(|name, c| {
            keep(name) || {
                let c = lock(&c.inner);
                c.dhcp_listening || c.ra_listening || c.nd_listening
            }
        });
    }

    pub fn snapshot(&self) -> ServicesStatus {
        ServicesStatus {
            interfaces: lock(&self.inner)
                .values()
                .map(|c| lock(&c.inner).clone())
                .collect(),
        }
    }
}

impl Counters {
    pub fn update(&self, f: impl FnOnce(&mut InterfaceCounters)) {
        f(&mut lock(&self.inner));
    }

    pub fn drop(&self, protocol: &str, reason: &str) {
        self.update(|c| *c.dropped.entry(format!("{protocol}.{reason}")).or_default() += 1);
    }

    pub fn get(&self) -> InterfaceCounters {
        lock(&self.inner).clone()
    }
}

/// A poisoned lock only means a panic elsewhere; counters stay usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How often a service looks for an interface that does not exist yet
/// (an intended tap QEMU has not opened, a veth not yet moved in), and
/// checks that the one it serves is still the same.
pub const INTERFACE_POLL: Duration = Duration::from_secs(1);

/// Waits until `ifname` exists and returns its ifindex; `None` when the
/// service's intent channel closed meanwhile (the interface was dropped).
pub async fn wait_for_interface<T>(ifname: &str, rx: &mut watch::Receiver<T>) -> Option<u32> {
    loop {
        if let Some(i) = crate::netlink::tap::ifindex(ifname) {
            return Some(i);
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERFACE_POLL) => {}
            r = rx.changed() => if r.is_err() { return None },
        }
    }
}

/// How long the services wait after an intent change before following it.
pub const SETTLE: Duration = Duration::from_millis(2);

/// Runs one task per interface that `want` lists, following `intent`: an
/// interface that appears gets `start(name, first value, receiver)`; a
/// changed value goes down its watch; an interface no longer listed (or
/// whose task ended) has its sender dropped, which tells the task to stop
/// (the RA task sends its final advertisement then). Returns, after every
/// task finished, when the intent watch closes. `service` names the logs.
pub async fn per_interface<P, W, S>(
    mut intent: watch::Receiver<Arc<Intent>>,
    service: &'static str,
    want: W,
    start: S,
) where
    P: Clone + PartialEq + Send + Sync + 'static,
    W: Fn(&Intent) -> BTreeMap<String, P>,
    S: Fn(&str, &P, watch::Receiver<P>) -> tokio::task::JoinHandle<()>,
{
    let mut tasks: BTreeMap<String, (watch::Sender<P>, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    loop {
        let snapshot = intent.borrow_and_update().clone();
        let wanted = want(&snapshot);
        tasks.retain(|name, (_, handle)| {
            let keep = wanted.contains_key(name) && !handle.is_finished();
            if !keep {
                tracing::debug!(interface = %name, "{service}: stopping");
            }
            keep
        });
        for (name, value) in wanted {
            if let Some((tx, _)) = tasks.get(&name) {
                tx.send_if_modified(|old| {
                    let changed = *old != value;
                    *old = value.clone();
                    changed
                });
                continue;
            }
            let (tx, rx) = watch::channel(value.clone());
            let handle = start(&name, &value, rx);
            tasks.insert(name, (tx, handle));
        }
        if intent.changed().await.is_err() {
            break;
        }
        // Let the change settle: the call that made it is answered by
        // then (on two busy cores this thread, woken by the change, ran
        // its 0.3 ms of socket setup before the answer to a VM's `prepare`
        // left; `perf sched`), and a burst of changes (50 VMs at once) is
        // taken as one.
        tokio::time::sleep(SETTLE).await;
    }
    for (_, (tx, handle)) in tasks {
        drop(tx);
        let _ = handle.await;
    }
}

/// Starts the DHCPv4, RA (with DHCPv6) and neighbour solicitation
/// responder supervisors. They follow
/// `intent` until it closes (the agent stopped).
pub fn spawn(
    config: Arc<Config>,
    intent: watch::Receiver<Arc<Intent>>,
    registry: Registry,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // A thread and a single-threaded runtime of their own, as dnsmasq and
    // radvd are one process each: a DHCP or RS packet wakes this thread
    // alone, never queues behind BGP, D-Bus or control-socket tasks on the
    // main runtime's workers, and a flood from a VM stays off those
    // workers. Measured over 1,000 exchanges (BENCHMARKS.md): on the main
    // runtime DISCOVER->OFFER p99 was 0.88 ms against dnsmasq's 0.56 in
    // the same run; on this thread 0.44 against 0.53.
    std::thread::Builder::new()
        .name("l3hv-services".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(async move {
                    tokio::join!(
                        crate::dhcp::supervise(config.clone(), intent.clone(), registry.clone()),
                        crate::nd::supervise(config.clone(), intent.clone(), registry.clone()),
                        crate::ra::supervise(config, intent, registry),
                    );
                }),
                Err(e) => tracing::error!(error = %e, "cannot start the services' runtime"),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_and_snapshotted() {
        let r = Registry::default();
        let a = r.interface("tap1");
        r.interface("tap1").update(|c| c.dhcp_served += 1);
        a.drop("dhcp", "malformed");
        a.drop("dhcp", "malformed");
        let s = r.snapshot();
        assert_eq!(s.interfaces.len(), 1);
        assert_eq!(s.interfaces[0].dhcp_served, 1);
        assert_eq!(s.interfaces[0].dropped["dhcp.malformed"], 2);
        r.retain(|_| false);
        assert!(r.snapshot().interfaces.is_empty());
    }
}
