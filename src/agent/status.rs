//! What `l3hv status` shows: per-interface kernel state and the last
//! reconcile's outcome. Built from the agent's state on request.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::Config;
use crate::intent::Intent;
use crate::netlink::apply::OpFailure;
use crate::reconcile::{self, KernelOp};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub at_unix: u64,
    #[serde(rename = "duration_ms", serialize_with = "as_millis")]
    pub duration: Duration,
    /// Where the time went: kernel dump, sysctl reads, desired + plan, apply.
    #[serde(serialize_with = "as_millis")]
    pub dump: Duration,
    /// What the pass planned against: `full` (a whole dump), `host` (links,
    /// addresses and rules dumped, routes, nexthop objects and proxy
    /// entries as the previous passes left them), `cache` (no dump) or
    /// `scoped` (no dump, and only the learned prefixes that changed were
    /// computed).
    pub observed: &'static str,
    /// Learned routes were computed for the prefixes that changed alone
    /// (`reconcile::scoped`), not all of them.
    pub learned_scoped: bool,
    #[serde(serialize_with = "as_millis")]
    pub sysctls: Duration,
    #[serde(serialize_with = "as_millis")]
    pub compute: Duration,
    #[serde(serialize_with = "as_millis")]
    pub apply: Duration,
    pub planned: usize,
    pub applied: usize,
    pub failed: Vec<OpFailure>,
    pub conflicts: Vec<String>,
    /// The pass could not run at all (dump failed).
    pub error: Option<String>,
    /// Failover fast path before this pass: nexthop groups that lost a
    /// member in place (their objects deleted, or the groups replaced)
    /// after a path was lost, and how long that took.
    pub fast_path_groups: usize,
    #[serde(serialize_with = "as_millis")]
    pub fast_path: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UplinkStatus {
    pub fabric: String,
    pub path: String,
    pub interface: String,
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteStatus {
    pub table: u32,
    pub dst: String,
    pub via: Option<String>,
    /// `installed`, or the kernel's refusal.
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfaceStatus {
    pub vm: String,
    pub name: String,
    pub mac: String,
    pub fabric: String,
    pub link: String,
    pub present: bool,
    /// The VM's addresses and prefixes (what is routed to it).
    pub addresses: Vec<String>,
    /// The gateway addresses on the host side of the interface.
    pub gateway_addresses: Vec<String>,
    pub routes: Vec<RouteStatus>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub hypervisor: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub vms: usize,
    pub uplinks: Vec<UplinkStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    pub routes_programmed: usize,
    /// VM routes waiting for their interface to exist.
    pub routes_pending: usize,
    pub routes_failed: usize,
    /// Learned paths in the RIB, and prefixes with a selected route.
    pub rib_paths: usize,
    pub rib_prefixes: usize,
    pub last_reconcile: Option<ReconcileReport>,
    /// Reconcile passes since start, and how many of them computed only
    /// the learned prefixes that changed (`reconcile::scoped`).
    pub reconcile_passes: u64,
    pub reconcile_scoped_passes: u64,
    /// Of those, passes that dumped the whole kernel.
    pub reconcile_full_passes: u64,
    /// How learned routes are programmed (`kernel.nexthop_objects`).
    pub nexthops: NexthopStatus,
    /// DHCP and RA counters per VM interface, when those services run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<crate::services::ServicesStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NexthopStatus {
    /// `objects` (groups, routes with nhid) or `multipath`.
    pub mode: String,
    /// The configured value: auto, on or off.
    pub setting: String,
    /// Whether the kernel has nexthop objects (probed at start).
    pub kernel_support: Option<bool>,
    /// Objects (one per next hop and uplink) and groups l3hv wants.
    pub objects: usize,
    pub groups: usize,
    /// Origins whose routes point straight at their one object, with no
    /// group yet (one path, few prefixes: `reconcile::groups`).
    pub direct: usize,
    /// Failover fast paths since start, and their kernel writes: member
    /// objects deleted, groups replaced.
    pub failovers: u64,
    pub failover_objects_deleted: u64,
    pub failover_groups_replaced: u64,
}

/// The interface an operation concerns, if any.
pub fn op_interface(op: &KernelOp) -> Option<&str> {
    match op {
        KernelOp::CreateTap { name, .. }
        | KernelOp::CreateSink { name }
        | KernelOp::SetAlias { name, .. }
        | KernelOp::SetUp { name }
        | KernelOp::DeleteLink { name } => Some(name),
        KernelOp::AddAddress { ifname, .. }
        | KernelOp::DelAddress { ifname, .. }
        | KernelOp::AddProxy { ifname, .. }
        | KernelOp::DelProxy { ifname, .. } => Some(ifname),
        KernelOp::AddRoute { attrs, .. } | KernelOp::DelRoute { attrs, .. } => attrs.oif.as_deref(),
        KernelOp::Sysctl { path, .. } => path.split('/').nth(3),
        KernelOp::AddRule { .. }
        | KernelOp::DelRule { .. }
        | KernelOp::DelForeignRule { .. }
        | KernelOp::AddNexthop { .. }
        | KernelOp::AddGroup { .. }
        | KernelOp::DelNexthop { .. } => None,
    }
}

/// A one-line, `ip(8)`-like description of an operation.
pub fn describe(op: &KernelOp) -> String {
    match op {
        KernelOp::CreateTap { name, multi_queue } => {
            format!(
                "tuntap add {name} mode tap vnet_hdr{}",
                if *multi_queue { " multi_queue" } else { "" }
            )
        }
        KernelOp::CreateSink { name } => format!("tuntap add {name} mode tun"),
        KernelOp::SetAlias { name, alias } => format!("link set {name} alias {alias:?}"),
        KernelOp::SetUp { name } => format!("link set {name} up"),
        KernelOp::DeleteLink { name } => format!("link del {name}"),
        KernelOp::Sysctl { path, value } => format!("sysctl {}={value}", path.replace('/', ".")),
        KernelOp::AddAddress { ifname, addr, .. } => format!("addr add {addr} dev {ifname}"),
        KernelOp::DelAddress { ifname, addr } => format!("addr del {addr} dev {ifname}"),
        KernelOp::AddRoute { id, attrs, replace } => format!(
            "route {} {} table {} metric {}{}{}",
            if *replace { "replace" } else { "add" },
            id.dst,
            id.table,
            id.metric,
            attrs
                .nh_id
                .map(|n| format!(" nhid {n}"))
                .unwrap_or_default()
                + &attrs
                    .gateway
                    .map(|g| format!(" via {g}"))
                    .unwrap_or_default(),
            attrs
                .oif
                .as_ref()
                .map(|o| format!(" dev {o}"))
                .unwrap_or_default(),
        ),
        KernelOp::DelRoute { id, .. } => format!(
            "route del {} table {} metric {}",
            id.dst, id.table, id.metric
        ),
        KernelOp::AddRule { rule } => {
            format!("rule add prio {} lookup {}", rule.priority, rule.table)
        }
        KernelOp::DelRule { rule } => {
            format!("rule del prio {} lookup {}", rule.priority, rule.table)
        }
        KernelOp::DelForeignRule { priority, .. } => format!("rule del prio {priority}"),
        KernelOp::AddProxy { ifname, addr } => format!("neigh add proxy {addr} dev {ifname}"),
        KernelOp::DelProxy { ifname, addr } => format!("neigh del proxy {addr} dev {ifname}"),
        KernelOp::AddNexthop { id, spec, replace } => format!(
            "nexthop {} id {id} via {} dev {}{}",
            if *replace { "replace" } else { "add" },
            spec.gateway,
            spec.oif,
            if spec.onlink { " onlink" } else { "" }
        ),
        KernelOp::AddGroup {
            id,
            members,
            replace,
        } => format!(
            "nexthop {} id {id} group {}",
            if *replace { "replace" } else { "add" },
            members
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join("/")
        ),
        KernelOp::DelNexthop { id, .. } => format!("nexthop del id {id}"),
    }
}

pub fn build(
    config: &Config,
    intent: &Intent,
    rib: &crate::rib::Rib,
    last: Option<&ReconcileReport>,
    started: SystemTime,
) -> Status {
    let desired = reconcile::desired(config, intent, rib);
    let failed_routes: Vec<(&reconcile::RouteId, &str)> = last
        .map(|r| {
            r.failed
                .iter()
                .filter_map(|f| match &f.op {
                    KernelOp::AddRoute { id, .. } => Some((id, f.error.as_str())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut interfaces = Vec::new();
    let mut programmed = 0;
    let mut pending = 0;
    for (vm, i) in intent.interfaces() {
        let link = desired.links.get(&i.name);
        // An interface that does not exist yet (a libvirt-managed tap
        // before QEMU opens it) has its routes pending, not installed.
        let present = crate::netlink::tap::ifindex(&i.name).is_some();
        let routes: Vec<RouteStatus> = desired
            .routes
            .iter()
            .filter(|(_, a)| a.oif.as_deref() == Some(i.name.as_str()))
            .map(|(id, a)| {
                let state = failed_routes.iter().find(|(f, _)| *f == id).map_or_else(
                    || if present { "installed" } else { "pending" }.to_string(),
                    |(_, e)| e.to_string(),
                );
                RouteStatus {
                    table: id.table,
                    dst: id.dst.to_string(),
                    via: a.gateway.map(|g| g.to_string()),
                    state,
                }
            })
            .collect();
        programmed += routes.iter().filter(|r| r.state == "installed").count();
        pending += routes.iter().filter(|r| r.state == "pending").count();
        let errors: Vec<String> = last
            .map(|r| {
                r.failed
                    .iter()
                    .filter(|f| op_interface(&f.op) == Some(i.name.as_str()))
                    .map(|f| format!("{}: {}", describe(&f.op), f.error))
                    .collect()
            })
            .unwrap_or_default();
        interfaces.push(InterfaceStatus {
            vm: vm.to_string(),
            name: i.name.clone(),
            mac: i.mac.to_string(),
            fabric: i.fabric.clone(),
            link: serde_json::to_value(i.link)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            present,
            addresses: i
                .host_prefixes()
                .map(|p| p.to_string())
                .chain(
                    i.routed
                        .iter()
                        .map(|r| format!("{} via {}", r.prefix, r.via)),
                )
                .collect(),
            gateway_addresses: link
                .map(|l| l.addresses.iter().map(|a| a.to_string()).collect())
                .unwrap_or_default(),
            routes,
            errors,
        });
    }
    let failed_names: BTreeSet<_> = failed_routes.iter().map(|(id, _)| **id).collect();
    Status {
        hypervisor: config.hypervisor.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: started.elapsed().map_or(0, |d| d.as_secs()),
        vms: intent.vms.len(),
        uplinks: config
            .uplinks()
            .iter()
            .map(|u| UplinkStatus {
                fabric: u.fabric.to_string(),
                path: u.path.to_string(),
                interface: u.config.interface.clone(),
                present: crate::netlink::tap::ifindex(&u.config.interface).is_some(),
            })
            .collect(),
        interfaces,
        routes_programmed: programmed,
        routes_pending: pending,
        routes_failed: failed_names.len(),
        rib_paths: rib.path_count(),
        rib_prefixes: rib.prefix_count(),
        last_reconcile: last.cloned(),
        reconcile_passes: 0,
        reconcile_scoped_passes: 0,
        reconcile_full_passes: 0,
        nexthops: NexthopStatus::default(),
        services: None,
    }
}

/// Upper bounds (seconds) of the reconcile duration histogram: from a
/// no-op pass (well under a millisecond) to a full table at scale.
pub const RECONCILE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Totals over every reconcile pass since start, accumulated by the agent
/// (the only writer) and published read-only after each pass: what the
/// metrics endpoint turns into counters and a histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReconcileStats {
    pub passes: u64,
    /// Of those, passes that computed the learned routes of the changed
    /// prefixes alone (`reconcile::scoped`).
    pub scoped: u64,
    /// Of those, passes that dumped the whole kernel (the repair path).
    pub full: u64,
    /// Passes that could not run (the dump failed).
    pub errors: u64,
    pub operations_applied: u64,
    pub operations_failed: u64,
    /// Per-bucket (not cumulative) counts, one per [`RECONCILE_BUCKETS`]
    /// bound plus the last for +Inf.
    pub duration_buckets: Vec<u64>,
    pub duration_sum: Duration,
    /// Intent changes (SetVm/RemoveVm from the hook, D-Bus or the CLI):
    /// from the agent taking the call to its answer, which waits for the
    /// local reconcile. Per-bucket counts as `duration_buckets`.
    pub intent_call_buckets: Vec<u64>,
    pub intent_call_sum: Duration,
    /// Failover fast paths (a path lost: nexthop groups changed in place
    /// before the pass): from the event to the kernel's acknowledgement,
    /// per-bucket counts as `duration_buckets`.
    pub failover_buckets: Vec<u64>,
    pub failover_sum: Duration,
    pub failovers: u64,
    /// Their kernel writes: member objects deleted (the kernel takes them
    /// out of every group) and groups replaced.
    pub failover_objects_deleted: u64,
    pub failover_groups_replaced: u64,
    /// The last pass.
    pub last: Option<ReconcileReport>,
}

fn bucket(buckets: &mut Vec<u64>, d: Duration) {
    if buckets.len() != RECONCILE_BUCKETS.len() + 1 {
        *buckets = vec![0; RECONCILE_BUCKETS.len() + 1];
    }
    let secs = d.as_secs_f64();
    let i = RECONCILE_BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(RECONCILE_BUCKETS.len());
    buckets[i] += 1;
}

impl ReconcileStats {
    /// Adds one answered intent change.
    pub fn record_intent_call(&mut self, took: Duration) {
        bucket(&mut self.intent_call_buckets, took);
        self.intent_call_sum += took;
    }

    /// Adds one failover fast path.
    pub fn record_failover(&mut self, took: Duration, deleted: usize, replaced: usize) {
        bucket(&mut self.failover_buckets, took);
        self.failover_sum += took;
        self.failovers += 1;
        self.failover_objects_deleted += deleted as u64;
        self.failover_groups_replaced += replaced as u64;
    }

    /// Adds one pass.
    pub fn record(&mut self, report: &ReconcileReport) {
        self.passes += 1;
        if report.learned_scoped {
            self.scoped += 1;
        }
        if report.observed == "full" {
            self.full += 1;
        }
        if report.error.is_some() {
            self.errors += 1;
        }
        self.operations_applied += report.applied as u64;
        self.operations_failed += report.failed.len() as u64;
        bucket(&mut self.duration_buckets, report.duration);
        self.duration_sum += report.duration;
        self.last = Some(report.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_accumulate_into_buckets() {
        let mut s = ReconcileStats::default();
        let r = |ms: u64, applied: usize| ReconcileReport {
            duration: Duration::from_millis(ms),
            applied,
            ..Default::default()
        };
        s.record(&r(3, 2));
        s.record(&r(3, 0));
        s.record(&r(60_000, 1));
        assert_eq!(s.passes, 3);
        assert_eq!(s.operations_applied, 3);
        // 3ms ≤ 0.005
        assert_eq!(s.duration_buckets[3], 2);
        assert_eq!(*s.duration_buckets.last().unwrap(), 1);
        assert_eq!(s.duration_sum, Duration::from_millis(60_006));
        assert_eq!(s.last.as_ref().unwrap().applied, 1);
    }
}
