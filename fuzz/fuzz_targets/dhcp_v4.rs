//! Any bytes a VM sends to port 67: never a panic, and a reply only ever
//! carries the binding's address to the binding's MAC.
#![no_main]

use std::net::Ipv4Addr;

use l3hv::dhcp::server::{self, Binding, Destination, Outcome, Subnet};
use l3hv::intent::MacAddr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
