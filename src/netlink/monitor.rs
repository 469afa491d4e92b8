//! Link notifications (RTNLGRP_LINK): a tap appearing when QEMU starts, an
//! adopted interface created after its intent, carrier loss flushing
//! routes (and the nexthop objects on the uplink, whose emptied groups take
//! their IPv4 routes with them without any RTM_DELROUTE). The kernel state
//! is level-reconciled; these events only say "look again now" instead of
//! waiting for the periodic pass. A socket overrun (ENOBUFS) is one such
//! event too.

use std::time::Duration;

use futures::StreamExt;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

/// Starts a task that sends `()` on the returned channel after each burst
/// of link notifications (bursts are coalesced for `quiet`).
pub fn link_changes(quiet: Duration) -> std::io::Result<mpsc::Receiver<()>> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if matches!(msg.payload, netlink_packet_core::NetlinkPayload::Overrun(_)) {
                // ENOBUFS: notifications were lost (the kernel may have
                // flushed routes or nexthops meanwhile): the full pass this
                // triggers re-dumps everything.
                tracing::warn!("link notifications overran the socket; re-dumping");
            }
            // Coalesce: wait until the burst is over.
            loop {
                match tokio::time::timeout(quiet, messages.next()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
