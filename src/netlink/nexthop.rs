//! Kernel nexthop objects (`ip nexthop`): a small hand-written codec for
//! RTM_NEWNEXTHOP / RTM_DELNEXTHOP / RTM_GETNEXTHOP and the blocking socket
//! calls that carry them.
//!
//! Hand-written because netlink-packet-route 0.33 (the version rtnetlink
//! 0.23 uses, pinned by virt 0.5's libc, see DESIGN.md) has no nexthop
//! message at all: `RouteNetlinkMessage` cannot carry an `nhmsg`, so the
//! rtnetlink handle cannot send one. Routes only reference objects by id
//! (RTA_NH_ID, `RouteAttribute::NhId`, which the crate does have). The
//! codec covers what l3hv uses: `nhmsg`, NHA_ID, NHA_GROUP, NHA_GROUP_TYPE,
//! NHA_GATEWAY, NHA_OIF, NHA_BLACKHOLE and NHA_FDB (decoded, never sent);
//! every other attribute is skipped on decode.
//!
//! Called by `netlink::dump` (the dump, the start-up detection) and
//! `netlink::apply` (pipelined batches of requests). It decides nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub const RTM_NEWNEXTHOP: u16 = 104;
pub const RTM_DELNEXTHOP: u16 = 105;
pub const RTM_GETNEXTHOP: u16 = 106;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_GROUP_TYPE: u16 = 3;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_FDB: u16 = 11;
/// `NEXTHOP_GRP_TYPE_MPATH`: hash-threshold ECMP, what RTA_MULTIPATH does.
pub const GROUP_TYPE_MPATH: u16 = 0;
/// RTNH_F_ONLINK in `nh_flags`.
pub const FLAG_ONLINK: u32 = 4;

const NLMSG_HDR: usize = 16;
const NHMSG_LEN: usize = 8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
/// Extended-ack TLVs follow the error (NLM_F_ACK_TLVS).
const NLM_F_ACK_TLVS: u16 = 0x200;
/// Error message carried in the extended ack.
const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// How many requests go out in one datagram (each is acknowledged).
const BATCH: usize = 64;

/// One `nhmsg` with its attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NexthopMessage {
    pub family: u8,
    pub scope: u8,
    pub protocol: u8,
    pub flags: u32,
    pub id: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// Group members: (id, weight as the kernel carries it, i.e. weight-1).
    pub group: Vec<(u32, u16)>,
    pub group_type: Option<u16>,
    pub blackhole: bool,
    pub fdb: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("nexthop message truncated")]
    Truncated,
    #[error("nexthop attribute {kind} has a bad length {len}")]
    BadAttribute { kind: u16, len: usize },
}

/// A refusal, with the kernel's extended-ack text when it gave one.
#[derive(Debug, thiserror::Error)]
pub enum NexthopError {
    #[error("{}{}", std::io::Error::from_raw_os_error(*errno), message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel { errno: i32, message: Option<String> },
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

impl NexthopError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl NexthopMessage {
    /// A nexthop object: `id N via GATEWAY dev OIF [onlink] proto P`.
    pub fn gateway(id: u32, gateway: IpAddr, oif: u32, onlink: bool, protocol: u8) -> Self {
        Self {
            family: if gateway.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol,
            flags: if onlink { FLAG_ONLINK } else { 0 },
            id: Some(id),
            gateway: Some(gateway),
            oif: Some(oif),
            ..Default::default()
        }
    }

    /// A multipath group: `id N group A/B/... proto P` (equal weights).
    pub fn group(id: u32, members: &[u32], protocol: u8) -> Self {
        Self {
            protocol,
            id: Some(id),
            group: members.iter().map(|m| (*m, 0)).collect(),
            group_type: Some(GROUP_TYPE_MPATH),
            ..Default::default()
        }
    }

    /// What identifies an object to delete: its id alone.
    pub fn by_id(id: u32) -> Self {
        Self {
            id: Some(id),
            ..Default::default()
        }
    }

    /// The `nhmsg` and its attributes (no netlink header).
    pub fn emit(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[self.family, self.scope, self.protocol, 0]);
        b.extend_from_slice(&self.flags.to_ne_bytes());
        if let Some(id) = self.id {
            attr(&mut b, NHA_ID, &id.to_ne_bytes());
        }
        if !self.group.is_empty() {
            let mut v = Vec::with_capacity(8 * self.group.len());
            for (id, weight) in &self.group {
                v.extend_from_slice(&id.to_ne_bytes());
                // weight (u8), weight_high (u8), resvd2 (u16)
                v.push((*weight & 0xff) as u8);
                v.push((*weight >> 8) as u8);
                v.extend_from_slice(&[0, 0]);
            }
            attr(&mut b, NHA_GROUP, &v);
        }
        if let (Some(t), false) = (self.group_type, self.group.is_empty()) {
            if t != GROUP_TYPE_MPATH {
                attr(&mut b, NHA_GROUP_TYPE, &t.to_ne_bytes());
            }
        }
        if self.blackhole {
            attr(&mut b, NHA_BLACKHOLE, &[]);
        }
        match self.gateway {
            Some(IpAddr::V4(a)) => attr(&mut b, NHA_GATEWAY, &a.octets()),
            Some(IpAddr::V6(a)) => attr(&mut b, NHA_GATEWAY, &a.octets()),
            None => {}
        }
        if let Some(oif) = self.oif {
            attr(&mut b, NHA_OIF, &oif.to_ne_bytes());
        }
        b
    }

    /// Decodes an `nhmsg` and its attributes (no netlink header).
    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < NHMSG_LEN {
            return Err(DecodeError::Truncated);
        }
        let mut m = Self {
            family: buf[0],
            scope: buf[1],
            protocol: buf[2],
            flags: u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes")),
            ..Default::default()
        };
        let mut rest = &buf[NHMSG_LEN..];
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
            if len < 4 || len > rest.len() {
                return Err(DecodeError::Truncated);
            }
            let v = &rest[4..len];
            let bad = || DecodeError::BadAttribute { kind, len: v.len() };
            let u32_of = |v: &[u8]| v.try_into().map(u32::from_ne_bytes).map_err(|_| bad());
            match kind {
                NHA_ID => m.id = Some(u32_of(v)?),
                NHA_OIF => m.oif = Some(u32_of(v)?),
                NHA_GROUP => {
                    if !v.len().is_multiple_of(8) {
                        return Err(bad());
                    }
                    m.group = v
                        .chunks_exact(8)
                        .map(|c| {
                            (
                                u32::from_ne_bytes(c[0..4].try_into().expect("4 bytes")),
                                u16::from(c[4]) | (u16::from(c[5]) << 8),
                            )
                        })
                        .collect();
                }
                NHA_GROUP_TYPE => {
                    let t: [u8; 2] = v.get(..2).and_then(|s| s.try_into().ok()).ok_or_else(bad)?;
                    m.group_type = Some(u16::from_ne_bytes(t));
                }
                NHA_GATEWAY => {
                    m.gateway = Some(match v.len() {
                        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).expect("4"))),
                        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).expect("16"))),
                        _ => return Err(bad()),
                    })
                }
                NHA_BLACKHOLE => m.blackhole = true,
                NHA_FDB => m.fdb = true,
                _ => {}
            }
            let step = (len + 3) & !3;
            rest = rest.get(step..).unwrap_or(&[]);
        }
        Ok(m)
    }
}

fn attr(b: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize((b.len() + 3) & !3, 0);
}

/// A netlink message: `nlmsghdr` + `payload`.
pub fn frame(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + payload.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(payload);
    b
}

/// The netlink messages of one datagram: (type, flags, seq, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDR {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        let payload = &rest[NLMSG_HDR..len];
        rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Some((kind, flags, seq, payload))
    })
}

/// An NLMSG_ERROR payload: 0 for an ACK, else the refusal.
fn error_of(flags: u16, payload: &[u8]) -> Result<(), NexthopError> {
    let code = payload
        .get(0..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .ok_or(DecodeError::Truncated)?;
    if code == 0 {
        return Ok(());
    }
    // With NETLINK_CAP_ACK the echoed request is its header alone; the
    // extended-ack TLVs follow it.
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        let mut rest = payload.get(4 + NLMSG_HDR..).unwrap_or(&[]);
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let kind = u16::from_ne_bytes([rest[2], rest[3]]);
            if len < 4 || len > rest.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let text = &rest[4..len];
                let text = text.split(|c| *c == 0).next().unwrap_or(&[]);
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
            rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        }
    }
    Err(NexthopError::Kernel {
        errno: -code,
        message,
    })
}

fn open() -> std::io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    // Only the header of a refused request comes back, with the kernel's
    // reason as text.
    let _ = s.set_cap_ack(true);
    let _ = s.set_ext_ack(true);
    let _ = s.set_rx_buf_sz(1 << 20);
    s.connect(&SocketAddr::new(0, 0))?;
    Ok(s)
}

/// One request: message type, extra flags (NLM_F_CREATE...), the
/// message's payload as it goes on the wire (a [`NexthopMessage`], or any
/// other write of a pass: a route, maybe on a group sent in the same
/// batch, an address, a link set up, a proxy entry, a rule: see
/// `netlink::apply`).
pub type Request = (u16, u16, Vec<u8>);

/// The socket a pass's netlink writes go over (all but link deletions),
/// kept open between batches: a
/// socket per batch was seven system calls before the first request (a
/// learned route's first group paid them twice, object then group).
/// Sequence numbers keep growing across batches, so an answer left over
/// from an interrupted batch (ENOBUFS) is never taken for a new one's.
#[derive(Default)]
pub struct Channel {
    socket: Option<Socket>,
    seq: u32,
    /// The answers' buffer, kept: zeroing 64 KiB anew was a few
    /// microseconds of every batch.
    buf: Vec<u8>,
}

impl Channel {
    /// Sends `requests` (blocking), `BATCH` to a datagram, each
    /// acknowledged; the result of each, in order. The kernel processes
    /// every message of a datagram even when one is refused.
    pub fn execute(&mut self, requests: &[Request]) -> Vec<Result<(), NexthopError>> {
        let socket = match self.socket.take() {
            Some(s) => s,
            None => match open() {
                Ok(s) => s,
                Err(e) => {
                    return requests
                        .iter()
                        .map(|_| Err(NexthopError::Io(std::io::Error::from(e.kind()))))
                        .collect();
                }
            },
        };
        if self.buf.len() < 1 << 16 {
            self.buf = vec![0u8; 1 << 16];
        }
        let (out, healthy) = execute_on(&socket, &mut self.seq, &mut self.buf, requests);
        // A socket that failed to send or receive is not trusted again.
        if healthy {
            self.socket = Some(socket);
        }
        out
    }
}

/// [`Channel::execute`] on `socket`, numbering from `seq`; false when the
/// socket failed.
fn execute_on(
    socket: &Socket,
    seq: &mut u32,
    buf: &mut [u8],
    requests: &[Request],
) -> (Vec<Result<(), NexthopError>>, bool) {
    let mut out: Vec<Result<(), NexthopError>> = Vec::with_capacity(requests.len());
    let mut healthy = true;
    for chunk in requests.chunks(BATCH) {
        // Leaves room below u32::MAX for the chunk; 0 is never used.
        if *seq > u32::MAX - 2 * BATCH as u32 {
            *seq = 0;
        }
        let base = *seq + 1;
        *seq += chunk.len() as u32;
        let mut datagram = Vec::with_capacity(chunk.len() * 64);
        for (i, (kind, flags, msg)) in chunk.iter().enumerate() {
            datagram.extend(frame(
                *kind,
                NLM_F_REQUEST | NLM_F_ACK | flags,
                base + i as u32,
                msg,
            ));
        }
        let mut results: Vec<Option<Result<(), NexthopError>>> =
            (0..chunk.len()).map(|_| None).collect();
        if let Err(e) = socket.send(&datagram, 0) {
            healthy = false;
            out.extend(
                chunk
                    .iter()
                    .map(|_| Err(NexthopError::Io(std::io::Error::from(e.kind())))),
            );
            continue;
        }
        let mut pending = chunk.len();
        while pending > 0 {
            let n = match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) => {
                    healthy = false;
                    // ENOBUFS included: what is unanswered is reported as
                    // failed, so the agent re-dumps on its next pass.
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Err(NexthopError::Io(std::io::Error::from_raw_os_error(
                            e.raw_os_error().unwrap_or(libc::EIO),
                        ))));
                    }
                    break;
                }
            };
            for (kind, flags, answered, payload) in messages(&buf[..n]) {
                if kind != NLMSG_ERROR || answered < base {
                    continue;
                }
                let i = (answered - base) as usize;
                if let Some(slot) = results.get_mut(i) {
                    if slot.is_none() {
                        *slot = Some(error_of(flags, payload));
                        pending -= 1;
                    }
                }
            }
        }
        out.extend(results.into_iter().map(|r| {
            r.unwrap_or_else(|| {
                Err(NexthopError::Io(std::io::Error::from_raw_os_error(
                    libc::EIO,
                )))
            })
        }));
    }
    (out, healthy)
}

/// Dumps every nexthop object of the namespace (blocking). A kernel
/// without nexthop objects answers EOPNOTSUPP (or EINVAL).
pub fn dump() -> Result<Vec<NexthopMessage>, NexthopError> {
    let socket = open()?;
    let req = frame(
        RTM_GETNEXTHOP,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        &NexthopMessage::default().emit(),
    );
    socket.send(&req, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        for (kind, flags, _seq, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    error_of(flags, payload)?;
                    return Ok(out);
                }
                RTM_NEWNEXTHOP => out.push(NexthopMessage::parse(payload)?),
                _ => {}
            }
            if flags & NLM_F_MULTI == 0 {
                return Ok(out);
            }
        }
    }
}

/// The answers of a kernel built without nexthop objects (no
/// RTM_GETNEXTHOP handler: EOPNOTSUPP) or that refuses the family.
pub fn unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::EINVAL | libc::EAFNOSUPPORT)
}

/// Does this kernel have nexthop objects? `Err` when the socket itself
/// failed (the question stays open).
pub fn supported() -> Result<bool, NexthopError> {
    match dump() {
        Ok(_) => Ok(true),
        Err(e) if e.errno().is_some_and(unsupported) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// One socket for every batch, answers matched across batches and a
    /// sequence number wrapping, against the kernel (a private namespace).
    #[test]
    fn the_channel_keeps_its_socket_and_matches_every_answer() {
        crate::testutil::in_private_netns(|| async {
            for args in [
                &["link", "add", "nh0", "type", "veth", "peer", "name", "nh1"][..],
                &["link", "set", "nh0", "up"],
                &["link", "set", "nh1", "up"],
            ] {
                let ok = std::process::Command::new("ip").args(args).status();
                assert!(ok.is_ok_and(|s| s.success()), "ip {args:?}");
            }
            let dev = crate::netlink::tap::ifindex("nh0").expect("nh0");
            let add = |id: u32| {
                (
                    RTM_NEWNEXTHOP,
                    NLM_F_CREATE | NLM_F_EXCL,
                    NexthopMessage::gateway(id, "192.0.2.2".parse().unwrap(), dev, true, 203)
                        .emit(),
                )
            };
            let del = |id: u32| (RTM_DELNEXTHOP, 0, NexthopMessage::by_id(id).emit());
            let enoent = |r: &Result<(), NexthopError>| matches!(r, Err(e) if e.errno() == Some(libc::ENOENT));
            let mut ch = Channel::default();
            // Three batches' worth: acknowledged successes and refusals,
            // each where it belongs.
            let mut reqs: Vec<Request> = (1..=150).map(add).collect();
            reqs.push(del(9999));
            reqs.push(add(7)); // exists: EEXIST
            let r = ch.execute(&reqs);
            assert_eq!(r.len(), 152);
            assert!(r[..150].iter().all(|r| r.is_ok()), "{:?}", &r[..3]);
            assert!(enoent(&r[150]), "{:?}", r[150]);
            assert!(matches!(&r[151], Err(e) if e.errno() == Some(libc::EEXIST)));
            let fd = ch.socket.as_ref().map(|s| s.as_raw_fd()).expect("kept");
            // Near the end of the sequence space: it wraps, still matched.
            ch.seq = u32::MAX - 70;
            let r = ch.execute(&(1..=100).map(del).collect::<Vec<_>>());
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            assert_eq!(ch.seq, 100, "wrapped to 0 before the first chunk");
            let r = ch.execute(&[del(1), add(1)]);
            assert!(enoent(&r[0]) && r[1].is_ok(), "{r:?}");
            assert_eq!(ch.socket.as_ref().map(|s| s.as_raw_fd()), Some(fd));
        });
    }

    // Requests captured with `strace -e write=3` from iproute2 6.1 on
    // kernel 6.18 (veth0 had ifindex 3), netlink header stripped:
    //   ip nexthop add id 7 via 198.51.100.102 dev veth0 onlink proto 203
    const ADD_V4: [u8; 32] = [
        0x02, 0x00, 0xcb, 0x00, // family AF_INET, scope 0, protocol 203, resvd
        0x04, 0x00, 0x00, 0x00, // nh_flags RTNH_F_ONLINK
        0x08, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, // NHA_ID 7
        0x08, 0x00, 0x06, 0x00, 0xc6, 0x33, 0x64, 0x66, // NHA_GATEWAY 198.51.100.102
        0x08, 0x00, 0x05, 0x00, 0x03, 0x00, 0x00, 0x00, // NHA_OIF 3
    ];
    //   ip nexthop add id 9 group 7/8 proto 203
    const ADD_GROUP: [u8; 36] = [
        0x00, 0x00, 0xcb, 0x00, // family AF_UNSPEC, scope 0, protocol 203
        0x00, 0x00, 0x00, 0x00, // nh_flags
        0x08, 0x00, 0x01, 0x00, 0x09, 0x00, 0x00, 0x00, // NHA_ID 9
        0x14, 0x00, 0x02, 0x00, // NHA_GROUP, 2 entries:
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //   id 7 weight 0(+1)
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //   id 8 weight 0(+1)
    ];
    //   ip -6 nexthop add id 10 via 2001:db8:c633:6400::102 dev veth0 proto 203
    const ADD_V6: [u8; 44] = [
        0x0a, 0x00, 0xcb, 0x00, 0x00, 0x00, 0x00, 0x00, // AF_INET6, no flags
        0x08, 0x00, 0x01, 0x00, 0x0a, 0x00, 0x00, 0x00, // NHA_ID 10
        0x14, 0x00, 0x06, 0x00, // NHA_GATEWAY 2001:db8:c633:6400::102
        0x20, 0x01, 0x0d, 0xb8, 0xc6, 0x33, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        0x02, 0x08, 0x00, 0x05, 0x00, 0x03, 0x00, 0x00, 0x00, // NHA_OIF 3
    ];
    // The kernel's answer to `ip nexthop show id 9` (dump reply payload):
    // NHA_GROUP_TYPE and NHA_OP_FLAGS (14, skipped) come with it.
    const DUMP_GROUP: [u8; 52] = [
        0x00, 0x00, 0xcb, 0x00, 0x00, 0x00, 0x00, 0x00, // AF_UNSPEC, proto 203
        0x08, 0x00, 0x01, 0x00, 0x09, 0x00, 0x00, 0x00, // NHA_ID 9
        0x06, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, // NHA_GROUP_TYPE mpath (+pad)
        0x14, 0x00, 0x02, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, // NHA_GROUP 7, 8
        0x08, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x80, // NHA_OP_FLAGS (ignored)
    ];
    // ... and to `ip nexthop show id 7`: scope link, attributes reordered.
    const DUMP_V4: [u8; 32] = [
        0x02, 0xfd, 0xcb, 0x00, 0x04, 0x00, 0x00, 0x00, // AF_INET, scope link, onlink
        0x08, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, // NHA_ID 7
        0x08, 0x00, 0x05, 0x00, 0x03, 0x00, 0x00, 0x00, // NHA_OIF 3
        0x08, 0x00, 0x06, 0x00, 0xc6, 0x33, 0x64, 0x66, // NHA_GATEWAY
    ];

    #[test]
    fn gateway_object_matches_iproute2() {
        let m = NexthopMessage::gateway(7, "198.51.100.102".parse().unwrap(), 3, true, 203);
        assert_eq!(m.emit(), ADD_V4);
        assert_eq!(NexthopMessage::parse(&ADD_V4).unwrap(), m);
    }

    #[test]
    fn ipv6_object_matches_iproute2() {
        let m = NexthopMessage::gateway(
            10,
            "2001:db8:c633:6400::102".parse().unwrap(),
            3,
            false,
            203,
        );
        assert_eq!(m.emit(), ADD_V6);
        assert_eq!(NexthopMessage::parse(&ADD_V6).unwrap(), m);
    }

    #[test]
    fn group_matches_iproute2() {
        let m = NexthopMessage::group(9, &[7, 8], 203);
        assert_eq!(m.emit(), ADD_GROUP);
        let back = NexthopMessage::parse(&ADD_GROUP).unwrap();
        assert_eq!(back.group, vec![(7, 0), (8, 0)]);
        assert_eq!(back.id, Some(9));
    }

    #[test]
    fn dump_replies_decode() {
        let g = NexthopMessage::parse(&DUMP_GROUP).unwrap();
        assert_eq!(g.id, Some(9));
        assert_eq!(g.protocol, 203);
        assert_eq!(g.group_type, Some(GROUP_TYPE_MPATH));
        assert_eq!(g.group, vec![(7, 0), (8, 0)]);
        let n = NexthopMessage::parse(&DUMP_V4).unwrap();
        assert_eq!(n.scope, 0xfd);
        assert_eq!(n.flags & FLAG_ONLINK, FLAG_ONLINK);
        assert_eq!(n.oif, Some(3));
        assert_eq!(n.gateway, Some("198.51.100.102".parse().unwrap()));
    }

    #[test]
    fn delete_carries_the_id_only() {
        assert_eq!(
            NexthopMessage::by_id(9).emit(),
            [0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 1, 0, 9, 0, 0, 0]
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        assert_eq!(
            NexthopMessage::parse(&ADD_V4[..4]),
            Err(DecodeError::Truncated)
        );
        assert!(NexthopMessage::parse(&ADD_V4[..14]).is_err());
        let mut bad = ADD_V4;
        bad[16] = 0x06; // NHA_GATEWAY of 2 bytes
        assert!(NexthopMessage::parse(&bad).is_err());
    }

    #[test]
    fn framed_messages_and_extended_acks_split() {
        let mut b = frame(RTM_NEWNEXTHOP, NLM_F_REQUEST, 5, &ADD_V4);
        // An NLMSG_ERROR, EINVAL, capped request header, NLMSGERR_ATTR_MSG.
        let mut err = Vec::new();
        err.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        err.extend(frame(RTM_NEWNEXTHOP, NLM_F_REQUEST, 6, &[]));
        attr(&mut err, NLMSGERR_ATTR_MSG, b"Invalid nexthop id\0");
        b.extend(frame(NLMSG_ERROR, NLM_F_ACK_TLVS, 6, &err));
        let all: Vec<_> = messages(&b).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].2, 5);
        let e = error_of(all[1].1, all[1].3).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert!(e.to_string().contains("(Invalid nexthop id)"), "{e}");
        assert!(error_of(0, &0i32.to_ne_bytes()).is_ok());
    }
}
