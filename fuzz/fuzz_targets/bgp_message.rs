//! Any bytes a BGP peer sends, through l3hv's codec boundary: framing, then
//! decoding with every combination of negotiated ADD-PATH and 4-octet AS.
//! Never a panic; an error is always a NOTIFICATION with a defined code
//! (l3hv::fuzzing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| l3hv::fuzzing::bgp_message(data));
