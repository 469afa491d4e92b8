//! PURE: RFC 4271 §8 session states and the OPEN negotiation (§6.2).

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Serialize;

use super::codec::{Afi, Codec, LocalOpen, Notification, Open};

/// RFC 4271 §8.2.2 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Negotiated {
    pub hold_time: Duration,
    pub keepalive: Duration,
    pub remote_id: Ipv4Addr,
    pub four_octet_as: bool,
    pub ipv4: bool,
    pub ipv6: bool,
    pub add_path_rx: Vec<Afi>,
    pub add_path_tx: Vec<Afi>,
    pub route_refresh: bool,
    pub enhanced_route_refresh: bool,
    pub graceful_restart: Option<u16>,
    /// Families the peer keeps across its restart (we keep its paths of
    /// those families stale when it restarts).
    pub graceful_restart_families: Vec<Afi>,
    pub extended_next_hop: bool,
}

/// Checks the peer's OPEN against ours (RFC 4271 §6.2) and derives the
/// session parameters and the codec. An error is the NOTIFICATION to send.
pub fn negotiate(
    local: &LocalOpen,
    expected_asn: u32,
    remote: &Open,
) -> Result<(Negotiated, Codec), Notification> {
    if remote.version != 4 {
        return Err(Notification::new(2, 1, 4u16.to_be_bytes().to_vec()));
    }
    if remote.asn != expected_asn {
        return Err(Notification::new(2, 2, vec![]));
    }
    let id = u32::from(remote.bgp_id);
    // §6.2: the identifier must be a valid unicast host address; iBGP
    // peers must not share ours.
    if id == 0 || id == u32::MAX || remote.bgp_id == local.bgp_id {
        return Err(Notification::new(2, 3, vec![]));
    }
    if remote.hold_time == 1 || remote.hold_time == 2 {
        return Err(Notification::new(2, 6, vec![]));
    }
    let hold = local.hold_time.min(remote.hold_time);
    let hold_time = Duration::from_secs(u64::from(hold));
    let codec = Codec::negotiated(local, remote);
    // Without the multiprotocol capability a peer speaks IPv4 unicast only
    // (RFC 4760 §8).
    let (ipv4, ipv6) = if remote.multiprotocol.is_empty() {
        (true, false)
    } else {
        (
            remote.multiprotocol.contains(&Afi::Ipv4),
            remote.multiprotocol.contains(&Afi::Ipv6),
        )
    };
    let afis = [Afi::Ipv4, Afi::Ipv6];
    Ok((
        Negotiated {
            hold_time,
            keepalive: hold_time / 3,
            remote_id: remote.bgp_id,
            four_octet_as: remote.four_octet_as,
            ipv4,
            ipv6,
            add_path_rx: afis
                .iter()
                .copied()
                .filter(|a| codec.add_path_rx(*a))
                .collect(),
            add_path_tx: afis
                .iter()
                .copied()
                .filter(|a| codec.add_path_tx(*a))
                .collect(),
            route_refresh: remote.route_refresh,
            enhanced_route_refresh: remote.enhanced_route_refresh,
            graceful_restart: remote.graceful_restart,
            graceful_restart_families: remote.graceful_restart_families.clone(),
            extended_next_hop: remote.extended_next_hop,
        },
        codec,
    ))
}

/// Connect-retry backoff: doubles from `base` up to `max`, with up to 25 %
/// jitter taken from `jitter` (0..=255) so that sessions do not retry in
/// lockstep.
pub fn backoff(base: Duration, max: Duration, failures: u32, jitter: u8) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.min(16));
    let d = exp.min(max);
    d + d * u32::from(jitter) / 1024
}

/// How long a BFD-triggered reconnect keeps retrying fast: the peer's BFD
/// usually turns Up a few milliseconds after ours (the three-way
/// handshake), and a peer like BIRD refuses the session until it has.
pub const BFD_KICK_WINDOW: Duration = Duration::from_secs(2);
/// The pause between those fast retries.
pub const BFD_KICK_RETRY: Duration = Duration::from_millis(50);

/// The wait before the next connect: `backoff` normally; after BFD came Up
/// less than [`BFD_KICK_WINDOW`] ago, [`BFD_KICK_RETRY`] (a failure right
/// after the path came back is the peer's BFD lagging ours, not a peer
/// to back off from).
pub fn retry_wait(backoff: Duration, since_bfd_up: Option<Duration>) -> Duration {
    match since_bfd_up {
        Some(d) if d < BFD_KICK_WINDOW => BFD_KICK_RETRY.min(backoff),
        _ => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_right_after_bfd_up_is_retried_fast() {
        let backoff = Duration::from_millis(1200);
        assert_eq!(retry_wait(backoff, None), backoff);
        assert_eq!(
            retry_wait(backoff, Some(Duration::from_millis(1))),
            BFD_KICK_RETRY
        );
        assert_eq!(retry_wait(backoff, Some(Duration::from_secs(3))), backoff);
        // Never longer than the backoff itself.
        let short = Duration::from_millis(10);
        assert_eq!(retry_wait(short, Some(Duration::ZERO)), short);
    }

    fn local() -> LocalOpen {
        LocalOpen {
            asn: 65000,
            hold_time: 90,
            bgp_id: "192.0.2.1".parse().unwrap(),
            add_path_send: false,
            graceful_restart: None,
        }
    }

    fn remote() -> Open {
        Open {
            version: 4,
            asn: 65000,
            hold_time: 240,
            bgp_id: "192.0.2.126".parse().unwrap(),
            four_octet_as: true,
            multiprotocol: vec![Afi::Ipv4, Afi::Ipv6],
            add_path: vec![(Afi::Ipv4, true, true), (Afi::Ipv6, true, false)],
            route_refresh: true,
            enhanced_route_refresh: false,
            graceful_restart: Some(120),
            graceful_restart_families: vec![Afi::Ipv4],
            extended_next_hop: false,
        }
    }

    #[test]
    fn negotiates_the_smaller_hold_time_and_add_path_per_direction() {
        let (n, _) = negotiate(&local(), 65000, &remote()).unwrap();
        assert_eq!(n.hold_time, Duration::from_secs(90));
        assert_eq!(n.keepalive, Duration::from_secs(30));
        assert_eq!(n.add_path_rx, vec![Afi::Ipv4, Afi::Ipv6]);
        // We do not send unless configured to.
        assert!(n.add_path_tx.is_empty());
        let mut l = local();
        l.add_path_send = true;
        let (n, _) = negotiate(&l, 65000, &remote()).unwrap();
        assert_eq!(n.add_path_tx, vec![Afi::Ipv4]);
    }

    #[test]
    fn open_errors() {
        let mut r = remote();
        r.asn = 65001;
        assert_eq!(negotiate(&local(), 65000, &r).unwrap_err().subcode, 2);
        let mut r = remote();
        r.version = 3;
        assert_eq!(negotiate(&local(), 65000, &r).unwrap_err().subcode, 1);
        let mut r = remote();
        r.hold_time = 2;
        assert_eq!(negotiate(&local(), 65000, &r).unwrap_err().subcode, 6);
        let mut r = remote();
        r.bgp_id = local().bgp_id;
        assert_eq!(negotiate(&local(), 65000, &r).unwrap_err().subcode, 3);
        let mut r = remote();
        r.hold_time = 0;
        let (n, _) = negotiate(&local(), 65000, &r).unwrap();
        assert_eq!(n.hold_time, Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(b, m, 0, 0), b);
        assert_eq!(backoff(b, m, 3, 0), Duration::from_secs(8));
        assert_eq!(backoff(b, m, 30, 0), m);
        assert!(backoff(b, m, 0, 255) < Duration::from_millis(1250));
    }
}
