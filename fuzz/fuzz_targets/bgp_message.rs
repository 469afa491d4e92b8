//! Any bytes a BGP peer sends, through l3hv's codec boundary: framing, then
//! decoding with every combination of negotiated ADD-PATH and 4-octet AS.
//! Never a panic; an error is always a NOTIFICATION with a defined code.
#![no_main]

use l3hv::bgp::codec::{Codec, LocalOpen, Open, Afi};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((flags, bytes)) = data.split_first() else { return };
    let local = LocalOpen {
        asn: 65000,
        hold_time: 90,
        bgp_id: "192.0.2.1".parse().unwrap(),
        add_path_send: flags & 4 != 0,
        graceful_restart: None,
    };
    let remote = Open {
        version: 4,
        asn: 65000,
        hold_time: 90,
        bgp_id: "192.0.2.2".parse().unwrap(),
        four_octet_as: flags & 1 != 0,
        multiprotocol: vec![Afi::Ipv4, Afi::Ipv6],
        add_path: vec![(Afi::Ipv4, flags & 2 != 0, true), (Afi::Ipv6, flags & 8 != 0, true)],
        route_refresh: true,
        enhanced_route_refresh: false,
        graceful_restart: None,
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
});
