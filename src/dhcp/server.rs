//! PURE DHCPv4 server logic: (raw request bytes, [`Binding`]) → [`Outcome`].
//!
//! Owns the decision of what to answer a VM on one interface and where the
//! answer goes (RFC 2131 §4.1, §4.3). It never touches a socket, the clock
//! or the kernel: `io.rs` feeds it bytes and sends what it returns. It only
//! ever answers the one MAC of its binding with the one intended address;
//! there is no pool and no lease database (the address is static, so a
//! restarted agent answers exactly as before).
//!
//! Every byte comes from an untrusted VM: [`decode`] checks sizes and the
//! fixed header before the codec (dhcproto) sees anything, and a codec panic
//! is caught and reported as malformed input.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use ipnet::{IpNet, Ipv4Net};

use crate::config::{Config, Ipv4Mode};
use crate::intent::{InterfaceIntent, MacAddr};

/// Largest request we look at. A DHCP message fits a 576-byte datagram
/// unless the client negotiated more (RFC 2131 §2); clients never need
/// more than an Ethernet MTU, and anything bigger is abuse.
pub const MAX_REQUEST: usize = 1500;
/// The fixed BOOTP header plus the magic cookie (RFC 2131 §2, §3).
pub const MIN_REQUEST: usize = 240;
/// Replies are padded to the BOOTP minimum (RFC 1542 §3.3).
pub const MIN_REPLY: usize = 300;
/// RFC 2131 §3: the magic cookie 99.130.83.99.
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// RFC 2132 §9.2: 0xffffffff is an infinite lease.
const INFINITE: u32 = u32::MAX;

/// How the VM is told about its subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subnet {
    /// The VM believes it is on a shared subnet of this prefix length and
    /// reaches the gateway on-link (option 1 + option 3).
    Shared { prefix_len: u8 },
    /// A /32 and RFC 3442 classless routes: gateway/32 on-link, then the
    /// default route via the gateway.
    PointToPoint,
}

/// Everything needed to answer one VM interface: its static lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    /// The gateway address on the tap: server identifier, source and router.
    pub server: Ipv4Addr,
    pub subnet: Subnet,
    /// `None`: infinite.
    pub lease: Option<Duration>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub mtu: Option<u16>,
    /// The VM name when it is a valid host name (RFC 1123), else nothing.
    pub hostname: Option<String>,
}

/// The binding of one VM interface under `config`, or `None` when the
/// interface has no IPv4 address (or its fabric is gone).
pub fn binding(config: &Config, vm: &str, iface: &InterfaceIntent) -> Option<Binding> {
    let fabric = config.fabric(&iface.fabric)?;
    let address = *iface.ipv4.first()?;
    let server = fabric.effective_gateway_v4();
    let subnet = match fabric.ipv4_mode {
        Ipv4Mode::SharedSubnet => fabric
            .subnets
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            // The router must be on-link from the VM's point of view.
            .find(|n| n.contains(&address) && n.contains(&server))
            .map_or(Subnet::PointToPoint, |n| Subnet::Shared {
                prefix_len: n.prefix_len(),
            }),
        Ipv4Mode::PointToPoint => Subnet::PointToPoint,
    };
    Some(Binding {
        mac: iface.mac,
        address,
        server,
        subnet,
        lease: config.dhcp.lease_time,
        dns: config.dhcp.dns_servers.clone(),
        domain: config.dhcp.domain.clone(),
        mtu: config.dhcp.mtu,
        hostname: valid_hostname(vm).then(|| vm.to_string()),
    })
}

/// RFC 1123 §2.1 host name: labels of letters, digits and '-', at most 63
/// bytes each, 253 in all.
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Why a packet was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Shorter than the BOOTP header, longer than [`MAX_REQUEST`], a bad
    /// magic cookie or options the codec refused.
    Malformed,
    /// A BOOTREPLY, or not Ethernet.
    NotRequest,
    /// No DHCP message type (plain BOOTP is not served).
    NoMessageType,
    /// chaddr is not the MAC intended on this interface.
    WrongMac,
    /// Relayed (giaddr set): a VM has no business relaying.
    Relayed,
    /// A REQUEST for another server (RFC 2131 §4.3.2, SELECTING).
    OtherServer,
    /// OFFER, ACK, NAK… from a VM.
    UnexpectedType,
    /// Over the per-interface rate limit (counted by `io.rs`).
    RateLimited,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotRequest => "not_request",
            DropReason::NoMessageType => "no_message_type",
            DropReason::WrongMac => "wrong_mac",
            DropReason::Relayed => "relayed",
            DropReason::OtherServer => "other_server",
            DropReason::UnexpectedType => "unexpected_type",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// Where a reply goes (RFC 2131 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68.
    Broadcast,
    /// Unicast to the client's configured address (ciaddr).
    Client(Ipv4Addr),
    /// Unicast to the offered address before the client has it: the
    /// sender installs a neighbour entry (address → mac) so no ARP is
    /// needed.
    Offered { address: Ipv4Addr, mac: MacAddr },
}

/// What to do with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reply {
        kind: MessageType,
        bytes: Vec<u8>,
        to: Destination,
    },
    /// A valid message that needs no answer (RELEASE, DECLINE).
    Noted(MessageType),
    Dropped(DropReason),
}

/// Decodes a request defensively: size limits, the fixed header, the magic
/// cookie, then the codec with any panic contained.
pub fn decode(bytes: &[u8]) -> Result<Message, DropReason> {
    if bytes.len() < MIN_REQUEST || bytes.len() > MAX_REQUEST {
        return Err(DropReason::Malformed);
    }
    if bytes[236..240] != MAGIC {
        return Err(DropReason::Malformed);
    }
    // dhcproto decodes with explicit bounds checks; the guard is a second
    // line of defence, since a panic here would be a remote crash.
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)))
        .map_err(|_| DropReason::Malformed)?
        .map_err(|_| DropReason::Malformed)
}

/// The answer to `request` (raw bytes from the VM) for `binding`.
pub fn reply(request: &[u8], binding: &Binding) -> Outcome {
    match decode(request) {
        Ok(m) => reply_to(&m, binding),
        Err(d) => Outcome::Dropped(d),
    }
}

/// The answer to a decoded request.
pub fn reply_to(req: &Message, b: &Binding) -> Outcome {
    if req.opcode() != Opcode::BootRequest || req.htype() != HType::Eth || req.hlen() != 6 {
        return Outcome::Dropped(DropReason::NotRequest);
    }
    if req.chaddr().get(..6) != Some(&b.mac.0[..]) {
        return Outcome::Dropped(DropReason::WrongMac);
    }
    if !req.giaddr().is_unspecified() {
        return Outcome::Dropped(DropReason::Relayed);
    }
    let Some(kind) = req.opts().msg_type() else {
        return Outcome::Dropped(DropReason::NoMessageType);
    };
    match kind {
        // RFC 2131 §4.3.1
        MessageType::Discover => answer(req, b, MessageType::Offer),
        // RFC 2131 §4.3.2
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(sid)) =
                req.opts().get(OptionCode::ServerIdentifier)
            {
                if *sid != b.server {
                    return Outcome::Dropped(DropReason::OtherServer);
                }
            }
            let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(a)) => *a,
                _ => req.ciaddr(),
            };
            if requested == b.address {
                answer(req, b, MessageType::Ack)
            } else {
                nak(req, b)
            }
        }
        // RFC 2131 §4.3.5
        MessageType::Inform => answer(req, b, MessageType::Ack),
        // RFC 2131 §4.3.3, §4.3.4: the binding is static; nothing to free.
        MessageType::Release | MessageType::Decline => Outcome::Noted(kind),
        _ => Outcome::Dropped(DropReason::UnexpectedType),
    }
}

/// The reply skeleton: BOOTREPLY with the request's xid, flags and chaddr.
fn skeleton(req: &Message, b: &Binding, yiaddr: Ipv4Addr, ciaddr: Ipv4Addr) -> Message {
    let mut m = Message::new_with_id(
        req.xid(),
        ciaddr,
        yiaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &b.mac.0,
    );
    // new_with_id makes a BOOTREQUEST.
    m.set_opcode(Opcode::BootReply);
    m.set_htype(HType::Eth);
    m.set_flags(req.flags());
    // RFC 6842: echo the client identifier.
    if let Some(id @ DhcpOption::ClientIdentifier(_)) = req.opts().get(OptionCode::ClientIdentifier)
    {
        m.opts_mut().insert(id.clone());
    }
    m
}

fn answer(req: &Message, b: &Binding, kind: MessageType) -> Outcome {
    let inform = req.opts().has_msg_type(MessageType::Inform);
    // RFC 2131 table 3: an ACK to INFORM has no yiaddr and no lease time.
    let (yiaddr, ciaddr) = if inform {
        (Ipv4Addr::UNSPECIFIED, req.ciaddr())
    } else {
        (b.address, req.ciaddr())
    };
    let mut m = skeleton(req, b, yiaddr, ciaddr);
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(b.server));
    if !inform {
        let lease = b
            .lease
            .map_or(INFINITE, |d| u32::try_from(d.as_secs()).unwrap_or(INFINITE));
        o.insert(DhcpOption::AddressLeaseTime(lease));
        if lease != INFINITE {
            // RFC 2131 §4.4.5: T1 = 0.5, T2 = 0.875 of the lease.
            o.insert(DhcpOption::Renewal(lease / 2));
            o.insert(DhcpOption::Rebinding(
                (u64::from(lease) * 7 / 8).try_into().unwrap_or(lease),
            ));
        }
    }
    match b.subnet {
        Subnet::Shared { prefix_len } => {
            o.insert(DhcpOption::SubnetMask(mask(prefix_len)));
            o.insert(DhcpOption::Router(vec![b.server]));
        }
        Subnet::PointToPoint => {
            o.insert(DhcpOption::SubnetMask(Ipv4Addr::BROADCAST));
            // For clients without RFC 3442; those with it ignore option 3.
            o.insert(DhcpOption::Router(vec![b.server]));
            // RFC 3442: clients that honour 121 ignore option 3, so the
            // default route is in here too, after the on-link route to
            // the gateway that makes it reachable.
            let host = Ipv4Net::new(b.server, 32).expect("/32 is valid");
            let default = Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid");
            o.insert(DhcpOption::ClasslessStaticRoute(vec![
                (host, Ipv4Addr::UNSPECIFIED),
                (default, b.server),
            ]));
        }
    }
    if !b.dns.is_empty() {
        // An option holds at most 255 bytes: 63 addresses.
        o.insert(DhcpOption::DomainNameServer(
            b.dns.iter().take(63).copied().collect(),
        ));
    }
    if let Some(d) = b
        .domain
        .as_ref()
        .filter(|d| !d.is_empty() && d.len() <= 255)
    {
        o.insert(DhcpOption::DomainName(d.clone()));
    }
    if let Some(mtu) = b.mtu.filter(|m| *m >= 68) {
        // RFC 2132 §5.1: at least 68.
        o.insert(DhcpOption::InterfaceMtu(mtu));
    }
    if let Some(h) = &b.hostname {
        o.insert(DhcpOption::Hostname(h.clone()));
    }
    let to = if inform || !req.ciaddr().is_unspecified() {
        // RFC 2131 §4.1: ciaddr set → unicast to it (§4.3.5 for INFORM).
        if req.ciaddr().is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Client(req.ciaddr())
        }
    } else if req.flags().broadcast() {
        Destination::Broadcast
    } else {
        Destination::Offered {
            address: b.address,
            mac: b.mac,
        }
    };
    encode_reply(&m, kind, to)
}

/// RFC 2131 §4.3.2: a NAK for a wrong address; always broadcast (§4.1)
/// since the client may have no usable address.
fn nak(req: &Message, b: &Binding) -> Outcome {
    let mut m = skeleton(req, b, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::Nak));
    o.insert(DhcpOption::ServerIdentifier(b.server));
    o.insert(DhcpOption::Message("wrong address".into()));
    encode_reply(&m, MessageType::Nak, Destination::Broadcast)
}

fn encode_reply(m: &Message, kind: MessageType, to: Destination) -> Outcome {
    let mut bytes = Vec::with_capacity(MIN_REPLY);
    if m.encode(&mut Encoder::new(&mut bytes)).is_err() {
        // Only our own values are encoded; a failure is a bug, not input.
        return Outcome::Dropped(DropReason::Malformed);
    }
    if bytes.len() < MIN_REPLY {
        bytes.resize(MIN_REPLY, 0);
    }
    Outcome::Reply { kind, bytes, to }
}

fn mask(prefix_len: u8) -> Ipv4Addr {
    let p = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - p).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x71, 0x00, 0x05];

    fn binding_shared() -> Binding {
        Binding {
            mac: MacAddr(MAC),
            address: Ipv4Addr::new(203, 0, 113, 5),
            server: Ipv4Addr::new(203, 0, 113, 254),
            subnet: Subnet::Shared { prefix_len: 24 },
            lease: None,
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            domain: Some("example.net".into()),
            mtu: Some(1450),
            hostname: Some("vm1".into()),
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A DHCPDISCOVER laid out as busybox 1.35 udhcpc sends it (as seen on a
    /// veth, 52:54:00:71:00:05), field by field.
    fn udhcpc_discover() -> Vec<u8> {
        let mut b = hex("01 01 06 00      \
             3f 8a 1c 02      \
             00 00 00 00      \
             00 00 00 00      \
             00 00 00 00      \
             00 00 00 00      \
             00 00 00 00      \
             525400710005 00000000000000000000");
        // op=1 BOOTREQUEST, htype=1 Ethernet, hlen=6, hops=0; xid;
        // secs=0, flags=0; ciaddr, yiaddr, siaddr, giaddr; chaddr (16).
        b.resize(236, 0); // sname (64) + file (128) are zero
        b.extend(hex("63 82 53 63 \
             35 01 01 \
             39 02 02 40 \
             37 07 01 03 06 0c 0f 1c 2a \
             3c 0c 75 64 68 63 70 20 31 2e 33 35 2e 30 \
             ff"));
        // magic; 53 DISCOVER; 57 max size 576; 55 PRL (1 3 6 12 15 28
        // 42); 60 vendor class "udhcp 1.35.0"; end. udhcpc pads to 300.
        b.resize(300, 0);
        b
    }

    fn request_from(discover: &[u8], ip: [u8; 4], server: Option<[u8; 4]>) -> Vec<u8> {
        let mut b = discover[..240].to_vec();
        b.extend([53, 1, 3, 50, 4]);
        b.extend(ip);
        if let Some(s) = server {
            b.extend([54, 4]);
            b.extend(s);
        }
        b.push(255);
        b
    }

    fn opts_of(bytes: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(bytes)).unwrap()
    }

    #[test]
    fn discover_gets_offer_with_everything() {
        let out = reply(&udhcpc_discover(), &binding_shared());
        let Outcome::Reply { kind, bytes, to } = out else {
            panic!("{out:?}")
        };
        assert_eq!(kind, MessageType::Offer);
        assert_eq!(
            to,
            Destination::Offered {
                address: Ipv4Addr::new(203, 0, 113, 5),
                mac: MacAddr(MAC)
            }
        );
        assert!(bytes.len() >= MIN_REPLY);
        // The fixed header, byte by byte.
        assert_eq!(bytes[0], 2, "op BOOTREPLY");
        assert_eq!(&bytes[1..4], &[1, 6, 0], "htype, hlen, hops");
        assert_eq!(&bytes[4..8], &[0x3f, 0x8a, 0x1c, 0x02], "xid echoed");
        assert_eq!(&bytes[10..12], &[0, 0], "flags echoed");
        assert_eq!(&bytes[12..16], &[0; 4], "ciaddr");
        assert_eq!(&bytes[16..20], &[203, 0, 113, 5], "yiaddr");
        assert_eq!(&bytes[28..34], &MAC, "chaddr");
        assert_eq!(&bytes[236..240], &MAGIC);
        // Options in code order (dhcproto sorts), then End.
        let want = hex("01 04 ff ff ff 00 \
             03 04 cb 00 71 fe \
             06 04 c0 00 02 35 \
             0c 03 76 6d 31 \
             0f 0b 65 78 61 6d 70 6c 65 2e 6e 65 74 \
             1a 02 05 aa \
             33 04 ff ff ff ff \
             35 01 02 \
             36 04 cb 00 71 fe \
             ff");
        assert_eq!(&bytes[240..240 + want.len()], &want[..]);
        assert!(bytes[240 + want.len()..].iter().all(|b| *b == 0));
        // And back: the codec reads what we wrote.
        let m = opts_of(&bytes);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    }

    #[test]
    fn request_for_the_address_gets_ack_and_wrong_one_a_broadcast_nak() {
        let d = udhcpc_discover();
        let ok = request_from(&d, [203, 0, 113, 5], Some([203, 0, 113, 254]));
        match reply(&ok, &binding_shared()) {
            Outcome::Reply { kind, bytes, .. } => {
                assert_eq!(kind, MessageType::Ack);
                assert_eq!(&bytes[16..20], &[203, 0, 113, 5]);
            }
            o => panic!("{o:?}"),
        }
        let wrong = request_from(&d, [203, 0, 113, 6], None);
        match reply(&wrong, &binding_shared()) {
            Outcome::Reply { kind, bytes, to } => {
                assert_eq!(kind, MessageType::Nak);
                assert_eq!(to, Destination::Broadcast);
                assert_eq!(&bytes[10..12], &[0x80, 0], "broadcast flag");
                assert_eq!(&bytes[16..20], &[0; 4], "no yiaddr in a NAK");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let r = request_from(&udhcpc_discover(), [203, 0, 113, 5], Some([192, 0, 2, 1]));
        assert_eq!(
            reply(&r, &binding_shared()),
            Outcome::Dropped(DropReason::OtherServer)
        );
    }

    #[test]
    fn wrong_mac_gets_nothing() {
        let mut d = udhcpc_discover();
        d[33] = 0x06;
        assert_eq!(
            reply(&d, &binding_shared()),
            Outcome::Dropped(DropReason::WrongMac)
        );
    }

    #[test]
    fn destinations_follow_rfc2131_4_1() {
        let b = binding_shared();
        // Broadcast flag.
        let mut d = udhcpc_discover();
        d[10] = 0x80;
        assert!(matches!(
            reply(&d, &b),
            Outcome::Reply {
                to: Destination::Broadcast,
                ..
            }
        ));
        // Renewing: ciaddr set → unicast to ciaddr.
        let mut r = request_from(&udhcpc_discover(), [203, 0, 113, 5], None);
        r[12..16].copy_from_slice(&[203, 0, 113, 5]);
        assert!(matches!(
            reply(&r, &b),
            Outcome::Reply {
                to: Destination::Client(a),
                ..
            } if a == Ipv4Addr::new(203, 0, 113, 5)
        ));
        // Relayed: dropped.
        let mut g = udhcpc_discover();
        g[24..28].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(reply(&g, &b), Outcome::Dropped(DropReason::Relayed));
    }

    #[test]
    fn inform_ack_has_no_lease() {
        let mut i = udhcpc_discover()[..240].to_vec();
        i[12..16].copy_from_slice(&[203, 0, 113, 5]);
        i.extend([53, 1, 8, 255]);
        let Outcome::Reply { kind, bytes, to } = reply(&i, &binding_shared()) else {
            panic!()
        };
        assert_eq!(kind, MessageType::Ack);
        assert_eq!(to, Destination::Client(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(&bytes[16..20], &[0; 4]);
        let m = opts_of(&bytes);
        assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
    }

    #[test]
    fn release_and_decline_are_noted() {
        for t in [4u8, 7] {
            let mut r = udhcpc_discover()[..240].to_vec();
            r.extend([53, 1, t, 255]);
            assert!(matches!(reply(&r, &binding_shared()), Outcome::Noted(_)));
        }
    }

    #[test]
    fn point_to_point_gets_32_and_classless_routes_with_default() {
        let mut b = binding_shared();
        b.server = Ipv4Addr::new(169, 254, 0, 1);
        b.subnet = Subnet::PointToPoint;
        b.lease = Some(Duration::from_secs(3600));
        let Outcome::Reply { bytes, .. } = reply(&udhcpc_discover(), &b) else {
            panic!()
        };
        let m = opts_of(&bytes);
        assert_eq!(
            m.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::BROADCAST))
        );
        // RFC 3442 encoding: 32 a9 fe 00 01 | 00 00 00 00 ; 0 | a9 fe 00 01.
        let want = hex("79 0e 20 a9 fe 00 01 00 00 00 00 00 a9 fe 00 01");
        assert!(
            bytes.windows(want.len()).any(|w| w == want),
            "option 121 bytes"
        );
        assert_eq!(
            m.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(
            m.opts().get(OptionCode::Renewal),
            Some(&DhcpOption::Renewal(1800))
        );
        assert_eq!(
            m.opts().get(OptionCode::Rebinding),
            Some(&DhcpOption::Rebinding(3150))
        );
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let b = binding_shared();
        assert_eq!(reply(&[], &b), Outcome::Dropped(DropReason::Malformed));
        assert_eq!(
            reply(&[0; 239], &b),
            Outcome::Dropped(DropReason::Malformed)
        );
        assert_eq!(
            reply(&[0; 240], &b),
            Outcome::Dropped(DropReason::Malformed)
        );
        assert_eq!(
            reply(&[0; 4000], &b),
            Outcome::Dropped(DropReason::Malformed)
        );
        // A valid header with every truncation and a pseudo-random tail.
        let d = udhcpc_discover();
        for cut in MIN_REQUEST..d.len() {
            let _ = reply(&d[..cut], &b);
        }
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut p = d[..240].to_vec();
            for _ in 0..(x % 300) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                p.push(x as u8);
            }
            let _ = reply(&p, &b);
        }
        // An option whose length runs past the end.
        let mut p = d[..240].to_vec();
        p.extend([53, 1, 1, 121, 200, 32]);
        let _ = reply(&p, &b);
    }

    #[test]
    fn binding_from_config_follows_fabric_mode() {
        let text = r#"
[hypervisor]
name = "hv1"
router_id = "198.51.100.101"
[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24"]
gateway_v4 = "203.0.113.254"
[fabrics.p2p]
table = 91
subnets = ["198.18.0.0/24"]
ipv4_mode = "point-to-point"
[dhcp]
lease_time = "1h"
"#;
        let c = crate::config::parse("t.toml", text).unwrap();
        let mut i = InterfaceIntent {
            name: "tap1".into(),
            mac: MacAddr(MAC),
            fabric: "public".into(),
            link: Default::default(),
            ipv4: vec![Ipv4Addr::new(203, 0, 113, 5)],
            ipv6: vec![],
            ipv6_prefixes: vec![],
            routed: vec![],
        };
        let b = binding(&c, "vm_1", &i).unwrap();
        assert_eq!(b.subnet, Subnet::Shared { prefix_len: 24 });
        assert_eq!(b.server, Ipv4Addr::new(203, 0, 113, 254));
        assert_eq!(b.lease, Some(Duration::from_secs(3600)));
        assert_eq!(b.hostname, None, "'_' is no host name");
        i.fabric = "p2p".into();
        i.ipv4 = vec![Ipv4Addr::new(198, 18, 0, 5)];
        let b = binding(&c, "vm1", &i).unwrap();
        assert_eq!(b.subnet, Subnet::PointToPoint);
        assert_eq!(b.server, Ipv4Addr::new(169, 254, 0, 1));
        assert_eq!(b.hostname.as_deref(), Some("vm1"));
        i.ipv4.clear();
        assert!(binding(&c, "vm1", &i).is_none());
    }

    #[test]
    fn masks() {
        assert_eq!(mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(mask(32), Ipv4Addr::BROADCAST);
    }

    /// Found by the dhcp_v4 fuzz target: an option whose length dhcproto
    /// 0.15 only debug-asserts. In a debug build the decoder panics; the
    /// panic must stay contained (dropped as malformed), in release the
    /// decode fails cleanly.
    #[test]
    fn fuzz_finding_bad_option_length_is_dropped_not_a_panic() {
        let bytes = include_bytes!("testdata/fuzz-v4-option-len.bin");
        // Debug builds: the contained panic (Malformed); release builds
        // decode it and drop it on its merits. Never a reply, never a panic.
        let out = reply(bytes, &binding_shared());
        assert!(matches!(out, Outcome::Dropped(_)), "{out:?}");
    }
}
