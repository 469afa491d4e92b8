//! Executes a [`Plan`]: phases in order, the operations of one phase
//! pipelined on the netlink socket. Every refusal is reported per
//! operation, never lost.

use futures::StreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol, AddressScope,
};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHop, RouteNextHopFlags,
    RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::LinkUnspec;
use serde::Serialize;

use std::collections::{BTreeSet, HashMap};

use super::{Kernel, errno, nexthop, sysctl, tap};
use crate::reconcile::{KernelOp, Plan, RouteAttrs, RouteId, RouteKind, RuleSpec};

/// How many requests may be in flight on the socket at once.
const PIPELINE: usize = 64;

/// How many batched requests are built before they are sent (the channel
/// sends them 64 to a datagram).
const BATCH_SLICE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpFailure {
    pub op: KernelOp,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub applied: usize,
    pub failed: Vec<OpFailure>,
}

#[derive(Debug, thiserror::Error)]
enum OpError {
    #[error("{0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("interface {0} does not exist")]
    NoSuchLink(String),
}

impl Kernel {
    /// Applies `plan`; the report lists each operation the kernel refused.
    pub async fn apply(&self, plan: &Plan) -> ApplyReport {
        let mut report = ApplyReport::default();
        // Objects the kernel refused in this apply (an uplink without
        // carrier): groups are written without them rather than refused
        // whole; the refusal is reported on the object, and the next pass
        // (retry, link event) adds it back.
        let mut refused_nexthops: BTreeSet<u32> = BTreeSet::new();
        // Operations that go over the synchronous batch socket wait here
        // while the phases after theirs hold only more of them: a learned
        // route's object, its group and the route itself leave in one
        // datagram (the kernel takes a datagram's messages in order) where
        // they were three round trips, one of them through rtnetlink's
        // connection task; a VM's link, addresses, routes and proxy entries
        // likewise (six round trips, each with its interface looked up,
        // were half of a VM start's kernel work). They are sent before any
        // other operation of a later phase, so the order of phases holds.
        let mut pending: Vec<&KernelOp> = Vec::new();
        for phase in plan.phases() {
            if phase.is_empty() {
                continue;
            }
            let (batched, phase): (Vec<&KernelOp>, Vec<&KernelOp>) =
                phase.iter().partition(|op| batched(op));
            // Deletions of groups and objects wait for the adds before them,
            // retries included: a group the first try refused (one of its
            // objects was) must be in place, and its routes on it, before
            // the group they leave is deleted, which takes its routes along.
            let deletes = batched
                .iter()
                .any(|op| matches!(op, KernelOp::DelNexthop { .. }));
            let adds = pending.iter().any(|op| {
                matches!(
                    op,
                    KernelOp::AddNexthop { .. }
                        | KernelOp::AddGroup { .. }
                        | KernelOp::AddRoute { .. }
                )
            });
            if deletes && adds {
                self.apply_batched(
                    std::mem::take(&mut pending),
                    &mut refused_nexthops,
                    &mut report,
                )
                .await;
            }
            if phase.is_empty() {
                pending.extend(batched);
                continue;
            }
            // The operations of earlier phases first; this phase's batched
            // ones wait for the next phases' (a VM's alias, set in the phase
            // of its sysctls, leaves with its link set up, addresses and
            // routes: one round trip less per VM start).
            if !pending.is_empty() {
                self.apply_batched(
                    std::mem::take(&mut pending),
                    &mut refused_nexthops,
                    &mut report,
                )
                .await;
            }
            pending.extend(batched);
            // Sysctls and tap ioctls are synchronous file/ioctl calls of
            // microseconds, made in place: the agent runs on a thread of its
            // own (`agent::spawn`), and a hop to a blocking thread and back
            // cost a VM start two wake-ups per phase. A sysctl write that
            // waits for RTNL blocks the agent and the BGP sessions on its
            // thread (KEEPALIVEs wait too; not measured, see issue 6).
            // Link deletions go through rtnetlink's connection, pipelined:
            // each holds RTNL for milliseconds (RCU grace periods), so a
            // batch behind one would wait for all of them in turn.
            let mut deletions = Vec::new();
            for op in phase {
                let r = match op {
                    KernelOp::Sysctl { path, value } => sysctl::write(path, value),
                    KernelOp::CreateTap { name, multi_queue } => tap::create(name, *multi_queue),
                    KernelOp::CreateSink { name } => tap::create_sink(name),
                    KernelOp::DeleteLink { name } => {
                        deletions.push(name);
                        continue;
                    }
                    other => Err(std::io::Error::other(format!(
                        "not an operation of its own: {other:?}"
                    ))),
                };
                match r {
                    Ok(()) => report.applied += 1,
                    Err(e) => report.failed.push(OpFailure {
                        op: op.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            let mut results = futures::stream::iter(deletions)
                .map(|name| async move { (name, self.delete_link(name).await) })
                .buffer_unordered(PIPELINE);
            while let Some((name, r)) = results.next().await {
                match r {
                    Ok(()) => report.applied += 1,
                    Err(e) => report.failed.push(OpFailure {
                        op: KernelOp::DeleteLink { name: name.clone() },
                        error: e.to_string(),
                    }),
                }
            }
        }
        if !pending.is_empty() {
            self.apply_batched(pending, &mut refused_nexthops, &mut report)
                .await;
        }
        report
    }

    /// Nexthop objects, groups, their deletion and the routes of learned
    /// prefixes on groups, in acknowledged batches on their own socket, in
    /// place (blocking: see `apply`). An object the kernel refuses makes
    /// every group naming it fail in the same batch: those groups go once
    /// more without it, and the routes that failed on them after them.
    async fn apply_batched(
        &self,
        ops: Vec<&KernelOp>,
        refused: &mut BTreeSet<u32>,
        report: &mut ApplyReport,
    ) {
        let mut outcome: Vec<Result<(), String>> = vec![Ok(()); ops.len()];
        let first: Vec<usize> = (0..ops.len()).collect();
        self.send_batch(&ops, &first, &mut outcome, refused).await;
        let regroup: Vec<usize> = (0..ops.len())
            .filter(|&i| {
                outcome[i].is_err()
                    && matches!(ops[i], KernelOp::AddGroup { members, .. }
                        if members.iter().any(|m| refused.contains(m)))
            })
            .collect();
        if !regroup.is_empty() {
            self.send_batch(&ops, &regroup, &mut outcome, refused).await;
            // Then the routes that failed on a group now in place.
            let regrouped: BTreeSet<u32> = regroup
                .iter()
                .filter(|&&i| outcome[i].is_ok())
                .filter_map(|&i| match ops[i] {
                    KernelOp::AddGroup { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            let reroute: Vec<usize> = (0..ops.len())
                .filter(|&i| {
                    outcome[i].is_err()
                        && matches!(ops[i], KernelOp::AddRoute { attrs, .. }
                            if attrs.nh_id.is_some_and(|g| regrouped.contains(&g)))
                })
                .collect();
            if !reroute.is_empty() {
                self.send_batch(&ops, &reroute, &mut outcome, refused).await;
            }
        }
        for (op, r) in ops.into_iter().zip(outcome) {
            match r {
                Ok(()) => report.applied += 1,
                Err(error) => report.failed.push(OpFailure {
                    op: op.clone(),
                    error,
                }),
            }
        }
    }

    /// Sends `ops[i]` for each `i` of `which` in one batch; their results go
    /// to `outcome`, refused objects to `refused`.
    async fn send_batch(
        &self,
        ops: &[&KernelOp],
        which: &[usize],
        outcome: &mut [Result<(), String>],
        refused: &mut BTreeSet<u32>,
    ) {
        // Built and sent a slice at a time: a million routes' requests at
        // once were ~100 MB beside the pass's own state.
        let mut indexes = Indexes::default();
        for (n, chunk) in which.chunks(BATCH_SLICE).enumerate() {
            if n > 0 {
                // The BGP sessions share the agent's thread
                // (`agent::spawn`): between slices (4,096 operations, about
                // 13 ms of kernel work here) they send their KEEPALIVEs and
                // read, where a pass of a million routes held them for
                // seconds. A pass of one slice (every single UPDATE's)
                // never yields.
                tokio::task::yield_now().await;
            }
            let mut sent: Vec<usize> = Vec::with_capacity(chunk.len());
            let mut requests: Vec<nexthop::Request> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                match self.request(ops[i], refused, &mut indexes) {
                    Ok(Some(r)) => {
                        sent.push(i);
                        requests.push(r);
                    }
                    Ok(None) => outcome[i] = Ok(()),
                    Err(e) => {
                        if let KernelOp::AddNexthop { id, .. } = ops[i] {
                            refused.insert(*id);
                        }
                        outcome[i] = Err(e);
                    }
                }
            }
            if requests.is_empty() {
                continue;
            }
            // In place, like the sysctls (see `apply`): on the failover
            // path the hop to a blocking thread was two wake-ups before the
            // groups changed.
            let results = match self.nexthops.lock() {
                Ok(mut channel) => channel.execute(&requests),
                // Poisoned (a batch panicked half-way): its socket was taken
                // out of the channel, so this batch opens a new one.
                Err(poisoned) => poisoned.into_inner().execute(&requests),
            };
            for (i, r) in sent.into_iter().zip(results) {
                let r = match (ops[i], r) {
                    (op, Err(e)) if e.errno().is_some_and(|n| done_by(op, n)) => Ok(()),
                    (_, r) => r,
                };
                if r.is_err() {
                    if let KernelOp::AddNexthop { id, .. } = ops[i] {
                        refused.insert(*id);
                    }
                }
                outcome[i] = r.map_err(|e| e.to_string());
            }
        }
    }

    /// The wire request of a batched operation; `None`: nothing to send
    /// (what it deletes went with its link); Err is the reason it is not
    /// sent (reported as the operation's failure).
    fn request(
        &self,
        op: &KernelOp,
        refused: &BTreeSet<u32>,
        indexes: &mut Indexes,
    ) -> Result<Option<nexthop::Request>, String> {
        let mut index = |name: &str| {
            indexes
                .get(name)
                .ok_or_else(|| OpError::NoSuchLink(name.to_string()).to_string())
        };
        Ok(Some(match op {
            KernelOp::AddNexthop { id, spec, replace } => (
                nexthop::RTM_NEWNEXTHOP,
                create_flags(*replace),
                nexthop::NexthopMessage::gateway(
                    *id,
                    spec.gateway,
                    index(&spec.oif)?,
                    spec.onlink,
                    self.protocol,
                )
                .emit(),
            ),
            KernelOp::AddGroup {
                id,
                members,
                replace,
            } => {
                let members: Vec<u32> = members
                    .iter()
                    .copied()
                    .filter(|m| !refused.contains(m))
                    .collect();
                if members.is_empty() {
                    return Err("every member object was refused".into());
                }
                (
                    nexthop::RTM_NEWNEXTHOP,
                    create_flags(*replace),
                    nexthop::NexthopMessage::group(*id, &members, self.protocol).emit(),
                )
            }
            KernelOp::DelNexthop { id, .. } => (
                nexthop::RTM_DELNEXTHOP,
                0,
                nexthop::NexthopMessage::by_id(*id).emit(),
            ),
            KernelOp::AddRoute { id, attrs, replace } => (
                libc::RTM_NEWROUTE,
                create_flags(*replace),
                emit(
                    &self
                        .route_message(id, attrs, indexes)
                        .map_err(|e| e.to_string())?,
                ),
            ),
            KernelOp::DelRoute { id, attrs } => (
                libc::RTM_DELROUTE,
                0,
                emit(
                    &self
                        .del_route_message(id, attrs, indexes)
                        .map_err(|e| e.to_string())?,
                ),
            ),
            KernelOp::SetAlias { name, alias } => (
                libc::RTM_SETLINK,
                0,
                emit(
                    &LinkUnspec::new_with_index(index(name)?)
                        .append_extra_attribute(LinkAttribute::IfAlias(alias.clone()))
                        .build(),
                ),
            ),
            KernelOp::SetUp { name } => (
                libc::RTM_SETLINK,
                0,
                emit(&LinkUnspec::new_with_index(index(name)?).up().build()),
            ),
            KernelOp::AddAddress {
                ifname,
                addr,
                gateway,
            } => {
                let mut m = self.address_message(index(ifname)?, addr);
                if *gateway {
                    m.header.scope = AddressScope::Link;
                    if addr.addr().is_ipv6() {
                        // fe80::1 cannot collide with an EUI-64 address; without
                        // nodad it sits tentative until QEMU attaches.
                        m.attributes
                            .push(AddressAttribute::Flags(AddressFlags::Nodad));
                    }
                }
                m.attributes
                    .push(AddressAttribute::Protocol(AddressProtocol::Other(
                        self.protocol,
                    )));
                (libc::RTM_NEWADDR, create_flags(false), emit(&m))
            }
            KernelOp::DelAddress { ifname, addr } => {
                let Some(idx) = indexes.get(ifname) else {
                    return Ok(None);
                };
                (libc::RTM_DELADDR, 0, emit(&self.address_message(idx, addr)))
            }
            KernelOp::AddProxy { ifname, addr } => {
                let mut m = self.proxy_message(index(ifname)?, addr);
                m.header.state = netlink_packet_route::neighbour::NeighbourState::Permanent;
                m.attributes
                    .push(NeighbourAttribute::Protocol(RouteProtocol::Other(
                        self.protocol,
                    )));
                (libc::RTM_NEWNEIGH, create_flags(false), emit(&m))
            }
            KernelOp::DelProxy { ifname, addr } => {
                let Some(idx) = indexes.get(ifname) else {
                    return Ok(None);
                };
                (libc::RTM_DELNEIGH, 0, emit(&self.proxy_message(idx, addr)))
            }
            KernelOp::AddRule { rule } => (
                libc::RTM_NEWRULE,
                create_flags(false),
                emit(&self.rule_message(rule)),
            ),
            KernelOp::DelRule { rule } => (libc::RTM_DELRULE, 0, emit(&self.rule_message(rule))),
            KernelOp::DelForeignRule { v6, priority } => {
                let mut m = RuleMessage::default();
                m.header.family = family(*v6);
                m.attributes.push(RuleAttribute::Priority(*priority));
                (libc::RTM_DELRULE, 0, emit(&m))
            }
            other => return Err(format!("not a batched operation: {other:?}")),
        }))
    }

    /// An address as `ip address add` sends it (for IPv4 its local and
    /// peer address both `addr`).
    fn address_message(&self, index: u32, addr: &IpNet) -> AddressMessage {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        req.message_mut().clone()
    }

    /// The proxy entry for `addr` on the link `index` (NTF_PROXY).
    fn proxy_message(&self, index: u32, addr: &std::net::Ipv6Addr) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.ifindex = index;
        m.header.flags = NeighbourFlags::Proxy;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                *addr,
            )));
        m
    }

    /// Deletes a link; one already gone is done.
    async fn delete_link(&self, name: &str) -> Result<(), OpError> {
        let Some(idx) = tap::ifindex(name) else {
            return Ok(());
        };
        ignore(self.handle.link().del(idx).execute().await, libc::ENODEV)?;
        Ok(())
    }

    fn route_message(
        &self,
        id: &RouteId,
        attrs: &RouteAttrs,
        indexes: &mut Indexes,
    ) -> Result<RouteMessage, OpError> {
        let mut m = RouteMessage::default();
        let v6 = id.dst.addr().is_ipv6();
        m.header.address_family = family(v6);
        m.header.destination_prefix_length = id.dst.prefix_len();
        m.header.protocol = RouteProtocol::Other(self.protocol);
        // RT_TABLE_COMPAT in the header, the real table in RTA_TABLE.
        m.header.table = u8::try_from(id.table).unwrap_or(252);
        m.attributes.push(RouteAttribute::Table(id.table));
        m.attributes.push(RouteAttribute::Priority(id.metric));
        if id.dst.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    id.dst.addr(),
                )));
        }
        m.header.kind = match attrs.kind {
            RouteKind::Unicast => RouteType::Unicast,
            RouteKind::Blackhole => RouteType::BlackHole,
            RouteKind::Unreachable => RouteType::Unreachable,
        };
        m.header.scope = if attrs.kind == RouteKind::Unicast && attrs.gateway.is_none() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        if let Some(oif) = &attrs.oif {
            let idx = indexes
                .get(oif)
                .ok_or_else(|| OpError::NoSuchLink(oif.clone()))?;
            m.attributes.push(RouteAttribute::Oif(idx));
        }
        if let Some(gw) = attrs.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if !attrs.multipath.is_empty() {
            let mut hops = Vec::with_capacity(attrs.multipath.len());
            for h in &attrs.multipath {
                let idx = indexes
                    .get(&h.oif)
                    .ok_or_else(|| OpError::NoSuchLink(h.oif.clone()))?;
                let mut flags = RouteNextHopFlags::empty();
                if h.onlink {
                    flags |= RouteNextHopFlags::Onlink;
                }
                let mut hop = RouteNextHop::default();
                hop.flags = flags;
                hop.interface_index = idx;
                hop.attributes
                    .push(RouteAttribute::Gateway(RouteAddress::from(h.gateway)));
                hops.push(hop);
            }
            m.attributes.push(RouteAttribute::MultiPath(hops));
            m.header.scope = RouteScope::Universe;
        }
        if let Some(id) = attrs.nh_id {
            // The group says how to forward; the route carries no
            // oif/gateway/multipath of its own (the kernel refuses both).
            m.attributes.push(RouteAttribute::NhId(id));
            m.header.scope = RouteScope::Universe;
        }
        if let Some(src) = attrs.pref_src {
            m.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        if attrs.onlink {
            m.header.flags |= RouteFlags::Onlink;
        }
        Ok(m)
    }

    /// The route to delete, matched by table, destination, metric and
    /// protocol: the group it pointed at may be gone already, and the
    /// route may have gone with its link ("no such route" is done).
    fn del_route_message(
        &self,
        id: &RouteId,
        attrs: &RouteAttrs,
        indexes: &mut Indexes,
    ) -> Result<RouteMessage, OpError> {
        let mut attrs = RouteAttrs::clone(attrs);
        attrs.nh_id = None;
        if attrs
            .oif
            .as_deref()
            .is_some_and(|n| indexes.get(n).is_none())
        {
            attrs.oif = None;
        }
        let mut msg = self.route_message(id, &attrs, indexes)?;
        // Any scope, as `ip route del` asks: a route on a group has
        // scope universe although it names no gateway here.
        msg.header.scope = RouteScope::NoWhere;
        Ok(msg)
    }

    fn rule_message(&self, r: &RuleSpec) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = family(r.v6);
        // An unspecified action makes lookups fail with EINVAL: always
        // "to table".
        m.header.action = RuleAction::ToTable;
        m.header.table = u8::try_from(r.table).unwrap_or(252);
        m.attributes.push(RuleAttribute::Table(r.table));
        m.attributes.push(RuleAttribute::Priority(r.priority));
        m.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(self.protocol)));
        if let Some(iif) = &r.iif {
            m.attributes.push(RuleAttribute::Iifname(iif.clone()));
        }
        if let Some(src) = r.src {
            m.header.src_len = src.prefix_len();
            m.attributes.push(RuleAttribute::Source(src.addr()));
        }
        if let Some(n) = r.suppress_prefixlength {
            m.attributes.push(RuleAttribute::SuppressPrefixLen(n));
        }
        m
    }
}

/// Goes over the synchronous batch socket ([`nexthop::Channel`]) rather
/// than rtnetlink: every netlink write but a link's deletion (nexthop
/// objects and groups, which rtnetlink 0.23 has no messages for, routes,
/// addresses, links set up or named, proxy entries, rules; rtnetlink's rule
/// requests cannot carry every attribute we set either).
fn batched(op: &KernelOp) -> bool {
    !matches!(
        op,
        KernelOp::Sysctl { .. }
            | KernelOp::CreateTap { .. }
            | KernelOp::CreateSink { .. }
            | KernelOp::DeleteLink { .. }
    )
}

/// Is `errno` the kernel saying `op` is already done? Deleting what is
/// already gone (with its link or uplink, or by hand), or adding an
/// address or proxy entry that is there.
fn done_by(op: &KernelOp, errno: i32) -> bool {
    match op {
        KernelOp::DelNexthop { .. } | KernelOp::DelProxy { .. } | KernelOp::DelRule { .. } => {
            errno == libc::ENOENT
        }
        KernelOp::DelForeignRule { .. } => errno == libc::ENOENT,
        KernelOp::DelRoute { .. } => errno == libc::ESRCH,
        KernelOp::DelAddress { .. } => errno == libc::EADDRNOTAVAIL,
        KernelOp::AddAddress { .. } | KernelOp::AddProxy { .. } => errno == libc::EEXIST,
        _ => false,
    }
}

/// Interface indexes looked up once per batch: a VM's link, addresses,
/// routes and proxy entries name the same tap, and each lookup is three
/// system calls. Links are created and deleted outside batches (`apply`).
#[derive(Default)]
struct Indexes(HashMap<String, Option<u32>>);

impl Indexes {
    fn get(&mut self, name: &str) -> Option<u32> {
        if let Some(i) = self.0.get(name) {
            return *i;
        }
        let i = tap::ifindex(name);
        self.0.insert(name.to_string(), i);
        i
    }
}

/// A message's payload as it goes on the wire.
fn emit(msg: &impl netlink_packet_core::Emitable) -> Vec<u8> {
    let mut b = vec![0u8; msg.buffer_len()];
    msg.emit(&mut b);
    b
}

fn family(v6: bool) -> AddressFamily {
    if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

/// NLM_F_CREATE|NLM_F_EXCL for a new object: an id held by someone
/// else's object is refused, never overwritten; NLM_F_REPLACE for ours.
fn create_flags(replace: bool) -> u16 {
    if replace {
        // With CREATE: a group the kernel dropped meanwhile (its uplink
        // lost carrier) is created again in the same pass.
        nexthop::NLM_F_REPLACE | nexthop::NLM_F_CREATE
    } else {
        nexthop::NLM_F_CREATE | nexthop::NLM_F_EXCL
    }
}

/// Deleting what is already gone (or adding what is there) is success.
fn ignore(r: Result<(), rtnetlink::Error>, code: i32) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if errno(&e) == Some(code) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{NextHopSpec, RouteAttrs};
    use std::process::Command;
    use std::sync::Arc;

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A route's attributes on nexthop group `group`.
    fn on_group(group: u32) -> Arc<RouteAttrs> {
        Arc::new(RouteAttrs {
            kind: RouteKind::Unicast,
            oif: None,
            gateway: None,
            onlink: false,
            pref_src: None,
            multipath: vec![],
            nh_id: Some(group),
        })
    }

    /// A learned route's object, group and route go in one batch; an
    /// object the kernel refuses in that batch (its uplink is down) leaves
    /// the group written without it and the route on the group, with only
    /// the object reported. A private namespace.
    #[test]
    fn a_refused_object_in_the_batch_leaves_the_group_without_it() {
        crate::testutil::in_private_netns(|| async {
            ip(&["link", "add", "up0", "type", "veth", "peer", "up1"]);
            ip(&["link", "add", "dn0", "type", "veth", "peer", "dn1"]);
            ip(&["link", "set", "up0", "up"]);
            ip(&["link", "set", "up1", "up"]);
            let kernel = Kernel::connect(203).expect("netlink");
            let hop = |gw: &str, oif: &str| NextHopSpec {
                gateway: gw.parse().unwrap(),
                oif: oif.into(),
                onlink: true,
            };
            let on = |dst: &str, group: u32, replace: bool| KernelOp::AddRoute {
                id: RouteId {
                    table: 90,
                    dst: dst.parse().unwrap(),
                    metric: 20,
                },
                attrs: on_group(group),
                replace,
            };
            let route = |dst: &str| on(dst, 10, false);
            let plan = Plan {
                add_nexthops: vec![
                    KernelOp::AddNexthop {
                        id: 1,
                        spec: hop("192.0.2.1", "up0"),
                        replace: false,
                    },
                    KernelOp::AddNexthop {
                        id: 2,
                        spec: hop("192.0.2.2", "dn0"),
                        replace: false,
                    },
                ],
                add_groups: vec![KernelOp::AddGroup {
                    id: 10,
                    members: vec![1, 2],
                    replace: false,
                }],
                add_routes: vec![route("198.18.0.0/24"), route("198.18.1.0/24")],
                ..Plan::default()
            };
            let report = kernel.apply(&plan).await;
            assert_eq!(report.applied, 4, "{report:?}");
            assert_eq!(report.failed.len(), 1, "{report:?}");
            assert!(
                matches!(report.failed[0].op, KernelOp::AddNexthop { id: 2, .. }),
                "{report:?}"
            );
            let groups = ip(&["nexthop", "show", "id", "10"]);
            assert!(groups.contains("group 1 "), "{groups}");
            let v4 = ip(&["route", "show", "table", "90"]);
            assert!(v4.contains("198.18.0.0/24 nhid 10"), "{v4}");
            assert!(v4.contains("198.18.1.0/24 nhid 10"), "{v4}");

            // The routes move to a new group whose other object is refused,
            // and the group they leave is deleted in the same plan: the new
            // group (retried without the refused object) and the routes on
            // it are in place before the old group goes, which would take
            // them along (silently: no RTM_DELROUTE to watch for, so the
            // order of the groups' own events is what shows it).
            let monitor = Command::new("ip")
                .args(["-o", "monitor", "nexthop"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("ip monitor");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let moved = Plan {
                add_nexthops: vec![KernelOp::AddNexthop {
                    id: 3,
                    spec: hop("192.0.2.3", "dn0"),
                    replace: false,
                }],
                add_groups: vec![KernelOp::AddGroup {
                    id: 11,
                    members: vec![1, 3],
                    replace: false,
                }],
                add_routes: vec![on("198.18.0.0/24", 11, true), on("198.18.1.0/24", 11, true)],
                remove_groups: vec![KernelOp::DelNexthop {
                    id: 10,
                    group: true,
                }],
                ..Plan::default()
            };
            let report = kernel.apply(&moved).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let _ = Command::new("kill").arg(monitor.id().to_string()).status();
            let events = monitor.wait_with_output().expect("monitor output");
            let events = String::from_utf8_lossy(&events.stdout);
            assert_eq!(report.applied, 4, "{report:?}");
            assert!(
                matches!(&report.failed[..], [f] if matches!(f.op, KernelOp::AddNexthop { id: 3, .. })),
                "{report:?}"
            );
            let created = events.find("id 11 group 1 ");
            let deleted = events.find("Deleted id 10 ");
            assert!(
                created.is_some() && deleted.is_some() && created < deleted,
                "the new group must exist before the old one goes:\n{events}"
            );
            let v4 = ip(&["route", "show", "table", "90"]);
            assert!(v4.contains("198.18.0.0/24 nhid 11"), "{v4}");
            assert!(v4.contains("198.18.1.0/24 nhid 11"), "{v4}");
            assert!(ip(&["nexthop", "show", "id", "11"]).contains("group 1 "));

            // Deleted in one batch too: the routes, then the group and the
            // object; deleting what is gone already is done.
            let del = |op: &KernelOp| match op {
                KernelOp::AddRoute { id, attrs, .. } => KernelOp::DelRoute {
                    id: *id,
                    attrs: attrs.clone(),
                },
                _ => unreachable!(),
            };
            let gone = Plan {
                remove: vec![
                    del(&moved.add_routes[0]),
                    del(&moved.add_routes[1]),
                    del(&moved.add_routes[1]),
                ],
                remove_groups: vec![KernelOp::DelNexthop {
                    id: 11,
                    group: true,
                }],
                remove_nexthops: vec![KernelOp::DelNexthop {
                    id: 1,
                    group: false,
                }],
                ..Plan::default()
            };
            let report = kernel.apply(&gone).await;
            assert_eq!((report.applied, report.failed.len()), (5, 0), "{report:?}");
            assert_eq!(ip(&["route", "show", "table", "90"]), "");
            assert_eq!(ip(&["nexthop", "show"]), "");
        });
    }

    /// A VM's link, addresses, routes, proxy entry and rules leave in the
    /// batch with one answer each: what is already done counts as done
    /// (an address or proxy entry there, a deletion of what is gone or on
    /// a link that is gone), a refusal is reported on its operation alone,
    /// and the operations after it still go through. A private namespace.
    #[test]
    fn a_vms_writes_go_in_one_batch_with_an_answer_each() {
        crate::testutil::in_private_netns(|| async {
            let kernel = Kernel::connect(203).expect("netlink");
            let addr = |a: &str, gateway: bool| KernelOp::AddAddress {
                ifname: "tb0".into(),
                addr: a.parse().unwrap(),
                gateway,
            };
            let attrs = |oif: &str| {
                Arc::new(RouteAttrs {
                    kind: RouteKind::Unicast,
                    oif: Some(oif.into()),
                    gateway: None,
                    onlink: false,
                    pref_src: None,
                    multipath: vec![],
                    nh_id: None,
                })
            };
            let id = |dst: &str| RouteId {
                table: 90,
                dst: dst.parse().unwrap(),
                metric: 10,
            };
            let route = |dst: &str, oif: &str| KernelOp::AddRoute {
                id: id(dst),
                attrs: attrs(oif),
                replace: false,
            };
            let rule = RuleSpec {
                v6: false,
                priority: 1234,
                iif: Some("tb0".into()),
                src: None,
                table: 90,
                suppress_prefixlength: None,
            };
            let proxy = |ifname: &str| KernelOp::AddProxy {
                ifname: ifname.into(),
                addr: "2001:db8::5".parse().unwrap(),
            };
            let plan = Plan {
                create_links: vec![KernelOp::CreateTap {
                    name: "tb0".into(),
                    multi_queue: false,
                }],
                configure_links: vec![
                    KernelOp::SetAlias {
                        name: "tb0".into(),
                        alias: "l3hv:test".into(),
                    },
                    KernelOp::Sysctl {
                        path: "net/ipv6/conf/tb0/addr_gen_mode".into(),
                        value: "1".into(),
                    },
                ],
                set_up: vec![KernelOp::SetUp { name: "tb0".into() }],
                add_addresses: vec![addr("169.254.0.1/32", true), addr("fe80::1/64", true)],
                add_routes: vec![
                    route("198.18.0.5/32", "tb0"),
                    // On a link that does not exist: refused alone.
                    route("198.18.0.6/32", "nosuch0"),
                    route("2001:db8::5/128", "tb0"),
                    proxy("tb0"),
                    KernelOp::AddRule { rule: rule.clone() },
                ],
                ..Plan::default()
            };
            let report = kernel.apply(&plan).await;
            assert_eq!(report.applied, 10, "{report:?}");
            assert!(
                matches!(&report.failed[..], [f] if f.error.contains("nosuch0")),
                "{report:?}"
            );
            let link = ip(&["-d", "link", "show", "tb0"]);
            assert!(link.contains("alias l3hv:test"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            let v4 = ip(&["-4", "address", "show", "tb0"]);
            assert!(v4.contains("169.254.0.1/32 scope link"), "{v4}");
            let v6 = ip(&["-6", "address", "show", "tb0"]);
            assert!(v6.contains("fe80::1/64"), "{v6}");
            let routes = ip(&["route", "show", "table", "90"]);
            assert!(routes.contains("198.18.0.5 dev tb0"), "{routes}");
            let routes = ip(&["-6", "route", "show", "table", "90"]);
            assert!(routes.contains("2001:db8::5 dev tb0"), "{routes}");
            let proxies = ip(&["-6", "neigh", "show", "proxy", "dev", "tb0"]);
            assert!(proxies.contains("2001:db8::5"), "{proxies}");
            let rules = ip(&["rule", "show", "priority", "1234"]);
            assert!(rules.contains("iif tb0 lookup 90"), "{rules}");

            // Again: the address and proxy entry are there (done), the rule
            // is refused (it exists: a rule of someone else's is never
            // taken over), the route is refused (exclusive create).
            let again = Plan {
                add_addresses: vec![addr("169.254.0.1/32", true)],
                add_routes: vec![
                    proxy("tb0"),
                    KernelOp::AddRule { rule: rule.clone() },
                    route("198.18.0.5/32", "tb0"),
                ],
                ..Plan::default()
            };
            let report = kernel.apply(&again).await;
            assert_eq!(report.applied, 2, "{report:?}");
            assert_eq!(report.failed.len(), 2, "{report:?}");

            // Deletions, of what is there and of what is gone.
            let del_route = |dst: &str, oif: &str| KernelOp::DelRoute {
                id: id(dst),
                attrs: attrs(oif),
            };
            let gone = Plan {
                remove: vec![
                    del_route("198.18.0.5/32", "tb0"),
                    del_route("198.18.0.7/32", "tb0"),
                    del_route("198.18.0.8/32", "nosuch0"),
                    KernelOp::DelAddress {
                        ifname: "tb0".into(),
                        addr: "169.254.0.1/32".parse().unwrap(),
                    },
                    KernelOp::DelAddress {
                        ifname: "tb0".into(),
                        addr: "169.254.0.9/32".parse().unwrap(),
                    },
                    KernelOp::DelAddress {
                        ifname: "nosuch0".into(),
                        addr: "169.254.0.9/32".parse().unwrap(),
                    },
                    KernelOp::DelProxy {
                        ifname: "tb0".into(),
                        addr: "2001:db8::5".parse().unwrap(),
                    },
                    KernelOp::DelProxy {
                        ifname: "tb0".into(),
                        addr: "2001:db8::6".parse().unwrap(),
                    },
                    KernelOp::DelProxy {
                        ifname: "nosuch0".into(),
                        addr: "2001:db8::6".parse().unwrap(),
                    },
                    KernelOp::DelRule { rule: rule.clone() },
                    KernelOp::DelRule { rule },
                    KernelOp::DelForeignRule {
                        v6: true,
                        priority: 4321,
                    },
                ],
                delete_links: vec![
                    KernelOp::DeleteLink { name: "tb0".into() },
                    KernelOp::DeleteLink {
                        name: "nosuch0".into(),
                    },
                ],
                ..Plan::default()
            };
            let report = kernel.apply(&gone).await;
            assert_eq!(report.applied, 14, "{report:?}");
            assert!(report.failed.is_empty(), "{report:?}");
            assert!(ip(&["rule", "show", "priority", "1234"]).is_empty());
            assert!(ip(&["route", "show", "table", "90"]).is_empty());
            assert!(
                !Command::new("ip")
                    .args(["link", "show", "tb0"])
                    .output()
                    .expect("ip")
                    .status
                    .success()
            );
        });
    }

    /// A large apply makes room for the other tasks of its runtime (the BGP
    /// sessions share the agent's thread): they run between its slices,
    /// while it is still writing. A private namespace.
    #[test]
    fn a_large_apply_lets_the_runtimes_other_tasks_run() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        crate::testutil::in_private_netns(|| async {
            ip(&["link", "add", "up0", "type", "veth", "peer", "up1"]);
            ip(&["link", "set", "up0", "up"]);
            ip(&["link", "set", "up1", "up"]);
            let kernel = Kernel::connect(203).expect("netlink");
            let attrs = on_group(10);
            let routes = 3 * BATCH_SLICE;
            let plan = Plan {
                add_nexthops: vec![KernelOp::AddNexthop {
                    id: 1,
                    spec: NextHopSpec {
                        gateway: "192.0.2.1".parse().unwrap(),
                        oif: "up0".into(),
                        onlink: true,
                    },
                    replace: false,
                }],
                add_groups: vec![KernelOp::AddGroup {
                    id: 10,
                    members: vec![1],
                    replace: false,
                }],
                add_routes: (0..routes as u32)
                    .map(|i| KernelOp::AddRoute {
                        id: RouteId {
                            table: 90,
                            dst: IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 32)
                                .unwrap(),
                            metric: 20,
                        },
                        attrs: attrs.clone(),
                        replace: false,
                    })
                    .collect(),
                ..Plan::default()
            };
            let applying = Arc::new(AtomicBool::new(false));
            let ran = Arc::new(AtomicUsize::new(0));
            let other = {
                let (applying, ran) = (applying.clone(), ran.clone());
                tokio::spawn(async move {
                    loop {
                        if applying.load(Ordering::SeqCst) {
                            ran.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::task::yield_now().await;
                    }
                })
            };
            tokio::task::yield_now().await;
            applying.store(true, Ordering::SeqCst);
            let report = kernel.apply(&plan).await;
            applying.store(false, Ordering::SeqCst);
            other.abort();
            assert_eq!(report.applied, routes + 2, "{:?}", report.failed.first());
            let installed = ip(&["-4", "route", "show", "table", "90"]).lines().count();
            assert_eq!(installed, routes);
            assert!(
                ran.load(Ordering::SeqCst) >= 2,
                "the other task ran {} times while {routes} routes were written",
                ran.load(Ordering::SeqCst)
            );
        });
    }
}
