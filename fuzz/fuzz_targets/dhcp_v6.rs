//! Any bytes a VM sends to port 547: never a panic (l3hv::fuzzing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| l3hv::fuzzing::dhcp_v6(data));
