//! Bytes per learned path, by structure: what l3hvd keeps for every path
//! it learns (the session's Adj-RIB-In, the Loc-RIB, the mirror of the
//! kernel's routes) and what a pass builds and drops (the desired state).
//! Counted by a global allocator that tracks live bytes (requested sizes,
//! not malloc's chunk overhead), so each structure's cost is exact and
//! repeatable; the process's RSS (benches/bgp_learn.sh) adds the
//! allocator's overhead and fragmentation on top.
//!
//!   cargo bench --bench memory [-- N]        default N = 100000
//!
//! Half the paths are IPv4 /32s, half IPv6 /128s, one path per prefix
//! from one session (the feed of benches/bgp_learn.sh).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use ipnet::IpNet;
use l3hv::bgp::codec::{Nlri, PathAttrs};
use l3hv::bgp::session::AdjRibIn;
use l3hv::btree::compact_past;
use l3hv::intent::Intent;
use l3hv::reconcile::{self, ObservedKernel};
use l3hv::rib::{Path, Rib, RibEvent};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout, same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const CONFIG: &str = r#"
[hypervisor]
name = "hv1"
router_id = "198.51.100.101"

[fabrics.public]
table = 90
catch_all = true
subnets = ["10.0.0.0/8", "2001:db8:1000::/36"]
gateway_v4 = "10.255.255.254"
"#;

fn prefixes(n: usize) -> Vec<IpNet> {
    let half = n / 2;
    let v4 = (0..half).map(|i| {
        let a = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i as u32;
        IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), 32).expect("/32")
    });
    let v6 = (0..n - half).map(|i| {
        let a = u128::from("2001:db8:1000::".parse::<Ipv6Addr>().expect("v6")) + i as u128;
        IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), 128).expect("/128")
    });
    v4.chain(v6).collect()
}

fn per_path(bytes: isize, n: usize) -> String {
    format!(
        "{:>12} bytes  {:>6.1} per path",
        bytes,
        bytes as f64 / n as f64
    )
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let config = l3hv::config::parse("bench.toml", CONFIG).expect("config");
    let intent = Intent::default();
    let prefixes = prefixes(n);
    let session: Arc<str> = Arc::from("public-a");
    let uplink: Arc<str> = Arc::from("a-public");
    let attrs_v4 = Arc::new(PathAttrs {
        next_hop: Some("192.0.2.1".parse().expect("ip")),
        local_pref: Some(100),
        as_path_len: 0,
        originator_id: Some(Ipv4Addr::new(198, 51, 100, 102)),
        cluster_list: vec![Ipv4Addr::new(198, 51, 100, 1)],
    });
    let attrs_v6 = Arc::new(PathAttrs {
        next_hop: Some("2001:db8:ffff::1".parse().expect("ip")),
        ..(*attrs_v4).clone()
    });

    println!("{n} paths, one per prefix, half IPv4 /32, half IPv6 /128");

    // The session's Adj-RIB-In (src/bgp/session.rs): Nlri -> shared
    // attributes of the UPDATE that carried it.
    // Rebuilt with full nodes as it grows, like the session does after
    // each UPDATE (here: every 1,000 paths).
    let base = live();
    let mut adj_in = AdjRibIn::new();
    let mut compacted = 0;
    for chunk in prefixes.chunks(1000) {
        for p in chunk {
            let a = if p.addr().is_ipv4() {
                &attrs_v4
            } else {
                &attrs_v6
            };
            adj_in.insert(
                Nlri {
                    prefix: *p,
                    path_id: Some(1),
                },
                Arc::clone(a),
            );
        }
        compact_past(&mut adj_in, &mut compacted);
    }
    println!("adj-rib-in   {}", per_path(live() - base, n));

    // The Loc-RIB, fed as the session feeds it (UPDATEs of 1,000 paths).
    let base = live();
    let mut rib = Rib::default();
    for chunk in prefixes.chunks(1000) {
        let announce = chunk
            .iter()
            .map(|p| {
                let a = if p.addr().is_ipv4() {
                    &attrs_v4
                } else {
                    &attrs_v6
                };
                (
                    *p,
                    Some(1),
                    Path {
                        next_hop: a.next_hop.expect("next hop"),
                        uplink: Arc::clone(&uplink),
                        local_pref: 100,
                        as_path_len: 0,
                        originator: a.originator_id,
                    },
                )
            })
            .collect();
        rib.apply(RibEvent::Update {
            session: Arc::clone(&session),
            fabric: "public".into(),
            announce,
            withdraw: vec![],
        });
    }
    println!("loc-rib      {}", per_path(live() - base, n));

    // A pass: the desired state over the whole RIB (dropped after the
    // pass), and the mirror of the kernel's routes the agent keeps.
    let base = live();
    let none = std::collections::BTreeMap::new();
    let desired =
        reconcile::desired_with(&config, &intent, &rib, reconcile::Nexthops::Objects(&none));
    println!(
        "desired      {}  (per pass, transient)",
        per_path(live() - base, n)
    );
    // The mirror the agent keeps (what a dump returns, or the passes'
    // changes inserted one by one), rebuilt once it has grown.
    let base = live();
    let mut cache = ObservedKernel {
        nexthops: desired.nexthops.clone(),
        groups: desired.groups.clone(),
        ..Default::default()
    };
    for (id, attrs) in &desired.routes {
        cache.routes.insert(*id, attrs.clone());
    }
    compact_past(&mut cache.routes, &mut 0);
    println!("kernel cache {}", per_path(live() - base, n));
    drop(desired);
    std::hint::black_box((&adj_in, &rib, &cache));
}
