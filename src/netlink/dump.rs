//! Dumps links, addresses, routes and rules into an [`ObservedKernel`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressProtocol};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHopFlags, RouteProtocol,
    RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::{IpVersion, RouteMessageBuilder};

use super::{Kernel, NetlinkError};
use crate::reconcile::{
    NextHopSpec, ObservedKernel, ObservedLink, RouteAttrs, RouteId, RouteKind, RuleSpec,
};

/// The "no suppression" value the kernel reports for suppress_prefixlength.
const SUPPRESS_UNSET: u32 = u32::MAX;

impl Kernel {
    /// Dumps what l3hv may own: every link (name, index, up, alias), the
    /// addresses carrying l3hv's protocol (all addresses of `uplinks`), and
    /// the routes and rules carrying l3hv's protocol. Sysctls are not read
    /// here.
    pub async fn dump(&self, uplinks: &BTreeSet<String>) -> Result<ObservedKernel, NetlinkError> {
        self.dump_with(uplinks, true).await
    }

    /// As [`Kernel::dump`] without the routes, nexthop objects and proxy
    /// entries (what grows with the learned routes): links, addresses and
    /// rules only, for a pass that takes the rest from what it mirrored.
    pub async fn dump_host(
        &self,
        uplinks: &BTreeSet<String>,
    ) -> Result<ObservedKernel, NetlinkError> {
        self.dump_with(uplinks, false).await
    }

    async fn dump_with(
        &self,
        uplinks: &BTreeSet<String>,
        all: bool,
    ) -> Result<ObservedKernel, NetlinkError> {
        let mut o = ObservedKernel::default();

        // Links on a blocking thread (lean hand parser, see links.rs) while
        // addresses, routes and rules come over the async socket.
        let links = tokio::task::spawn_blocking(super::links::dump);
        // Nexthop objects over their own (hand-coded) socket, alongside.
        let nexthops = all.then(|| tokio::task::spawn_blocking(super::nexthop::dump));
        // One dump at a time per netlink socket: the kernel answers a
        // second concurrent dump with EBUSY.
        let addrs = self.dump_addresses().await;
        let rules = self.dump_rules().await;
        let proxies = if all {
            self.dump_proxies().await
        } else {
            Ok(Vec::new())
        };
        let links = links
            .await
            .map_err(|e| NetlinkError::Socket(std::io::Error::other(e)))??;
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for l in links {
            names.insert(l.index, l.name.clone());
            if l.carrier {
                o.carrier.insert(l.name.clone());
            }
            o.links.insert(
                l.name.clone(),
                ObservedLink {
                    name: l.name,
                    ifindex: l.index,
                    up: l.up,
                    alias: l.alias,
                    addresses: BTreeSet::new(),
                },
            );
        }
        for msg in addrs? {
            let Some(name) = names.get(&msg.header.index) else {
                continue;
            };
            let ours = address_protocol(&msg) == Some(self.protocol);
            if !ours && !uplinks.contains(name) {
                continue;
            }
            if let (Some(addr), Some(link)) = (address_of(&msg), o.links.get_mut(name)) {
                if let Ok(net) = IpNet::new(addr, msg.header.prefix_len) {
                    link.addresses.insert(net);
                }
            }
        }
        if !all {
            for msg in rules? {
                self.observe_rule(&msg, &mut o);
            }
            return Ok(o);
        }
        // Routes are processed as they stream in: at 100,000 learned
        // routes, collecting the decoded messages first cost ~100 MB.
        self.dump_routes_into(&names, &mut o).await?;
        let Some(nexthops) = nexthops else {
            return Ok(o);
        };
        let nexthops = nexthops
            .await
            .map_err(|e| NetlinkError::Socket(std::io::Error::other(e)))?;
        match nexthops {
            Ok(list) => self.observe_nexthops(list, &names, &mut o),
            // A kernel without nexthop objects has none of ours.
            Err(e) if e.errno().is_some_and(super::nexthop::unsupported) => {}
            Err(e) => {
                return Err(NetlinkError::Nexthop {
                    what: "dump",
                    source: e,
                });
            }
        }
        for msg in rules? {
            self.observe_rule(&msg, &mut o);
        }
        for msg in proxies? {
            let ours = msg.attributes.iter().any(
                |a| matches!(a, NeighbourAttribute::Protocol(p) if u8::from(*p) == self.protocol),
            );
            let addr = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(*v6),
                _ => None,
            });
            if let (true, Some(addr), Some(name)) = (ours, addr, names.get(&msg.header.ifindex)) {
                o.proxies.insert((name.clone(), addr));
            }
        }
        Ok(o)
    }

    fn observe_rule(&self, msg: &RuleMessage, o: &mut ObservedKernel) {
        let protocol = msg.attributes.iter().find_map(|a| match a {
            RuleAttribute::Protocol(p) => Some(u8::from(*p)),
            _ => None,
        });
        let spec = rule_of(msg);
        if protocol == Some(self.protocol) {
            o.rules.insert(spec);
        } else {
            o.foreign_rules.insert((spec.v6, spec.priority));
        }
    }

    /// Keeps the objects and groups carrying l3hv's protocol.
    fn observe_nexthops(
        &self,
        list: Vec<super::nexthop::NexthopMessage>,
        names: &BTreeMap<u32, String>,
        o: &mut ObservedKernel,
    ) {
        for m in list {
            let (true, Some(id)) = (m.protocol == self.protocol, m.id) else {
                continue;
            };
            if !m.group.is_empty() {
                o.groups
                    .insert(id, m.group.iter().map(|(member, _)| *member).collect());
            } else if let (Some(gateway), Some(oif)) =
                (m.gateway, m.oif.and_then(|i| names.get(&i)))
            {
                o.nexthops.insert(
                    id,
                    NextHopSpec {
                        gateway,
                        oif: oif.clone(),
                        onlink: m.flags & super::nexthop::FLAG_ONLINK != 0,
                    },
                );
            } else {
                // Ours but not a shape l3hv writes: a group of nothing, so
                // the plan deletes it.
                o.groups.insert(id, BTreeSet::new());
            }
        }
    }

    async fn dump_proxies(&self) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        self.handle
            .neighbours()
            .get()
            .proxies()
            .set_address_family(AddressFamily::Inet6)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetlinkError::Dump {
                what: "neighbour proxies",
                source,
            })
    }

    async fn dump_addresses(&self) -> Result<Vec<AddressMessage>, NetlinkError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetlinkError::Dump {
                what: "addresses",
                source,
            })
    }

    /// Routes carrying l3hv's protocol (filtered by the kernel under strict
    /// checking, and again here), normalised into `o`.
    async fn dump_routes_into(
        &self,
        names: &BTreeMap<u32, String>,
        o: &mut ObservedKernel,
    ) -> Result<(), NetlinkError> {
        // A million learned routes have a handful of distinct attributes.
        let mut shared = crate::reconcile::AttrsInterner::default();
        for family in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut req = self.handle.route().get(family);
            let header = &mut req.message_mut().header;
            header.protocol = RouteProtocol::Other(self.protocol);
            // The builder's defaults (table main, type unicast) would become
            // dump filters too under strict checking: dump every table and
            // type.
            header.table = 0;
            header.kind = RouteType::Unspec;
            header.scope = RouteScope::Universe;
            let mut stream = req.execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|source| NetlinkError::Dump {
                    what: "routes",
                    source,
                })?
            {
                if u8::from(msg.header.protocol) != self.protocol {
                    continue;
                }
                if let Some((id, attrs)) = route_of(&msg, names) {
                    let attrs = shared.share(attrs);
                    match o.routes.entry(id) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            o.duplicate_routes.push((id, attrs))
                        }
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(attrs);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn dump_rules(&self) -> Result<Vec<RuleMessage>, NetlinkError> {
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut part: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|source| NetlinkError::Dump {
                    what: "rules",
                    source,
                })?;
            out.append(&mut part);
        }
        Ok(out)
    }
}
fn address_protocol(msg: &AddressMessage) -> Option<u8> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Protocol(p) => Some(match p {
            AddressProtocol::Loopback => 1,
            AddressProtocol::RouterAnnouncement => 2,
            AddressProtocol::LinkLocal => 3,
            AddressProtocol::Other(n) => *n,
            _ => 0,
        }),
        _ => None,
    })
}

/// IFA_LOCAL is the interface's own IPv4 address (IFA_ADDRESS is the peer
/// on point-to-point links); IPv6 only has IFA_ADDRESS.
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Normalises a route to the fields l3hv compares.
pub(crate) fn route_of(
    msg: &RouteMessage,
    names: &BTreeMap<u32, String>,
) -> Option<(RouteId, RouteAttrs)> {
    let v6 = msg.header.address_family == AddressFamily::Inet6;
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut metric = 0;
    let mut oif = None;
    let mut gateway = None;
    let mut pref_src = None;
    let mut multipath = Vec::new();
    let mut nh_id = None;
    for a in &msg.attributes {
        match a {
            // Tables above 255 are reported as 252 in the header.
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = names.get(i).cloned(),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::PrefSource(s) => pref_src = ip_of(s),
            RouteAttribute::NhId(id) => nh_id = Some(*id),
            RouteAttribute::MultiPath(hops) => {
                for h in hops {
                    let gateway = h.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => ip_of(g),
                        _ => None,
                    });
                    if let (Some(gateway), Some(oif)) = (gateway, names.get(&h.interface_index)) {
                        multipath.push(NextHopSpec {
                            gateway,
                            oif: oif.clone(),
                            onlink: h.flags.contains(RouteNextHopFlags::Onlink),
                        });
                    }
                }
                multipath.sort();
            }
            _ => {}
        }
    }
    let dst = dst.unwrap_or(if v6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    });
    let dst = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
    let kind = match msg.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::BlackHole => RouteKind::Blackhole,
        RouteType::Unreachable => RouteKind::Unreachable,
        _ => return None,
    };
    // IPv6 blackhole/unreachable routes are reported on `lo`.
    if kind != RouteKind::Unicast {
        oif = None;
        gateway = None;
    }
    // A route on a nexthop object is reported with the object's gateway
    // and device (or RTA_MULTIPATH for a group) expanded: the id is what
    // l3hv compares.
    let mut onlink = msg.header.flags.contains(RouteFlags::Onlink);
    if nh_id.is_some() {
        oif = None;
        gateway = None;
        multipath.clear();
        onlink = false;
    }
    Some((
        RouteId { table, dst, metric },
        RouteAttrs {
            kind,
            oif,
            gateway,
            onlink,
            pref_src,
            multipath,
            nh_id,
        },
    ))
}

fn rule_of(msg: &RuleMessage) -> RuleSpec {
    let v6 = msg.header.family == AddressFamily::Inet6;
    let mut spec = RuleSpec {
        v6,
        priority: 0,
        iif: None,
        src: None,
        table: u32::from(msg.header.table),
        suppress_prefixlength: None,
    };
    for a in &msg.attributes {
        match a {
            RuleAttribute::Priority(p) => spec.priority = *p,
            RuleAttribute::Iifname(n) => spec.iif = Some(n.clone()),
            RuleAttribute::Source(ip) => spec.src = IpNet::new(*ip, msg.header.src_len).ok(),
            RuleAttribute::Table(t) => spec.table = *t,
            RuleAttribute::SuppressPrefixLen(n) if *n != SUPPRESS_UNSET => {
                spec.suppress_prefixlength = Some(*n)
            }
            _ => {}
        }
    }
    spec
}
