//! The DHCPv4 server: one UDP socket per VM interface, answering only the
//! MAC intended there with its static address.
//!
//! ```text
//!  agent ── watch<Arc<Intent>> ──► supervise ── watch<Binding> ──► io::serve (one task per interface)
//!                                   (starts/stops tasks as          │ recv ─► server::reply (PURE) ─► send
//!                                    interfaces come and go)        └─► Counters (read by status)
//! ```
//!
//! [`server`] decides (pure); [`io`] owns the socket, the neighbour entry
//! for unicast replies and the per-interface limits. On `shared-dhcpv6`
//! fabrics [`v6`] (pure) and [`io6`] hand out the intended IPv6 address
//! the same way (RFC 8415 IA_NA). Nothing here writes
//! intent, and a reply can only leave through the interface its request
//! came in on (SO_BINDTODEVICE plus IP_PKTINFO).

pub mod io;
pub mod io6;
pub mod server;
pub mod v6;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::intent::Intent;
use crate::netlink::Kernel;
use crate::services::Registry;
use server::Binding;

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("dhcp {ifname}: socket: {source}")]
    Socket {
        ifname: String,
        source: std::io::Error,
    },
}

/// The binding of every VM interface that has an IPv4 address.
pub fn bindings(config: &Config, intent: &Intent) -> BTreeMap<String, Binding> {
    intent
        .interfaces()
        .filter_map(|(vm, i)| server::binding(config, vm, i).map(|b| (i.name.clone(), b)))
        .collect()
}

/// Follows the intent and runs one [`io::serve`] task per interface with
/// an IPv4 address. Returns when the intent watch closes.
pub async fn supervise(
    config: Arc<Config>,
    mut intent: watch::Receiver<Arc<Intent>>,
    registry: Registry,
) {
    let kernel = match Kernel::connect(config.kernel.route_protocol) {
        Ok(k) => Some(k),
        Err(e) => {
            warn!(error = %e, "dhcp: no netlink; unicast replies fall back to broadcast");
            None
        }
    };
    let mut tasks: BTreeMap<String, (watch::Sender<Binding>, JoinHandle<()>)> = BTreeMap::new();
    let mut tasks6: BTreeMap<String, (watch::Sender<v6::Binding6>, JoinHandle<()>)> =
        BTreeMap::new();
    loop {
        let snapshot = intent.borrow_and_update().clone();
        let want6: BTreeMap<String, (v6::Binding6, std::net::Ipv6Addr)> = snapshot
            .interfaces()
            .filter_map(|(_, i)| {
                let b = v6::binding(&config, i)?;
                let gw = config.fabric(&i.fabric)?.gateway_v6;
                Some((i.name.clone(), (b, gw)))
            })
            .collect();
        tasks6.retain(|name, (_, handle)| want6.contains_key(name) && !handle.is_finished());
        for (name, (b, gw)) in want6 {
            if let Some((tx, _)) = tasks6.get(&name) {
                tx.send_if_modified(|old| {
                    let changed = *old != b;
                    *old = b.clone();
                    changed
                });
                continue;
            }
            info!(interface = %name, address = %b.address, "dhcpv6: serving");
            let (tx, rx) = watch::channel(b);
            let handle = tokio::spawn(io6::serve(name.clone(), rx, gw, registry.interface(&name)));
            tasks6.insert(name, (tx, handle));
        }
        let want = bindings(&config, &snapshot);
        // Dropping the sender tells the task to clean up and stop.
        tasks.retain(|name, (_, handle)| {
            let keep = want.contains_key(name) && !handle.is_finished();
            if !keep {
                debug!(interface = %name, "dhcp: stopping");
            }
            keep
        });
        for (name, b) in want {
            if let Some((tx, _)) = tasks.get(&name) {
                tx.send_if_modified(|old| {
                    let changed = *old != b;
                    *old = b.clone();
                    changed
                });
                continue;
            }
            info!(interface = %name, address = %b.address, mac = %b.mac, "dhcp: serving");
            let (tx, rx) = watch::channel(b);
            let handle = tokio::spawn(io::serve(
                name.clone(),
                rx,
                kernel.clone(),
                registry.interface(&name),
            ));
            tasks.insert(name, (tx, handle));
        }
        registry.retain(|n| snapshot.interfaces().any(|(_, i)| i.name == n));
        if intent.changed().await.is_err() {
            break;
        }
    }
    for (_, (tx, handle)) in tasks {
        drop(tx);
        let _ = handle.await;
    }
    for (_, (tx, handle)) in tasks6 {
        drop(tx);
        let _ = handle.await;
    }
}
