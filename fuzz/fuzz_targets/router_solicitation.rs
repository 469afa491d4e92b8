//! Any ICMPv6 message a VM sends: never a panic; only hop limit 255 passes.
#![no_main]

use std::net::Ipv6Addr;

use l3hv::ra::build;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (hop, rest) = match data.split_first() {
        Some((h, r)) => (Some(*h), r),
        None => (None, data),
    };
    let src = if hop.is_some_and(|h| h & 1 == 1) {
        Ipv6Addr::UNSPECIFIED
    } else {
        "fe80::5054:ff:fe00:1".parse().unwrap()
    };
    if build::solicitation(rest, hop, src).is_ok() {
        assert_eq!(hop, Some(255));
    }
});
