//! Any ICMPv6 message a VM sends: never a panic; only hop limit 255 passes
//! (l3hv::fuzzing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| l3hv::fuzzing::router_solicitation(data));
