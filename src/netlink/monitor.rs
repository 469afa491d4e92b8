//! Link notifications (RTNLGRP_LINK): a tap appearing when QEMU starts, an
//! adopted interface created after its intent, carrier loss flushing
//! routes (and the nexthop objects on the uplink, whose emptied groups take
//! their IPv4 routes with them without any RTM_DELROUTE). The kernel state
//! is level-reconciled; these events only say "look again now" instead of
//! waiting for the periodic pass, and at which links: the agent dumps
//! everything only when an uplink is one of them. A socket overrun
//! (ENOBUFS) is such an event for every link.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

/// What one link notification says of a link: what the agent compares
/// with its mirror of the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkNote {
    pub index: u32,
    /// RTM_DELLINK.
    pub deleted: bool,
    /// IFF_UP (not the carrier), as the last notification has it.
    pub up: bool,
    /// IFF_LOWER_UP and IFF_RUNNING, as the last notification has it: the
    /// kernel deletes a link's nexthop objects when it loses either (the
    /// notification reads IFF_LOWER_UP live, so a carrier back by then
    /// shows only as IFF_RUNNING clear).
    pub carrier: bool,
    /// Some notification of the burst had no carrier (or IFF_UP clear):
    /// the kernel then deletes the link's nexthop objects.
    pub carrier_lost: bool,
    /// IFLA_MTU of the last notification: under 1280 the kernel takes
    /// IPv6 off the link (and under 68 IPv4), addresses and routes with it.
    pub mtu: Option<u32>,
    /// Some notification of the burst had IFF_UP clear: the link was down
    /// at some point (the kernel then deletes its routes and IPv6
    /// addresses), even if it is up again.
    pub was_down: bool,
    pub alias: Option<String>,
}

/// The links one burst of notifications was about, by name, with the last
/// notification of each; `None` when some notifications were lost
/// (ENOBUFS) or one had no name: anything may have changed.
pub type LinkBurst = Option<BTreeMap<String, LinkNote>>;

/// Starts a task that sends, after each burst of link notifications
/// (bursts are coalesced for `quiet`), the names of the links it concerned.
pub fn link_changes(quiet: Duration) -> std::io::Result<mpsc::Receiver<LinkBurst>> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let mut burst: LinkBurst = Some(BTreeMap::new());
            note(&mut burst, msg.payload);
            // Coalesce: wait until the burst is over.
            loop {
                match tokio::time::timeout(quiet, messages.next()).await {
                    Ok(Some((msg, _))) => note(&mut burst, msg.payload),
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(burst).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Adds the link a notification is about to `burst`.
fn note(burst: &mut LinkBurst, payload: NetlinkPayload<RouteNetlinkMessage>) {
    match payload {
        NetlinkPayload::InnerMessage(
            m @ (RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_)),
        ) => {
            let (deleted, m) = match m {
                RouteNetlinkMessage::DelLink(m) => (true, m),
                RouteNetlinkMessage::NewLink(m) => (false, m),
                _ => return,
            };
            let mut name = None;
            let mut alias = None;
            let mut mtu = None;
            for a in m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::IfAlias(a) if !a.is_empty() => alias = Some(a),
                    LinkAttribute::Mtu(n) => mtu = Some(n),
                    _ => {}
                }
            }
            let up = m.header.flags.contains(LinkFlags::Up);
            let carrier = m.header.flags.contains(LinkFlags::LowerUp)
                && m.header.flags.contains(LinkFlags::Running);
            let note = LinkNote {
                index: m.header.index,
                deleted,
                up,
                carrier,
                carrier_lost: !(deleted || up && carrier),
                was_down: !up && !deleted,
                alias,
                mtu,
            };
            match (burst.as_mut(), name) {
                (Some(links), Some(n)) => {
                    let before = links.get(&n).filter(|l| l.index == note.index);
                    let note = LinkNote {
                        was_down: note.was_down || before.is_some_and(|l| l.was_down),
                        carrier_lost: note.carrier_lost || before.is_some_and(|l| l.carrier_lost),
                        ..note
                    };
                    links.insert(n, note);
                }
                // A link without its name: look at everything.
                (Some(_), None) => *burst = None,
                (None, _) => {}
            }
        }
        NetlinkPayload::Overrun(_) => {
            // ENOBUFS: notifications were lost (the kernel may have flushed
            // routes or nexthops meanwhile): the full pass this triggers
            // re-dumps everything.
            tracing::warn!("link notifications overran the socket; re-dumping");
            *burst = None;
        }
        _ => {}
    }
}
