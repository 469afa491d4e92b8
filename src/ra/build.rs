//! PURE router advertisement logic (RFC 4861, RFC 8106): what one VM
//! interface is told, the bytes of the RA, the validation of a router
//! solicitation, and when the next RA goes out.
//!
//! It never touches a socket or the clock: `io.rs` passes `now` and a
//! random draw in and sends what comes out. The ICMPv6 checksum is left
//! zero: the kernel fills it for raw ICMPv6 sockets (RFC 3542 §3.1).

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv6Net};

use crate::config::{Config, Ipv6Mode};
use crate::intent::InterfaceIntent;

/// RFC 4861 §10 constants.
pub const MAX_INITIAL_RTR_ADVERT_INTERVAL: Duration = Duration::from_secs(16);
pub const MAX_INITIAL_RTR_ADVERTISEMENTS: u32 = 3;
pub const MIN_DELAY_BETWEEN_RAS: Duration = Duration::from_secs(3);
pub const MAX_RA_DELAY_TIME: Duration = Duration::from_millis(500);

pub const ICMPV6_RS: u8 = 133;
pub const ICMPV6_RA: u8 = 134;
/// Largest solicitation we look at; real ones are 8 or 16 bytes.
pub const MAX_RS: usize = 1280;

/// Lifetimes of advertised prefixes (radvd's defaults, RFC 4861 §6.2.1).
const PREFIX_VALID: Duration = Duration::from_secs(86400);
const PREFIX_PREFERRED: Duration = Duration::from_secs(14400);
/// At most this many RDNSS addresses and DNSSL names (keeps the RA small).
const MAX_DNS: usize = 8;

/// One prefix information option (RFC 4861 §4.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixInfo {
    pub prefix: Ipv6Net,
    /// L: the prefix is on-link.
    pub on_link: bool,
    /// A: hosts may form addresses from it (SLAAC).
    pub autonomous: bool,
}

/// Everything one interface's RAs say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// Source of every RA (the tap's link-local gateway, fe80::1).
    pub source: Ipv6Addr,
    /// M: addresses come from DHCPv6.
    pub managed: bool,
    /// O: other configuration (DNS) from DHCPv6 too.
    pub other: bool,
    pub router_lifetime: Duration,
    pub mtu: Option<u32>,
    pub prefixes: Vec<PrefixInfo>,
    pub rdnss: Vec<Ipv6Addr>,
    pub dnssl: Vec<String>,
    /// RFC 8106 §5.1: at least 3 × MaxRtrAdvInterval.
    pub dns_lifetime: Duration,
    /// The tap's MAC for the source link-layer address option.
    pub source_mac: Option<[u8; 6]>,
}

/// The advert of one VM interface under `config`, per its fabric's IPv6
/// mode (DESIGN.md "IPv6 addressing modes"). `None` if the fabric is gone.
pub fn advert(config: &Config, iface: &InterfaceIntent) -> Option<Advert> {
    let fabric = config.fabric(&iface.fabric)?;
    let mut prefixes = Vec::new();
    let own = |on_link: bool| {
        iface.ipv6_prefixes.iter().map(move |p| PrefixInfo {
            prefix: p.trunc(),
            on_link,
            // SLAAC needs a /64 (RFC 4862 §5.5.3, RFC 4291 interface ids).
            autonomous: p.prefix_len() == 64,
        })
    };
    let mut managed = false;
    match fabric.ipv6_mode {
        // (1) a /64 per VM: L=1 A=1, no proxy, no DHCPv6.
        Ipv6Mode::PrefixPerVm => prefixes.extend(own(true)),
        // (2) a shared /64: L=1 A=0 and M=1; DHCPv6 hands out the address.
        Ipv6Mode::SharedDhcpv6 => {
            for net in &fabric.subnets {
                let IpNet::V6(net) = net else { continue };
                if iface.ipv6.iter().any(|a| net.contains(a)) {
                    prefixes.push(PrefixInfo {
                        prefix: net.trunc(),
                        on_link: true,
                        autonomous: false,
                    });
                }
            }
            prefixes.extend(own(true));
            managed = !iface.ipv6.is_empty();
        }
        // (3) off-link: L=0, everything goes to fe80::1.
        Ipv6Mode::OffLink => prefixes.extend(own(false)),
    }
    let ra = &config.ra;
    Some(Advert {
        source: fabric.gateway_v6,
        managed,
        other: managed,
        router_lifetime: ra.router_lifetime,
        mtu: ra.mtu,
        prefixes,
        rdnss: ra.rdnss.iter().take(MAX_DNS).copied().collect(),
        dnssl: ra.dnssl.iter().take(MAX_DNS).cloned().collect(),
        dns_lifetime: ra.max_interval * 3,
        source_mac: None,
    })
}

fn secs32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The RA bytes (ICMPv6 message, checksum zero). `last` makes the final
/// RA of a removed interface: router lifetime 0 (RFC 4861 §6.2.5).
pub fn encode(a: &Advert, last: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    // RFC 4861 §4.2: type, code, checksum.
    b.extend([ICMPV6_RA, 0, 0, 0]);
    // Cur Hop Limit 64, M and O flags.
    b.push(64);
    b.push(if a.managed { 0x80 } else { 0 } | if a.other { 0x40 } else { 0 });
    let lifetime = if last {
        0
    } else {
        u16::try_from(a.router_lifetime.as_secs().min(9000)).unwrap_or(9000)
    };
    b.extend(lifetime.to_be_bytes());
    // Reachable Time, Retrans Timer: unspecified.
    b.extend([0; 8]);
    if let Some(mac) = a.source_mac {
        // §4.6.1 source link-layer address, length 1 (8 bytes).
        b.extend([1, 1]);
        b.extend(mac);
    }
    if let Some(mtu) = a.mtu {
        // §4.6.4 MTU.
        b.extend([5, 1, 0, 0]);
        b.extend(mtu.to_be_bytes());
    }
    for p in &a.prefixes {
        // §4.6.2 prefix information, length 4 (32 bytes).
        b.extend([3, 4, p.prefix.prefix_len()]);
        b.push(if p.on_link { 0x80 } else { 0 } | if p.autonomous { 0x40 } else { 0 });
        b.extend(secs32(PREFIX_VALID).to_be_bytes());
        b.extend(secs32(PREFIX_PREFERRED).to_be_bytes());
        b.extend([0; 4]);
        b.extend(p.prefix.network().octets());
    }
    if !a.rdnss.is_empty() {
        // RFC 8106 §5.1 RDNSS: length 1 + 2 per address.
        b.extend([25, (1 + 2 * a.rdnss.len()) as u8, 0, 0]);
        b.extend(secs32(a.dns_lifetime).to_be_bytes());
        for r in &a.rdnss {
            b.extend(r.octets());
        }
    }
    let names: Vec<u8> = a
        .dnssl
        .iter()
        .filter_map(|n| dns_name(n))
        .flatten()
        .collect();
    if !names.is_empty() {
        // RFC 8106 §5.2 DNSSL: names in DNS wire format, zero-padded to 8.
        let len = (8 + names.len()).div_ceil(8);
        b.extend([31, len as u8, 0, 0]);
        b.extend(secs32(a.dns_lifetime).to_be_bytes());
        b.extend(&names);
        b.resize(b.len() + (len * 8 - 8 - names.len()), 0);
    }
    b
}

/// `example.net` → `7example3net0`; `None` for a name that cannot be
/// encoded.
fn dns_name(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

/// Why a solicitation was dropped (RFC 4861 §6.1.1 validity checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsDrop {
    /// Not 255: it was forwarded, so it does not come from the link.
    HopLimit,
    Oversized,
    /// Shorter than 8 bytes, not type 133 code 0, or an option of length 0
    /// or running past the end.
    Malformed,
    /// Source :: with a source link-layer address option.
    UnspecifiedWithLladdr,
    RateLimited,
}

impl RsDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            RsDrop::HopLimit => "hop_limit",
            RsDrop::Oversized => "oversized",
            RsDrop::Malformed => "malformed",
            RsDrop::UnspecifiedWithLladdr => "unspecified_with_lladdr",
            RsDrop::RateLimited => "rate_limited",
        }
    }
}

/// A valid router solicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Solicitation {
    pub source: Ipv6Addr,
    pub source_mac: Option<[u8; 6]>,
}

/// Validates a solicitation (ICMPv6 message, as a raw socket returns it).
pub fn solicitation(
    packet: &[u8],
    hop_limit: Option<u8>,
    source: Ipv6Addr,
) -> Result<Solicitation, RsDrop> {
    if packet.len() > MAX_RS {
        return Err(RsDrop::Oversized);
    }
    if hop_limit != Some(255) {
        return Err(RsDrop::HopLimit);
    }
    if packet.len() < 8 || packet[0] != ICMPV6_RS || packet[1] != 0 {
        return Err(RsDrop::Malformed);
    }
    let mut source_mac = None;
    let mut rest = &packet[8..];
    while !rest.is_empty() {
        let [kind, len, ..] = *rest else {
            return Err(RsDrop::Malformed);
        };
        let bytes = usize::from(len) * 8;
        if len == 0 || bytes > rest.len() {
            return Err(RsDrop::Malformed);
        }
        if kind == 1 {
            if source.is_unspecified() {
                return Err(RsDrop::UnspecifiedWithLladdr);
            }
            if bytes == 8 {
                source_mac = rest[2..8].try_into().ok();
            }
        }
        rest = &rest[bytes..];
    }
    Ok(Solicitation { source, source_mac })
}

/// RFC 4861 §6.2.4: the wait before the next unsolicited RA, from a
/// uniform draw `random` in [0, 1). The first few are at most 16 s apart.
pub fn unsolicited_interval(min: Duration, max: Duration, sent: u32, random: f64) -> Duration {
    let span = max.saturating_sub(min).as_secs_f64();
    let d = min + Duration::from_secs_f64(span * random.clamp(0.0, 1.0));
    if sent < MAX_INITIAL_RTR_ADVERTISEMENTS {
        d.min(MAX_INITIAL_RTR_ADVERT_INTERVAL)
    } else {
        d
    }
}

/// How a solicitation is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A unicast RA to the soliciting host, now. The host is alone on its
    /// tap, so the random delay of RFC 4861 §6.2.6, which exists to spread
    /// the answers to many hosts of one link, would only slow it down;
    /// RFC 7772 §5.1 recommends unicast answers.
    UnicastNow,
    /// The next multicast RA is sent no later than this.
    MulticastAt(Instant),
}

/// RFC 4861 §6.2.6. A solicitation from `::` can only be answered by
/// multicast: within MAX_RA_DELAY_TIME (`delay`, drawn in [0, 0.5 s]),
/// but never sooner than MIN_DELAY_BETWEEN_RAS after the last multicast
/// RA, and not later than the one already `scheduled`.
pub fn answer(
    source: Ipv6Addr,
    now: Instant,
    delay: Duration,
    last_multicast: Option<Instant>,
    scheduled: Instant,
) -> Answer {
    if !source.is_unspecified() {
        return Answer::UnicastNow;
    }
    let mut at = now + delay.min(MAX_RA_DELAY_TIME);
    if let Some(last) = last_multicast {
        at = at.max(last + MIN_DELAY_BETWEEN_RAS);
    }
    Answer::MulticastAt(at.min(scheduled.max(now)))
}

/// The earliest time the next multicast RA may go (§6.2.6 rate limit).
pub fn not_before(at: Instant, last_multicast: Option<Instant>) -> Instant {
    last_multicast.map_or(at, |l| at.max(l + MIN_DELAY_BETWEEN_RAS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::MacAddr;

    fn advert_fixture() -> Advert {
        Advert {
            source: "fe80::1".parse().unwrap(),
            managed: false,
            other: false,
            router_lifetime: Duration::from_secs(1800),
            mtu: Some(1500),
            prefixes: vec![PrefixInfo {
                prefix: "2001:db8:cb00:7104::/64".parse().unwrap(),
                on_link: true,
                autonomous: true,
            }],
            rdnss: vec!["2001:db8::53".parse().unwrap()],
            dnssl: vec!["example.net".into()],
            dns_lifetime: Duration::from_secs(30),
            source_mac: Some([0x02, 0, 0, 0, 0, 0x01]),
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ra_bytes_field_by_field() {
        let want = hex("86 00 0000 40 00 0708 00000000 00000000 \
             01 01 020000000001 \
             05 01 0000 000005dc \
             03 04 40 c0 00015180 00003840 00000000 20010db8cb0071040000000000000000 \
             19 03 0000 0000001e 20010db8000000000000000000000053 \
             1f 03 0000 0000001e 076578616d706c65036e6574 00 000000");
        // type 134, code, checksum (kernel), hop limit 64, flags, lifetime
        // 1800, reachable, retrans | SLLA | MTU 1500 | PIO /64 L A valid
        // 86400 preferred 14400 | RDNSS lifetime 30 | DNSSL "example.net"
        // padded to 24 bytes.
        assert_eq!(encode(&advert_fixture(), false), want);
        let last = encode(&advert_fixture(), true);
        assert_eq!(&last[6..8], &[0, 0], "final RA: router lifetime 0");
    }

    #[test]
    fn flags_per_mode() {
        let mut a = advert_fixture();
        a.managed = true;
        a.other = true;
        a.prefixes[0].on_link = false;
        a.prefixes[0].autonomous = false;
        let b = encode(&a, false);
        assert_eq!(b[5], 0xc0);
        assert_eq!(b[16 + 8 + 8 + 3], 0, "PIO L=0 A=0");
    }

    fn iface(fabric: &str) -> InterfaceIntent {
        InterfaceIntent {
            name: "tap1".into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            fabric: fabric.into(),
            link: Default::default(),
            ipv4: vec![],
            ipv6: vec!["2001:db8:cb00:7100::5".parse().unwrap()],
            ipv6_prefixes: vec!["2001:db8:cb00:7104::/64".parse().unwrap()],
            routed: vec![],
        }
    }

    #[test]
    fn advert_follows_the_fabric_mode() {
        let text = r#"
[hypervisor]
name = "hv1"
router_id = "198.51.100.101"
[fabrics.public]
table = 90
catch_all = true
subnets = ["2001:db8:cb00:7100::/64"]
[fabrics.shared]
table = 91
subnets = ["2001:db8:cb00:7200::/64"]
ipv6_mode = "shared-dhcpv6"
[fabrics.offlink]
table = 92
subnets = ["2001:db8:cb00:7300::/64"]
ipv6_mode = "off-link"
[ra]
rdnss = ["2001:db8::53"]
"#;
        let c = crate::config::parse("t.toml", text).unwrap();
        let a = advert(&c, &iface("public")).unwrap();
        assert!(!a.managed);
        assert_eq!(a.prefixes.len(), 1);
        assert!(a.prefixes[0].on_link && a.prefixes[0].autonomous);
        assert_eq!(a.dns_lifetime, Duration::from_secs(30));

        let mut i = iface("shared");
        i.ipv6 = vec!["2001:db8:cb00:7200::5".parse().unwrap()];
        i.ipv6_prefixes.clear();
        let a = advert(&c, &i).unwrap();
        assert!(a.managed && a.other);
        assert_eq!(
            a.prefixes,
            vec![PrefixInfo {
                prefix: "2001:db8:cb00:7200::/64".parse().unwrap(),
                on_link: true,
                autonomous: false
            }]
        );

        let a = advert(&c, &iface("offlink")).unwrap();
        assert!(!a.prefixes[0].on_link && a.prefixes[0].autonomous);
        assert!(advert(&c, &iface("nope")).is_none());
    }

    #[test]
    fn solicitations_are_validated() {
        let ll: Ipv6Addr = "fe80::5054:ff:fe00:1".parse().unwrap();
        // rdisc6's RS: no options.
        let rs = hex("85 00 0000 00000000");
        assert_eq!(
            solicitation(&rs, Some(255), ll),
            Ok(Solicitation {
                source: ll,
                source_mac: None
            })
        );
        assert_eq!(solicitation(&rs, Some(64), ll), Err(RsDrop::HopLimit));
        assert_eq!(solicitation(&rs, None, ll), Err(RsDrop::HopLimit));
        // The kernel's RS: with a source link-layer address.
        let rs = hex("85 00 0000 00000000 01 01 525400000001");
        assert_eq!(
            solicitation(&rs, Some(255), ll).unwrap().source_mac,
            Some([0x52, 0x54, 0, 0, 0, 1])
        );
        assert_eq!(
            solicitation(&rs, Some(255), Ipv6Addr::UNSPECIFIED),
            Err(RsDrop::UnspecifiedWithLladdr)
        );
        for bad in [
            hex("85 00 0000"),
            hex("85 01 0000 00000000"),
            hex("86 00 0000 00000000"),
            hex("85 00 0000 00000000 01 00 525400000001"),
            hex("85 00 0000 00000000 01 02 525400000001"),
            hex("85 00 0000 00000000 01"),
        ] {
            assert_eq!(
                solicitation(&bad, Some(255), ll),
                Err(RsDrop::Malformed),
                "{bad:x?}"
            );
        }
        assert_eq!(
            solicitation(&vec![0x85; 2000], Some(255), ll),
            Err(RsDrop::Oversized)
        );
        // Every byte string up to 24 bytes of a pseudo-random walk: no panic.
        let mut x: u32 = 99;
        for n in 0..5000 {
            let p: Vec<u8> = (0..n % 24)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = solicitation(&p, Some(255), ll);
        }
    }

    #[test]
    fn timing_follows_rfc4861() {
        let min = Duration::from_secs(3);
        let max = Duration::from_secs(10);
        assert_eq!(unsolicited_interval(min, max, 5, 0.0), min);
        assert_eq!(
            unsolicited_interval(min, max, 5, 0.5),
            Duration::from_millis(6500)
        );
        let long = Duration::from_secs(600);
        assert_eq!(
            unsolicited_interval(min, long, 0, 0.9),
            MAX_INITIAL_RTR_ADVERT_INTERVAL
        );

        let now = Instant::now();
        let ll: Ipv6Addr = "fe80::2".parse().unwrap();
        let far = now + Duration::from_secs(9);
        assert_eq!(
            answer(ll, now, Duration::ZERO, Some(now), far),
            Answer::UnicastNow
        );
        let d = Duration::from_millis(200);
        // No recent multicast RA: within the random delay.
        assert_eq!(
            answer(Ipv6Addr::UNSPECIFIED, now, d, None, far),
            Answer::MulticastAt(now + d)
        );
        // One a second ago: not before 3 s after it.
        let last = now - Duration::from_secs(1);
        assert_eq!(
            answer(Ipv6Addr::UNSPECIFIED, now, d, Some(last), far),
            Answer::MulticastAt(now + Duration::from_secs(2))
        );
        // Never later than the one already scheduled.
        let soon = now + Duration::from_millis(50);
        assert_eq!(
            answer(Ipv6Addr::UNSPECIFIED, now, d, None, soon),
            Answer::MulticastAt(soon)
        );
        // A held answer never waits more than 3.5 s (radvd can hold 10 s).
        let worst = answer(
            Ipv6Addr::UNSPECIFIED,
            now,
            Duration::from_secs(5),
            Some(now),
            now + Duration::from_secs(600),
        );
        assert_eq!(worst, Answer::MulticastAt(now + MIN_DELAY_BETWEEN_RAS));
    }
}
