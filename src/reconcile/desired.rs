//! PURE: configuration + intent → [`DesiredKernel`].
//!
//! This is the one place that says what the kernel of a hypervisor must look
//! like (DESIGN.md "Kernel layout"): per VM interface its gateway addresses,
//! sysctls and host routes; host-wide the rules, the default routes at the
//! bottom of each table and the host sysctls.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::model::*;
use crate::config::{Config, DefaultRoute, Ipv4Mode, Ipv6Forwarding, Ipv6Mode};
use crate::intent::{Intent, LinkMode};
use crate::rib::Rib;

pub const PROXY_ARP: IfSysctl = IfSysctl {
    dir: "ipv4/conf",
    key: "proxy_arp",
};
pub const RP_FILTER: IfSysctl = IfSysctl {
    dir: "ipv4/conf",
    key: "rp_filter",
};
pub const FORWARDING_V4: IfSysctl = IfSysctl {
    dir: "ipv4/conf",
    key: "forwarding",
};
pub const SEND_REDIRECTS: IfSysctl = IfSysctl {
    dir: "ipv4/conf",
    key: "send_redirects",
};
pub const PROXY_DELAY_V4: IfSysctl = IfSysctl {
    dir: "ipv4/neigh",
    key: "proxy_delay",
};
pub const PROXY_DELAY_V6: IfSysctl = IfSysctl {
    dir: "ipv6/neigh",
    key: "proxy_delay",
};
pub const ACCEPT_RA: IfSysctl = IfSysctl {
    dir: "ipv6/conf",
    key: "accept_ra",
};
pub const FORCE_FORWARDING_V6: IfSysctl = IfSysctl {
    dir: "ipv6/conf",
    key: "force_forwarding",
};
pub const PROXY_NDP: IfSysctl = IfSysctl {
    dir: "ipv6/conf",
    key: "proxy_ndp",
};
/// The kernel answers a proxied neighbour solicitation only on an interface
/// with IPv6 `forwarding=1` (`force_forwarding` is not enough, kernel 6.18).
pub const FORWARDING_V6: IfSysctl = IfSysctl {
    dir: "ipv6/conf",
    key: "forwarding",
};
/// 1 = no automatic link-local: the tap's only link-local is fe80::1.
pub const ADDR_GEN_MODE: IfSysctl = IfSysctl {
    dir: "ipv6/conf",
    key: "addr_gen_mode",
};

/// Every per-interface sysctl l3hv may set on a VM interface (restored to
/// the kernel's `default` value when an adopted interface is released).
pub const VM_SYSCTLS: &[IfSysctl] = &[
    PROXY_ARP,
    RP_FILTER,
    FORWARDING_V4,
    SEND_REDIRECTS,
    PROXY_DELAY_V4,
    PROXY_DELAY_V6,
    ACCEPT_RA,
    FORCE_FORWARDING_V6,
    PROXY_NDP,
    FORWARDING_V6,
    ADDR_GEN_MODE,
];

fn default_v4() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"))
}
fn default_v6() -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 0).expect("/0 is valid"))
}
fn host(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

fn default_route(kind: DefaultRoute) -> Option<RouteAttrs> {
    let kind = match kind {
        DefaultRoute::Blackhole => RouteKind::Blackhole,
        DefaultRoute::Unreachable => RouteKind::Unreachable,
        DefaultRoute::None => return None,
    };
    Some(RouteAttrs {
        kind,
        oif: None,
        gateway: None,
        onlink: false,
        pref_src: None,
        multipath: Vec::new(),
        nh_id: None,
    })
}

/// Computes the kernel state for `intent` and the learned routes of `rib`
/// under `config`, learned ECMP routes as RTA_MULTIPATH.
pub fn desired(config: &Config, intent: &Intent, rib: &Rib) -> DesiredKernel {
    desired_with(config, intent, rib, Nexthops::Multipath)
}

/// How learned routes say where they go.
#[derive(Debug, Clone, Copy)]
pub enum Nexthops<'a> {
    /// Each route carries its next hops (RTA_MULTIPATH).
    Multipath,
    /// Routes point at nexthop objects and groups ([`super::groups`]);
    /// with the groups the kernel holds now (a key with one keeps it).
    Objects(&'a BTreeMap<u32, BTreeSet<u32>>),
}

/// As [`desired`], learned routes as `nexthops` says.
pub fn desired_with(
    config: &Config,
    intent: &Intent,
    rib: &Rib,
    nexthops: Nexthops,
) -> DesiredKernel {
    let mut d = desired_host(config, intent, rib);
    add_learned(config, rib, &mut d, nexthops);
    d
}

/// Everything [`desired_with`] computes but the learned routes and their
/// nexthop objects and groups: what an intent change recomputes when the
/// learned routes are planned from the prefixes it makes local or gives
/// back (`super::scoped`). O(VMs + learned addresses in shared /64s).
pub fn desired_host(config: &Config, intent: &Intent, rib: &Rib) -> DesiredKernel {
    let mut d = DesiredKernel::default();
    let k = &config.kernel;

    // Host-wide sysctls (DESIGN.md: as the seed does).
    let hs = &mut d.host_sysctls;
    hs.insert("net/ipv4/icmp_errors_use_inbound_ifaddr".into(), "1".into());
    hs.insert("net/ipv4/conf/all/arp_announce".into(), "2".into());
    // rp_filter is max(all, if): uplinks need 0, taps set 1 themselves.
    hs.insert("net/ipv4/conf/all/rp_filter".into(), "0".into());
    // send_redirects is all OR if.
    hs.insert("net/ipv4/conf/all/send_redirects".into(), "0".into());
    if k.ipv6_forwarding == Ipv6Forwarding::Global {
        hs.insert("net/ipv6/conf/all/forwarding".into(), "1".into());
    }
    if let Some(m) = k.nexthop_compat_mode {
        hs.insert("net/ipv4/nexthop_compat_mode".into(), m.to_string());
    }

    // Uplinks.
    for u in config.uplinks() {
        let fabric = &config.fabrics[u.fabric];
        let mut s = BTreeMap::new();
        s.insert(FORWARDING_V4, "1".into());
        s.insert(RP_FILTER, "0".into());
        s.insert(SEND_REDIRECTS, "0".into());
        if k.ipv6_forwarding == Ipv6Forwarding::PerInterface {
            s.insert(FORCE_FORWARDING_V6, "1".into());
        }
        if fabric.ipv6_mode == Ipv6Mode::SharedDhcpv6 {
            s.insert(PROXY_NDP, "1".into());
        }
        d.uplinks.insert(
            u.config.interface.clone(),
            DesiredUplink {
                addresses: u.config.addresses.iter().copied().collect(),
                sysctls: s,
            },
        );
    }

    // Bottom of every table.
    let mut tables: Vec<(u32, DefaultRoute)> = config
        .fabrics
        .values()
        .map(|f| (f.table, f.default_route))
        .collect();
    tables.push((k.local_out_table, k.local_out_default));
    for (table, kind) in tables {
        if let Some(attrs) = default_route(kind) {
            for dst in [default_v4(), default_v6()] {
                d.routes.insert(
                    RouteId {
                        table,
                        dst,
                        metric: u32::MAX,
                    },
                    std::sync::Arc::new(attrs.clone()),
                );
            }
        }
    }

    // Shared-subnet fabrics: proxy ARP for the whole subnet (see
    // `FabricConfig::arp_whole_subnet`). The kernel answers ARP by proxy
    // only for a target with a unicast route out another device, so each
    // subnet gets one route under every real one, out of l3hv's sink (a tun
    // nobody opens, which drops what it is given). Not `lo`: a packet
    // routed out of `lo` keeps its route and loops until its TTL runs out.
    let mut sink_used = false;
    for f in config.fabrics.values() {
        if f.ipv4_mode != Ipv4Mode::SharedSubnet || !f.arp_whole_subnet {
            continue;
        }
        for net in f.subnets.iter().filter(|n| n.addr().is_ipv4()) {
            sink_used = true;
            d.routes.insert(
                RouteId {
                    table: f.table,
                    dst: net.trunc(),
                    metric: u32::MAX,
                },
                std::sync::Arc::new(RouteAttrs {
                    kind: RouteKind::Unicast,
                    oif: Some(k.sink_interface.clone()),
                    gateway: None,
                    onlink: false,
                    pref_src: None,
                    multipath: Vec::new(),
                    nh_id: None,
                }),
            );
        }
    }
    if sink_used {
        d.links.insert(
            k.sink_interface.clone(),
            DesiredLink {
                name: k.sink_interface.clone(),
                vm: String::new(),
                ownership: Ownership::Sink,
                addresses: BTreeSet::new(),
                sysctls: BTreeMap::new(),
            },
        );
    }

    // Rules: a constant number whatever the VM count.
    for (v6, p) in [(false, k.rules_v4), (true, k.rules_v6)] {
        let rule = |priority, iif: Option<&str>, src, table, suppress| RuleSpec {
            v6,
            priority,
            iif: iif.map(str::to_string),
            src,
            table,
            suppress_prefixlength: suppress,
        };
        d.rules.insert(rule(p.main, Some("lo"), None, 254, Some(0)));
        d.rules
            .insert(rule(p.local_out, Some("lo"), None, k.local_out_table, None));
        let private_uplinks = config.uplinks().into_iter().filter(|u| !u.catch_all);
        for (i, u) in private_uplinks.enumerate() {
            d.rules.insert(rule(
                p.uplink + i as u32,
                Some(&u.config.interface),
                None,
                u.table,
                None,
            ));
        }
        let private_subnets = config
            .fabrics
            .values()
            .filter(|f| !f.catch_all)
            .flat_map(|f| f.subnets.iter().map(move |n| (f.table, *n)))
            .filter(|(_, n)| n.addr().is_ipv6() == v6);
        for (i, (table, net)) in private_subnets.enumerate() {
            d.rules
                .insert(rule(p.fabric + i as u32, None, Some(net), table, None));
        }
        if let Some(f) = config.fabrics.values().find(|f| f.catch_all) {
            d.rules.insert(rule(p.catch_all, None, None, f.table, None));
        }
        if k.remove_default_rules {
            d.absent_rules.insert((v6, 32766));
            d.absent_rules.insert((v6, 32767));
        }
    }

    // VM interfaces.
    for (vm, i) in intent.interfaces() {
        let Some(fabric) = config.fabric(&i.fabric) else {
            // Validation refuses such intent; a config reload may still
            // remove a fabric under a VM. Its routes simply go.
            d.conflicts.push(format!(
                "vm {vm}: interface {}: fabric `{}` is not configured",
                i.name, i.fabric
            ));
            continue;
        };
        let ownership = match i.link {
            LinkMode::Tap => Ownership::Created { multi_queue: false },
            LinkMode::TapMultiQueue => Ownership::Created { multi_queue: true },
            LinkMode::Adopt => Ownership::Adopted,
        };
        let mut addresses = BTreeSet::new();
        addresses.insert(host(IpAddr::V4(fabric.effective_gateway_v4())));
        // fe80::1/64, not the seed's /128: l3hv's taps have no kernel
        // link-local (addr_gen_mode 1), so the /64 is what gives the kernel
        // its fe80::/64 route on the tap. Without it, unicast DHCPv6 replies
        // and solicited RAs to the guest's link-local fail with ENETUNREACH.
        addresses.insert(IpNet::V6(
            ipnet::Ipv6Net::new(fabric.gateway_v6, 64).expect("64 is a valid IPv6 prefix length"),
        ));
        let mut s = BTreeMap::new();
        s.insert(PROXY_ARP, "1".to_string());
        s.insert(RP_FILTER, "1".into());
        s.insert(FORWARDING_V4, "1".into());
        s.insert(SEND_REDIRECTS, "0".into());
        s.insert(PROXY_DELAY_V4, "0".into());
        s.insert(PROXY_DELAY_V6, "0".into());
        s.insert(ACCEPT_RA, "0".into());
        if k.ipv6_forwarding == Ipv6Forwarding::PerInterface {
            s.insert(FORCE_FORWARDING_V6, "1".into());
        }
        if fabric.ipv6_mode == Ipv6Mode::SharedDhcpv6 {
            s.insert(PROXY_NDP, "1".into());
            s.insert(FORWARDING_V6, "1".into());
        }
        if matches!(ownership, Ownership::Created { .. }) {
            s.insert(ADDR_GEN_MODE, "1".into());
        }
        d.links.insert(
            i.name.clone(),
            DesiredLink {
                name: i.name.clone(),
                vm: vm.to_string(),
                ownership,
                addresses,
                sysctls: s,
            },
        );

        let add = |d: &mut DesiredKernel, table, dst: IpNet, attrs: RouteAttrs| {
            let id = RouteId {
                table,
                dst,
                metric: k.vm_route_metric,
            };
            if let Some(existing) = d.routes.get(&id) {
                if **existing != attrs {
                    d.conflicts.push(format!(
                        "vm {vm}: {dst} in table {table} is already routed via {}",
                        existing.oif.as_deref().unwrap_or("?")
                    ));
                }
                return;
            }
            d.routes.insert(id, std::sync::Arc::new(attrs));
        };
        let pref_src = |dst: &IpNet| match dst {
            IpNet::V4(_) => config.hypervisor.private_source_v4.map(IpAddr::V4),
            IpNet::V6(_) => config.hypervisor.private_source_v6.map(IpAddr::V6),
        };
        let direct = |gateway: Option<IpAddr>, pref_src: Option<IpAddr>| RouteAttrs {
            kind: RouteKind::Unicast,
            oif: Some(i.name.clone()),
            gateway,
            onlink: gateway.is_some(),
            pref_src,
            multipath: Vec::new(),
            nh_id: None,
        };
        for dst in i.host_prefixes() {
            add(&mut d, fabric.table, dst, direct(None, None));
            add(&mut d, k.local_out_table, dst, direct(None, pref_src(&dst)));
        }
        for r in &i.routed {
            let dst = r.prefix.trunc();
            add(&mut d, fabric.table, dst, direct(Some(r.via), None));
            add(
                &mut d,
                k.local_out_table,
                dst,
                direct(Some(r.via), pref_src(&dst)),
            );
        }
    }
    // What learned routes must not shadow: routes out of a VM link or the
    // sink (kept for the scoped passes of `super::scoped`).
    d.local = d
        .routes
        .iter()
        .filter(|(_, a)| a.oif.as_ref().is_some_and(|o| d.links.contains_key(o)))
        .map(|(id, _)| (id.table, id.dst))
        .collect();
    d.host_routes = d.routes.keys().copied().collect();
    proxies(config, intent, rib, &mut d);
    d
}

/// IPv6 neighbour proxy (instead of ndppd), for fabrics whose VMs share a
/// /64 (`shared-dhcpv6`): every VM link of the fabric answers NDP for the
/// addresses of that /64 that are routed elsewhere, the other local VMs'
/// and the learned host routes, so a VM reaches them as if on-link.
fn proxies(config: &Config, intent: &Intent, rib: &Rib, d: &mut DesiredKernel) {
    for (name, fabric) in &config.fabrics {
        if fabric.ipv6_mode != Ipv6Mode::SharedDhcpv6 || !fabric.nd_proxy_entries {
            continue;
        }
        let shared: Vec<ipnet::Ipv6Net> = fabric
            .subnets
            .iter()
            .filter_map(|n| match n {
                IpNet::V6(n) => Some(*n),
                IpNet::V4(_) => None,
            })
            .collect();
        let in_shared = |a: &Ipv6Addr| shared.iter().any(|n| n.contains(a));
        let links: Vec<(&str, Vec<Ipv6Addr>)> = intent
            .interfaces()
            .filter(|(_, i)| i.fabric == *name)
            .map(|(_, i)| {
                (
                    i.name.as_str(),
                    i.ipv6.iter().copied().filter(|a| in_shared(a)).collect(),
                )
            })
            .collect();
        // The learned host routes inside the shared /64s alone (a range of
        // the RIB, not all of it).
        let learned: Vec<Ipv6Addr> = shared
            .iter()
            .flat_map(|n| rib.prefixes_within(name, IpNet::V6(*n)))
            .filter_map(|p| match p {
                IpNet::V6(n) if n.prefix_len() == 128 => Some(n.addr()),
                _ => None,
            })
            .collect();
        // Which links have each address of the /64.
        let mut holders: BTreeMap<Ipv6Addr, Vec<&str>> = BTreeMap::new();
        for (link, addrs) in &links {
            for a in addrs {
                holders.entry(*a).or_default().push(link);
            }
        }
        let learned: BTreeSet<Ipv6Addr> = learned.into_iter().collect();
        for a in holders.keys().chain(learned.iter()) {
            let on = holders.get(a).map_or(&[][..], Vec::as_slice);
            for (link, _) in &links {
                if proxied_on(link, on, learned.contains(a)) {
                    d.proxies.insert((link.to_string(), *a));
                }
            }
        }
    }
}

/// Does `link`, a VM link of a shared-/64 fabric, answer NDP by proxy for
/// an address of the /64 that the links `holders` have and that is
/// `learned` (routed to another hypervisor) or not? Yes when another local
/// link has it, or when it is learned and not `link`'s own.
pub(super) fn proxied_on(link: &str, holders: &[&str], learned: bool) -> bool {
    holders.iter().any(|h| *h != link) || (learned && !holders.contains(&link))
}

/// Adds the learned routes (with their objects and groups) to what
/// [`desired_host`] computed: [`desired_with`] in two steps, for a pass
/// that needs the host part before it has the kernel's groups.
///
/// Learned routes: ECMP over every selected next hop, in the fabric's
/// table; private (non-catch-all) fabrics also in local-out. A prefix with
/// a local VM route in that table is never shadowed: local wins. With
/// nexthop objects every learned route points at the group of its
/// originators (even a single-member one: gaining a second path is then a
/// group replace, not a route rewrite), or straight at the one object of
/// a small key the kernel has no group for (`groups`, "Direct keys").
pub fn add_learned(config: &Config, rib: &Rib, d: &mut DesiredKernel, nexthops: Nexthops) {
    let (nexthop_objects, in_kernel) = match nexthops {
        Nexthops::Multipath => (false, None),
        Nexthops::Objects(g) => (true, Some(g)),
    };
    let k = &config.kernel;
    // Collected, then added as one sorted batch: a B-tree filled by
    // ascending inserts keeps its nodes half full (232 bytes per route at
    // 1,000,000 instead of 126, benches/memory.rs). Later entries win, as
    // inserts would; what is local is decided from `d` before any of them.
    let mut routes: Vec<(RouteId, SharedAttrs)> = Vec::new();
    // One shared copy per distinct attributes (per group and table).
    let mut shared = AttrsInterner::default();
    for (name, fabric) in &config.fabrics {
        let selected = rib.selected_with_origins(name);
        let group_ids = if let Some(in_kernel) = in_kernel {
            let returning = rib.syncing_hops(name, std::time::Instant::now());
            super::groups::build(name, &selected, &returning, in_kernel, d)
        } else {
            Vec::new()
        };
        for (n, (dst, sel)) in selected.iter().enumerate() {
            let dst = *dst;
            let template = if nexthop_objects {
                let Some(id) = group_ids[n] else { continue };
                RouteAttrs {
                    kind: RouteKind::Unicast,
                    oif: None,
                    gateway: None,
                    onlink: false,
                    pref_src: None,
                    multipath: Vec::new(),
                    nh_id: Some(id),
                }
            } else {
                let mut members: Vec<NextHopSpec> = sel
                    .hops
                    .iter()
                    .filter(|h| h.gateway.is_ipv4() == dst.addr().is_ipv4())
                    .map(|h| NextHopSpec {
                        gateway: h.gateway,
                        oif: h.uplink.to_string(),
                        onlink: true,
                    })
                    .collect();
                match members.len() {
                    0 => continue,
                    1 => {
                        let one = members.remove(0);
                        RouteAttrs {
                            kind: RouteKind::Unicast,
                            oif: Some(one.oif),
                            gateway: Some(one.gateway),
                            onlink: true,
                            pref_src: None,
                            multipath: Vec::new(),
                            nh_id: None,
                        }
                    }
                    _ => RouteAttrs {
                        kind: RouteKind::Unicast,
                        oif: None,
                        gateway: None,
                        onlink: false,
                        pref_src: None,
                        multipath: members,
                        nh_id: None,
                    },
                }
            };
            // No allocation per prefix: at most the fabric's table and
            // local-out.
            let mut tables = [(fabric.table, None), (0, None)];
            let mut n_tables = 1;
            if !fabric.catch_all {
                let src = match dst {
                    IpNet::V4(_) => config.hypervisor.private_source_v4.map(IpAddr::V4),
                    IpNet::V6(_) => config.hypervisor.private_source_v6.map(IpAddr::V6),
                };
                tables[1] = (k.local_out_table, src);
                n_tables = 2;
            }
            for &(table, src) in &tables[..n_tables] {
                if d.local.contains(&(table, dst)) {
                    continue;
                }
                let mut attrs = template.clone();
                attrs.pref_src = src;
                routes.push((
                    RouteId {
                        table,
                        dst,
                        metric: k.learned_route_metric,
                    },
                    shared.share(attrs),
                ));
            }
        }
    }
    let mut routes: BTreeMap<RouteId, SharedAttrs> = routes.into_iter().collect();
    d.routes.append(&mut routes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::intent::{InterfaceIntent, RoutedAddr, VmIntent};

    fn cfg() -> Config {
        config::parse("t", include_str!("../../packaging/l3hv.toml")).unwrap()
    }

    fn intent() -> Intent {
        let mut i = Intent::default();
        i.vms.insert(
            "vm1".into(),
            VmIntent {
                name: "vm1".into(),
                interfaces: vec![InterfaceIntent {
                    name: "tap1".into(),
                    mac: "52:54:00:00:00:01".parse().unwrap(),
                    fabric: "public".into(),
                    link: LinkMode::Tap,
                    ipv4: vec!["203.0.113.1".parse().unwrap()],
                    ipv6: vec!["2001:db8:cb00:7100::1".parse().unwrap()],
                    ipv6_prefixes: vec![],
                    routed: vec![RoutedAddr {
                        prefix: "203.0.113.10/32".parse().unwrap(),
                        via: "203.0.113.1".parse().unwrap(),
                    }],
                }],
            },
        );
        i
    }

    #[test]
    fn empty_intent_has_rules_and_defaults_only() {
        let d = desired(&cfg(), &Intent::default(), &Rib::default());
        assert_eq!(d.links.keys().collect::<Vec<_>>(), ["l3hv-sink"]);
        // 3 tables (90, 20, 100) × 2 families, then the whole-subnet proxy
        // ARP routes of the two shared IPv4 subnets (to l3hv's sink).
        assert_eq!(d.routes.len(), 6 + 2);
        let (bottom, sinks): (Vec<_>, Vec<_>) = d
            .routes
            .iter()
            .partition(|(id, _)| id.dst.prefix_len() == 0);
        assert!(bottom.iter().all(|(_, a)| a.kind == RouteKind::Blackhole));
        assert!(
            sinks
                .iter()
                .all(|(_, a)| a.oif.as_deref() == Some("l3hv-sink"))
        );
        // v4: main, local-out, 2 private uplinks, 1 private subnet, catch-all.
        assert_eq!(d.rules.iter().filter(|r| !r.v6).count(), 6);
        // v6: no private v6 subnet.
        assert_eq!(d.rules.iter().filter(|r| r.v6).count(), 5);
        let main = d.rules.iter().find(|r| !r.v6 && r.priority == 21).unwrap();
        assert_eq!(main.table, 254);
        assert_eq!(main.suppress_prefixlength, Some(0));
        let private = d.rules.iter().find(|r| !r.v6 && r.priority == 40).unwrap();
        assert_eq!(private.src, Some("172.22.2.0/24".parse().unwrap()));
        assert_eq!(private.table, 20);
        let uplinks: Vec<_> = d
            .rules
            .iter()
            .filter(|r| !r.v6 && r.iif.as_deref().is_some_and(|i| i != "lo"))
            .collect();
        assert_eq!(uplinks.len(), 2);
        assert!(uplinks.iter().all(|r| r.table == 20));
    }

    #[test]
    fn shared_ipv4_subnets_get_a_route_to_the_sink() {
        let d = desired(&cfg(), &intent(), &Rib::default());
        let id = |table, dst: &str| RouteId {
            table,
            dst: dst.parse().unwrap(),
            metric: u32::MAX,
        };
        for (table, dst) in [(90, "203.0.113.0/24"), (20, "172.22.2.0/24")] {
            let sink = &d.routes[&id(table, dst)];
            assert_eq!(sink.kind, RouteKind::Unicast);
            assert_eq!(sink.oif.as_deref(), Some("l3hv-sink"));
            assert_eq!(sink.gateway, None);
        }
        assert_eq!(d.links["l3hv-sink"].ownership, Ownership::Sink);
        assert_eq!(d.links["l3hv-sink"].alias(), "l3hv:sink");
        assert!(d.links["l3hv-sink"].addresses.is_empty());
        // Not in local-out (the hypervisor's own traffic), not for IPv6.
        assert!(
            !d.routes
                .keys()
                .any(|r| r.table == 100 && r.metric == u32::MAX && r.dst.prefix_len() > 0)
        );
        assert!(!d.routes.contains_key(&id(90, "2001:db8:cb00:7100::/64")));
        // Neither sink nor routes for point-to-point fabrics or when off.
        let mut c = cfg();
        c.fabrics.get_mut("public").unwrap().arp_whole_subnet = false;
        c.fabrics.get_mut("private").unwrap().ipv4_mode = crate::config::Ipv4Mode::PointToPoint;
        let d = desired(&c, &intent(), &Rib::default());
        assert!(!d.links.contains_key("l3hv-sink"));
        assert!(
            d.routes
                .values()
                .all(|a| a.oif.as_deref() != Some("l3hv-sink"))
        );
    }

    #[test]
    fn proxy_entries_per_other_interface_unless_turned_off() {
        let mut i = intent();
        let mut second = i.vms["vm1"].clone();
        second.name = "vm2".into();
        second.interfaces[0].name = "tap2".into();
        second.interfaces[0].ipv4 = vec!["203.0.113.2".parse().unwrap()];
        second.interfaces[0].ipv6 = vec!["2001:db8:cb00:7100::2".parse().unwrap()];
        second.interfaces[0].routed.clear();
        i.vms.insert("vm2".into(), second);
        let d = desired(&cfg(), &i, &Rib::default());
        let want: BTreeSet<(String, Ipv6Addr)> = [
            ("tap1".to_string(), "2001:db8:cb00:7100::2".parse().unwrap()),
            ("tap2".to_string(), "2001:db8:cb00:7100::1".parse().unwrap()),
        ]
        .into();
        assert_eq!(d.proxies, want);
        let mut c = cfg();
        c.fabrics.get_mut("public").unwrap().nd_proxy_entries = false;
        let d = desired(&c, &i, &Rib::default());
        assert!(d.proxies.is_empty());
        // The interfaces keep proxy_ndp: a kernel entry added by hand works.
        assert_eq!(d.links["tap1"].sysctls[&PROXY_NDP], "1");
    }

    #[test]
    fn nexthop_compat_mode_is_written_only_when_configured() {
        let key = "net/ipv4/nexthop_compat_mode";
        let d = desired(&cfg(), &Intent::default(), &Rib::default());
        assert!(!d.host_sysctls.contains_key(key));
        let mut c = cfg();
        c.kernel.nexthop_compat_mode = Some(0);
        let d = desired(&c, &Intent::default(), &Rib::default());
        assert_eq!(d.host_sysctls[key], "0");
    }

    #[test]
    fn vm_interface_state() {
        let d = desired(&cfg(), &intent(), &Rib::default());
        let l = &d.links["tap1"];
        assert_eq!(l.alias(), "l3hv:tap:vm1");
        assert!(l.addresses.contains(&"203.0.113.254/32".parse().unwrap()));
        assert!(l.addresses.contains(&"fe80::1/64".parse().unwrap()));
        assert_eq!(l.sysctls[&PROXY_ARP], "1");
        assert_eq!(l.sysctls[&PROXY_NDP], "1"); // public is shared-dhcpv6
        let vm_routes: Vec<_> = d
            .routes
            .iter()
            .filter(|(_, a)| a.oif.as_deref() == Some("tap1"))
            .collect();
        // (v4, v6, routed) × (public, local-out)
        assert_eq!(vm_routes.len(), 6);
        let anycast = d
            .routes
            .get(&RouteId {
                table: 90,
                dst: "203.0.113.10/32".parse().unwrap(),
                metric: 16,
            })
            .unwrap();
        assert_eq!(anycast.gateway, Some("203.0.113.1".parse().unwrap()));
        assert!(anycast.onlink);
    }

    #[test]
    fn conflicting_routes_are_reported_not_overwritten() {
        let mut i = intent();
        let mut vm2 = i.vms["vm1"].clone();
        vm2.name = "vm2".into();
        vm2.interfaces[0].name = "tap2".into();
        vm2.interfaces[0].ipv4 = vec!["203.0.113.2".parse().unwrap()];
        vm2.interfaces[0].ipv6 = vec![];
        vm2.interfaces[0].routed[0].via = "203.0.113.2".parse().unwrap();
        i.vms.insert("vm2".into(), vm2);
        let d = desired(&cfg(), &i, &Rib::default());
        assert_eq!(d.conflicts.len(), 2, "{:?}", d.conflicts);
        let anycast = &d.routes[&RouteId {
            table: 90,
            dst: "203.0.113.10/32".parse().unwrap(),
            metric: 16,
        }];
        assert_eq!(anycast.oif.as_deref(), Some("tap1"));
    }
}
