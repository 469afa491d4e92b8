//! Executes a [`Plan`]: phases in order, the operations of one phase
//! pipelined on the netlink socket. Every refusal is reported per
//! operation, never lost.

use futures::StreamExt;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressProtocol, AddressScope,
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
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::LinkUnspec;
use serde::Serialize;

use std::collections::BTreeSet;

use super::{Kernel, errno, nexthop, sysctl, tap};
use crate::reconcile::{KernelOp, Plan, RouteAttrs, RouteId, RouteKind, RuleSpec};

/// How many requests may be in flight on the socket at once.
const PIPELINE: usize = 64;

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
    #[error("{0}")]
    Io(#[from] std::io::Error),
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
        for phase in plan.phases() {
            if phase.is_empty() {
                continue;
            }
            // Nexthop objects go over their own socket (hand codec), in
            // acknowledged batches.
            let (nexthop_ops, phase): (Vec<&KernelOp>, Vec<&KernelOp>) =
                phase.iter().partition(|op| {
                    matches!(
                        op,
                        KernelOp::AddNexthop { .. }
                            | KernelOp::AddGroup { .. }
                            | KernelOp::DelNexthop { .. }
                    )
                });
            if !nexthop_ops.is_empty() {
                self.apply_nexthops(nexthop_ops, &mut refused_nexthops, &mut report);
            }
            // Sysctls and tap ioctls are synchronous file/ioctl calls of
            // microseconds, made in place: the agent runs on a thread of its
            // own (`agent::spawn`), and a hop to a blocking thread and back
            // cost a VM start two wake-ups per phase. A sysctl write that
            // waits for RTNL blocks only the agent, which would wait anyway.
            let (blocking, netlink): (Vec<&KernelOp>, Vec<&KernelOp>) =
                phase.into_iter().partition(|op| {
                    matches!(
                        op,
                        KernelOp::Sysctl { .. }
                            | KernelOp::CreateTap { .. }
                            | KernelOp::CreateSink { .. }
                    )
                });
            for op in blocking {
                let r = match op {
                    KernelOp::Sysctl { path, value } => sysctl::write(path, value),
                    KernelOp::CreateTap { name, multi_queue } => tap::create(name, *multi_queue),
                    KernelOp::CreateSink { name } => tap::create_sink(name),
                    _ => Ok(()),
                };
                match r {
                    Ok(()) => report.applied += 1,
                    Err(e) => report.failed.push(OpFailure {
                        op: op.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            // By reference, one result at a time: at 1,000,000 routes a
            // copy of the phase plus a result per operation were the larger
            // part of a pass's peak memory.
            let mut results = futures::stream::iter(netlink)
                .map(|op| async move { (op, self.exec(op).await) })
                .buffer_unordered(PIPELINE);
            while let Some((op, r)) = results.next().await {
                match r {
                    Ok(()) => report.applied += 1,
                    Err(e) => report.failed.push(OpFailure {
                        op: op.clone(),
                        error: e.to_string(),
                    }),
                }
            }
        }
        report
    }

    /// Nexthop objects, groups and their deletion, in acknowledged batches
    /// on their own socket, in place (blocking: see `apply`).
    fn apply_nexthops(
        &self,
        ops: Vec<&KernelOp>,
        refused: &mut BTreeSet<u32>,
        report: &mut ApplyReport,
    ) {
        let mut sent: Vec<&KernelOp> = Vec::with_capacity(ops.len());
        let mut requests: Vec<nexthop::Request> = Vec::with_capacity(ops.len());
        for op in ops {
            let request = match op {
                KernelOp::AddNexthop { id, spec, replace } => {
                    let Some(idx) = tap::ifindex(&spec.oif) else {
                        refused.insert(*id);
                        report.failed.push(OpFailure {
                            op: op.clone(),
                            error: OpError::NoSuchLink(spec.oif.clone()).to_string(),
                        });
                        continue;
                    };
                    (
                        nexthop::RTM_NEWNEXTHOP,
                        create_flags(*replace),
                        nexthop::NexthopMessage::gateway(
                            *id,
                            spec.gateway,
                            idx,
                            spec.onlink,
                            self.protocol,
                        ),
                    )
                }
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
                        report.failed.push(OpFailure {
                            op: op.clone(),
                            error: "every member object was refused".into(),
                        });
                        continue;
                    }
                    (
                        nexthop::RTM_NEWNEXTHOP,
                        create_flags(*replace),
                        nexthop::NexthopMessage::group(*id, &members, self.protocol),
                    )
                }
                KernelOp::DelNexthop { id, .. } => (
                    nexthop::RTM_DELNEXTHOP,
                    0,
                    nexthop::NexthopMessage::by_id(*id),
                ),
                _ => continue,
            };
            sent.push(op);
            requests.push(request);
        }
        // In place, like the sysctls (see `apply`): on the failover path
        // the hop to a blocking thread was two wake-ups before the groups
        // changed.
        let results = match self.nexthops.lock() {
            Ok(mut channel) => channel.execute(&requests),
            // Poisoned (a batch panicked half-way): its socket was taken
            // out of the channel, so this batch opens a new one.
            Err(poisoned) => poisoned.into_inner().execute(&requests),
        };
        for (op, r) in sent.into_iter().zip(results) {
            let r = match (op, r) {
                // Already gone (with its uplink, or by hand): done.
                (KernelOp::DelNexthop { .. }, Err(e)) if e.errno() == Some(libc::ENOENT) => Ok(()),
                (_, r) => r,
            };
            match r {
                Ok(()) => report.applied += 1,
                Err(e) => {
                    if let KernelOp::AddNexthop { id, .. } = op {
                        refused.insert(*id);
                    }
                    report.failed.push(OpFailure {
                        op: op.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    async fn exec(&self, op: &KernelOp) -> Result<(), OpError> {
        let index =
            |name: &str| tap::ifindex(name).ok_or_else(|| OpError::NoSuchLink(name.to_string()));
        match op {
            KernelOp::SetAlias { name, alias } => {
                let msg = LinkUnspec::new_with_index(index(name)?)
                    .append_extra_attribute(LinkAttribute::IfAlias(alias.clone()))
                    .build();
                self.handle.link().set(msg).execute().await?;
            }
            KernelOp::SetUp { name } => {
                let msg = LinkUnspec::new_with_index(index(name)?).up().build();
                self.handle.link().set(msg).execute().await?;
            }
            KernelOp::AddAddress {
                ifname,
                addr,
                gateway,
            } => {
                let mut req =
                    self.handle
                        .address()
                        .add(index(ifname)?, addr.addr(), addr.prefix_len());
                let m = req.message_mut();
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
                ignore(req.execute().await, libc::EEXIST)?;
            }
            KernelOp::DelAddress { ifname, addr } => {
                let Some(idx) = tap::ifindex(ifname) else {
                    return Ok(());
                };
                let mut req = self
                    .handle
                    .address()
                    .add(idx, addr.addr(), addr.prefix_len());
                let msg = req.message_mut().clone();
                ignore(
                    self.handle.address().del(msg).execute().await,
                    libc::EADDRNOTAVAIL,
                )?;
            }
            KernelOp::AddRoute { id, attrs, replace } => {
                let msg = self.route_message(id, attrs)?;
                let req = self.handle.route().add(msg);
                if *replace {
                    req.replace().execute().await?;
                } else {
                    req.execute().await?;
                }
            }
            KernelOp::DelRoute { id, attrs } => {
                // The route may have gone with its link: resolve the oif
                // leniently and treat "no such route" as done.
                let mut attrs = RouteAttrs::clone(attrs);
                // Matched by table, destination, metric and protocol: the
                // group it pointed at may be gone already.
                attrs.nh_id = None;
                if attrs
                    .oif
                    .as_deref()
                    .is_some_and(|n| tap::ifindex(n).is_none())
                {
                    attrs.oif = None;
                }
                let mut msg = self.route_message(id, &attrs)?;
                // Any scope, as `ip route del` asks: a route on a group has
                // scope universe although it names no gateway here.
                msg.header.scope = RouteScope::NoWhere;
                ignore(self.handle.route().del(msg).execute().await, libc::ESRCH)?;
            }
            KernelOp::AddRule { rule } => {
                self.rule_request(RouteNetlinkMessage::NewRule(self.rule_message(rule)), true)
                    .await?;
            }
            KernelOp::DelRule { rule } => {
                ignore(
                    self.rule_request(RouteNetlinkMessage::DelRule(self.rule_message(rule)), false)
                        .await,
                    libc::ENOENT,
                )?;
            }
            KernelOp::DelForeignRule { v6, priority } => {
                let mut m = RuleMessage::default();
                m.header.family = family(*v6);
                m.attributes.push(RuleAttribute::Priority(*priority));
                ignore(
                    self.rule_request(RouteNetlinkMessage::DelRule(m), false)
                        .await,
                    libc::ENOENT,
                )?;
            }
            KernelOp::AddProxy { ifname, addr } => {
                let mut req = self
                    .handle
                    .neighbours()
                    .add(index(ifname)?, std::net::IpAddr::V6(*addr))
                    .flags(NeighbourFlags::Proxy);
                req.message_mut()
                    .attributes
                    .push(NeighbourAttribute::Protocol(RouteProtocol::Other(
                        self.protocol,
                    )));
                ignore(req.execute().await, libc::EEXIST)?;
            }
            KernelOp::DelProxy { ifname, addr } => {
                let Some(idx) = tap::ifindex(ifname) else {
                    return Ok(());
                };
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet6;
                m.header.ifindex = idx;
                m.header.flags = NeighbourFlags::Proxy;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                        *addr,
                    )));
                ignore(
                    self.handle.neighbours().del(m).execute().await,
                    libc::ENOENT,
                )?;
            }
            KernelOp::DeleteLink { name } => {
                let Some(idx) = tap::ifindex(name) else {
                    return Ok(());
                };
                ignore(self.handle.link().del(idx).execute().await, libc::ENODEV)?;
            }
            KernelOp::Sysctl { path, value } => sysctl::write(path, value)?,
            KernelOp::CreateTap { name, multi_queue } => tap::create(name, *multi_queue)?,
            KernelOp::CreateSink { name } => tap::create_sink(name)?,
            // Sent by apply_nexthops.
            KernelOp::AddNexthop { .. }
            | KernelOp::AddGroup { .. }
            | KernelOp::DelNexthop { .. } => {}
        }
        Ok(())
    }

    fn route_message(&self, id: &RouteId, attrs: &RouteAttrs) -> Result<RouteMessage, OpError> {
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
            let idx = tap::ifindex(oif).ok_or_else(|| OpError::NoSuchLink(oif.clone()))?;
            m.attributes.push(RouteAttribute::Oif(idx));
        }
        if let Some(gw) = attrs.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if !attrs.multipath.is_empty() {
            let mut hops = Vec::with_capacity(attrs.multipath.len());
            for h in &attrs.multipath {
                let idx = tap::ifindex(&h.oif).ok_or_else(|| OpError::NoSuchLink(h.oif.clone()))?;
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

    /// rtnetlink's rule requests cannot carry every attribute we set (the
    /// protocol, suppress_prefixlength), so rules go out as raw messages.
    async fn rule_request(
        &self,
        msg: RouteNetlinkMessage,
        create: bool,
    ) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        if create {
            req.header.flags |= netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL;
        }
        let mut handle = self.handle.clone();
        let mut response = handle.request(req)?;
        while let Some(m) = response.next().await {
            if let netlink_packet_core::NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(rtnetlink::Error::NetlinkError(e));
                }
            }
        }
        Ok(())
    }
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
