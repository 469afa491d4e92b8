//! IPv6 router advertisements: one raw ICMPv6 socket per VM interface.
//!
//! ```text
//!  agent ── watch<Arc<Intent>> ──► supervise ── watch<Advert> ──► io::serve (one task per interface)
//!                                                                  │ timer ─► build::encode ─► ff02::1
//!                                                                  │ RS ─► build::solicitation/answer ─► RA
//!                                                                  └─► Counters (read by status)
//! ```
//!
//! [`build`] decides (pure); [`io`] owns the socket and timers. Every VM
//! interface gets RAs (at least the default router); prefixes and flags
//! follow the fabric's IPv6 mode. Nothing here writes intent.

pub mod build;
pub mod io;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::intent::Intent;
use crate::services::Registry;
use build::Advert;

#[derive(Debug, thiserror::Error)]
pub enum RaError {
    #[error("ra {ifname}: socket: {source}")]
    Socket {
        ifname: String,
        source: std::io::Error,
    },
}

/// The advert of every VM interface.
pub fn adverts(config: &Config, intent: &Intent) -> BTreeMap<String, Advert> {
    intent
        .interfaces()
        .filter_map(|(_, i)| build::advert(config, i).map(|a| (i.name.clone(), a)))
        .collect()
}

/// Follows the intent and runs one [`io::serve`] task per VM interface.
/// Returns when the intent watch closes.
pub async fn supervise(
    config: Arc<Config>,
    intent: watch::Receiver<Arc<Intent>>,
    registry: Registry,
) {
    crate::services::per_interface(
        intent,
        "ra",
        |i| adverts(&config, i),
        |name, a, rx| {
            info!(interface = %name, prefixes = a.prefixes.len(), managed = a.managed, "ra: advertising");
            tokio::spawn(io::serve(
                name.to_string(),
                rx,
                config.ra.clone(),
                registry.interface(name),
            ))
        },
    )
    .await
}
