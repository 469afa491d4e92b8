//! PURE: `l3hv routes`: the RIB with its paths, the selected ECMP set and,
//! per route, its kernel state (installed, pending, failed with the
//! kernel's reason, or shadowed by a local VM route).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::config::Config;
use crate::reconcile::{DesiredKernel, ObservedKernel, RouteId};
use crate::rib::Rib;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PathView {
    pub session: String,
    pub path_id: Option<u32>,
    pub next_hop: IpAddr,
    pub uplink: String,
    pub originator: Option<std::net::Ipv4Addr>,
    pub local_pref: u32,
    pub as_path_len: usize,
    /// Part of the ECMP set installed for the prefix.
    pub selected: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KernelView {
    pub table: u32,
    pub metric: u32,
    /// The nexthop group the route points at (nexthop objects mode), or
    /// its one nexthop object for an origin with one path and few prefixes
    /// (`reconcile::groups`, "Direct keys").
    pub nh_id: Option<u32>,
    /// "installed", "pending", "failed: <reason>", "shadowed by a local VM
    /// route" or "not installed: no usable next hop".
    pub state: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteView {
    pub fabric: String,
    pub prefix: IpNet,
    pub paths: Vec<PathView>,
    pub kernel: Vec<KernelView>,
}

/// The learned routes (those within `filter`, all when `None`).
pub fn build(
    config: &Config,
    rib: &Rib,
    desired: &DesiredKernel,
    observed: &ObservedKernel,
    failed: &BTreeMap<RouteId, String>,
    filter: Option<IpNet>,
) -> Vec<RouteView> {
    let metric = config.kernel.learned_route_metric;
    let mut out = Vec::new();
    for (name, fabric) in &config.fabrics {
        let selected = rib.selected(name);
        for (prefix, paths) in rib.table(name) {
            if filter.is_some_and(|f| !f.contains(prefix) && !prefix.contains(&f.network())) {
                continue;
            }
            let hops = selected.get(prefix);
            let paths = paths
                .map(|(session, path_id, p)| PathView {
                    session: session.to_string(),
                    path_id,
                    next_hop: p.next_hop,
                    uplink: p.uplink.to_string(),
                    originator: p.originator,
                    local_pref: p.local_pref,
                    as_path_len: p.as_path_len,
                    selected: hops.is_some_and(|h| {
                        h.iter()
                            .any(|h| h.gateway == p.next_hop && h.uplink == p.uplink)
                    }),
                })
                .collect();
            let mut tables = vec![fabric.table];
            if !fabric.catch_all {
                tables.push(config.kernel.local_out_table);
            }
            let kernel = tables
                .into_iter()
                .map(|table| {
                    let id = RouteId {
                        table,
                        dst: *prefix,
                        metric,
                    };
                    let want = desired.routes.get(&id);
                    let local = desired
                        .routes
                        .range(
                            RouteId { metric: 0, ..id }..=RouteId {
                                metric: u32::MAX,
                                ..id
                            },
                        )
                        .any(|(i, _)| i.metric != metric);
                    let state = match (want, failed.get(&id)) {
                        (None, _) if local => "shadowed by a local VM route".to_string(),
                        (None, _) => "not installed: no usable next hop".to_string(),
                        (Some(_), Some(reason)) => format!("failed: {reason}"),
                        (Some(w), None) if observed.routes.get(&id) == Some(w) => {
                            "installed".to_string()
                        }
                        (Some(_), None) => "pending".to_string(),
                    };
                    KernelView {
                        table,
                        metric,
                        nh_id: want.and_then(|w| w.nh_id),
                        state,
                    }
                })
                .collect();
            out.push(RouteView {
                fabric: name.clone(),
                prefix: *prefix,
                paths,
                kernel,
            });
        }
    }
    out
}
