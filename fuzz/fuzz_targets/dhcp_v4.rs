//! Any bytes a VM sends to port 67: never a panic, and a reply only ever
//! carries the binding's address to the binding's MAC (l3hv::fuzzing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| l3hv::fuzzing::dhcp_v4(data));
