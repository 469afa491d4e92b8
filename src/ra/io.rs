//! The ICMPv6 socket of one VM interface: periodic RAs, answers to RSs,
//! and a final RA when the interface leaves the intent.
//!
//! Owns a raw ICMPv6 socket with SO_BINDTODEVICE(interface), hop limit 255
//! out, IPV6_RECVHOPLIMIT in (RFC 4861 §6.1.1 drops anything below 255),
//! an ICMPv6 filter that lets only solicitations in, and membership of
//! ff02::2 on the interface. Every RA leaves with IPV6_PKTINFO naming this
//! interface and the gateway (fe80::1) as source.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::RaError;
use super::build::{self, Advert, Answer, RsDrop};
use crate::config::RaConfig;
use crate::netlink::tap::ifindex;
use crate::services::limit::{LogLimit, TokenBucket};
use crate::services::{Counters, INTERFACE_POLL, sockopt, wait_for_interface};

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// Unicast answers per interface: a burst, then a steady rate. A guest
/// sends three solicitations when its link comes up; beyond this, answers
/// are multicast ones, one per 3 s at most.
const BURST: u32 = 20;
const PER_SECOND: u32 = 50;
/// Packets handled per wake-up before the timers get a turn.
const DRAIN: usize = 64;
/// `ICMPV6_FILTER` from linux/icmpv6.h (libc does not export it).
const ICMPV6_FILTER: libc::c_int = 1;

/// Opens the socket of `ifname` (index `index`).
pub fn open(ifname: &str, index: u32) -> Result<AsyncFd<Socket>, RaError> {
    let err = |source| RaError::Socket {
        ifname: ifname.to_string(),
        source,
    };
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(err)?;
    s.bind_device(Some(ifname.as_bytes())).map_err(err)?;
    s.set_multicast_hops_v6(255).map_err(err)?;
    s.set_unicast_hops_v6(255).map_err(err)?;
    s.set_multicast_loop_v6(false).map_err(err)?;
    s.set_multicast_if_v6(index).map_err(err)?;
    s.set_recv_hoplimit_v6(true).map_err(err)?;
    // The final RA of a released interface may go after the agent has
    // already removed fe80::1 from it: let IPV6_PKTINFO name a source the
    // interface no longer has (ip6_datagram_send_ctl honours freebind).
    s.set_freebind_v6(true).map_err(err)?;
    // RFC 3542 §3.2: pass only router solicitations.
    let mut filter = [u32::MAX; 8];
    filter[usize::from(build::ICMPV6_RS >> 5)] &= !(1 << (build::ICMPV6_RS & 31));
    // SAFETY: setsockopt with a pointer to a live [u32; 8] and its size,
    // the layout of struct icmp6_filter.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMPV6_FILTER,
            filter.as_ptr().cast(),
            std::mem::size_of_val(&filter) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    s.join_multicast_v6(&ALL_ROUTERS, index).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    // SAFETY: the Socket owns its fd, which stays open and the same until
    // the AsyncFd (which owns the Socket) is dropped.
    unsafe { AsyncFd::register(s) }.map_err(|e| err(e.into()))
}

enum Ended {
    Stop,
    Reopen,
}

/// Serves `ifname` until `advert` closes, then sends a final RA.
pub async fn serve(
    ifname: String,
    mut advert: watch::Receiver<Advert>,
    ra: RaConfig,
    counters: Counters,
) {
    let mut log = LogLimit::new(Duration::from_secs(10));
    loop {
        let Some(index) = wait_for_interface(&ifname, &mut advert).await else {
            return;
        };
        let socket = match open(&ifname, index) {
            Ok(s) => s,
            Err(e) => {
                if log.allow(Instant::now()).is_some() {
                    warn!(error = %e, "ra: cannot open; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(INTERFACE_POLL) => continue,
                    r = advert.changed() => if r.is_err() { return } else { continue },
                }
            }
        };
        counters.update(|c| c.ra_listening = true);
        let mut port = Port {
            ifname: &ifname,
            index,
            fd: socket.as_raw_fd(),
            ra: &ra,
            counters: &counters,
            mac: sockopt::mac_of(&ifname),
            bucket: TokenBucket::new(BURST, PER_SECOND, Instant::now()),
            log: LogLimit::new(Duration::from_secs(10)),
            last_multicast: None,
            sent: 0,
        };
        let ended = port.run(&socket, &mut advert).await;
        counters.update(|c| c.ra_listening = false);
        match ended {
            Ended::Stop => {
                // RFC 4861 §6.2.5: the interface stops advertising.
                let a = advert.borrow().clone();
                let sent = port.send(&a, ALL_NODES, true);
                debug!(interface = %ifname, sent, "ra: final advertisement");
                return;
            }
            Ended::Reopen => debug!(interface = %ifname, "ra: interface changed; reopening"),
        }
    }
}

struct Port<'a> {
    ifname: &'a str,
    index: u32,
    /// The socket's fd, owned by `serve` for as long as the port lives.
    fd: std::os::fd::RawFd,
    ra: &'a RaConfig,
    counters: &'a Counters,
    mac: Option<[u8; 6]>,
    bucket: TokenBucket,
    log: LogLimit,
    last_multicast: Option<Instant>,
    /// Multicast RAs sent since the socket opened.
    sent: u32,
}

impl Port<'_> {
    async fn run(
        &mut self,
        socket: &AsyncFd<Socket>,
        advert: &mut watch::Receiver<Advert>,
    ) -> Ended {
        let mut buf = vec![0u8; build::MAX_RS + 1];
        let mut check = tokio::time::interval(INTERFACE_POLL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first RA goes out at once (RFC 4861 §6.2.4).
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {
                    let now = Instant::now();
                    let allowed = build::not_before(now, self.last_multicast);
                    if allowed > now {
                        next = allowed;
                        continue;
                    }
                    let a = advert.borrow().clone();
                    self.send(&a, ALL_NODES, false);
                    self.last_multicast = Some(now);
                    self.sent = self.sent.saturating_add(1);
                    next = now + build::unsolicited_interval(
                        self.ra.min_interval,
                        self.ra.max_interval,
                        self.sent,
                        fastrand::f64(),
                    );
                }
                r = socket.readable() => {
                    let mut guard = match r {
                        Ok(g) => g,
                        Err(e) => {
                            self.warn(format_args!("socket: {e}"));
                            return Ended::Reopen;
                        }
                    };
                    for _ in 0..DRAIN {
                        match guard.try_io(|s| sockopt::recv_v6(s.as_raw_fd(), &mut buf)) {
                            Ok(Ok(rx)) => {
                                let a = advert.borrow().clone();
                                if let Some(at) = self.on_packet(&buf[..rx.len], rx, &a) {
                                    next = next.min(at);
                                }
                            }
                            Ok(Err(e)) => {
                                self.warn(format_args!("receive failed: {e}"));
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
                r = advert.changed() => {
                    if r.is_err() {
                        return Ended::Stop;
                    }
                    advert.borrow_and_update();
                    // New information goes out soon (§6.2.4 allows it).
                    self.sent = 0;
                    next = Instant::now();
                }
                _ = check.tick() => {
                    if ifindex(self.ifname) != Some(self.index) {
                        return Ended::Reopen;
                    }
                }
            }
        }
    }

    /// Handles one received packet; returns when the next multicast RA
    /// must go, if the answer is one.
    fn on_packet(&mut self, packet: &[u8], rx: sockopt::Received6, a: &Advert) -> Option<Instant> {
        if rx.truncated {
            self.counters.drop("ra", RsDrop::Oversized.as_str());
            return None;
        }
        let rs = match build::solicitation(packet, rx.hop_limit, *rx.from.ip()) {
            Ok(rs) => rs,
            Err(d) => {
                self.counters.drop("ra", d.as_str());
                self.warn(format_args!(
                    "solicitation from {} dropped: {}",
                    rx.from.ip(),
                    d.as_str()
                ));
                return None;
            }
        };
        let now = Instant::now();
        let delay =
            Duration::from_secs_f64(build::MAX_RA_DELAY_TIME.as_secs_f64() * fastrand::f64());
        let far = now + self.ra.max_interval;
        match build::answer(rs.source, now, delay, self.last_multicast, far) {
            Answer::UnicastNow => {
                if !self.bucket.take(now) {
                    // Over the limit: no unicast, but the next multicast RA
                    // (at most one per MIN_DELAY_BETWEEN_RAS) still answers.
                    self.counters.drop("ra", RsDrop::RateLimited.as_str());
                    return Some(build::not_before(now + delay, self.last_multicast));
                }
                if self.send(a, rs.source, false) {
                    self.counters.update(|c| c.rs_answered += 1);
                }
                None
            }
            Answer::MulticastAt(at) => {
                self.counters.update(|c| c.rs_answered += 1);
                Some(at)
            }
        }
    }

    /// Sends one RA; true when it went out.
    fn send(&mut self, a: &Advert, to: Ipv6Addr, last: bool) -> bool {
        let mut a = a.clone();
        a.source_mac = self.mac;
        let bytes = build::encode(&a, last);
        let dst = SocketAddrV6::new(to, 0, 0, self.index);
        match sockopt::send_v6(self.fd, &bytes, dst, a.source, self.index) {
            Ok(_) => {
                self.counters.update(|c| c.ra_sent += 1);
                true
            }
            Err(e) => {
                // A tap without carrier (QEMU not attached) refuses or
                // drops: not worth a warning each time.
                debug!(interface = %self.ifname, error = %e, "ra: send failed");
                self.counters.drop("ra", "send_failed");
                false
            }
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            warn!(interface = %self.ifname, suppressed, "ra: {what}");
        }
    }
}
