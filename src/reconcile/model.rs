//! The kernel objects l3hv manages, as plain comparable values.
//!
//! Desired and observed state are both expressed in these types, so a
//! reconcile is a diff of two maps. Nothing here knows about netlink.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

/// What identifies a route to the kernel: (table, destination, metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RouteId {
    pub table: u32,
    pub dst: IpNet,
    pub metric: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    Unicast,
    Blackhole,
    Unreachable,
}

/// Everything else about a route; a difference here is a `replace`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RouteAttrs {
    pub kind: RouteKind,
    pub oif: Option<String>,
    pub gateway: Option<IpAddr>,
    pub onlink: bool,
    pub pref_src: Option<IpAddr>,
    /// ECMP members (RTA_MULTIPATH); empty for a single next hop, which
    /// uses `oif`/`gateway`.
    pub multipath: Vec<NextHopSpec>,
    /// A nexthop group (RTA_NH_ID) instead of `oif`/`gateway`/`multipath`.
    pub nh_id: Option<u32>,
}

/// Route attributes as the route maps hold them: shared, since a million
/// learned routes have a handful of distinct ones (one per nexthop group
/// and table). Inline they were 96 of the 126 bytes per route of the kernel
/// mirror and of each pass's desired map (benches/memory.rs).
pub type SharedAttrs = Arc<RouteAttrs>;

/// Hands out one shared copy per distinct value.
#[derive(Debug, Default)]
pub struct AttrsInterner(std::collections::HashMap<RouteAttrs, SharedAttrs>);

impl AttrsInterner {
    pub fn share(&mut self, attrs: RouteAttrs) -> SharedAttrs {
        if let Some(a) = self.0.get(&attrs) {
            return Arc::clone(a);
        }
        let a = Arc::new(attrs.clone());
        self.0.insert(attrs, Arc::clone(&a));
        a
    }
}

/// One member of an ECMP route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NextHopSpec {
    pub gateway: IpAddr,
    pub oif: String,
    pub onlink: bool,
}

/// What a nexthop group stands for (see `reconcile::groups`): the origins
/// of the paths of its prefixes, per fabric and address family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct GroupKey {
    pub fabric: String,
    pub v6: bool,
    pub origins: Vec<IpAddr>,
}

/// A policy rule (always `lookup <table>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleSpec {
    pub v6: bool,
    pub priority: u32,
    pub iif: Option<String>,
    pub src: Option<IpNet>,
    pub table: u32,
    pub suppress_prefixlength: Option<u32>,
}

/// A sysctl under /proc/sys, by its slash path (`net/ipv4/conf/tap1/proxy_arp`).
pub type SysctlPath = String;

/// How a managed VM interface came to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    /// Created by l3hv (a persistent tap); deleted when no longer intended.
    Created { multi_queue: bool },
    /// Created by someone else; l3hv only configures it.
    Adopted,
    /// l3hv's own packet sink (a layer-3 tun nobody opens), under the
    /// whole-subnet proxy ARP routes; deleted when no fabric needs it.
    Sink,
}

/// The alias l3hv writes on every VM interface it manages: its ownership
/// tag in the kernel, so a restarted agent finds what it must sweep.
pub fn alias_for(ownership: Ownership, vm: &str) -> String {
    match ownership {
        Ownership::Created { .. } => format!("{ALIAS_CREATED}{vm}"),
        Ownership::Adopted => format!("{ALIAS_ADOPTED}{vm}"),
        Ownership::Sink => ALIAS_SINK.to_string(),
    }
}

pub const ALIAS_CREATED: &str = "l3hv:tap:";
pub const ALIAS_ADOPTED: &str = "l3hv:adopt:";
pub const ALIAS_SINK: &str = "l3hv:sink";

/// One per-interface sysctl: `net/<dir>/<ifname>/<key>` with its default
/// under `net/<dir>/default/<key>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct IfSysctl {
    pub dir: &'static str,
    pub key: &'static str,
}

impl IfSysctl {
    pub fn path(&self, ifname: &str) -> SysctlPath {
        format!("net/{}/{}/{}", self.dir, ifname, self.key)
    }
    pub fn default_path(&self) -> SysctlPath {
        self.path("default")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredLink {
    pub name: String,
    pub vm: String,
    pub ownership: Ownership,
    /// Addresses (with prefix length) tagged with l3hv's protocol.
    pub addresses: BTreeSet<IpNet>,
    pub sysctls: BTreeMap<IfSysctl, String>,
}

impl DesiredLink {
    pub fn alias(&self) -> String {
        alias_for(self.ownership, &self.vm)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct DesiredUplink {
    /// Ensured present; l3hv never deletes an uplink address.
    pub addresses: BTreeSet<IpNet>,
    pub sysctls: BTreeMap<IfSysctl, String>,
}

/// The kernel state l3hv wants, computed from configuration and intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct DesiredKernel {
    pub links: BTreeMap<String, DesiredLink>,
    pub uplinks: BTreeMap<String, DesiredUplink>,
    pub host_sysctls: BTreeMap<SysctlPath, String>,
    pub routes: BTreeMap<RouteId, SharedAttrs>,
    pub rules: BTreeSet<RuleSpec>,
    /// Kernel rules (v6, priority) to remove (`remove_default_rules`).
    pub absent_rules: BTreeSet<(bool, u32)>,
    /// IPv6 neighbour proxy entries (NTF_PROXY): (VM link, address routed
    /// elsewhere in its shared /64).
    pub proxies: BTreeSet<(String, std::net::Ipv6Addr)>,
    /// Kernel nexthop objects by id: one per (gateway, uplink).
    pub nexthops: BTreeMap<u32, NextHopSpec>,
    /// Nexthop groups by id: their member object ids. The kernel's
    /// groups: a key routed straight at its one object ([`Self::direct`])
    /// has none.
    pub groups: BTreeMap<u32, BTreeSet<u32>>,
    /// What each group id stands for: every key of a learned route, with
    /// or without a group in the kernel (a direct key keeps its id's slot).
    pub group_keys: BTreeMap<u32, GroupKey>,
    /// Keys whose routes point straight at their one nexthop object, by
    /// group id (see `groups`, "Direct keys").
    pub direct: BTreeMap<u32, Direct>,
    /// Two intents that want the same route; the first one wins.
    pub conflicts: Vec<String>,
    /// Every route but the learned ones (those of the intent, the tables'
    /// defaults, the sink's): what a pass that leaves learned routes to
    /// `super::scoped` may delete next time.
    #[serde(skip)]
    pub host_routes: BTreeSet<RouteId>,
    /// (table, prefix) of every route out of a VM link or the sink: no
    /// learned route shadows these (local wins).
    #[serde(skip)]
    pub local: BTreeSet<(u32, IpNet)>,
    /// The hop sets of each group's prefixes ([`GroupUse`]).
    #[serde(skip)]
    pub group_use: BTreeMap<u32, GroupUse>,
    /// Objects a failover fast path took out of groups since the pass
    /// that computed these groups: the next scoped pass deletes those no
    /// group holds (its own candidates are the members it changes).
    #[serde(skip)]
    pub dropped: BTreeSet<u32>,
    /// Some group or object id is not at its natural slot (it probed past
    /// a hash collision): a scoped pass then cannot find ids by their key
    /// alone, nor delete without moving what the full pass would place.
    #[serde(skip)]
    pub probed: bool,
}

/// A key routed straight at its one nexthop object, with no group in the
/// kernel: its routes and the prefixes they are for (at most
/// `groups::DIRECT_MAX`), which a pass rewrites when the key gets a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Direct {
    pub object: u32,
    pub prefixes: BTreeSet<IpNet>,
}

/// The prefixes of one nexthop group, as the last pass computed them:
/// what lets a scoped pass ([`super::scoped`]) recompute the group's
/// members from the prefixes it changes alone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupUse {
    /// The distinct hop sets of the group's learned prefixes (of any
    /// table, shadowed or not), with how many prefixes have each; the
    /// members follow from them (`groups::members`).
    pub sets: BTreeMap<BTreeSet<NextHopSpec>, usize>,
    /// Hops of a session relearning its table were added to the members
    /// (`Rib::syncing_hops`): the sets alone do not give them.
    pub returning: bool,
}

impl GroupUse {
    /// Learned prefixes keyed to the group.
    pub fn prefixes(&self) -> usize {
        self.sets.values().sum()
    }
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedLink {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    pub alias: Option<String>,
    /// Addresses carrying l3hv's protocol (all addresses, for uplinks).
    pub addresses: BTreeSet<IpNet>,
}

impl ObservedLink {
    /// The ownership l3hv left on this link, if any.
    pub fn ownership(&self) -> Option<Ownership> {
        let alias = self.alias.as_deref()?;
        if alias.starts_with(ALIAS_CREATED) {
            Some(Ownership::Created { multi_queue: false })
        } else if alias == ALIAS_SINK {
            Some(Ownership::Sink)
        } else if alias.starts_with(ALIAS_ADOPTED) {
            Some(Ownership::Adopted)
        } else {
            None
        }
    }
}

/// The kernel state l3hv found (only what it may own or depends on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ObservedKernel {
    pub links: BTreeMap<String, ObservedLink>,
    /// Routes carrying l3hv's protocol.
    pub routes: BTreeMap<RouteId, SharedAttrs>,
    /// Further routes with an id already seen (IPv4 `append`ed duplicates).
    pub duplicate_routes: Vec<(RouteId, SharedAttrs)>,
    /// Rules carrying l3hv's protocol.
    pub rules: BTreeSet<RuleSpec>,
    /// Every (v6, priority) of a rule that is not l3hv's.
    pub foreign_rules: BTreeSet<(bool, u32)>,
    /// IPv6 proxy entries carrying l3hv's protocol.
    pub proxies: BTreeSet<(String, std::net::Ipv6Addr)>,
    /// Nexthop objects and groups carrying l3hv's protocol.
    pub nexthops: BTreeMap<u32, NextHopSpec>,
    pub groups: BTreeMap<u32, BTreeSet<u32>>,
    /// Sysctls that were read: `None` when the file does not exist. A
    /// desired sysctl missing from this map was verified earlier and is
    /// trusted.
    pub sysctls: BTreeMap<SysctlPath, Option<String>>,
    /// The links that had carrier (IFF_LOWER_UP) when dumped: what a
    /// notification about an uplink is compared with (its nexthop objects
    /// exist only while it has carrier).
    #[serde(skip)]
    pub carrier: BTreeSet<String>,
}
