//! PURE: neighbour solicitations in, neighbour advertisements out (RFC 4861
//! §4.3, §4.4, §7.1.1), as whole Ethernet frames.
//!
//! Written by hand: the frames are two fixed layouts of a few dozen bytes,
//! and the crates that parse ICMPv6 (pnet, etherparse) would bring their
//! own packet model for three fields; the validity checks of RFC 4861
//! §7.1.1 are what matters and are all here, next to their tests.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMPV6_NS: u8 = 135;
pub const ICMPV6_NA: u8 = 136;
const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;
/// ICMPv6 type, code, checksum, reserved, target.
const NS_LEN: usize = 24;
/// Largest frame accepted (a solicitation is 86 bytes with its option).
pub const MAX_FRAME: usize = 1518;
const OPT_SOURCE_LLA: u8 = 1;
const OPT_TARGET_LLA: u8 = 2;

/// A valid neighbour solicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Solicitation {
    /// Ethernet source of the frame.
    pub src_mac: [u8; 6],
    /// IPv6 source (`::` for duplicate address detection).
    pub source: Ipv6Addr,
    pub target: Ipv6Addr,
    /// The source link-layer address option, if present.
    pub source_lla: Option<[u8; 6]>,
}

/// Why a frame was dropped (`nd.<reason>` in the interface's counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsDrop {
    Truncated,
    Oversized,
    NotIcmpv6,
    NotSolicitation,
    HopLimit,
    Code,
    Checksum,
    MulticastTarget,
    BadOption,
}

impl NsDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Oversized => "oversized",
            Self::NotIcmpv6 => "not_icmpv6",
            Self::NotSolicitation => "not_solicitation",
            Self::HopLimit => "hop_limit",
            Self::Code => "code",
            Self::Checksum => "checksum",
            Self::MulticastTarget => "multicast_target",
            Self::BadOption => "bad_option",
        }
    }
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

/// The ICMPv6 checksum of `payload` between `src` and `dst` (RFC 8200 §8.1).
pub fn checksum(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += u32::from(w);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(payload.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(payload);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parses and validates an Ethernet frame holding a neighbour
/// solicitation (RFC 4861 §7.1.1: hop limit 255, code 0, checksum, length,
/// target not multicast, options of non-zero length, no source link-layer
/// option from the unspecified address).
pub fn parse(frame: &[u8]) -> Result<Solicitation, NsDrop> {
    if frame.len() > MAX_FRAME {
        return Err(NsDrop::Oversized);
    }
    if frame.len() < ETH_HLEN + IPV6_HLEN + NS_LEN {
        return Err(NsDrop::Truncated);
    }
    let ip = &frame[ETH_HLEN..];
    if u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV6
        || ip[0] >> 4 != 6
        || ip[6] != IPPROTO_ICMPV6
    {
        return Err(NsDrop::NotIcmpv6);
    }
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let Some(icmp) = ip[IPV6_HLEN..].get(..payload_len) else {
        return Err(NsDrop::Truncated);
    };
    if icmp.len() < NS_LEN {
        return Err(NsDrop::Truncated);
    }
    if icmp[0] != ICMPV6_NS {
        return Err(NsDrop::NotSolicitation);
    }
    if ip[7] != 255 {
        return Err(NsDrop::HopLimit);
    }
    if icmp[1] != 0 {
        return Err(NsDrop::Code);
    }
    let source = addr(&ip[8..24]);
    let destination = addr(&ip[24..40]);
    if checksum(source, destination, icmp) != 0 {
        return Err(NsDrop::Checksum);
    }
    let target = addr(&icmp[8..24]);
    if target.is_multicast() {
        return Err(NsDrop::MulticastTarget);
    }
    let mut source_lla = None;
    let mut opts = &icmp[NS_LEN..];
    while !opts.is_empty() {
        if opts.len() < 2 {
            return Err(NsDrop::BadOption);
        }
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return Err(NsDrop::BadOption);
        }
        if opts[0] == OPT_SOURCE_LLA && len == 8 {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&opts[2..8]);
            source_lla = Some(mac);
        }
        opts = &opts[len..];
    }
    if source.is_unspecified() && source_lla.is_some() {
        return Err(NsDrop::BadOption);
    }
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    Ok(Solicitation {
        src_mac,
        source,
        target,
        source_lla,
    })
}

/// What the responder of one interface answers for, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The source of the answers: the fabric's gateway (fe80::1).
    pub gateway: Ipv6Addr,
    /// The fabric's shared IPv6 subnets.
    pub subnets: Vec<Ipv6Net>,
    /// The addresses of the VM on this interface: never answered for (its
    /// own duplicate detection and reachability checks are its business).
    pub own: Vec<Ipv6Addr>,
}

/// Why a valid solicitation gets no answer (not counted as a drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Duplicate address detection (source `::`).
    Dad,
    /// The target lies outside the shared subnets (fe80::1 is the kernel's).
    OffSubnet,
    /// The target is the VM's own address.
    Own,
}

/// Whether `ns` gets an answer under `policy`.
pub fn decide(ns: &Solicitation, policy: &Policy) -> Result<(), Skip> {
    if ns.source.is_unspecified() {
        return Err(Skip::Dad);
    }
    if !policy.subnets.iter().any(|n| n.contains(&ns.target)) {
        return Err(Skip::OffSubnet);
    }
    if policy.own.contains(&ns.target) {
        return Err(Skip::Own);
    }
    Ok(())
}

/// The solicited advertisement answering `ns` (RFC 4861 §7.2.4, as a
/// proxy: S=1, O=0, and R=0: the target is a VM, a host. The kernel's own
/// proxy entries answer with R=0 too; a guest that saw R=1 then R=0 for
/// the same target would take it as a router turned host and delete the
/// routes via the answer's source, fe80::1: its default route), from
/// `from` (the gateway, fe80::1)
/// and `mac` (the interface's), straight to the solicitor's link-layer
/// address, so no neighbour resolution stands between it and the VM.
pub fn advertisement(ns: &Solicitation, mac: [u8; 6], from: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(NS_LEN + 8);
    icmp.extend_from_slice(&[ICMPV6_NA, 0, 0, 0]);
    icmp.extend_from_slice(&[0x40, 0, 0, 0]); // Solicited
    icmp.extend_from_slice(&ns.target.octets());
    icmp.extend_from_slice(&[OPT_TARGET_LLA, 1]);
    icmp.extend_from_slice(&mac);
    let sum = checksum(from, ns.source, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(ETH_HLEN + IPV6_HLEN + icmp.len());
    f.extend_from_slice(&ns.source_lla.unwrap_or(ns.src_mac));
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&ns.source.octets());
    f.extend_from_slice(&icmp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 3];
    const TAP_MAC: [u8; 6] = [0xfe, 0x54, 0, 0, 0, 3];

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// A solicitation as a Linux guest sends it (multicast to the
    /// solicited-node group, source link-layer option).
    fn ns_frame(source: Ipv6Addr, target: Ipv6Addr, with_lla: bool) -> Vec<u8> {
        let t = target.octets();
        let group = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        let mut icmp = vec![ICMPV6_NS, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&t);
        if with_lla {
            icmp.extend_from_slice(&[OPT_SOURCE_LLA, 1]);
            icmp.extend_from_slice(&VM_MAC);
        }
        let sum = checksum(source, group, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
        f.extend_from_slice(&VM_MAC);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
        f.extend_from_slice(&source.octets());
        f.extend_from_slice(&group.octets());
        f.extend_from_slice(&icmp);
        f
    }

    fn policy() -> Policy {
        Policy {
            gateway: a("fe80::1"),
            subnets: vec!["2001:db8:cb00:7100::/64".parse().unwrap()],
            own: vec![a("2001:db8:cb00:7100::3")],
        }
    }

    #[test]
    fn a_guest_solicitation_parses() {
        let f = ns_frame(
            a("2001:db8:cb00:7100::3"),
            a("2001:db8:cb00:7100::77"),
            true,
        );
        let ns = parse(&f).unwrap();
        assert_eq!(ns.source, a("2001:db8:cb00:7100::3"));
        assert_eq!(ns.target, a("2001:db8:cb00:7100::77"));
        assert_eq!(ns.source_lla, Some(VM_MAC));
        assert_eq!(ns.src_mac, VM_MAC);
        assert_eq!(decide(&ns, &policy()), Ok(()));
    }

    #[test]
    fn the_answer_is_a_valid_solicited_proxy_advertisement() {
        let f = ns_frame(
            a("2001:db8:cb00:7100::3"),
            a("2001:db8:cb00:7100::77"),
            true,
        );
        let ns = parse(&f).unwrap();
        let na = advertisement(&ns, TAP_MAC, a("fe80::1"));
        assert_eq!(&na[0..6], &VM_MAC);
        assert_eq!(&na[6..12], &TAP_MAC);
        let ip = &na[14..];
        assert_eq!(ip[6], IPPROTO_ICMPV6);
        assert_eq!(ip[7], 255);
        assert_eq!(addr(&ip[8..24]), a("fe80::1"));
        assert_eq!(addr(&ip[24..40]), ns.source);
        let icmp = &ip[40..];
        assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), icmp.len());
        assert_eq!(icmp[0], ICMPV6_NA);
        assert_eq!(
            icmp[4], 0x40,
            "S set, R and O clear (as the kernel's proxy)"
        );
        assert_eq!(addr(&icmp[8..24]), ns.target);
        assert_eq!(&icmp[24..], &[OPT_TARGET_LLA, 1, 0xfe, 0x54, 0, 0, 0, 3]);
        assert_eq!(checksum(a("fe80::1"), ns.source, icmp), 0);
    }

    #[test]
    fn without_a_source_option_the_answer_goes_to_the_frame_source() {
        let f = ns_frame(
            a("2001:db8:cb00:7100::3"),
            a("2001:db8:cb00:7100::77"),
            false,
        );
        let ns = parse(&f).unwrap();
        assert_eq!(ns.source_lla, None);
        assert_eq!(&advertisement(&ns, TAP_MAC, a("fe80::1"))[0..6], &VM_MAC);
    }

    #[test]
    fn dad_own_and_off_subnet_targets_are_not_answered() {
        let dad = parse(&ns_frame(
            Ipv6Addr::UNSPECIFIED,
            a("2001:db8:cb00:7100::77"),
            false,
        ))
        .unwrap();
        assert_eq!(decide(&dad, &policy()), Err(Skip::Dad));
        let own = parse(&ns_frame(
            a("fe80::5054:ff:fe00:3"),
            a("2001:db8:cb00:7100::3"),
            true,
        ))
        .unwrap();
        assert_eq!(decide(&own, &policy()), Err(Skip::Own));
        let off = parse(&ns_frame(
            a("2001:db8:cb00:7100::3"),
            a("2001:db8:ffff::1"),
            true,
        ))
        .unwrap();
        assert_eq!(decide(&off, &policy()), Err(Skip::OffSubnet));
        let gw = parse(&ns_frame(a("2001:db8:cb00:7100::3"), a("fe80::1"), true)).unwrap();
        assert_eq!(decide(&gw, &policy()), Err(Skip::OffSubnet));
    }

    #[test]
    fn invalid_solicitations_are_dropped_with_their_reason() {
        let good = ns_frame(
            a("2001:db8:cb00:7100::3"),
            a("2001:db8:cb00:7100::77"),
            true,
        );
        let with = |i: usize, v: u8| {
            let mut f = good.clone();
            f[i] = v;
            f
        };
        assert_eq!(parse(&good[..60]), Err(NsDrop::Truncated));
        assert_eq!(parse(&vec![0; MAX_FRAME + 1]), Err(NsDrop::Oversized));
        assert_eq!(parse(&with(12, 0x08)), Err(NsDrop::NotIcmpv6));
        assert_eq!(parse(&with(20, 17)), Err(NsDrop::NotIcmpv6));
        assert_eq!(parse(&with(21, 64)), Err(NsDrop::HopLimit));
        assert_eq!(parse(&with(54, ICMPV6_NA)), Err(NsDrop::NotSolicitation));
        assert_eq!(parse(&with(55, 1)), Err(NsDrop::Code));
        assert_eq!(parse(&with(70, 0x42)), Err(NsDrop::Checksum));
        // Payload length beyond the frame.
        assert_eq!(parse(&with(19, 200)), Err(NsDrop::Truncated));
        // A zero-length option (checksum fixed up so only that is wrong).
        let mut f = good.clone();
        f[79] = 0;
        let icmp_sum = {
            f[56] = 0;
            f[57] = 0;
            checksum(addr(&f[22..38]), addr(&f[38..54]), &f[54..])
        };
        f[56..58].copy_from_slice(&icmp_sum.to_be_bytes());
        assert_eq!(parse(&f), Err(NsDrop::BadOption));
        let mc = ns_frame(a("2001:db8:cb00:7100::3"), a("ff02::1"), true);
        assert_eq!(parse(&mc), Err(NsDrop::MulticastTarget));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let good = ns_frame(
            a("2001:db8:cb00:7100::3"),
            a("2001:db8:cb00:7100::77"),
            true,
        );
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..rng.usize(1..6) {
                let i = rng.usize(..f.len());
                f[i] = rng.u8(..);
            }
            f.truncate(rng.usize(..=f.len()));
            let _ = parse(&f);
        }
    }
}
