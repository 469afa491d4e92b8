//! Permanent neighbour entries for the DHCP server: the offered address →
//! the VM's MAC on its tap, so a unicast OFFER/ACK needs no ARP from a
//! client that does not have its address yet (RFC 2131 §4.1; dnsmasq does
//! the same with SIOCSARP). Tagged with l3hv's protocol number
//! (NDA_PROTOCOL) so they are recognisably ours.

use std::net::IpAddr;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::RouteProtocol;

use super::{Kernel, NetlinkError};

impl Kernel {
    /// `ip neigh replace ADDR lladdr MAC dev IFINDEX nud permanent proto P`.
    pub async fn neigh_replace(
        &self,
        ifindex: u32,
        addr: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, addr)
            .link_layer_address(&mac)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                self.protocol,
            )));
        req.execute().await.map_err(|source| NetlinkError::Request {
            what: "neighbour replace",
            source,
        })
    }

    /// `ip neigh del ADDR dev IFINDEX`; a missing entry is not an error.
    pub async fn neigh_del(&self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.ifindex = ifindex;
        m.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        match self.handle.neighbours().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if super::errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                what: "neighbour delete",
                source,
            }),
        }
    }
}
