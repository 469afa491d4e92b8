//! Any bytes a VM sends to port 547: never a panic.
#![no_main]

use l3hv::dhcp::v6::{self, Binding6};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let b = Binding6 {
        address: "2001:db8:cb00:7100::3".parse().unwrap(),
        lease: None,
        dns: vec!["2001:db8::53".parse().unwrap()],
    };
    let _ = v6::reply(data, &b);
});
