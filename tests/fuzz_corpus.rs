//! Inputs the fuzzer found (`tests/data/fuzz/<target>/`: a spread of the
//! corpus by size, committed; plus the whole local `fuzz/corpus/<target>/`
//! when there is one) through the same checks as the fuzz targets
//! (`l3hv::fuzzing`), on the stable toolchain: malformed DHCPv4, DHCPv6,
//! router solicitations and BGP messages never panic and never break the
//! targets' properties.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = root.join("tests/data/fuzz").join(target);
    let local = root.join("fuzz/corpus").join(target);
    let mut n = 0;
    for dir in [seeds, local] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            let caught = std::panic::catch_unwind(|| check(&data));
            assert!(caught.is_ok(), "{target}: {} failed", path.display());
            n += 1;
        }
    }
    // The committed inputs are there (a missing directory would pass
    // vacuously).
    assert!(n >= 10, "{target}: only {n} inputs");
}

#[test]
fn dhcp_v4_corpus() {
    replay("dhcp_v4", l3hv::fuzzing::dhcp_v4);
}

#[test]
fn dhcp_v6_corpus() {
    replay("dhcp_v6", l3hv::fuzzing::dhcp_v6);
}

#[test]
fn router_solicitation_corpus() {
    replay("router_solicitation", l3hv::fuzzing::router_solicitation);
}

#[test]
fn bgp_message_corpus() {
    replay("bgp_message", l3hv::fuzzing::bgp_message);
}
