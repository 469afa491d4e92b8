//! PURE: the plan for a few learned prefixes that changed, against the
//! kernel as the last pass left it, without recomputing every route.
//!
//! A level-based pass ([`super::desired`] then [`super::plan`]) computes the
//! whole desired state: fine for a VM start, but for one UPDATE carrying one
//! prefix it is O(learned routes) (140-335 ms at 100,000 routes, where BIRD
//! writes one netlink message), and it is what a remote VM's new address
//! waits for on every hypervisor. When only the RIB changed, this computes
//! the routes and neighbour proxy entries of the changed prefixes alone,
//! O(changed × log routes), and gives the same plan the full pass would.
//!
//! Nexthop groups follow too: a group's members depend on every prefix
//! keyed to it (see [`super::groups::members`]), so the last
//! pass keeps, per group, the distinct hop sets of its prefixes with their
//! counts ([`GroupUse`]: one set in the steady state); a changed prefix
//! moves its count from one set to another and the members are computed
//! again from the sets. A new group or object takes the id the full pass
//! would give it. Refused, with the reason, and left to the full pass: a
//! session relearning its table, an id the full pass would place
//! differently (a hash collision), bookkeeping that does not add up; and by
//! the caller: the graceful-restart hold, a session going down in the
//! batch, a batch larger than a few thousand prefixes. A partial
//! withdrawal's fast path (`groups::shrink_withdrawn`) before the plan is
//! fine: it shrinks a group by the rule the plan computes members with,
//! and the plan finds the kernel as the fast path left it
//! (`tests::a_partial_withdrawals_fast_path_then_the_scoped_pass`).
//!
//! Tested against the full pass: a random sequence of UPDATEs, each planned
//! here when possible, must leave a kernel in which the full pass finds
//! nothing to do (`tests::scoped_passes_leave_what_the_full_pass_wants`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::groups::spec;
use super::model::*;
use super::plan::{KernelOp, Plan};
use crate::config::{Config, Ipv6Mode};
use crate::intent::{Intent, LinkMode};
use crate::rib::{Rib, RibEvent, Selected};

/// The changed prefixes: prefix → fabric → its selection before the change
/// (`None`: the fabric had no path for it). Fabrics not listed did not
/// change for that prefix.
pub type Before = BTreeMap<IpNet, BTreeMap<String, Option<Selected>>>;

/// Notes in `before` the selections the prefixes of `event` have in `rib`
/// (call before applying it; a prefix already noted keeps its first
/// selection). False for an event that is not an UPDATE: those change the
/// RIB in ways this module does not follow.
pub fn record(before: &mut Before, rib: &Rib, event: &RibEvent) -> bool {
    let RibEvent::Update {
        fabric,
        announce,
        withdraw,
        ..
    } = event
    else {
        return false;
    };
    let prefixes = announce.iter().map(|(p, _, _)| p);
    for p in prefixes.chain(withdraw.iter().map(|(p, _)| p)) {
        let fabrics = before.entry(*p).or_default();
        if !fabrics.contains_key(fabric) {
            fabrics.insert(fabric.clone(), rib.selection(fabric, p));
        }
    }
    true
}

/// A prefix's place among the groups: its key and its hops (as nexthop
/// objects; IPv6 routes never take IPv4 next hops, see `groups::build`).
/// `None`: no usable hop, no route.
fn entry(
    fabric: &str,
    dst: &IpNet,
    s: Option<&Selected>,
) -> Option<(GroupKey, BTreeSet<NextHopSpec>)> {
    let s = s?;
    let v6 = dst.addr().is_ipv6();
    let hops: BTreeSet<NextHopSpec> = s
        .hops
        .iter()
        .filter(|h| !v6 || h.gateway.is_ipv6())
        .map(spec)
        .collect();
    if hops.is_empty() {
        return None;
    }
    let key = GroupKey {
        fabric: fabric.to_string(),
        v6,
        origins: s.origins.clone(),
    };
    Some((key, hops))
}

/// Plans the changes of `before`'s prefixes from `rib` against `observed`
/// (the kernel as the last pass left it, mirrored). `last` is the last
/// pass's desired objects and groups with their [`GroupUse`] and `local`
/// set; on success it is updated to what the full pass would now compute.
/// On refusal (the reason is returned) nothing is changed and the caller
/// runs the full pass.
pub fn plan(
    config: &Config,
    intent: &Intent,
    rib: &Rib,
    before: &Before,
    last: &mut DesiredKernel,
    observed: &ObservedKernel,
    with_proxies: bool,
) -> Result<Plan, &'static str> {
    let k = &config.kernel;
    let metric = k.learned_route_metric;
    if metric == k.vm_route_metric || metric == u32::MAX {
        return Err("learned routes share a metric with other routes");
    }
    if !observed.duplicate_routes.is_empty() {
        return Err("duplicate routes in the kernel");
    }
    if last.group_use.values().any(|u| u.returning) {
        return Err("a session is relearning its table");
    }
    // What this plan changes of `last`'s groups and objects, applied to it
    // on success: O(changed) where copies of `last` were O(groups) (a
    // fleet of hypervisors is thousands of groups).
    let mut changes = Changes::new(last);

    // Each changed (prefix, fabric) leaves the hop sets of its old group
    // and joins those of its new one; the key of every fabric's entry now.
    let mut touched: BTreeMap<GroupKey, Touched> = BTreeMap::new();
    let mut now_keys: Vec<(IpNet, Vec<Option<GroupKey>>)> = Vec::with_capacity(before.len());
    for (dst, changed) in before {
        let mut keys = Vec::with_capacity(config.fabrics.len());
        for name in config.fabrics.keys() {
            let now = entry(name, dst, rib.selection(name, dst).as_ref());
            if let Some(was) = changed.get(name) {
                let was = entry(name, dst, was.as_ref());
                if was != now {
                    if let Some((key, hops)) = was {
                        let t = match touched.entry(key) {
                            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::btree_map::Entry::Vacant(e) => {
                                let id = changes
                                    .group_id(e.key())
                                    .ok_or("a prefix of no known group")?;
                                e.insert(Touched::of(last, id)?)
                            }
                        };
                        let n = t
                            .sets
                            .get_mut(&hops)
                            .ok_or("a hop set its group does not have")?;
                        *n -= 1;
                        if *n == 0 {
                            t.sets.remove(&hops);
                        }
                        if let Some(p) = t.prefixes.as_mut() {
                            p.remove(dst);
                        }
                    }
                    if let Some((key, hops)) = now.clone() {
                        let t = match touched.entry(key) {
                            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::btree_map::Entry::Vacant(e) => {
                                let t = match changes.group_id(e.key()) {
                                    Some(id) => Touched::of(last, id)?,
                                    None => Touched {
                                        sets: Sets::new(),
                                        prefixes: Some(BTreeSet::new()),
                                    },
                                };
                                e.insert(t)
                            }
                        };
                        *t.sets.entry(hops).or_default() += 1;
                        if let Some(p) = t.prefixes.as_mut() {
                            p.insert(*dst);
                        }
                    }
                }
            }
            keys.push(now.map(|(key, _)| key));
        }
        now_keys.push((*dst, keys));
    }

    // The touched groups: members again from their hop sets, an id for a
    // new key, objects for new members; a group with no prefix left goes,
    // then every object no group holds. A direct key that gets its group
    // (or another object) has the routes of its other prefixes rewritten.
    let mut released: BTreeSet<u32> = BTreeSet::new();
    let mut retarget: BTreeSet<IpNet> = BTreeSet::new();
    for (key, t) in touched {
        let was = changes.group_id(&key);
        let was_direct = was.and_then(|id| last.direct.get(&id));
        if let Some(id) = was {
            released.extend(last.groups.get(&id).into_iter().flatten().copied());
            released.extend(was_direct.map(|d| d.object));
        }
        if t.sets.is_empty() {
            if let Some(id) = was {
                changes.remove_group(id, key);
            }
            continue;
        }
        let members = super::groups::members(&t.sets);
        let id = match was {
            Some(id) => id,
            None => changes.free_group(super::groups::group_slot(&key))?,
        };
        let mut ids = BTreeSet::new();
        for m in members {
            let object = match changes.object_id(&m) {
                Some(o) => o,
                None => {
                    let slot = changes.free_object(super::groups::object_slot(&m))?;
                    changes.objects.insert(slot, Some(m));
                    slot
                }
            };
            ids.insert(object);
        }
        let prefixes = t.sets.values().sum();
        let direct = match super::groups::direct(&ids, prefixes, observed.groups.contains_key(&id))
        {
            Some(object) => Some(Direct {
                object,
                prefixes: t
                    .prefixes
                    .ok_or("a key whose group the kernel no longer has")?,
            }),
            None => None,
        };
        if let Some(d) = was_direct {
            if direct.as_ref().is_none_or(|now| now.object != d.object) {
                retarget.extend(d.prefixes.iter().filter(|p| !before.contains_key(p)));
            }
        }
        changes.groups.insert(
            id,
            Some(Group {
                members: ids,
                key: key.clone(),
                usage: GroupUse {
                    sets: t.sets,
                    returning: false,
                },
                direct,
            }),
        );
        changes.ids.insert(key, Some(id));
    }
    // And what a fast path took out of groups since the last pass.
    released.extend(last.dropped.iter().copied());
    changes.release(&released);
    if changes.deletes() && last.probed {
        // Ids are placed in key order with probing: without the one that
        // goes, the full pass would move a group or object that had probed
        // past it. Only when none did is this the full pass's result.
        return Err("ids placed past a collision");
    }

    let mut p = Plan::default();
    changes.ops(observed, &mut p);

    // The routes of each changed prefix in every fabric's table and in
    // local-out (later fabrics winning there, as in `desired::learned`),
    // and its neighbour proxy entries.
    let mut tables: BTreeSet<u32> = config.fabrics.values().map(|f| f.table).collect();
    tables.insert(k.local_out_table);
    // (And those of the prefixes of a direct key that got its group.)
    now_keys.extend(retarget.into_iter().map(|dst| {
        let keys = config
            .fabrics
            .keys()
            .map(|name| entry(name, &dst, rib.selection(name, &dst).as_ref()).map(|(k, _)| k))
            .collect();
        (dst, keys)
    }));
    for (dst, keys) in &now_keys {
        let dst = *dst;
        let mut want: BTreeMap<u32, RouteAttrs> = BTreeMap::new();
        for (fabric, key) in config.fabrics.values().zip(keys) {
            let Some(key) = key else { continue };
            let id = changes.target(key).ok_or("a prefix of no group")?;
            let mut put = |table: u32, pref_src: Option<IpAddr>| {
                if !last.local.contains(&(table, dst)) {
                    want.insert(
                        table,
                        RouteAttrs {
                            kind: RouteKind::Unicast,
                            oif: None,
                            gateway: None,
                            onlink: false,
                            pref_src,
                            multipath: Vec::new(),
                            nh_id: Some(id),
                        },
                    );
                }
            };
            put(fabric.table, None);
            if !fabric.catch_all {
                let src = match dst {
                    IpNet::V4(_) => config.hypervisor.private_source_v4.map(IpAddr::V4),
                    IpNet::V6(_) => config.hypervisor.private_source_v6.map(IpAddr::V6),
                };
                put(k.local_out_table, src);
            }
        }
        for &table in &tables {
            let id = RouteId { table, dst, metric };
            match (want.remove(&table), observed.routes.get(&id)) {
                (Some(w), Some(o)) if **o == w => {}
                (Some(w), o) => p.add_routes.push(KernelOp::AddRoute {
                    id,
                    attrs: std::sync::Arc::new(w),
                    replace: o.is_some(),
                }),
                (None, Some(o)) => p.remove.push(KernelOp::DelRoute {
                    id,
                    attrs: o.clone(),
                }),
                (None, None) => {}
            }
        }
        if with_proxies {
            proxies(config, intent, rib, &dst, observed, &mut p);
        }
    }

    let Changes {
        groups, objects, ..
    } = changes;
    last.dropped.clear();
    for (id, g) in groups {
        match g {
            Some(g) => {
                match g.direct {
                    Some(d) => {
                        last.groups.remove(&id);
                        last.direct.insert(id, d);
                    }
                    None => {
                        last.groups.insert(id, g.members);
                        last.direct.remove(&id);
                    }
                }
                last.group_keys.insert(id, g.key);
                last.group_use.insert(id, g.usage);
            }
            None => {
                last.groups.remove(&id);
                last.direct.remove(&id);
                last.group_keys.remove(&id);
                last.group_use.remove(&id);
            }
        }
    }
    for (id, o) in objects {
        match o {
            Some(spec) => last.nexthops.insert(id, spec),
            None => last.nexthops.remove(&id),
        };
    }
    Ok(p)
}

/// A group as a plan leaves it.
struct Group {
    members: BTreeSet<u32>,
    key: GroupKey,
    usage: GroupUse,
    /// Its routes point at its one object; the kernel has no group.
    direct: Option<Direct>,
}

type Sets = BTreeMap<BTreeSet<NextHopSpec>, usize>;

/// A key a plan changes: the hop sets of its prefixes, and the prefixes
/// themselves while it is direct or new (`None`: a group's, not kept).
struct Touched {
    sets: Sets,
    prefixes: Option<BTreeSet<IpNet>>,
}

impl Touched {
    fn of(last: &DesiredKernel, id: u32) -> Result<Self, &'static str> {
        let u = last.group_use.get(&id).ok_or("a group without its sets")?;
        Ok(Self {
            sets: u.sets.clone(),
            prefixes: last.direct.get(&id).map(|d| d.prefixes.clone()),
        })
    }
}

/// The groups and objects a plan adds, changes (`Some`) and deletes
/// (`None`), over `last`'s. Ids are found at their natural slot
/// (`groups::group_slot`, `object_slot`): where nothing of `last` probed
/// past a collision (`DesiredKernel::probed`) that is the only place they
/// can be; otherwise `last` is searched.
struct Changes<'a> {
    last: &'a DesiredKernel,
    groups: BTreeMap<u32, Option<Group>>,
    objects: BTreeMap<u32, Option<NextHopSpec>>,
    /// Keys whose group this plan made (`Some`) or deleted (`None`).
    ids: BTreeMap<GroupKey, Option<u32>>,
    /// A group or object was deleted (its id may since hold another).
    deleted: bool,
}

impl<'a> Changes<'a> {
    fn new(last: &'a DesiredKernel) -> Self {
        Self {
            last,
            groups: BTreeMap::new(),
            objects: BTreeMap::new(),
            ids: BTreeMap::new(),
            deleted: false,
        }
    }

    fn group_id(&self, key: &GroupKey) -> Option<u32> {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let slot = super::groups::group_slot(key);
        if self.last.group_keys.get(&slot) == Some(key) {
            return Some(slot);
        }
        if !self.last.probed {
            return None;
        }
        self.last
            .group_keys
            .iter()
            .find(|(_, k)| *k == key)
            .map(|(id, _)| *id)
    }

    /// The nexthop id the routes of `key` point at: its group, or its
    /// object when it is direct.
    fn target(&self, key: &GroupKey) -> Option<u32> {
        let id = self.group_id(key)?;
        match self.groups.get(&id) {
            Some(g) => g
                .as_ref()
                .map(|g| g.direct.as_ref().map_or(id, |d| d.object)),
            None => Some(self.last.direct.get(&id).map_or(id, |d| d.object)),
        }
    }

    fn object_id(&self, spec: &NextHopSpec) -> Option<u32> {
        let holds = |id: u32| match self.objects.get(&id) {
            Some(o) => o.as_ref() == Some(spec),
            None => self.last.nexthops.get(&id) == Some(spec),
        };
        let slot = super::groups::object_slot(spec);
        if holds(slot) {
            return Some(slot);
        }
        if !self.last.probed {
            return None;
        }
        self.last
            .nexthops
            .iter()
            .find(|(id, s)| *s == spec && holds(**id))
            .map(|(id, _)| *id)
    }

    /// `slot` for a new group, unless taken (the full pass would probe
    /// past it).
    fn free_group(&self, slot: u32) -> Result<u32, &'static str> {
        let taken = match self.groups.get(&slot) {
            Some(g) => g.is_some(),
            None => self.last.group_keys.contains_key(&slot),
        };
        free(slot, taken)
    }

    fn free_object(&self, slot: u32) -> Result<u32, &'static str> {
        let taken = match self.objects.get(&slot) {
            Some(o) => o.is_some(),
            None => self.last.nexthops.contains_key(&slot),
        };
        free(slot, taken)
    }

    fn remove_group(&mut self, id: u32, key: GroupKey) {
        self.groups.insert(id, None);
        self.ids.insert(key, None);
        self.deleted = true;
    }

    /// Deletes the objects of `candidates` (members some group had) that
    /// no group holds any more.
    fn release(&mut self, candidates: &BTreeSet<u32>) {
        let mut unheld: BTreeSet<u32> = candidates.clone();
        for g in self.groups.values().flatten() {
            unheld.retain(|o| !g.members.contains(o));
        }
        if unheld.is_empty() {
            return;
        }
        for (id, members) in &self.last.groups {
            if !self.groups.contains_key(id) {
                unheld.retain(|o| !members.contains(o));
            }
        }
        for (id, d) in &self.last.direct {
            if !self.groups.contains_key(id) {
                unheld.retain(|o| *o != d.object);
            }
        }
        for o in unheld {
            self.objects.insert(o, None);
            self.deleted = true;
        }
    }

    /// Does the plan delete a group or an object (even one whose id a new
    /// one then took)?
    fn deletes(&self) -> bool {
        self.deleted
    }

    /// The kernel operations for the changes, against `observed` (as
    /// `plan::nexthop_ops` plans them for whole maps).
    fn ops(&self, observed: &ObservedKernel, p: &mut Plan) {
        for (id, o) in &self.objects {
            match (o, observed.nexthops.get(id)) {
                (Some(spec), Some(have)) if have == spec => {}
                (Some(spec), have) => p.add_nexthops.push(KernelOp::AddNexthop {
                    id: *id,
                    spec: spec.clone(),
                    replace: have.is_some(),
                }),
                (None, Some(_)) => p.remove_nexthops.push(KernelOp::DelNexthop {
                    id: *id,
                    group: false,
                }),
                (None, None) => {}
            }
        }
        for (id, g) in &self.groups {
            // A direct key wants no group in the kernel.
            let want = g.as_ref().filter(|g| g.direct.is_none());
            match (want, observed.groups.get(id)) {
                (Some(g), Some(have)) if *have == g.members => {}
                (Some(g), have) => p.add_groups.push(KernelOp::AddGroup {
                    id: *id,
                    members: g.members.iter().copied().collect(),
                    replace: have.is_some(),
                }),
                (None, Some(_)) => p.remove_groups.push(KernelOp::DelNexthop {
                    id: *id,
                    group: true,
                }),
                (None, None) => {}
            }
        }
    }
}

/// The plan of an intent change: `desired`, from [`super::desired_host`]
/// (the VMs' links, addresses, routes and proxy entries, planned by
/// [`super::plan_host`]), plus the learned routes of the prefixes the
/// change made local or gave back (the learned route goes or comes back;
/// the intent does not move groups) and of the prefixes the RIB changed
/// since the last pass (`learned`, as for [`plan`]). `last` as for
/// [`plan`]; on success its `local` and `host_routes` are `desired`'s. On
/// refusal nothing is changed.
pub fn plan_intent(
    config: &Config,
    intent: &Intent,
    rib: &Rib,
    desired: &DesiredKernel,
    learned: Before,
    last: &mut DesiredKernel,
    observed: &ObservedKernel,
) -> Result<Plan, &'static str> {
    let mut p = super::plan::plan_host(desired, observed, &last.host_routes);
    let mut before = learned;
    for (_, dst) in last.local.symmetric_difference(&desired.local) {
        before.entry(*dst).or_default();
    }
    let was = std::mem::replace(&mut last.local, desired.local.clone());
    // The proxy entries are all in `desired` already.
    match plan(config, intent, rib, &before, last, observed, false) {
        Ok(learned) => p.extend(learned),
        Err(reason) => {
            last.local = was;
            return Err(reason);
        }
    }
    last.host_routes = desired.host_routes.clone();
    Ok(p)
}

/// A new group's or object's id where the full pass would put it: its own
/// slot, when nothing holds it (else the full pass would probe past it).
fn free(slot: u32, taken: bool) -> Result<u32, &'static str> {
    match taken {
        true => Err("a new id's slot is taken (the full pass probes)"),
        false => Ok(slot),
    }
}

/// The neighbour proxy entries of one address, as `desired::proxies` wants
/// them, against `observed`.
fn proxies(
    config: &Config,
    intent: &Intent,
    rib: &Rib,
    dst: &IpNet,
    observed: &ObservedKernel,
    p: &mut Plan,
) {
    let IpNet::V6(net) = dst else { return };
    if net.prefix_len() != 128 {
        return;
    }
    let a = net.addr();
    for (name, fabric) in &config.fabrics {
        if fabric.ipv6_mode != Ipv6Mode::SharedDhcpv6 || !fabric.nd_proxy_entries {
            continue;
        }
        let shared = fabric.subnets.iter().any(|n| match n {
            IpNet::V6(n) => n.contains(&a),
            IpNet::V4(_) => false,
        });
        if !shared {
            continue;
        }
        let learned = rib.selection(name, dst).is_some_and(|s| !s.hops.is_empty());
        let links: Vec<(&str, bool)> = intent
            .interfaces()
            .filter(|(_, i)| i.fabric == *name)
            .map(|(_, i)| {
                let waiting = i.link == LinkMode::Adopt && !observed.links.contains_key(&i.name);
                (i.name.as_str(), waiting)
            })
            .collect();
        let holders: Vec<&str> = intent
            .interfaces()
            .filter(|(_, i)| i.fabric == *name && i.ipv6.contains(&a))
            .map(|(_, i)| i.name.as_str())
            .collect();
        for &(link, waiting) in &links {
            let wanted = super::desired::proxied_on(link, &holders, learned);
            let has = observed.proxies.contains(&(link.to_string(), a));
            if wanted && !has && !waiting {
                p.add_routes.push(KernelOp::AddProxy {
                    ifname: link.to_string(),
                    addr: a,
                });
            } else if !wanted && has {
                p.remove.push(KernelOp::DelProxy {
                    ifname: link.to_string(),
                    addr: a,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::intent::{InterfaceIntent, VmIntent};
    use crate::reconcile::plan::tests::converged;
    use crate::reconcile::{Nexthops, desired_with, plan as full_plan};
    use crate::rib::Path;
    use std::sync::Arc;

    fn cfg() -> Config {
        let mut c = config::parse("t", include_str!("../../packaging/l3hv.toml")).unwrap();
        c.hypervisor.private_source_v4 = Some("172.22.15.101".parse().unwrap());
        c
    }

    fn vm(name: &str, tap: &str, fabric: &str, v4: &[&str], v6: &[&str]) -> VmIntent {
        VmIntent {
            name: name.into(),
            interfaces: vec![InterfaceIntent {
                name: tap.into(),
                mac: "52:54:00:00:00:01".parse().unwrap(),
                fabric: fabric.into(),
                link: LinkMode::Tap,
                ipv4: v4.iter().map(|a| a.parse().unwrap()).collect(),
                ipv6: v6.iter().map(|a| a.parse().unwrap()).collect(),
                ipv6_prefixes: vec![],
                routed: vec![],
            }],
        }
    }

    fn intent() -> Intent {
        let mut i = Intent::default();
        for v in [
            vm(
                "vm1",
                "tap1",
                "public",
                &["203.0.113.1"],
                &["2001:db8:cb00:7100::1"],
            ),
            vm("vm2", "tap2", "public", &[], &["2001:db8:cb00:7100::2"]),
            vm("vm3", "tap3", "private", &["172.22.2.3"], &[]),
        ] {
            i.vms.insert(v.name.clone(), v);
        }
        i
    }

    /// The full pass over a kernel with no group of l3hv's.
    fn full_new(cfg: &Config, intent: &Intent, rib: &Rib) -> DesiredKernel {
        desired_with(cfg, intent, rib, Nexthops::Objects(&BTreeMap::new()))
    }

    /// The full pass over the kernel `observed`.
    fn full_against(
        cfg: &Config,
        intent: &Intent,
        rib: &Rib,
        observed: &ObservedKernel,
    ) -> DesiredKernel {
        desired_with(cfg, intent, rib, Nexthops::Objects(&observed.groups))
    }

    /// What the agent keeps of a full pass.
    fn kept(d: &DesiredKernel) -> DesiredKernel {
        DesiredKernel {
            nexthops: d.nexthops.clone(),
            groups: d.groups.clone(),
            direct: d.direct.clone(),
            group_keys: d.group_keys.clone(),
            group_use: d.group_use.clone(),
            local: d.local.clone(),
            ..Default::default()
        }
    }

    /// hv2's (originator 10.0.0.2) path over `nh` on `uplink`.
    fn hv2_path(nh: &str, uplink: &str) -> Path {
        Path {
            next_hop: nh.parse().unwrap(),
            uplink: Arc::from(uplink),
            local_pref: 100,
            as_path_len: 0,
            originator: Some("10.0.0.2".parse().unwrap()),
        }
    }

    /// Session `s` announces `prefix` over `p` in the private fabric.
    fn announce_private(rib: &mut Rib, s: &str, prefix: &str, p: Path) {
        rib.apply(RibEvent::Update {
            session: s.into(),
            fabric: "private".into(),
            announce: vec![(prefix.parse().unwrap(), None, p)],
            withdraw: vec![],
        });
    }

    /// A deterministic pseudo-random sequence (xorshift64).
    struct Dice(u64);
    impl Dice {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    const PUBLIC: [&str; 9] = [
        "203.0.113.1/32", // vm1's own address: local wins
        "203.0.113.20/32",
        "203.0.113.21/32",
        "198.18.0.1/32",
        "198.18.0.0/24",
        "2001:db8:cb00:7100::1/128", // vm1's: local on tap1, proxied on tap2
        "2001:db8:cb00:7100::20/128",
        "2001:db8:cb00:7100::21/128",
        "2001:db8:ff::/48",
    ];
    const PRIVATE: [&str; 4] = [
        "172.22.2.3/32", // vm3's own address
        "172.22.2.30/32",
        "172.22.2.31/32",
        "10.9.0.0/16",
    ];

    /// One session's UPDATE of one prefix: announced by hv2 or hv3 (the
    /// ORIGINATOR_ID), or withdrawn.
    fn event(dice: &mut Dice) -> RibEvent {
        let public = dice.below(3) > 0;
        let (fabric, pool): (&str, &[&str]) = if public {
            ("public", &PUBLIC)
        } else {
            ("private", &PRIVATE)
        };
        let prefix: IpNet = pool[dice.below(pool.len())].parse().unwrap();
        let b = dice.below(2) == 1;
        let (session, uplink, nh) = match (public, b, prefix.addr().is_ipv6()) {
            (true, false, false) => ("pa", "a-public", "198.51.100.102"),
            (true, true, false) => ("pb", "b-public", "198.51.100.202"),
            (true, false, true) => ("pa", "a-public", "2001:db8:c633:6400::102"),
            (true, true, true) => ("pb", "b-public", "2001:db8:c633:6401::202"),
            (false, false, _) => ("qa", "a-private", "172.22.15.102"),
            (false, true, _) => ("qb", "b-private", "172.22.15.202"),
        };
        let (announce, withdraw) = if dice.below(4) == 0 {
            (vec![], vec![(prefix, None)])
        } else {
            let originator = ["10.0.0.2", "10.0.0.3"][dice.below(2)];
            let path = Path {
                next_hop: nh.parse().unwrap(),
                uplink: Arc::from(uplink),
                local_pref: 100,
                as_path_len: 0,
                originator: Some(originator.parse().unwrap()),
            };
            (vec![(prefix, None, path)], vec![])
        };
        RibEvent::Update {
            session: session.into(),
            fabric: fabric.into(),
            announce,
            withdraw,
        }
    }

    #[test]
    fn scoped_passes_leave_what_the_full_pass_wants() {
        let (cfg, intent) = (cfg(), intent());
        let mut grown = 0;
        for seed in 1..=20u64 {
            let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut rib = Rib::default();
            for _ in 0..30 {
                rib.apply(event(&mut dice));
            }
            let d = full_new(&cfg, &intent, &rib);
            let mut observed = converged(&d);
            let mut last = kept(&d);
            let (mut scoped, mut refused) = (0, 0);
            for step in 0..150 {
                let mut before = Before::new();
                for _ in 0..1 + dice.below(3) {
                    let ev = event(&mut dice);
                    record(&mut before, &rib, &ev);
                    rib.apply(ev);
                }
                let full = full_against(&cfg, &intent, &rib, &observed);
                let was = last.clone();
                match plan(&cfg, &intent, &rib, &before, &mut last, &observed, true) {
                    Ok(p) => {
                        scoped += 1;
                        for op in p.phases().into_iter().flatten() {
                            assert!(observed.mirror(op), "{op:?}");
                        }
                        let left = full_plan(&full, &observed);
                        assert!(left.is_empty(), "seed {seed} step {step}: {left:#?}");
                        assert_eq!(last.groups, full.groups, "seed {seed} step {step}");
                        assert_eq!(last.direct, full.direct, "seed {seed} step {step}");
                        assert_eq!(last.nexthops, full.nexthops);
                        assert_eq!(last.group_keys, full.group_keys);
                        assert_eq!(last.group_use, full.group_use);
                        grown += was
                            .direct
                            .keys()
                            .filter(|id| last.groups.contains_key(id))
                            .count();
                    }
                    Err(_) => {
                        refused += 1;
                        assert_eq!(last, was, "a refusal changes nothing");
                        for op in full_plan(&full, &observed).phases().into_iter().flatten() {
                            assert!(observed.mirror(op), "{op:?}");
                        }
                        last = kept(&full);
                    }
                }
            }
            // New origin sets, anycast, hop sets shrinking and growing,
            // groups emptied: all planned alone (the refusals have their
            // own tests).
            assert_eq!((scoped, refused), (150, 0), "seed {seed}");
        }
        // Direct keys that got their group (their routes rewritten) were
        // among them.
        assert!(grown > 20, "{grown}");
    }

    /// A remote hypervisor's fabric path fails: the reflector withdraws
    /// its prefixes over that path while the other still has them. The
    /// fast path takes the member out of the group at the UPDATE, by
    /// deleting its object (or, with `replace_only`, as it does when ids
    /// probed past a collision, by replacing the group); the scoped pass
    /// after the batch then has the group right and has nothing left to do
    /// (or only deletes the dead object), as the full pass would.
    #[test]
    fn a_partial_withdrawals_fast_path_then_the_scoped_pass() {
        for replace_only in [false, true] {
            partial_withdrawal_then_scoped_pass(replace_only);
        }
    }

    fn partial_withdrawal_then_scoped_pass(replace_only: bool) {
        let (cfg, intent) = (cfg(), intent());
        let mut rib = Rib::default();
        let path = |s: &str| Path {
            next_hop: if s == "qa" {
                "172.22.15.102"
            } else {
                "172.22.15.202"
            }
            .parse()
            .unwrap(),
            uplink: Arc::from(if s == "qa" { "a-private" } else { "b-private" }),
            local_pref: 100,
            as_path_len: 0,
            originator: Some("10.0.0.2".parse().unwrap()),
        };
        let prefixes: Vec<IpNet> = (10..30)
            .map(|i| format!("172.22.9.{i}/32").parse().unwrap())
            .collect();
        for s in ["qa", "qb"] {
            rib.apply(RibEvent::Update {
                session: s.into(),
                fabric: "private".into(),
                announce: prefixes.iter().map(|p| (*p, None, path(s))).collect(),
                withdraw: vec![],
            });
        }
        let d = full_new(&cfg, &intent, &rib);
        let mut observed = converged(&d);
        let mut last = kept(&d);
        assert_eq!(last.groups.len(), 1);
        let (&group, _) = last.groups.first_key_value().unwrap();

        // Path B withdraws them all, in one UPDATE.
        let event = RibEvent::Update {
            session: "qb".into(),
            fabric: "private".into(),
            announce: vec![],
            withdraw: prefixes.iter().map(|p| (*p, None)).collect(),
        };
        let lost = rib.partially_withdrawn(&event);
        let shrunk = crate::reconcile::groups::shrink_withdrawn(&last, &lost);
        assert_eq!(shrunk.len(), 1, "{lost:?}");
        // (What the agent's fast path writes and keeps: path B's object,
        // in no other group, deleted.)
        let (deleted, replace) = if replace_only {
            (BTreeSet::new(), shrunk.clone())
        } else {
            crate::reconcile::groups::failover_writes(
                &observed.groups,
                &last.groups,
                &last.direct,
                &shrunk,
            )
        };
        assert_eq!(deleted.len(), usize::from(!replace_only));
        assert_eq!(replace.len(), usize::from(replace_only), "{replace:?}");
        // (The agent's mirror is `failover_written`'s alone.)
        crate::reconcile::groups::failover_written(&mut observed, &mut last, &shrunk, &deleted);
        let (object_b, spec_b) = d
            .nexthops
            .iter()
            .find(|(_, spec)| spec.oif == "b-private")
            .map(|(id, spec)| (*id, spec.clone()))
            .unwrap();
        assert_eq!(
            observed.nexthops.contains_key(&object_b),
            replace_only,
            "the mirror has path B's object only if it was not deleted"
        );
        let mut before = Before::new();
        record(&mut before, &rib, &event);
        rib.apply(event);
        let full = full_against(&cfg, &intent, &rib, &observed);
        let p = plan(&cfg, &intent, &rib, &before, &mut last, &observed, true).unwrap();
        assert!(
            p.add_groups.is_empty() && p.add_routes.is_empty() && p.remove.is_empty(),
            "{p:#?}"
        );
        // Path B's object: deleted by the fast path, or now.
        assert_eq!(p.remove_nexthops.len(), usize::from(replace_only), "{p:#?}");
        for op in p.phases().into_iter().flatten() {
            assert!(observed.mirror(op), "{op:?}");
        }
        assert!(full_plan(&full, &observed).is_empty());
        assert_eq!(last.groups, full.groups);
        assert_eq!(last.groups[&group].len(), 1);
        assert_eq!(last.group_use, full.group_use);
        assert_eq!(last.nexthops, full.nexthops);

        // Path B announces them again: its object is created (at the id
        // it had) before the group that takes it back is written.
        let event = RibEvent::Update {
            session: "qb".into(),
            fabric: "private".into(),
            announce: prefixes.iter().map(|p| (*p, None, path("qb"))).collect(),
            withdraw: vec![],
        };
        let mut before = Before::new();
        record(&mut before, &rib, &event);
        rib.apply(event);
        let p = plan(&cfg, &intent, &rib, &before, &mut last, &observed, true).unwrap();
        assert_eq!(
            p.add_nexthops,
            vec![KernelOp::AddNexthop {
                id: object_b,
                spec: spec_b,
                replace: false,
            }],
            "{p:#?}"
        );
        assert!(
            matches!(&p.add_groups[..], [KernelOp::AddGroup { id, members, replace: true }]
                if *id == group && members.contains(&object_b)),
            "{p:#?}"
        );
        for op in p.phases().into_iter().flatten() {
            assert!(observed.mirror(op), "{op:?}");
        }
        assert!(full_plan(&full_against(&cfg, &intent, &rib, &observed), &observed).is_empty());
    }

    /// A new origin's first prefix comes over path A, then over path B:
    /// first its routes alone (on A's object), then the group created
    /// (not replaced: no RCU grace period) and the routes moved to it.
    #[test]
    fn a_new_origins_first_prefix_gets_its_group_with_its_second_path() {
        let (cfg, intent) = (cfg(), intent());
        let mut rib = Rib::default();
        let path = hv2_path;
        let announce = announce_private;
        let d = full_new(&cfg, &intent, &rib);
        let mut observed = converged(&d);
        let mut last = kept(&d);
        let dst: IpNet = "172.22.2.30/32".parse().unwrap();
        let mut step = |rib: &mut Rib, s: &str, p: Path| {
            let mut before = Before::new();
            before
                .entry(dst)
                .or_default()
                .insert("private".into(), rib.selection("private", &dst));
            announce(rib, s, "172.22.2.30/32", p);
            let p = plan(&cfg, &intent, rib, &before, &mut last, &observed, true).unwrap();
            for op in p.phases().into_iter().flatten() {
                assert!(observed.mirror(op), "{op:?}");
            }
            let full = full_against(&cfg, &intent, rib, &observed);
            assert!(full_plan(&full, &observed).is_empty());
            p
        };
        let p = step(&mut rib, "qa", path("172.22.15.102", "a-private"));
        assert!(p.add_groups.is_empty(), "{p:#?}");
        assert_eq!(p.add_nexthops.len(), 1);
        let KernelOp::AddNexthop { id: object, .. } = p.add_nexthops[0] else {
            unreachable!()
        };
        assert_eq!(p.add_routes.len(), 2, "fabric table and local-out");
        for op in &p.add_routes {
            assert!(
                matches!(op, KernelOp::AddRoute { attrs, replace: false, .. } if attrs.nh_id == Some(object))
            );
        }
        let p = step(&mut rib, "qb", path("172.22.15.202", "b-private"));
        let [
            KernelOp::AddGroup {
                id: group,
                replace: false,
                members,
            },
        ] = &p.add_groups[..]
        else {
            panic!("{p:#?}")
        };
        assert_eq!(members.len(), 2);
        assert_eq!(p.add_routes.len(), 2);
        for op in &p.add_routes {
            assert!(
                matches!(op, KernelOp::AddRoute { attrs, replace: true, .. } if attrs.nh_id == Some(*group))
            );
        }
        assert!(p.remove.is_empty() && p.remove_nexthops.is_empty());

        // A group the kernel lost (the mirror says so) is not made direct
        // from the changed prefixes alone: the full pass knows them all.
        let mut lost = observed.clone();
        lost.groups.remove(group);
        let mut before = Before::new();
        before
            .entry(dst)
            .or_default()
            .insert("private".into(), rib.selection("private", &dst));
        rib.apply(RibEvent::Update {
            session: "qb".into(),
            fabric: "private".into(),
            announce: vec![],
            withdraw: vec![(dst, None)],
        });
        let was = last.clone();
        assert_eq!(
            plan(&cfg, &intent, &rib, &before, &mut last, &lost, true),
            Err("a key whose group the kernel no longer has")
        );
        assert_eq!(last, was);
        // With the group in the kernel, it stays a group of one member.
        let p = plan(&cfg, &intent, &rib, &before, &mut last, &observed, true).unwrap();
        assert!(p.add_routes.is_empty(), "{p:#?}");
        assert!(
            matches!(&p.add_groups[..], [KernelOp::AddGroup { replace: true, members, .. }] if members.len() == 1)
        );
    }

    #[test]
    fn a_new_prefix_of_a_known_origin_is_its_routes_alone() {
        let (cfg, intent) = (cfg(), intent());
        let mut rib = Rib::default();
        let path = hv2_path;
        let announce = announce_private;
        let (a, b) = (
            || path("172.22.15.102", "a-private"),
            || path("172.22.15.202", "b-private"),
        );
        announce(&mut rib, "qa", "172.22.2.30/32", a());
        announce(&mut rib, "qb", "172.22.2.30/32", b());
        let d = full_new(&cfg, &intent, &rib);
        let mut observed = converged(&d);
        let mut last = kept(&d);
        let (group, _) = d.groups.first_key_value().unwrap();
        let group = *group;
        let new = |dst: &str| {
            let mut before = Before::new();
            before
                .entry(dst.parse().unwrap())
                .or_default()
                .insert("private".into(), None);
            before
        };

        // Over both fabric paths in one batch: its route in the fabric's
        // table and in local-out (with the private source), nothing else.
        announce(&mut rib, "qa", "172.22.2.31/32", a());
        announce(&mut rib, "qb", "172.22.2.31/32", b());
        let p = plan(
            &cfg,
            &intent,
            &rib,
            &new("172.22.2.31/32"),
            &mut last,
            &observed,
            true,
        )
        .unwrap();
        assert_eq!(p.len(), 2, "{p:#?}");
        for op in &p.add_routes {
            assert!(
                matches!(op, KernelOp::AddRoute { attrs, replace: false, .. } if attrs.nh_id == Some(group))
            );
            observed.mirror(op);
        }
        assert_eq!(last.group_use[&group].prefixes(), 2);

        // Over one path first (the other reflector's UPDATE on its way):
        // the group keeps both paths (`groups::members`), the new prefix
        // joins it with its routes alone, as the full pass has it.
        announce(&mut rib, "qa", "172.22.2.32/32", a());
        let p = plan(
            &cfg,
            &intent,
            &rib,
            &new("172.22.2.32/32"),
            &mut last,
            &observed,
            true,
        )
        .unwrap();
        assert_eq!(
            (p.add_routes.len(), p.add_groups.len(), p.len()),
            (2, 0, 2),
            "{p:#?}"
        );
        for op in p.phases().into_iter().flatten() {
            observed.mirror(op);
        }
        assert!(
            crate::reconcile::plan(&full_against(&cfg, &intent, &rib, &observed), &observed)
                .is_empty()
        );
        assert_eq!(last.group_use[&group].sets.len(), 2);
        let mut before = Before::new();
        before
            .entry("172.22.2.32/32".parse().unwrap())
            .or_default()
            .insert(
                "private".into(),
                rib.selection("private", &"172.22.2.32/32".parse().unwrap()),
            );
        // The second path: nothing for the kernel to do.
        announce(&mut rib, "qb", "172.22.2.32/32", b());
        let p = plan(&cfg, &intent, &rib, &before, &mut last, &observed, true).unwrap();
        assert!(p.is_empty(), "{p:#?}");
        assert_eq!(last.group_use[&group].prefixes(), 3);
        assert_eq!(last.group_use[&group].sets.len(), 1);
    }

    /// A group deleted and its id taken by a new group in the same plan is
    /// still a deletion: where the last pass probed, the full pass could
    /// place the groups differently.
    #[test]
    fn a_deleted_groups_id_taken_again_still_counts_as_a_deletion() {
        let key = |o: &str| GroupKey {
            fabric: "public".into(),
            v6: false,
            origins: vec![o.parse().unwrap()],
        };
        let k1 = key("10.0.0.1");
        let x = super::super::groups::group_slot(&k1);
        let mut last = DesiredKernel::default();
        last.groups.insert(x, BTreeSet::from([1]));
        last.group_keys.insert(x, k1.clone());
        last.probed = true;
        let mut changes = Changes::new(&last);
        assert!(!changes.deletes());
        assert!(changes.free_group(x).is_err(), "taken");
        changes.remove_group(x, k1);
        assert_eq!(changes.free_group(x), Ok(x), "free once deleted");
        changes.groups.insert(
            x,
            Some(Group {
                members: BTreeSet::from([2]),
                key: key("10.0.0.2"),
                usage: GroupUse::default(),
                direct: None,
            }),
        );
        assert!(changes.deletes());
    }

    #[test]
    fn what_the_full_pass_would_place_differently_is_refused() {
        let (cfg, intent) = (cfg(), intent());
        let mut rib = Rib::default();
        // Over both paths: each origin has its group.
        let announce = |rib: &mut Rib, prefix: &str, originator: &str| {
            for (session, nh, uplink) in [
                ("qa", "172.22.15.102", "a-private"),
                ("qb", "172.22.15.202", "b-private"),
            ] {
                rib.apply(RibEvent::Update {
                    session: session.into(),
                    fabric: "private".into(),
                    announce: vec![(
                        prefix.parse().unwrap(),
                        None,
                        Path {
                            next_hop: nh.parse().unwrap(),
                            uplink: Arc::from(uplink),
                            local_pref: 100,
                            as_path_len: 0,
                            originator: Some(originator.parse().unwrap()),
                        },
                    )],
                    withdraw: vec![],
                });
            }
        };
        announce(&mut rib, "172.22.2.30/32", "10.0.0.2");
        announce(&mut rib, "172.22.2.31/32", "10.0.0.3");
        let d = full_new(&cfg, &intent, &rib);
        let dst: IpNet = "172.22.2.31/32".parse().unwrap();
        let mut before = Before::new();
        before
            .entry(dst)
            .or_default()
            .insert("private".into(), rib.selection("private", &dst));
        for session in ["qa", "qb"] {
            rib.apply(RibEvent::Update {
                session: session.into(),
                fabric: "private".into(),
                announce: vec![],
                withdraw: vec![(dst, None)],
            });
        }
        // As placed, hv3's group going is planned alone.
        let mut last = kept(&d);
        let p = plan(
            &cfg,
            &intent,
            &rib,
            &before,
            &mut last,
            &converged(&d),
            true,
        )
        .unwrap();
        assert_eq!(p.remove_groups.len(), 1, "{p:#?}");

        // hv2's group past its slot (as after a collision): without hv3's
        // group the full pass could place it elsewhere.
        let mut moved = kept(&d);
        let hv2 = *moved
            .group_keys
            .iter()
            .find(|(_, k)| k.origins == ["10.0.0.2".parse::<IpAddr>().unwrap()])
            .unwrap()
            .0;
        let (g, k, u) = (
            moved.groups.remove(&hv2).unwrap(),
            moved.group_keys.remove(&hv2).unwrap(),
            moved.group_use.remove(&hv2).unwrap(),
        );
        moved.groups.insert(hv2 + 1, g);
        moved.group_keys.insert(hv2 + 1, k);
        moved.group_use.insert(hv2 + 1, u);
        moved.probed = true;
        let was = moved.clone();
        assert!(
            plan(
                &cfg,
                &intent,
                &rib,
                &before,
                &mut moved,
                &converged(&d),
                true
            )
            .is_err()
        );
        assert_eq!(moved, was);

        // A session relearning its table: its hops joined the groups.
        let mut syncing = kept(&d);
        for u in syncing.group_use.values_mut() {
            u.returning = true;
        }
        assert!(
            plan(
                &cfg,
                &intent,
                &rib,
                &before,
                &mut syncing,
                &converged(&d),
                true
            )
            .is_err()
        );
    }

    /// Applies every operation of `p` to `o` as the kernel would.
    fn mirror_all(o: &mut ObservedKernel, p: &Plan, ifindex: &mut u32) {
        for op in p.phases().into_iter().flatten() {
            if o.mirror(op) {
                continue;
            }
            match op {
                KernelOp::CreateTap { name, .. } | KernelOp::CreateSink { name } => {
                    *ifindex += 1;
                    o.links.insert(
                        name.clone(),
                        ObservedLink {
                            name: name.clone(),
                            ifindex: *ifindex,
                            up: false,
                            alias: None,
                            addresses: BTreeSet::new(),
                        },
                    );
                }
                KernelOp::SetAlias { name, alias } => {
                    o.links.get_mut(name).unwrap().alias = Some(alias.clone());
                }
                KernelOp::SetUp { name } => o.links.get_mut(name).unwrap().up = true,
                KernelOp::AddAddress { ifname, addr, .. } => {
                    o.links.get_mut(ifname).unwrap().addresses.insert(*addr);
                }
                KernelOp::DelAddress { ifname, addr } => {
                    o.links.get_mut(ifname).unwrap().addresses.remove(addr);
                }
                KernelOp::AddRule { rule } => {
                    o.rules.insert(rule.clone());
                }
                KernelOp::DelRule { rule } => {
                    o.rules.remove(rule);
                }
                KernelOp::DeleteLink { name } => {
                    o.links.remove(name);
                    o.routes.retain(|_, a| a.oif.as_deref() != Some(name));
                    o.proxies.retain(|(l, _)| l != name);
                }
                KernelOp::Sysctl { .. } => {}
                other => panic!("not mirrored: {other:?}"),
            }
        }
    }

    /// VMs that come, go and change addresses, some of them on prefixes
    /// the RIB also has (local wins), one on an adopted link that does not
    /// exist (its routes wait).
    fn vm_change(dice: &mut Dice, intent: &mut Intent) {
        let adopted = |mut v: VmIntent| {
            v.interfaces[0].link = LinkMode::Adopt;
            v
        };
        let pool = [
            vm(
                "vmA",
                "ta",
                "public",
                &["203.0.113.20"],
                &["2001:db8:cb00:7100::20"],
            ),
            vm("vmA", "ta", "public", &["203.0.113.21"], &[]),
            vm("vmB", "tb", "private", &["172.22.2.30"], &[]),
            vm("vmB", "tb", "private", &["172.22.2.31", "172.22.2.30"], &[]),
            vm("vmC", "tc", "public", &[], &["2001:db8:cb00:7100::21"]),
            adopted(vm("vmD", "ad0", "public", &["198.18.0.1"], &[])),
            vm("vm2", "tap2", "public", &[], &["2001:db8:cb00:7100::20"]),
        ];
        let v = &pool[dice.below(pool.len())];
        if dice.below(3) == 0 {
            intent.vms.remove(&v.name);
        } else {
            intent.vms.insert(v.name.clone(), v.clone());
        }
    }

    #[test]
    fn intent_changes_with_the_learned_routes_they_touch_leave_what_the_full_pass_wants() {
        let cfg = cfg();
        for seed in 1..=20u64 {
            let mut dice = Dice(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut intent = intent();
            let mut rib = Rib::default();
            for _ in 0..30 {
                rib.apply(event(&mut dice));
            }
            let d = full_new(&cfg, &intent, &rib);
            let mut observed = converged(&d);
            let mut last = kept(&d);
            last.host_routes = d.host_routes.clone();
            let mut ifindex = 100;
            for step in 0..120 {
                let p = if dice.below(2) == 0 {
                    vm_change(&mut dice, &mut intent);
                    // Sometimes with an UPDATE in the same batch.
                    let mut before = Before::new();
                    if dice.below(2) == 0 {
                        let ev = event(&mut dice);
                        record(&mut before, &rib, &ev);
                        rib.apply(ev);
                    }
                    let host = crate::reconcile::desired_host(&cfg, &intent, &rib);
                    plan_intent(&cfg, &intent, &rib, &host, before, &mut last, &observed)
                } else {
                    let mut before = Before::new();
                    let ev = event(&mut dice);
                    record(&mut before, &rib, &ev);
                    rib.apply(ev);
                    plan(&cfg, &intent, &rib, &before, &mut last, &observed, true)
                };
                let p = p.unwrap_or_else(|e| panic!("seed {seed} step {step}: refused: {e}"));
                mirror_all(&mut observed, &p, &mut ifindex);
                let full = full_against(&cfg, &intent, &rib, &observed);
                let left = full_plan(&full, &observed);
                assert!(left.is_empty(), "seed {seed} step {step}: {left:#?}");
                assert_eq!(last.local, full.local, "seed {seed} step {step}");
                assert_eq!(last.groups, full.groups, "seed {seed} step {step}");
                assert_eq!(last.direct, full.direct, "seed {seed} step {step}");
                assert_eq!(last.group_use, full.group_use, "seed {seed} step {step}");
            }
        }
    }
}
