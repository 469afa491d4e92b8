//! PURE stateful DHCPv6 (RFC 8415) for shared-/64 fabrics: (raw request
//! bytes, [`Binding6`]) → reply bytes or a drop reason.
//!
//! On a `shared-dhcpv6` fabric the RAs say A=0 and M=1, so a guest with
//! stable-privacy or temporary addresses still gets exactly its intended
//! address here, in an IA_NA. Only the one VM behind the interface can
//! reach the socket, so there is no client table: every client on the
//! interface gets that address. `io6.rs` owns the socket.

use std::net::Ipv6Addr;
use std::time::Duration;

use dhcproto::v6::{
    DhcpOption, IAAddr, IANA, Message, MessageType, OptionCode, Status, StatusCode,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use ipnet::IpNet;

use crate::config::{Config, Ipv6Mode};
use crate::intent::InterfaceIntent;

pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;
/// Largest request looked at (a VM link has no jumbo DHCPv6 business).
pub const MAX_REQUEST: usize = 1500;
/// The same server DUID on every hypervisor (DUID-LL, RFC 8415 §11.4, of a
/// locally administered MAC spelling "l3hv"): a VM that moves keeps
/// talking to "its" server, as it keeps its fe80::1 router.
pub const SERVER_DUID: [u8; 10] = [0, 3, 0, 1, 0x02, b'l', b'3', b'h', b'v', 0x01];

/// The lease of one VM interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding6 {
    pub address: Ipv6Addr,
    /// `None`: infinite.
    pub lease: Option<Duration>,
    pub dns: Vec<Ipv6Addr>,
}

/// The DHCPv6 binding of an interface on a `shared-dhcpv6` fabric: its
/// first address inside one of the fabric's IPv6 subnets.
pub fn binding(config: &Config, iface: &InterfaceIntent) -> Option<Binding6> {
    let fabric = config.fabric(&iface.fabric)?;
    if fabric.ipv6_mode != Ipv6Mode::SharedDhcpv6 {
        return None;
    }
    let address = *iface.ipv6.iter().find(|a| {
        fabric.subnets.iter().any(|n| match n {
            IpNet::V6(n) => n.contains(*a),
            IpNet::V4(_) => false,
        })
    })?;
    Some(Binding6 {
        address,
        lease: config.dhcp.lease_time,
        dns: config.ra.rdnss.clone(),
    })
}

/// Why a DHCPv6 packet got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop6 {
    Malformed,
    /// No client identifier where RFC 8415 §16 requires one.
    NoClientId,
    /// For another server (§16.4, §16.6), or a Solicit/Rebind naming one.
    OtherServer,
    /// A server or relay message from a VM.
    UnexpectedType,
    RateLimited,
}

impl Drop6 {
    pub fn as_str(self) -> &'static str {
        match self {
            Drop6::Malformed => "malformed",
            Drop6::NoClientId => "no_client_id",
            Drop6::OtherServer => "other_server",
            Drop6::UnexpectedType => "unexpected_type",
            Drop6::RateLimited => "rate_limited",
        }
    }
}

/// A reply and whether it hands out the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply6 {
    pub kind: MessageType,
    pub bytes: Vec<u8>,
    pub lease: bool,
}

/// Decodes defensively (sizes, then the codec with panics contained).
pub fn decode(bytes: &[u8]) -> Result<Message, Drop6> {
    if bytes.len() < 4 || bytes.len() > MAX_REQUEST {
        return Err(Drop6::Malformed);
    }
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)))
        .map_err(|_| Drop6::Malformed)?
        .map_err(|_| Drop6::Malformed)
}

/// The answer to `request` for `b`.
pub fn reply(request: &[u8], b: &Binding6) -> Result<Reply6, Drop6> {
    let req = decode(request)?;
    let kind = req.msg_type();
    let client = req.opts().get(OptionCode::ClientId).cloned();
    let server = match req.opts().get(OptionCode::ServerId) {
        Some(DhcpOption::ServerId(id)) => Some(id.as_slice()),
        _ => None,
    };
    let ours = server == Some(&SERVER_DUID[..]);
    // RFC 8415 §16: which messages must, may or must not name a server.
    match kind {
        MessageType::Solicit | MessageType::Rebind | MessageType::Confirm => {
            if server.is_some() {
                return Err(Drop6::OtherServer);
            }
        }
        MessageType::Request | MessageType::Renew | MessageType::Release | MessageType::Decline => {
            if !ours {
                return Err(Drop6::OtherServer);
            }
        }
        MessageType::InformationRequest => {
            if server.is_some() && !ours {
                return Err(Drop6::OtherServer);
            }
        }
        _ => return Err(Drop6::UnexpectedType),
    }
    if client.is_none() && kind != MessageType::InformationRequest {
        return Err(Drop6::NoClientId);
    }
    let rapid = kind == MessageType::Solicit && req.opts().get(OptionCode::RapidCommit).is_some();
    let out_kind = if kind == MessageType::Solicit && !rapid {
        MessageType::Advertise
    } else {
        MessageType::Reply
    };
    let mut m = Message::new_with_id(out_kind, req.xid());
    let o = m.opts_mut();
    o.insert(DhcpOption::ServerId(SERVER_DUID.to_vec()));
    if let Some(c) = client {
        o.insert(c);
    }
    if rapid {
        o.insert(DhcpOption::RapidCommit);
    }
    if !b.dns.is_empty() {
        o.insert(DhcpOption::DomainNameServers(
            b.dns.iter().take(8).copied().collect(),
        ));
    }
    let mut lease = false;
    match kind {
        MessageType::Solicit | MessageType::Request | MessageType::Renew | MessageType::Rebind => {
            let life = b
                .lease
                .map_or(u32::MAX, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
            let (t1, t2) = if life == u32::MAX {
                (u32::MAX, u32::MAX)
            } else {
                // RFC 8415 §21.4: T1 0.5, T2 0.8 of the preferred lifetime.
                (life / 2, (u64::from(life) * 4 / 5) as u32)
            };
            // One IA_NA per IA_NA asked for (at least one), each with the
            // intended address.
            let mut ids: Vec<u32> = req
                .opts()
                .iter()
                .filter_map(|o| match o {
                    DhcpOption::IANA(ia) => Some(ia.id),
                    _ => None,
                })
                .take(4)
                .collect();
            if ids.is_empty() {
                ids.push(1);
            }
            for id in ids {
                let mut opts = dhcproto::v6::DhcpOptions::new();
                opts.insert(DhcpOption::IAAddr(IAAddr {
                    addr: b.address,
                    preferred_life: life,
                    valid_life: life,
                    opts: dhcproto::v6::DhcpOptions::new(),
                }));
                o.insert(DhcpOption::IANA(IANA { id, t1, t2, opts }));
            }
            lease = out_kind == MessageType::Reply;
        }
        MessageType::Confirm => {
            // §18.3.3: is every address the client has still on-link?
            let mine = req.opts().iter().all(|o| match o {
                DhcpOption::IANA(ia) => ia.opts.iter().all(|a| match a {
                    DhcpOption::IAAddr(a) => a.addr == b.address,
                    _ => true,
                }),
                _ => true,
            });
            o.insert(DhcpOption::StatusCode(StatusCode {
                status: if mine {
                    Status::Success
                } else {
                    Status::NotOnLink
                },
                msg: String::new(),
            }));
        }
        MessageType::Release | MessageType::Decline => {
            o.insert(DhcpOption::StatusCode(StatusCode {
                status: Status::Success,
                msg: String::new(),
            }));
        }
        _ => {}
    }
    let mut bytes = Vec::with_capacity(128);
    m.encode(&mut Encoder::new(&mut bytes))
        .map_err(|_| Drop6::Malformed)?;
    Ok(Reply6 {
        kind: out_kind,
        bytes,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn b() -> Binding6 {
        Binding6 {
            address: "2001:db8:cb00:7100::3".parse().unwrap(),
            lease: None,
            dns: vec!["2001:db8::53".parse().unwrap()],
        }
    }

    /// A SOLICIT laid out as ISC dhclient -6 sends it: type 1, xid,
    /// client id (DUID-LLT), elapsed time, IA_NA id 0x0b1c2d3e T1 T2 0.
    fn solicit() -> Vec<u8> {
        hex("01 a1b2c3 \
             0001 000e 0001 0001 2e4f5a6b 525400710003 \
             0008 0002 0000 \
             0003 000c 0b1c2d3e 00000000 00000000")
    }

    #[test]
    fn solicit_gets_advertise_with_the_address() {
        let r = reply(&solicit(), &b()).unwrap();
        assert_eq!(r.kind, MessageType::Advertise);
        assert!(!r.lease);
        let bytes = &r.bytes;
        assert_eq!(&bytes[..4], &hex("02 a1b2c3"), "ADVERTISE, xid echoed");
        // Server id, DUID-LL "l3hv".
        let sid = hex("0002 000a 0003 0001 026c33687601");
        assert!(bytes.windows(sid.len()).any(|w| w == sid));
        // Client id echoed.
        let cid = hex("0001 000e 0001 0001 2e4f5a6b 525400710003");
        assert!(bytes.windows(cid.len()).any(|w| w == cid));
        // IA_NA (same IAID, T1/T2 infinite) with IAADDR ::3 infinite.
        let ia = hex("0003 0028 0b1c2d3e ffffffff ffffffff \
             0005 0018 20010db8cb0071000000000000000003 ffffffff ffffffff");
        assert!(bytes.windows(ia.len()).any(|w| w == ia), "{bytes:02x?}");
        // DNS.
        let dns = hex("0017 0010 20010db8000000000000000000000053");
        assert!(bytes.windows(dns.len()).any(|w| w == dns));
    }

    #[test]
    fn request_needs_our_server_id_and_gets_reply() {
        let mut req = solicit();
        req[0] = 3;
        assert_eq!(reply(&req, &b()), Err(Drop6::OtherServer));
        req.extend(hex("0002 000a 0003 0001 026c33687601"));
        let r = reply(&req, &b()).unwrap();
        assert_eq!(r.kind, MessageType::Reply);
        assert!(r.lease);
        let mut other = solicit();
        other[0] = 3;
        other.extend(hex("0002 000a 0003 0001 020000000001"));
        assert_eq!(reply(&other, &b()), Err(Drop6::OtherServer));
    }

    #[test]
    fn rapid_commit_solicit_gets_reply() {
        let mut s = solicit();
        s.extend(hex("000e 0000"));
        let r = reply(&s, &b()).unwrap();
        assert_eq!(r.kind, MessageType::Reply);
        assert!(r.lease);
    }

    #[test]
    fn confirm_says_not_on_link_for_another_address() {
        let mut c = hex("04 000001 0001 0004 00010203");
        c.extend(hex("0003 0028 00000001 00000000 00000000 \
             0005 0018 20010db8cb0071000000000000000009 00000000 00000000"));
        let r = reply(&c, &b()).unwrap();
        let st = hex("000d 0002 0004");
        assert!(r.bytes.windows(st.len()).any(|w| w == st), "NotOnLink");
    }

    #[test]
    fn server_messages_and_garbage_are_dropped() {
        let mut adv = solicit();
        adv[0] = 2;
        assert_eq!(reply(&adv, &b()), Err(Drop6::UnexpectedType));
        assert_eq!(reply(&[1, 2], &b()), Err(Drop6::Malformed));
        assert_eq!(reply(&hex("01 000001"), &b()), Err(Drop6::NoClientId));
        let s = solicit();
        for cut in 4..s.len() {
            let _ = reply(&s[..cut], &b());
        }
        let mut x: u32 = 7;
        for n in 0..3000 {
            let p: Vec<u8> = (0..4 + n % 80)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = reply(&p, &b());
        }
    }

    /// Found by the dhcp_v6 fuzz target: a VendorOpts option shorter than
    /// its 4-byte enterprise number makes dhcproto 0.15 underflow `len - 4`
    /// (a panic in debug builds). It must be dropped as malformed.
    #[test]
    fn fuzz_finding_short_vendor_opts_is_dropped_not_a_panic() {
        let bytes = include_bytes!("testdata/fuzz-v6-vendor-opts.bin");
        assert!(reply(bytes, &b()).is_err());
    }
}
