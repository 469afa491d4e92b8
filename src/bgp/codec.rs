//! The only file that imports the BGP codec crate (netgauze-bgp-pkt).
//!
//! It owns framing (RFC 4271 §4.1 header checks, done here so each header
//! error maps to its exact NOTIFICATION), decoding of OPEN/UPDATE through
//! netgauze with the parsing context set from the *negotiated*
//! capabilities (4-octet AS, ADD-PATH per AFI and direction), encoding, and
//! the mapping of every decode error to its RFC 4271 / RFC 7606 consequence.
//! NOTIFICATION and KEEPALIVE are written by hand: they are a few fixed
//! bytes and we need exact control over code, subcode and data.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::capabilities::{
    AddPathAddressFamily, AddPathCapability, BgpCapability, ExtendedNextHopEncoding,
    ExtendedNextHopEncodingCapability, FourOctetAsCapability, GracefulRestartAddressFamily,
    GracefulRestartCapability, MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::iana::RouteRefreshSubcode;
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As4PathSegment, AsPath, LocalPreference, MpReach, MpUnreach, NextHop, Origin, PathAttribute,
    PathAttributeValue,
};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::{BgpMessageParsingError, BgpParsingContext};
use netgauze_iana::address_family::{AddressFamily, AddressType};
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;

/// RFC 4271 §4.1.
pub const HEADER_LEN: usize = 19;
pub const MAX_LEN: usize = 4096;
const TYPE_OPEN: u8 = 1;
const TYPE_UPDATE: u8 = 2;
const TYPE_NOTIFICATION: u8 = 3;
const TYPE_KEEPALIVE: u8 = 4;
const TYPE_ROUTE_REFRESH: u8 = 5;

/// A NOTIFICATION: code, subcode, data (RFC 4271 §4.5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: Vec<u8>) -> Self {
        Self {
            code,
            subcode,
            data,
        }
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.code, self.subcode) {
            (1, 1) => "message header error / connection not synchronized",
            (1, 2) => "message header error / bad message length",
            (1, 3) => "message header error / bad message type",
            (1, _) => "message header error",
            (2, 1) => "open message error / unsupported version number",
            (2, 2) => "open message error / bad peer AS",
            (2, 3) => "open message error / bad BGP identifier",
            (2, 4) => "open message error / unsupported optional parameter",
            (2, 6) => "open message error / unacceptable hold time",
            (2, 7) => "open message error / unsupported capability",
            (2, _) => "open message error",
            (3, 1) => "update message error / malformed attribute list",
            (3, 3) => "update message error / missing well-known attribute",
            (3, 10) => "update message error / invalid network field",
            (3, 11) => "update message error / malformed AS_PATH",
            (3, _) => "update message error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 1) => "cease / maximum number of prefixes reached",
            (6, 2) => "cease / administrative shutdown",
            (6, 3) => "cease / peer de-configured",
            (6, 4) => "cease / administrative reset",
            (6, 5) => "cease / connection rejected",
            (6, 7) => "cease / connection collision resolution",
            (6, 10) => "cease / bfd down",
            (6, _) => "cease",
            (7, _) => "route-refresh message error",
            _ => "unknown",
        };
        write!(f, "{}/{} ({name})", self.code, self.subcode)
    }
}

/// One route as l3hv sees it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Nlri {
    pub prefix: IpNet,
    pub path_id: Option<u32>,
}

/// The attributes l3hv reads from a received path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathAttrs {
    pub next_hop: Option<IpAddr>,
    pub local_pref: Option<u32>,
    pub as_path_len: usize,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
}

/// A decoded UPDATE in l3hv's terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub announce: Vec<Nlri>,
    pub withdraw: Vec<Nlri>,
    pub attrs: Option<PathAttrs>,
    /// End-of-RIB for IPv4 (true, false) or IPv6 (false, true).
    pub end_of_rib: Option<bool>,
    /// RFC 7606 treat-as-withdraw was applied: `announce` was moved to
    /// `withdraw` because an attribute was malformed.
    pub treated_as_withdraw: bool,
}

/// A received message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    KeepAlive,
    /// A ROUTE-REFRESH (RFC 2918) or, with enhanced route refresh, a
    /// Beginning or End of Route Refresh (RFC 7313); `afi` is `None` for
    /// a family we do not carry (ignored).
    RouteRefresh {
        afi: Option<Afi>,
        kind: RefreshKind,
    },
}

/// The ROUTE-REFRESH message subtype (RFC 7313 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshKind {
    Request,
    Begin,
    End,
}

/// The parts of an OPEN that negotiation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    pub asn: u32,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub four_octet_as: bool,
    pub multiprotocol: Vec<Afi>,
    /// (afi, send, receive) as the peer advertised it.
    pub add_path: Vec<(Afi, bool, bool)>,
    pub route_refresh: bool,
    pub enhanced_route_refresh: bool,
    pub graceful_restart: Option<u16>,
    /// The families the peer preserves across its restart (RFC 4724 §3):
    /// only their paths are kept stale when it restarts.
    pub graceful_restart_families: Vec<Afi>,
    pub extended_next_hop: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Afi {
    Ipv4,
    Ipv6,
}

impl Afi {
    fn address_type(self) -> AddressType {
        match self {
            Afi::Ipv4 => AddressType::Ipv4Unicast,
            Afi::Ipv6 => AddressType::Ipv6Unicast,
        }
    }
    fn from_address_type(t: AddressType) -> Option<Self> {
        match t {
            AddressType::Ipv4Unicast => Some(Afi::Ipv4),
            AddressType::Ipv6Unicast => Some(Afi::Ipv6),
            _ => None,
        }
    }
}

/// What we advertise in our OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOpen {
    pub asn: u32,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub add_path_send: bool,
    pub graceful_restart: Option<u16>,
}

/// Decoding state set from the negotiated session.
#[derive(Debug, Clone, Default)]
pub struct Codec {
    four_octet_as: bool,
    /// ADD-PATH in the receive direction, per AFI.
    add_path_rx: HashMap<Afi, bool>,
    /// ADD-PATH in the send direction, per AFI.
    add_path_tx: HashMap<Afi, bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(String),
}

impl Codec {
    /// Sets the decoder and encoder from the negotiated capabilities:
    /// 4-octet AS when both sides said so, ADD-PATH per AFI and direction
    /// (we receive when we said receive and the peer said send).
    pub fn negotiated(local: &LocalOpen, remote: &Open) -> Self {
        let mut c = Codec {
            four_octet_as: remote.four_octet_as,
            ..Default::default()
        };
        for afi in [Afi::Ipv4, Afi::Ipv6] {
            let (peer_send, peer_receive) = remote
                .add_path
                .iter()
                .find(|(a, _, _)| *a == afi)
                .map_or((false, false), |(_, s, r)| (*s, *r));
            c.add_path_rx.insert(afi, peer_send);
            c.add_path_tx
                .insert(afi, peer_receive && local.add_path_send);
        }
        c
    }

    pub fn add_path_tx(&self, afi: Afi) -> bool {
        self.add_path_tx.get(&afi).copied().unwrap_or(false)
    }

    pub fn add_path_rx(&self, afi: Afi) -> bool {
        self.add_path_rx.get(&afi).copied().unwrap_or(false)
    }

    fn context(&self) -> BgpParsingContext {
        let mut add_path = HashMap::new();
        for afi in [Afi::Ipv4, Afi::Ipv6] {
            add_path.insert(afi.address_type(), self.add_path_rx(afi));
        }
        // Malformed path attributes are collected, not fatal: RFC 7606
        // decides per attribute (see `update_of`).
        BgpParsingContext::new(
            self.four_octet_as,
            HashMap::new(),
            add_path,
            true,
            true,
            false,
            false,
        )
    }

    /// Splits one whole message off `buf`, checking the header (RFC 4271
    /// §6.1). `Ok(None)`: need more bytes.
    pub fn frame(buf: &[u8]) -> Result<Option<usize>, Notification> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[..16].iter().any(|b| *b != 0xff) {
            return Err(Notification::new(1, 1, vec![]));
        }
        let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
        let kind = buf[18];
        let min = match kind {
            TYPE_OPEN => 29,
            TYPE_UPDATE => 23,
            TYPE_NOTIFICATION => 21,
            TYPE_KEEPALIVE => 19,
            TYPE_ROUTE_REFRESH => 23,
            _ => return Err(Notification::new(1, 3, vec![kind])),
        };
        if len < min || len > MAX_LEN || (kind == TYPE_KEEPALIVE && len != 19) {
            return Err(Notification::new(1, 2, buf[16..18].to_vec()));
        }
        if buf.len() < len {
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// Decodes one framed message. An error is the NOTIFICATION to send.
    pub fn decode(&self, frame: &[u8]) -> Result<Message, Notification> {
        match frame.get(18) {
            Some(&TYPE_KEEPALIVE) => return Ok(Message::KeepAlive),
            Some(&TYPE_NOTIFICATION) => {
                return Ok(Message::Notification(Notification::new(
                    frame.get(19).copied().unwrap_or(0),
                    frame.get(20).copied().unwrap_or(0),
                    frame.get(21..).map(<[u8]>::to_vec).unwrap_or_default(),
                )));
            }
            _ => {}
        }
        let mut ctx = self.context();
        let mut reader = SliceReader::new(frame);
        let msg =
            BgpMessage::parse(&mut reader, &mut ctx).map_err(|e| notification_for(&e, frame))?;
        let ignored = ctx.reset_parsing_errors();
        match msg {
            BgpMessage::Open(open) => open_of(&open),
            BgpMessage::Update(update) => Ok(Message::Update(update_of(
                &update,
                !ignored.path_attr_errors().is_empty(),
            )?)),
            BgpMessage::Notification(_) | BgpMessage::KeepAlive => {
                Err(Notification::new(1, 3, vec![]))
            }
            BgpMessage::RouteRefresh(r) => Ok(Message::RouteRefresh {
                afi: Afi::from_address_type(r.address_type()),
                kind: match r.operation_type() {
                    RouteRefreshSubcode::NormalRequest => RefreshKind::Request,
                    RouteRefreshSubcode::BeginningOfRouteRefresh => RefreshKind::Begin,
                    RouteRefreshSubcode::EndOfRouteRefresh => RefreshKind::End,
                },
            }),
        }
    }
}

/// RFC 4271 §6 / RFC 7606: what to send back for a decode error.
fn notification_for(e: &BgpMessageParsingError, frame: &[u8]) -> Notification {
    let kind = frame.get(18).copied().unwrap_or(0);
    match e {
        BgpMessageParsingError::ConnectionNotSynchronized { .. } => Notification::new(1, 1, vec![]),
        BgpMessageParsingError::UndefinedBgpMessageType { code, .. } => {
            Notification::new(1, 3, vec![*code])
        }
        BgpMessageParsingError::BadMessageLength { length, .. } => {
            Notification::new(1, 2, length.to_be_bytes().to_vec())
        }
        BgpMessageParsingError::BgpOpenMessageParsingError(o) => {
            let text = format!("{o:?}");
            if text.contains("UnsupportedVersion") {
                Notification::new(2, 1, 4u16.to_be_bytes().to_vec())
            } else if text.contains("UnacceptableHoldTime") {
                Notification::new(2, 6, vec![])
            } else if text.contains("OptionalParameter") {
                Notification::new(2, 4, vec![])
            } else {
                Notification::new(2, 0, vec![])
            }
        }
        // Errors that survive RFC 7606 treatment (NLRI, MP_REACH framing,
        // attribute-list structure) reset the session.
        _ if kind == TYPE_UPDATE => Notification::new(3, 1, vec![]),
        _ if kind == TYPE_OPEN => Notification::new(2, 0, vec![]),
        _ if kind == TYPE_ROUTE_REFRESH => Notification::new(7, 1, vec![]),
        _ => Notification::new(1, 0, vec![]),
    }
}

fn open_of(open: &BgpOpenMessage) -> Result<Message, Notification> {
    let mut o = Open {
        version: open.version(),
        asn: open.my_asn4(),
        hold_time: open.hold_time(),
        bgp_id: open.bgp_id(),
        four_octet_as: false,
        multiprotocol: vec![],
        add_path: vec![],
        route_refresh: false,
        enhanced_route_refresh: false,
        graceful_restart: None,
        graceful_restart_families: vec![],
        extended_next_hop: false,
    };
    for cap in open.capabilities() {
        match cap {
            BgpCapability::FourOctetAs(_) => o.four_octet_as = true,
            BgpCapability::MultiProtocolExtensions(mp) => {
                if let Some(afi) = Afi::from_address_type(mp.address_type()) {
                    o.multiprotocol.push(afi);
                }
            }
            BgpCapability::AddPath(ap) => {
                for f in ap.address_families() {
                    if let Some(afi) = Afi::from_address_type(f.address_type()) {
                        o.add_path.push((afi, f.send(), f.receive()));
                    }
                }
            }
            BgpCapability::RouteRefresh | BgpCapability::CiscoRouteRefresh => {
                o.route_refresh = true
            }
            BgpCapability::EnhancedRouteRefresh => o.enhanced_route_refresh = true,
            BgpCapability::GracefulRestartCapability(gr) => {
                o.graceful_restart = Some(gr.time());
                o.graceful_restart_families = gr
                    .address_families()
                    .iter()
                    .filter_map(|f| Afi::from_address_type(f.address_type()))
                    .collect();
            }
            // RFC 8950: only IPv4 unicast NLRI with IPv6 next hops matter.
            BgpCapability::ExtendedNextHopEncoding(e) => {
                o.extended_next_hop |= e.encodings().iter().any(|x| {
                    x.address_type() == AddressType::Ipv4Unicast
                        && x.next_hop_afi() == AddressFamily::IPv6
                })
            }
            _ => {}
        }
    }
    Ok(Message::Open(o))
}

fn update_of(u: &BgpUpdateMessage, malformed_attribute: bool) -> Result<Update, Notification> {
    let mut out = Update::default();
    if let Some(t) = u.end_of_rib() {
        out.end_of_rib = match t {
            AddressType::Ipv4Unicast => Some(true),
            AddressType::Ipv6Unicast => Some(false),
            _ => None,
        };
        return Ok(out);
    }
    let v4 = |a: &Ipv4UnicastAddress| Nlri {
        prefix: IpNet::V4(a.network().address()),
        path_id: a.path_id(),
    };
    let v6 = |a: &Ipv6UnicastAddress| Nlri {
        prefix: IpNet::V6(a.network().address()),
        path_id: a.path_id(),
    };
    out.withdraw.extend(u.withdraw_routes().iter().map(v4));
    out.announce.extend(u.nlri().iter().map(v4));
    let mut attrs = PathAttrs {
        next_hop: None,
        local_pref: None,
        as_path_len: 0,
        originator_id: None,
        cluster_list: vec![],
    };
    let mut v4_next_hop = None;
    let mut seen_origin = false;
    let mut seen_as_path = false;
    for a in u.path_attributes() {
        match a.value() {
            PathAttributeValue::Origin(_) => seen_origin = true,
            PathAttributeValue::AsPath(p) => {
                seen_as_path = true;
                attrs.as_path_len = match p {
                    AsPath::As2PathSegments(s) => s.iter().map(|s| s.as_numbers().len()).sum(),
                    AsPath::As4PathSegments(s) => s.iter().map(|s| s.as_numbers().len()).sum(),
                };
            }
            PathAttributeValue::NextHop(nh) => v4_next_hop = Some(IpAddr::V4(nh.next_hop())),
            PathAttributeValue::LocalPreference(lp) => attrs.local_pref = Some(lp.metric()),
            PathAttributeValue::Originator(o) => attrs.originator_id = Some(o.id()),
            PathAttributeValue::ClusterList(c) => {
                attrs.cluster_list = c.cluster_list().iter().map(|c| c.id()).collect()
            }
            PathAttributeValue::MpReach(MpReach::Ipv4Unicast { next_hop, nlri, .. }) => {
                attrs.next_hop = Some(*next_hop);
                out.announce.extend(nlri.iter().map(v4));
            }
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                next_hop_global,
                nlri,
                ..
            }) => {
                attrs.next_hop = Some(IpAddr::V6(*next_hop_global));
                out.announce.extend(nlri.iter().map(v6));
            }
            PathAttributeValue::MpUnreach(MpUnreach::Ipv4Unicast { nlri }) => {
                out.withdraw.extend(nlri.iter().map(v4))
            }
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri }) => {
                out.withdraw.extend(nlri.iter().map(v6))
            }
            _ => {}
        }
    }
    if attrs.next_hop.is_none() {
        attrs.next_hop = v4_next_hop;
    }
    if !out.announce.is_empty() {
        // RFC 7606 §3(d), §7.1, §7.2: a missing or malformed well-known
        // attribute is treat-as-withdraw, not a session reset.
        if malformed_attribute || !seen_origin || !seen_as_path || attrs.next_hop.is_none() {
            let gone = std::mem::take(&mut out.announce);
            out.withdraw.extend(gone);
            out.treated_as_withdraw = true;
            return Ok(out);
        }
        out.attrs = Some(attrs);
    } else if malformed_attribute && out.withdraw.is_empty() {
        out.treated_as_withdraw = true;
    }
    Ok(out)
}

fn header(kind: u8, body_len: usize) -> Vec<u8> {
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&((HEADER_LEN + body_len) as u16).to_be_bytes());
    v.push(kind);
    v
}

pub fn keepalive() -> Vec<u8> {
    header(TYPE_KEEPALIVE, 0)
}

/// A ROUTE-REFRESH message for `afi` (unicast) of subtype `kind`.
pub fn route_refresh(afi: Afi, kind: RefreshKind) -> Vec<u8> {
    let mut v = header(TYPE_ROUTE_REFRESH, 4);
    v.extend_from_slice(&(if afi == Afi::Ipv4 { 1u16 } else { 2 }).to_be_bytes());
    v.push(match kind {
        RefreshKind::Request => 0,
        RefreshKind::Begin => 1,
        RefreshKind::End => 2,
    });
    v.push(1);
    v
}

pub fn notification(n: &Notification) -> Vec<u8> {
    let mut v = header(TYPE_NOTIFICATION, 2 + n.data.len());
    v.push(n.code);
    v.push(n.subcode);
    v.extend_from_slice(&n.data);
    v
}

fn write(msg: &BgpMessage) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(msg.len());
    msg.write(&mut out)
        .map_err(|e| CodecError::Encode(format!("{e:?}")))?;
    Ok(out)
}

/// Our OPEN: MP IPv4+IPv6 unicast, 4-octet AS, route refresh, enhanced
/// route refresh, ADD-PATH (receive; send when configured), graceful
/// restart when configured.
pub fn open(local: &LocalOpen) -> Result<Vec<u8>, CodecError> {
    let mut caps = vec![
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv4Unicast,
        )),
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv6Unicast,
        )),
        BgpCapability::RouteRefresh,
        BgpCapability::EnhancedRouteRefresh,
        // RFC 8950: IPv4 unicast with IPv6 next hops, for IPv6-only fabric
        // paths (the kernel installs them through nexthop objects).
        BgpCapability::ExtendedNextHopEncoding(ExtendedNextHopEncodingCapability::new(vec![
            ExtendedNextHopEncoding::new(AddressType::Ipv4Unicast, AddressFamily::IPv6),
        ])),
        BgpCapability::FourOctetAs(FourOctetAsCapability::new(local.asn)),
        BgpCapability::AddPath(AddPathCapability::new(vec![
            AddPathAddressFamily::new(AddressType::Ipv4Unicast, local.add_path_send, true),
            AddPathAddressFamily::new(AddressType::Ipv6Unicast, local.add_path_send, true),
        ])),
    ];
    if let Some(time) = local.graceful_restart {
        caps.push(BgpCapability::GracefulRestartCapability(
            // Both families with Forwarding State preserved: the kernel
            // routes outlive the agent (RFC 4724 §3), so a helper keeps
            // our paths while we restart. The Restart State bit stays
            // clear: we never defer our own End-of-RIB.
            GracefulRestartCapability::new(
                false,
                false,
                time.min(4095),
                vec![
                    GracefulRestartAddressFamily::new(true, AddressType::Ipv4Unicast),
                    GracefulRestartAddressFamily::new(true, AddressType::Ipv6Unicast),
                ],
            ),
        ));
    }
    let my_as = u16::try_from(local.asn).unwrap_or(23456);
    let msg = BgpMessage::Open(BgpOpenMessage::new(
        my_as,
        local.hold_time,
        local.bgp_id,
        vec![BgpOpenMessageParameter::new_capabilities(caps)],
    ));
    write(&msg)
}

/// One path to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub prefixes: Vec<IpNet>,
    pub next_hop: IpAddr,
    pub local_pref: u32,
}

/// UPDATEs announcing `a` (one family per call), packed up to the message
/// size limit. iBGP: empty AS_PATH, LOCAL_PREF.
pub fn announce(codec: &Codec, a: &Announce) -> Result<Vec<Vec<u8>>, CodecError> {
    let mut out = Vec::new();
    let base = |mp: Option<PathAttributeValue>,
                nh4: Option<Ipv4Addr>|
     -> Result<Vec<PathAttribute>, CodecError> {
        let mut attrs = vec![
            attr(false, true, PathAttributeValue::Origin(Origin::IGP))?,
            attr(
                false,
                true,
                PathAttributeValue::AsPath(AsPath::As4PathSegments(
                    Vec::<As4PathSegment>::new().into(),
                )),
            )?,
        ];
        if let Some(nh) = nh4 {
            attrs.push(attr(
                false,
                true,
                PathAttributeValue::NextHop(NextHop::new(nh)),
            )?);
        }
        attrs.push(attr(
            false,
            true,
            PathAttributeValue::LocalPreference(LocalPreference::new(a.local_pref)),
        )?);
        if let Some(mp) = mp {
            attrs.push(attr(true, false, mp)?);
        }
        Ok(attrs)
    };
    // ~4 KiB per message: at most 5 bytes + 4 (path id) per IPv4 prefix,
    // 17 + 4 per IPv6 prefix; keep a margin for the attributes.
    let chunk = |per: usize| (MAX_LEN - 200) / per;
    let v4: Vec<Ipv4Net> = a
        .prefixes
        .iter()
        .filter_map(|p| match p {
            IpNet::V4(n) => Some(*n),
            _ => None,
        })
        .collect();
    let v6: Vec<Ipv6Net> = a
        .prefixes
        .iter()
        .filter_map(|p| match p {
            IpNet::V6(n) => Some(*n),
            _ => None,
        })
        .collect();
    let path_id = |afi| codec.add_path_tx(afi).then_some(1u32);
    for group in v4.chunks(chunk(9)) {
        let nlri: Vec<Ipv4UnicastAddress> = group
            .iter()
            .filter_map(|n| Ipv4Unicast::from_net(*n).ok())
            .map(|n| Ipv4UnicastAddress::new(path_id(Afi::Ipv4), n))
            .collect();
        let msg = match a.next_hop {
            IpAddr::V4(nh) => BgpUpdateMessage::new(vec![], base(None, Some(nh))?, nlri),
            // RFC 8950: IPv4 NLRI with an IPv6 next hop go in MP_REACH.
            IpAddr::V6(_) => BgpUpdateMessage::new(
                vec![],
                base(
                    Some(PathAttributeValue::MpReach(MpReach::Ipv4Unicast {
                        next_hop: a.next_hop,
                        next_hop_local: None,
                        nlri: nlri.into(),
                    })),
                    None,
                )?,
                vec![],
            ),
        };
        out.push(write(&BgpMessage::Update(msg))?);
    }
    if let IpAddr::V6(nh) = a.next_hop {
        for group in v6.chunks(chunk(21)) {
            let nlri: Vec<Ipv6UnicastAddress> = group
                .iter()
                .filter_map(|n| Ipv6Unicast::from_net(*n).ok())
                .map(|n| Ipv6UnicastAddress::new(path_id(Afi::Ipv6), n))
                .collect();
            let mp = PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                next_hop_global: nh,
                next_hop_local: None,
                nlri: nlri.into(),
            });
            out.push(write(&BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                base(Some(mp), None)?,
                vec![],
            )))?);
        }
    }
    Ok(out)
}

/// UPDATEs withdrawing `prefixes`.
pub fn withdraw(codec: &Codec, prefixes: &[IpNet]) -> Result<Vec<Vec<u8>>, CodecError> {
    let mut out = Vec::new();
    let v4: Vec<Ipv4UnicastAddress> = prefixes
        .iter()
        .filter_map(|p| match p {
            IpNet::V4(n) => Ipv4Unicast::from_net(*n).ok(),
            _ => None,
        })
        .map(|n| Ipv4UnicastAddress::new(codec.add_path_tx(Afi::Ipv4).then_some(1), n))
        .collect();
    let v6: Vec<Ipv6UnicastAddress> = prefixes
        .iter()
        .filter_map(|p| match p {
            IpNet::V6(n) => Ipv6Unicast::from_net(*n).ok(),
            _ => None,
        })
        .map(|n| Ipv6UnicastAddress::new(codec.add_path_tx(Afi::Ipv6).then_some(1), n))
        .collect();
    for group in v4.chunks(400) {
        out.push(write(&BgpMessage::Update(BgpUpdateMessage::new(
            group.to_vec(),
            vec![],
            vec![],
        )))?);
    }
    for group in v6.chunks(180) {
        let mp = PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
            nlri: group.to_vec().into(),
        });
        out.push(write(&BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![attr(true, false, mp)?],
            vec![],
        )))?);
    }
    Ok(out)
}

/// End-of-RIB markers for IPv4 and IPv6 unicast (RFC 4724 §2).
/// End-of-RIB (RFC 4724 §2) for each negotiated family: an empty UPDATE
/// for IPv4, an empty MP_UNREACH for IPv6.
pub fn end_of_rib(ipv4: bool, ipv6: bool) -> Result<Vec<Vec<u8>>, CodecError> {
    let mut out = Vec::new();
    if ipv4 {
        out.push(write(&BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![],
            vec![],
        )))?);
    }
    if ipv6 {
        let mp = PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
            nlri: Vec::new().into(),
        });
        out.push(write(&BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![attr(true, false, mp)?],
            vec![],
        )))?);
    }
    Ok(out)
}

fn attr(
    optional: bool,
    transitive: bool,
    value: PathAttributeValue,
) -> Result<PathAttribute, CodecError> {
    PathAttribute::from(optional, transitive, false, optional, value)
        .map_err(|(_, e)| CodecError::Encode(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalOpen {
        LocalOpen {
            asn: 65000,
            hold_time: 90,
            bgp_id: "192.0.2.1".parse().unwrap(),
            add_path_send: false,
            graceful_restart: None,
        }
    }

    fn round_open() -> Open {
        let bytes = open(&local()).unwrap();
        let len = Codec::frame(&bytes).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        match Codec::default().decode(&bytes).unwrap() {
            Message::Open(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn our_open_round_trips_with_its_capabilities() {
        let o = round_open();
        assert_eq!(o.asn, 65000);
        assert_eq!(o.hold_time, 90);
        assert!(o.four_octet_as);
        assert_eq!(o.multiprotocol, vec![Afi::Ipv4, Afi::Ipv6]);
        assert!(o.add_path.contains(&(Afi::Ipv4, false, true)));
        assert!(o.route_refresh && o.enhanced_route_refresh);
        assert!(o.extended_next_hop, "RFC 8950 IPv4 over IPv6 next hops");
    }

    #[test]
    fn graceful_restart_lists_both_families_with_forwarding_preserved() {
        let mut l = local();
        l.graceful_restart = Some(120);
        let bytes = open(&l).unwrap();
        // Capability 64, length 2 + 2 * 4: flags/time, then (AFI 1, SAFI 1,
        // F) and (AFI 2, SAFI 1, F). Without the families a helper keeps
        // nothing (RFC 4724 §4.2).
        let want = [64u8, 10, 0x00, 120, 0, 1, 1, 0x80, 0, 2, 1, 0x80];
        assert!(bytes.windows(want.len()).any(|w| w == want), "{bytes:02x?}");
    }

    #[test]
    fn route_refresh_subtypes_round_trip() {
        for (afi, kind) in [
            (Afi::Ipv4, RefreshKind::Request),
            (Afi::Ipv6, RefreshKind::Begin),
            (Afi::Ipv4, RefreshKind::End),
        ] {
            let b = route_refresh(afi, kind);
            assert_eq!(b.len(), 23);
            assert_eq!(
                Codec::default().decode(&b).unwrap(),
                Message::RouteRefresh {
                    afi: Some(afi),
                    kind
                }
            );
        }
    }

    #[test]
    fn header_errors_map_to_their_notifications() {
        let mut k = keepalive();
        assert_eq!(Codec::frame(&k).unwrap(), Some(19));
        k[3] = 0;
        assert_eq!(
            Codec::frame(&k).unwrap_err(),
            Notification::new(1, 1, vec![])
        );
        let mut k = keepalive();
        k[18] = 9;
        assert_eq!(Codec::frame(&k).unwrap_err().subcode, 3);
        let mut k = keepalive();
        k[17] = 20;
        assert_eq!(Codec::frame(&k).unwrap_err().subcode, 2);
        let mut big = keepalive();
        big[16] = 0x10;
        big[17] = 0x01;
        big[18] = TYPE_UPDATE;
        assert_eq!(Codec::frame(&big).unwrap_err().subcode, 2);
        assert_eq!(Codec::frame(&k[..10]).unwrap(), None);
    }

    #[test]
    fn announce_and_withdraw_round_trip_with_and_without_add_path() {
        for add_path in [false, true] {
            let mut codec = Codec {
                four_octet_as: true,
                ..Default::default()
            };
            codec.add_path_rx.insert(Afi::Ipv4, add_path);
            codec.add_path_rx.insert(Afi::Ipv6, add_path);
            codec.add_path_tx.insert(Afi::Ipv4, add_path);
            codec.add_path_tx.insert(Afi::Ipv6, add_path);
            let a = Announce {
                prefixes: vec![
                    "203.0.113.1/32".parse().unwrap(),
                    "203.0.113.10/32".parse().unwrap(),
                ],
                next_hop: "198.51.100.101".parse().unwrap(),
                local_pref: 100,
            };
            let msgs = announce(&codec, &a).unwrap();
            assert_eq!(msgs.len(), 1);
            let Message::Update(u) = codec.decode(&msgs[0]).unwrap() else {
                panic!()
            };
            assert_eq!(u.announce.len(), 2);
            assert_eq!(u.announce[0].path_id, add_path.then_some(1));
            assert_eq!(u.attrs.unwrap().next_hop, Some(a.next_hop));
            let a6 = Announce {
                prefixes: vec!["2001:db8:cb00:7100::1/128".parse().unwrap()],
                next_hop: "2001:db8:c633:6400::101".parse().unwrap(),
                local_pref: 100,
            };
            let msgs = announce(&codec, &a6).unwrap();
            let Message::Update(u) = codec.decode(&msgs[0]).unwrap() else {
                panic!()
            };
            assert_eq!(u.announce[0].prefix, a6.prefixes[0]);
            let w = withdraw(&codec, &[a.prefixes[0], a6.prefixes[0]]).unwrap();
            assert_eq!(w.len(), 2);
            let Message::Update(u) = codec.decode(&w[1]).unwrap() else {
                panic!()
            };
            assert_eq!(u.withdraw[0].prefix, a6.prefixes[0]);
        }
    }

    #[test]
    fn many_prefixes_are_packed_under_the_size_limit() {
        let codec = Codec {
            four_octet_as: true,
            ..Default::default()
        };
        let prefixes: Vec<IpNet> = (0..2000u32)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0xc612_0000 + i), 32).unwrap()))
            .collect();
        let msgs = announce(
            &codec,
            &Announce {
                prefixes,
                next_hop: "198.51.100.101".parse().unwrap(),
                local_pref: 100,
            },
        )
        .unwrap();
        assert!(msgs.len() >= 4 && msgs.len() <= 6, "{}", msgs.len());
        let mut n = 0;
        for m in &msgs {
            assert!(m.len() <= MAX_LEN);
            let Message::Update(u) = codec.decode(m).unwrap() else {
                panic!()
            };
            n += u.announce.len();
        }
        assert_eq!(n, 2000);
    }

    #[test]
    fn end_of_rib_is_recognised() {
        let codec = Codec::default();
        assert_eq!(
            end_of_rib(true, false).unwrap().len(),
            1,
            "only what was negotiated"
        );
        let e = end_of_rib(true, true).unwrap();
        let Message::Update(u) = codec.decode(&e[0]).unwrap() else {
            panic!()
        };
        assert_eq!(u.end_of_rib, Some(true));
        let Message::Update(u) = codec.decode(&e[1]).unwrap() else {
            panic!()
        };
        assert_eq!(u.end_of_rib, Some(false));
    }

    #[test]
    fn update_without_mandatory_attributes_is_treated_as_withdraw() {
        // UPDATE: no withdrawn, no attributes, NLRI 203.0.113.1/32.
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&[0, 28, 2, 0, 0, 0, 0, 32, 203, 0, 113, 1]);
        let Message::Update(u) = Codec::default().decode(&m).unwrap() else {
            panic!()
        };
        assert!(u.treated_as_withdraw);
        assert_eq!(u.withdraw.len(), 1);
        assert!(u.announce.is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        let codec = Codec::default();
        let mut seed = 0x1234_5678u32;
        for len in 19..400 {
            let mut m = vec![0xff; 16];
            m.extend_from_slice(&(len as u16).to_be_bytes());
            m.push((seed % 5 + 1) as u8);
            while m.len() < len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                m.push((seed >> 16) as u8);
            }
            if let Ok(Some(n)) = Codec::frame(&m) {
                let _ = codec.decode(&m[..n]);
            }
        }
    }

    #[test]
    fn notification_bytes() {
        let n = notification(&Notification::new(6, 2, vec![]));
        assert_eq!(n.len(), 21);
        let Message::Notification(d) = Codec::default().decode(&n).unwrap() else {
            panic!()
        };
        assert_eq!((d.code, d.subcode), (6, 2));
    }
}
