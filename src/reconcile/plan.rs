//! PURE: desired vs observed kernel state → [`Plan`].
//!
//! Level-based and idempotent: only differences become operations, so a
//! plan against a kernel that is already right is empty (a restarted agent
//! causes no flap). Only objects carrying l3hv's tag are ever deleted:
//! routes and rules with its protocol, addresses with its protocol on its
//! own links, links whose alias says l3hv created them.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;

use super::desired::VM_SYSCTLS;
use super::model::*;

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KernelOp {
    CreateTap {
        name: String,
        multi_queue: bool,
    },
    /// The packet sink under the whole-subnet proxy ARP routes.
    CreateSink {
        name: String,
    },
    SetAlias {
        name: String,
        alias: String,
    },
    SetUp {
        name: String,
    },
    Sysctl {
        path: SysctlPath,
        value: String,
    },
    /// `gateway`: a VM-facing gateway address (scope link, nodad).
    AddAddress {
        ifname: String,
        addr: IpNet,
        gateway: bool,
    },
    DelAddress {
        ifname: String,
        addr: IpNet,
    },
    AddRoute {
        id: RouteId,
        attrs: SharedAttrs,
        replace: bool,
    },
    DelRoute {
        id: RouteId,
        attrs: SharedAttrs,
    },
    AddRule {
        rule: RuleSpec,
    },
    DelRule {
        rule: RuleSpec,
    },
    /// Delete a rule that is not l3hv's (the kernel's main/default rules).
    DelForeignRule {
        v6: bool,
        priority: u32,
    },
    AddProxy {
        ifname: String,
        addr: std::net::Ipv6Addr,
    },
    DelProxy {
        ifname: String,
        addr: std::net::Ipv6Addr,
    },
    DeleteLink {
        name: String,
    },
    /// A nexthop object (`ip nexthop add id ID via GW dev OIF onlink`).
    AddNexthop {
        id: u32,
        spec: NextHopSpec,
        replace: bool,
    },
    /// A nexthop group; `replace` changes its members in place (the routes
    /// pointing at it are not touched).
    AddGroup {
        id: u32,
        members: Vec<u32>,
        replace: bool,
    },
    /// Deletes an object or a group (by id).
    DelNexthop {
        id: u32,
        group: bool,
    },
}

/// Operations grouped in the order they must be applied. Within a group
/// the operations are independent and may run concurrently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Taps to create, before anything can refer to them.
    pub create_links: Vec<KernelOp>,
    /// Alias and sysctls (addr_gen_mode must precede `up`).
    pub configure_links: Vec<KernelOp>,
    pub set_up: Vec<KernelOp>,
    /// Stale routes, rules and addresses.
    pub remove: Vec<KernelOp>,
    /// Addresses, then nexthop objects, groups (members first), then
    /// routes and rules.
    pub add_addresses: Vec<KernelOp>,
    pub add_nexthops: Vec<KernelOp>,
    pub add_groups: Vec<KernelOp>,
    pub add_routes: Vec<KernelOp>,
    /// Groups no route points at any more, then objects no group holds: a
    /// group is deleted only after its routes moved (the kernel would
    /// flush them), an object only after its groups were replaced.
    pub remove_groups: Vec<KernelOp>,
    pub remove_nexthops: Vec<KernelOp>,
    /// Links l3hv created and no longer intends; last.
    pub delete_links: Vec<KernelOp>,
}

impl Plan {
    /// Appends `other`'s operations, phase by phase.
    pub fn extend(&mut self, other: Plan) {
        let Plan {
            create_links,
            configure_links,
            set_up,
            remove,
            add_addresses,
            add_nexthops,
            add_groups,
            add_routes,
            remove_groups,
            remove_nexthops,
            delete_links,
        } = other;
        self.create_links.extend(create_links);
        self.configure_links.extend(configure_links);
        self.set_up.extend(set_up);
        self.remove.extend(remove);
        self.add_addresses.extend(add_addresses);
        self.add_nexthops.extend(add_nexthops);
        self.add_groups.extend(add_groups);
        self.add_routes.extend(add_routes);
        self.remove_groups.extend(remove_groups);
        self.remove_nexthops.extend(remove_nexthops);
        self.delete_links.extend(delete_links);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.phases().iter().map(|p| p.len()).sum()
    }

    pub fn phases(&self) -> [&Vec<KernelOp>; 11] {
        [
            &self.create_links,
            &self.configure_links,
            &self.set_up,
            &self.remove,
            &self.add_addresses,
            &self.add_nexthops,
            &self.add_groups,
            &self.add_routes,
            &self.remove_groups,
            &self.remove_nexthops,
            &self.delete_links,
        ]
    }
}

impl ObservedKernel {
    /// Applies one operation that went through to the routes, nexthop
    /// objects, groups and proxy entries (what passes keep mirrored
    /// instead of dumping); false for an operation on links, addresses,
    /// rules or sysctls, which the caller mirrors itself.
    pub fn mirror(&mut self, op: &KernelOp) -> bool {
        match op {
            KernelOp::AddRoute { id, attrs, .. } => {
                self.routes.insert(*id, attrs.clone());
            }
            KernelOp::DelRoute { id, .. } => {
                self.routes.remove(id);
            }
            KernelOp::AddProxy { ifname, addr } => {
                self.proxies.insert((ifname.clone(), *addr));
            }
            KernelOp::DelProxy { ifname, addr } => {
                self.proxies.remove(&(ifname.clone(), *addr));
            }
            KernelOp::AddNexthop { id, spec, .. } => {
                self.nexthops.insert(*id, spec.clone());
            }
            KernelOp::AddGroup { id, members, .. } => {
                self.groups.insert(*id, members.iter().copied().collect());
            }
            KernelOp::DelNexthop { id, group: true } => {
                self.groups.remove(id);
            }
            KernelOp::DelNexthop { id, group: false } => {
                self.nexthops.remove(id);
            }
            _ => return false,
        }
        true
    }
}

/// The objects and groups to add, replace and delete for the kernel to
/// hold exactly `nexthops` and `groups` of l3hv's.
pub(super) fn nexthop_ops(
    nexthops: &BTreeMap<u32, NextHopSpec>,
    groups: &BTreeMap<u32, BTreeSet<u32>>,
    observed: &ObservedKernel,
    p: &mut Plan,
) {
    for (id, spec) in nexthops {
        match observed.nexthops.get(id) {
            Some(o) if o == spec => {}
            o => p.add_nexthops.push(KernelOp::AddNexthop {
                id: *id,
                spec: spec.clone(),
                replace: o.is_some(),
            }),
        }
    }
    for (id, members) in groups {
        match observed.groups.get(id) {
            Some(o) if o == members => {}
            o => p.add_groups.push(KernelOp::AddGroup {
                id: *id,
                members: members.iter().copied().collect(),
                replace: o.is_some(),
            }),
        }
    }
    for id in observed.groups.keys() {
        if !groups.contains_key(id) {
            p.remove_groups.push(KernelOp::DelNexthop {
                id: *id,
                group: true,
            });
        }
    }
    for id in observed.nexthops.keys() {
        if !nexthops.contains_key(id) {
            p.remove_nexthops.push(KernelOp::DelNexthop {
                id: *id,
                group: false,
            });
        }
    }
}

/// Should `desired` be written given what was read?
fn needs_write(observed: &ObservedKernel, path: &str, desired: &str) -> bool {
    match observed.sysctls.get(path) {
        Some(Some(v)) => v.trim() != desired,
        Some(None) => true,
        None => false,
    }
}

/// Computes the operations that turn `observed` into `desired`.
pub fn plan(desired: &DesiredKernel, observed: &ObservedKernel) -> Plan {
    plan_with(desired, observed, None)
}

/// As [`plan`] for a `desired` from [`super::desired_host`]: learned
/// routes, nexthop objects and groups are left as they are (planned by
/// [`super::scoped`]), and the routes to delete are looked for among
/// `previous` (the last pass's [`DesiredKernel::host_routes`]: the
/// kernel's routes of l3hv besides the learned ones, when it is mirrored)
/// instead of among every route of the kernel.
pub fn plan_host(
    desired: &DesiredKernel,
    observed: &ObservedKernel,
    previous: &BTreeSet<RouteId>,
) -> Plan {
    plan_with(desired, observed, Some(previous))
}

fn plan_with(
    desired: &DesiredKernel,
    observed: &ObservedKernel,
    previous: Option<&BTreeSet<RouteId>>,
) -> Plan {
    let mut p = Plan::default();

    // Host sysctls.
    for (path, value) in &desired.host_sysctls {
        if needs_write(observed, path, value) {
            p.configure_links.push(KernelOp::Sysctl {
                path: path.clone(),
                value: value.clone(),
            });
        }
    }

    // Uplinks: sysctls and missing addresses; never removed. An uplink
    // that does not exist (yet) is reported in status, not written to.
    for (name, u) in &desired.uplinks {
        if !observed.links.contains_key(name) {
            continue;
        }
        for (s, value) in &u.sysctls {
            let path = s.path(name);
            if needs_write(observed, &path, value) {
                p.configure_links.push(KernelOp::Sysctl {
                    path,
                    value: value.clone(),
                });
            }
        }
        if let Some(o) = observed.links.get(name) {
            for a in u.addresses.difference(&o.addresses) {
                p.add_addresses.push(KernelOp::AddAddress {
                    ifname: name.clone(),
                    addr: *a,
                    gateway: false,
                });
            }
        }
    }

    // VM links.
    for (name, l) in &desired.links {
        let observed_link = observed.links.get(name);
        let created_now = observed_link.is_none();
        match (observed_link, l.ownership) {
            (None, Ownership::Created { multi_queue }) => {
                p.create_links.push(KernelOp::CreateTap {
                    name: name.clone(),
                    multi_queue,
                })
            }
            (None, Ownership::Sink) => p
                .create_links
                .push(KernelOp::CreateSink { name: name.clone() }),
            _ => {}
        }
        if created_now && l.ownership == Ownership::Adopted {
            // Nothing to configure yet: the interface does not exist. The
            // next reconcile (link event or timer) picks it up.
            continue;
        }
        let alias = l.alias();
        if observed_link.and_then(|o| o.alias.as_deref()) != Some(alias.as_str()) {
            p.configure_links.push(KernelOp::SetAlias {
                name: name.clone(),
                alias,
            });
        }
        for (s, value) in &l.sysctls {
            let path = s.path(name);
            if created_now || needs_write(observed, &path, value) {
                p.configure_links.push(KernelOp::Sysctl {
                    path,
                    value: value.clone(),
                });
            }
        }
        if !observed_link.is_some_and(|o| o.up) {
            p.set_up.push(KernelOp::SetUp { name: name.clone() });
        }
        let have: BTreeSet<IpNet> = observed_link
            .map(|o| o.addresses.clone())
            .unwrap_or_default();
        for a in l.addresses.difference(&have) {
            p.add_addresses.push(KernelOp::AddAddress {
                ifname: name.clone(),
                addr: *a,
                gateway: true,
            });
        }
        for a in have.difference(&l.addresses) {
            p.remove.push(KernelOp::DelAddress {
                ifname: name.clone(),
                addr: *a,
            });
        }
    }

    // Links l3hv tagged and no longer intends.
    for (name, o) in &observed.links {
        if desired.links.contains_key(name) || desired.uplinks.contains_key(name) {
            continue;
        }
        match o.ownership() {
            Some(Ownership::Created { .. } | Ownership::Sink) => p
                .delete_links
                .push(KernelOp::DeleteLink { name: name.clone() }),
            Some(Ownership::Adopted) => {
                // Give the interface back as the kernel's defaults would
                // have it.
                for a in &o.addresses {
                    p.remove.push(KernelOp::DelAddress {
                        ifname: name.clone(),
                        addr: *a,
                    });
                }
                for s in VM_SYSCTLS {
                    let default = observed.sysctls.get(&s.default_path()).cloned().flatten();
                    let current = observed.sysctls.get(&s.path(name)).cloned().flatten();
                    if let (Some(default), Some(current)) = (default, current) {
                        if default.trim() != current.trim() {
                            p.configure_links.push(KernelOp::Sysctl {
                                path: s.path(name),
                                value: default.trim().to_string(),
                            });
                        }
                    }
                }
                p.configure_links.push(KernelOp::SetAlias {
                    name: name.clone(),
                    alias: String::new(),
                });
            }
            None => {}
        }
    }

    // Routes. An adopted interface that does not exist yet (libvirt creates
    // a managed tap after the prepare hook) gets its routes when it
    // appears: nothing can point at it before.
    let waiting: BTreeSet<&str> = desired
        .links
        .iter()
        .filter(|(name, l)| {
            l.ownership == Ownership::Adopted && !observed.links.contains_key(*name)
        })
        .map(|(name, _)| name.as_str())
        .collect();
    for (id, attrs) in &desired.routes {
        if attrs.oif.as_deref().is_some_and(|o| waiting.contains(o)) {
            continue;
        }
        match observed.routes.get(id) {
            Some(o) if o == attrs => {}
            Some(_) => p.add_routes.push(KernelOp::AddRoute {
                id: *id,
                attrs: attrs.clone(),
                replace: true,
            }),
            None => p.add_routes.push(KernelOp::AddRoute {
                id: *id,
                attrs: attrs.clone(),
                replace: false,
            }),
        }
    }
    // Also the routes on a link about to be deleted: the agent answers
    // before the (slow, RCU-bound) link deletion, and the routes must be
    // gone by then.
    let stale: Box<dyn Iterator<Item = (&RouteId, &SharedAttrs)>> = match previous {
        None => Box::new(observed.routes.iter()),
        Some(previous) => Box::new(
            previous
                .iter()
                .filter_map(|id| observed.routes.get_key_value(id)),
        ),
    };
    for (id, attrs) in stale {
        if !desired.routes.contains_key(id) {
            p.remove.push(KernelOp::DelRoute {
                id: *id,
                attrs: attrs.clone(),
            });
        }
    }
    for (id, attrs) in &observed.duplicate_routes {
        p.remove.push(KernelOp::DelRoute {
            id: *id,
            attrs: attrs.clone(),
        });
    }

    // Nexthop objects and groups (kernel.nexthop_objects).
    if previous.is_none() {
        nexthop_ops(&desired.nexthops, &desired.groups, observed, &mut p);
    }

    // Rules.
    for r in desired.rules.difference(&observed.rules) {
        p.add_routes.push(KernelOp::AddRule { rule: r.clone() });
    }
    for r in observed.rules.difference(&desired.rules) {
        p.remove.push(KernelOp::DelRule { rule: r.clone() });
    }
    // Neighbour proxy entries.
    for (ifname, addr) in desired.proxies.difference(&observed.proxies) {
        if desired.links.contains_key(ifname) && !waiting.contains(ifname.as_str()) {
            p.add_routes.push(KernelOp::AddProxy {
                ifname: ifname.clone(),
                addr: *addr,
            });
        }
    }
    for (ifname, addr) in observed.proxies.difference(&desired.proxies) {
        let going = p
            .delete_links
            .iter()
            .any(|op| matches!(op, KernelOp::DeleteLink { name } if name == ifname));
        if !going {
            p.remove.push(KernelOp::DelProxy {
                ifname: ifname.clone(),
                addr: *addr,
            });
        }
    }
    for (v6, priority) in &desired.absent_rules {
        if observed.foreign_rules.contains(&(*v6, *priority)) {
            p.remove.push(KernelOp::DelForeignRule {
                v6: *v6,
                priority: *priority,
            });
        }
    }
    p
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{self, Config};
    use crate::intent::{Intent, InterfaceIntent, LinkMode, VmIntent};
    use crate::reconcile::desired::{Nexthops, desired, desired_with};
    use std::collections::BTreeMap;

    fn cfg() -> Config {
        config::parse("t", include_str!("../../packaging/l3hv.toml")).unwrap()
    }

    fn intent(link: LinkMode) -> Intent {
        let mut i = Intent::default();
        i.vms.insert(
            "vm1".into(),
            VmIntent {
                name: "vm1".into(),
                interfaces: vec![InterfaceIntent {
                    name: "tap1".into(),
                    mac: "52:54:00:00:00:01".parse().unwrap(),
                    fabric: "public".into(),
                    link,
                    ipv4: vec!["203.0.113.1".parse().unwrap()],
                    ipv6: vec![],
                    ipv6_prefixes: vec![],
                    routed: vec![],
                }],
            },
        );
        i
    }

    /// The kernel after `d` was applied perfectly, with sysctls trusted.
    pub(crate) fn converged(d: &DesiredKernel) -> ObservedKernel {
        let mut o = ObservedKernel::default();
        for (i, (name, l)) in d.links.iter().enumerate() {
            o.links.insert(
                name.clone(),
                ObservedLink {
                    name: name.clone(),
                    ifindex: 10 + i as u32,
                    up: true,
                    alias: Some(l.alias()),
                    addresses: l.addresses.clone(),
                },
            );
        }
        for (name, u) in &d.uplinks {
            o.links.insert(
                name.clone(),
                ObservedLink {
                    name: name.clone(),
                    ifindex: 2,
                    up: true,
                    alias: None,
                    addresses: u.addresses.clone(),
                },
            );
        }
        o.routes = d.routes.clone();
        o.rules = d.rules.clone();
        o.nexthops = d.nexthops.clone();
        o.groups = d.groups.clone();
        o.proxies = d.proxies.clone();
        o
    }

    #[test]
    fn converged_kernel_needs_nothing() {
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let p = plan(&d, &converged(&d));
        assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn empty_kernel_gets_everything() {
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let p = plan(&d, &ObservedKernel::default());
        assert_eq!(
            p.create_links,
            vec![
                KernelOp::CreateSink {
                    name: "l3hv-sink".into()
                },
                KernelOp::CreateTap {
                    name: "tap1".into(),
                    multi_queue: false
                }
            ]
        );
        assert_eq!(p.set_up.len(), 2);
        // Both gateway addresses; uplinks are absent so get none.
        assert_eq!(p.add_addresses.len(), 2);
        let routes = p
            .add_routes
            .iter()
            .filter(|o| matches!(o, KernelOp::AddRoute { .. }))
            .count();
        assert_eq!(routes, d.routes.len());
        // Sysctls of the new tap are written although nothing was read.
        assert!(p.configure_links.iter().any(
            |o| matches!(o, KernelOp::Sysctl { path, value } if path == "net/ipv4/conf/tap1/proxy_arp" && value == "1")
        ));
    }

    #[test]
    fn the_sink_goes_when_no_fabric_needs_it() {
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let o = converged(&d);
        let mut c = cfg();
        for f in c.fabrics.values_mut() {
            f.arp_whole_subnet = false;
        }
        let p = plan(
            &desired(&c, &intent(LinkMode::Tap), &crate::rib::Rib::default()),
            &o,
        );
        assert_eq!(
            p.delete_links,
            vec![KernelOp::DeleteLink {
                name: "l3hv-sink".into()
            }]
        );
        // Its routes go first (the kernel would flush them anyway).
        assert_eq!(
            p.remove
                .iter()
                .filter(|op| matches!(op, KernelOp::DelRoute { attrs, .. } if attrs.oif.as_deref() == Some("l3hv-sink")))
                .count(),
            2
        );
    }

    #[test]
    fn removed_interface_is_swept_exactly() {
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let o = converged(&d);
        let empty = desired(&cfg(), &Intent::default(), &crate::rib::Rib::default());
        let p = plan(&empty, &o);
        assert_eq!(
            p.delete_links,
            vec![KernelOp::DeleteLink {
                name: "tap1".into()
            }]
        );
        // Routes through the tap are deleted before it; nothing else is
        // touched.
        assert!(!p.remove.is_empty());
        assert!(
            p.remove.iter().all(|op| matches!(op,
                KernelOp::DelRoute { attrs, .. } if attrs.oif.as_deref() == Some("tap1"))),
            "{:#?}",
            p.remove
        );
        assert!(p.add_routes.is_empty());
    }

    #[test]
    fn released_adopted_interface_is_given_back() {
        let d = desired(
            &cfg(),
            &intent(LinkMode::Adopt),
            &crate::rib::Rib::default(),
        );
        let mut o = converged(&d);
        o.sysctls
            .insert("net/ipv4/conf/tap1/proxy_arp".into(), Some("1".into()));
        o.sysctls
            .insert("net/ipv4/conf/default/proxy_arp".into(), Some("0".into()));
        let empty = desired(&cfg(), &Intent::default(), &crate::rib::Rib::default());
        let p = plan(&empty, &o);
        assert!(p.delete_links.is_empty());
        let removed_routes = p
            .remove
            .iter()
            .filter(|o| matches!(o, KernelOp::DelRoute { .. }))
            .count();
        assert_eq!(removed_routes, 2);
        let removed_addrs = p
            .remove
            .iter()
            .filter(|o| matches!(o, KernelOp::DelAddress { .. }))
            .count();
        assert_eq!(removed_addrs, 2);
        assert!(p.configure_links.contains(&KernelOp::Sysctl {
            path: "net/ipv4/conf/tap1/proxy_arp".into(),
            value: "0".into()
        }));
        assert!(p.configure_links.contains(&KernelOp::SetAlias {
            name: "tap1".into(),
            alias: String::new()
        }));
    }

    #[test]
    fn changed_route_is_replaced_not_deleted() {
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let mut o = converged(&d);
        let (id, attrs) = o
            .routes
            .iter_mut()
            .find(|(_, a)| a.oif.is_some())
            .map(|(id, a)| (*id, a))
            .unwrap();
        std::sync::Arc::make_mut(attrs).oif = Some("other".into());
        let p = plan(&d, &o);
        assert_eq!(p.len(), 1);
        assert!(
            matches!(&p.add_routes[0], KernelOp::AddRoute { id: i, replace: true, .. } if *i == id)
        );
    }

    #[test]
    fn foreign_objects_are_never_touched() {
        let d = desired(&cfg(), &Intent::default(), &crate::rib::Rib::default());
        let mut o = converged(&d);
        o.links.insert(
            "eth0".into(),
            ObservedLink {
                name: "eth0".into(),
                ifindex: 3,
                up: false,
                alias: Some("uplink to the world".into()),
                addresses: ["192.0.2.1/24".parse().unwrap()].into(),
            },
        );
        o.foreign_rules.insert((false, 32766));
        assert!(plan(&d, &o).is_empty());
    }

    #[test]
    fn sysctl_drift_is_repaired() {
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let mut o = converged(&d);
        o.sysctls
            .insert("net/ipv4/conf/tap1/rp_filter".into(), Some("0".into()));
        o.sysctls
            .insert("net/ipv4/conf/tap1/proxy_arp".into(), Some("1\n".into()));
        let p = plan(&d, &o);
        assert_eq!(
            p.configure_links,
            vec![KernelOp::Sysctl {
                path: "net/ipv4/conf/tap1/rp_filter".into(),
                value: "1".into()
            }]
        );
    }

    #[test]
    fn host_sysctls_the_last_pass_settled_at_the_wanted_value_are_not_read() {
        use crate::reconcile::sysctls_to_read;
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let o = converged(&d);
        let verified = BTreeMap::from([("tap1".to_string(), o.links["tap1"].ifindex)]);
        let mut all: BTreeMap<SysctlPath, String> = d.host_sysctls.clone();
        for (name, u) in &d.uplinks {
            all.extend(u.sysctls.iter().map(|(s, v)| (s.path(name), v.clone())));
        }
        assert!(all.len() >= 2, "{all:?}");
        // Nothing settled (a full pass): every one is read.
        let r = sysctls_to_read(&d, &o, &verified, Some(&BTreeMap::new()));
        assert_eq!(
            r.read.iter().cloned().collect::<BTreeSet<_>>(),
            all.keys().cloned().collect()
        );
        // All settled at the values wanted: none.
        let r = sysctls_to_read(&d, &o, &verified, Some(&all));
        assert!(r.read.is_empty(), "{r:?}");
        // One settled at another value (the intent wants a new one now),
        // one not settled at all: those two.
        let mut settled = all.clone();
        let (changed, _) = all.iter().next().unwrap();
        settled.insert(changed.clone(), "other".into());
        let (gone, _) = all.iter().last().unwrap();
        settled.remove(gone);
        let r = sysctls_to_read(&d, &o, &verified, Some(&settled));
        assert_eq!(
            r.read.into_iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([changed.clone(), gone.clone()])
        );
    }

    #[test]
    fn sysctls_of_a_link_not_created_yet_are_written_unread() {
        use crate::reconcile::sysctls_to_read;
        let d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let mut o = converged(&d);
        let idx = o.links["tap1"].ifindex;
        let verified = BTreeMap::from([("tap1".to_string(), idx)]);
        let r = sysctls_to_read(&d, &o, &verified, None);
        assert!(r.read.is_empty() && r.absent.is_empty(), "{r:?}");
        // Not verified at this ifindex (recreated under us): read.
        let r = sysctls_to_read(
            &d,
            &o,
            &BTreeMap::from([("tap1".to_string(), idx + 1)]),
            None,
        );
        assert!(r.absent.is_empty());
        assert_eq!(r.read.len(), d.links["tap1"].sysctls.len());
        assert!(r.read.iter().all(|p| p.contains("/tap1/")));
        // Not in the kernel yet: nothing to read, everything to write.
        o.links.remove("tap1");
        let r = sysctls_to_read(&d, &o, &BTreeMap::new(), None);
        assert!(r.read.is_empty(), "{r:?}");
        assert_eq!(r.absent.len(), d.links["tap1"].sysctls.len());
        o.sysctls.clear();
        o.sysctls.extend(r.absent.iter().map(|p| (p.clone(), None)));
        let p = plan(&d, &o);
        for path in &r.absent {
            assert!(
                p.configure_links
                    .iter()
                    .any(|op| matches!(op, KernelOp::Sysctl { path: q, .. } if q == path)),
                "{path} not written: {p:#?}"
            );
        }
    }

    #[test]
    fn proxy_entries_are_planned_once() {
        let mut d = desired(&cfg(), &intent(LinkMode::Tap), &crate::rib::Rib::default());
        let o = converged(&d);
        d.proxies
            .insert(("tap1".into(), "2001:db8:cb00:7100::9".parse().unwrap()));
        let p = plan(&d, &o);
        assert_eq!(p.len(), 1, "{p:#?}");
        let mut o2 = converged(&d);
        o2.proxies
            .insert(("tap1".into(), "2001:db8:cb00:7100::8".parse().unwrap()));
        let p = plan(&d, &o2);
        let dels = p
            .remove
            .iter()
            .filter(|op| matches!(op, KernelOp::DelProxy { .. }))
            .count();
        assert_eq!(dels, 1, "{p:#?}");
    }

    #[test]
    fn an_adopted_interface_that_does_not_exist_yet_waits() {
        let d = desired(
            &cfg(),
            &intent(LinkMode::Adopt),
            &crate::rib::Rib::default(),
        );
        let mut o = converged(&d);
        o.links.remove("tap1");
        o.routes.retain(|_, a| a.oif.as_deref() != Some("tap1"));
        let p = plan(&d, &o);
        assert!(p.is_empty(), "{p:#?}");
    }

    fn two_path_rib(with_b: bool) -> crate::rib::Rib {
        use crate::rib::{Path, RibEvent};
        let mut rib = crate::rib::Rib::default();
        let mut paths = vec![("a", "198.51.100.102", "a-public")];
        if with_b {
            paths.push(("b", "198.51.100.202", "b-public"));
        }
        for (session, nh, uplink) in paths {
            rib.apply(RibEvent::Update {
                session: session.into(),
                fabric: "public".into(),
                announce: (0..100)
                    .map(|i| {
                        (
                            format!("198.18.0.{i}/32").parse().unwrap(),
                            None,
                            Path {
                                next_hop: nh.parse().unwrap(),
                                uplink: uplink.into(),
                                local_pref: 100,
                                as_path_len: 0,
                                originator: Some("198.51.100.102".parse().unwrap()),
                            },
                        )
                    })
                    .collect(),
                withdraw: vec![],
            });
        }
        rib
    }

    #[test]
    fn losing_a_fabric_path_replaces_the_group_not_the_routes() {
        let i = Intent::default();
        let none = BTreeMap::new();
        let both = desired_with(&cfg(), &i, &two_path_rib(true), Nexthops::Objects(&none));
        assert_eq!(both.groups.len(), 1);
        assert!(plan(&both, &converged(&both)).is_empty());
        let one = desired_with(
            &cfg(),
            &i,
            &two_path_rib(false),
            Nexthops::Objects(&both.groups),
        );
        let p = plan(&one, &converged(&both));
        // One group replaced in place, one object gone; no route touched.
        assert!(p.add_routes.is_empty() && p.remove.is_empty(), "{p:#?}");
        assert_eq!(p.add_groups.len(), 1);
        assert!(
            matches!(&p.add_groups[0], KernelOp::AddGroup { replace: true, members, .. } if members.len() == 1)
        );
        assert_eq!(p.remove_nexthops.len(), 1);
        assert_eq!(p.len(), 2);
        // And back: the object first, then the group.
        let p = plan(&both, &converged(&one));
        assert_eq!(p.add_nexthops.len(), 1);
        assert_eq!(p.add_groups.len(), 1);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn switching_modes_rewrites_routes_then_sweeps_groups() {
        let i = Intent::default();
        let none = BTreeMap::new();
        let objects = desired_with(&cfg(), &i, &two_path_rib(true), Nexthops::Objects(&none));
        let multipath = desired_with(&cfg(), &i, &two_path_rib(true), Nexthops::Multipath);
        assert!(multipath.routes.values().all(|a| a.nh_id.is_none()));
        let p = plan(&multipath, &converged(&objects));
        assert_eq!(p.add_routes.len(), 100);
        assert_eq!(p.remove_groups.len(), 1);
        assert_eq!(p.remove_nexthops.len(), 2);
    }
}
