//! The checks of the fuzz targets (`fuzz/fuzz_targets/`), as plain
//! functions: cargo-fuzz runs them on a nightly toolchain, and
//! `tests/fuzz_corpus.rs` replays every input of `fuzz/corpus/` through them
//! on stable, so the corpus the fuzzer found is checked by every test run.
//! Each panics on a violated property, never otherwise.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::bgp::codec::{Afi, Codec, LocalOpen, Open};
use crate::dhcp::server::{self, Binding, Destination, Outcome, Subnet};
use crate::dhcp::v6::{self, Binding6};
use crate::intent::MacAddr;
use crate::ra::build;

/// Any bytes a VM sends to port 67: never a panic, and a reply only ever
/// carries the binding's address to the binding's MAC.
pub fn dhcp_v4(data: &[u8]) {
    let b = Binding {
        mac: MacAddr([0x52, 0x54, 0, 0x71, 0, 5]),
        address: Ipv4Addr::new(203, 0, 113, 5),
        server: Ipv4Addr::new(203, 0, 113, 254),
        subnet: if data.first().is_some_and(|b| b & 1 == 1) {
            Subnet::PointToPoint
        } else {
            Subnet::Shared { prefix_len: 24 }
        },
        lease: None,
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        domain: Some("example.net".into()),
        mtu: Some(1500),
        hostname: Some("vm1".into()),
    };
    if let Outcome::Reply { bytes, to, .. } = server::reply(data, &b) {
        assert_eq!(&bytes[28..34], &b.mac.0);
        if let Destination::Offered { address, mac } = to {
            assert_eq!((address, mac), (b.address, b.mac));
        }
    }
}

/// Any bytes a VM sends to port 547: never a panic.
pub fn dhcp_v6(data: &[u8]) {
    let b = Binding6 {
        address: Ipv6Addr::new(0x2001, 0xdb8, 0xcb00, 0x7100, 0, 0, 0, 3),
        lease: None,
        dns: vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53)],
    };
    let _ = v6::reply(data, &b);
}

/// Any ICMPv6 message a VM sends (the first byte is the hop limit it came
/// with): never a panic; only hop limit 255 passes.
pub fn router_solicitation(data: &[u8]) {
    let (hop, rest) = match data.split_first() {
        Some((h, r)) => (Some(*h), r),
        None => (None, data),
    };
    let src = if hop.is_some_and(|h| h & 1 == 1) {
        Ipv6Addr::UNSPECIFIED
    } else {
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe00, 1)
    };
    if build::solicitation(rest, hop, src).is_ok() {
        assert_eq!(hop, Some(255));
    }
}

/// Any bytes a BGP peer sends (after a first byte choosing the negotiated
/// ADD-PATH and 4-octet AS), through framing and decoding: never a panic;
/// an error is always a NOTIFICATION with a defined code.
pub fn bgp_message(data: &[u8]) {
    let Some((flags, bytes)) = data.split_first() else {
        return;
    };
    let local = LocalOpen {
        asn: 65000,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(192, 0, 2, 1),
        add_path_send: flags & 4 != 0,
        graceful_restart: None,
    };
    let remote = Open {
        version: 4,
        asn: 65000,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(192, 0, 2, 2),
        four_octet_as: flags & 1 != 0,
        multiprotocol: vec![Afi::Ipv4, Afi::Ipv6],
        add_path: vec![
            (Afi::Ipv4, flags & 2 != 0, true),
            (Afi::Ipv6, flags & 8 != 0, true),
        ],
        route_refresh: true,
        enhanced_route_refresh: false,
        graceful_restart: None,
        graceful_restart_families: Vec::new(),
        extended_next_hop: false,
    };
    let codec = Codec::negotiated(&local, &remote);
    let mut rest = bytes;
    while !rest.is_empty() {
        match Codec::frame(rest) {
            Ok(Some(len)) => {
                if let Err(n) = codec.decode(&rest[..len]) {
                    assert!((1..=7).contains(&n.code), "{n}");
                }
                rest = &rest[len..];
            }
            Ok(None) => break,
            Err(n) => {
                assert_eq!(n.code, 1);
                break;
            }
        }
    }
}
