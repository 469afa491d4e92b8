//! The AF_PACKET socket of one VM interface: neighbour solicitations in,
//! advertisements out.
//!
//! The socket sees only what the VM sends (PACKET_IGNORE_OUTGOING: not the
//! kernel's own solicitations towards the VM) and, through a classic BPF
//! program run in the kernel, only ICMPv6 neighbour solicitations: the
//! VM's other traffic is never copied to user space. Answers are whole
//! Ethernet frames sent on the same socket, straight to the solicitor's
//! MAC. Per-interface token bucket; malformed frames are counted and
//! logged at a bounded rate.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::NdError;
use super::wire::{self, Policy};
use crate::netlink::tap::ifindex;
use crate::services::limit::{LogLimit, TokenBucket};
use crate::services::{Counters, INTERFACE_POLL, sockopt, wait_for_interface};

/// Answers per interface: a burst, then a steady rate. A guest resolves a
/// handful of peers; a scan of the /64 meets the bucket.
const BURST: u32 = 100;
const PER_SECOND: u32 = 200;
/// Frames handled per wake-up.
const DRAIN: usize = 64;
/// `PACKET_IGNORE_OUTGOING` from linux/if_packet.h (Linux 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// `ldh [12]; jeq #0x86dd; ldb [20]; jeq #58; ldb [54]; jeq #135;
/// ret #65535; ret #0`: IPv6, next header ICMPv6, type 135. (A
/// solicitation never carries extension headers.)
fn filter() -> [SockFilter; 8] {
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    [
        SockFilter::new(LD_H_ABS, 0, 0, 12),
        SockFilter::new(JEQ_K, 0, 5, u32::from(wire::ETH_P_IPV6)),
        SockFilter::new(LD_B_ABS, 0, 0, 20),
        SockFilter::new(JEQ_K, 0, 3, u32::from(wire::IPPROTO_ICMPV6)),
        SockFilter::new(LD_B_ABS, 0, 0, 54),
        SockFilter::new(JEQ_K, 0, 1, u32::from(wire::ICMPV6_NS)),
        SockFilter::new(RET_K, 0, 0, 0xffff),
        SockFilter::new(RET_K, 0, 0, 0),
    ]
}

/// Opens the socket of `ifname` (index `index`).
pub fn open(ifname: &str, index: u32) -> Result<AsyncFd<Socket>, NdError> {
    let err = |source| NdError::Socket {
        ifname: ifname.to_string(),
        source,
    };
    // Protocol 0 until the filter is on: nothing is queued unfiltered.
    let s = Socket::new(Domain::PACKET, Type::RAW, None).map_err(err)?;
    s.attach_filter(&filter()).map_err(err)?;
    sockopt::set_int(s.as_raw_fd(), libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1).map_err(err)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = wire::ETH_P_IPV6.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: bind with a pointer to a live sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    s.set_nonblocking(true).map_err(err)?;
    // SAFETY: the Socket owns its fd, which stays open and the same until
    // the AsyncFd (which owns the Socket) is dropped.
    unsafe { AsyncFd::register(s) }.map_err(|e| err(e.into()))
}

/// Serves `ifname` until `policy` closes.
pub async fn serve(ifname: String, mut policy: watch::Receiver<Policy>, counters: Counters) {
    let mut log = LogLimit::new(Duration::from_secs(10));
    loop {
        let Some(index) = wait_for_interface(&ifname, &mut policy).await else {
            return;
        };
        let socket = match open(&ifname, index) {
            Ok(s) => s,
            Err(e) => {
                if log.allow(Instant::now()).is_some() {
                    warn!(error = %e, "nd: cannot open; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(INTERFACE_POLL) => continue,
                    r = policy.changed() => if r.is_err() { return } else { continue },
                }
            }
        };
        let Some(mac) = sockopt::mac_of(&ifname) else {
            tokio::time::sleep(INTERFACE_POLL).await;
            continue;
        };
        counters.update(|c| c.nd_listening = true);
        let mut port = Port {
            ifname: &ifname,
            index,
            fd: socket.as_raw_fd(),
            mac,
            counters: &counters,
            bucket: TokenBucket::new(BURST, PER_SECOND, Instant::now()),
            log: LogLimit::new(Duration::from_secs(10)),
        };
        let reopen = port.run(&socket, &mut policy).await;
        counters.update(|c| c.nd_listening = false);
        if !reopen {
            return;
        }
        debug!(interface = %ifname, "nd: interface changed; reopening");
    }
}

struct Port<'a> {
    ifname: &'a str,
    index: u32,
    /// The socket's fd, owned by `serve` for as long as the port lives.
    fd: std::os::fd::RawFd,
    mac: [u8; 6],
    counters: &'a Counters,
    bucket: TokenBucket,
    log: LogLimit,
}

impl Port<'_> {
    /// Runs until the policy closes (false) or the interface changed (true).
    async fn run(
        &mut self,
        socket: &AsyncFd<Socket>,
        policy: &mut watch::Receiver<Policy>,
    ) -> bool {
        let mut buf = vec![0u8; wire::MAX_FRAME + 1];
        let mut check = tokio::time::interval(INTERFACE_POLL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = socket.readable() => {
                    let mut guard = match r {
                        Ok(g) => g,
                        Err(e) => {
                            self.warn(format_args!("socket: {e}"));
                            return true;
                        }
                    };
                    for _ in 0..DRAIN {
                        // SAFETY: recv into a live buffer of its own length.
                        let r = guard.try_io(|s| {
                            let n = unsafe {
                                libc::recv(
                                    s.as_raw_fd(),
                                    buf.as_mut_ptr().cast(),
                                    buf.len(),
                                    libc::MSG_TRUNC,
                                )
                            };
                            if n < 0 {
                                Err(std::io::Error::last_os_error())
                            } else {
                                Ok(n as usize)
                            }
                        });
                        match r {
                            Ok(Ok(n)) => {
                                let p = policy.borrow();
                                self.on_frame(&buf[..n.min(buf.len())], n > wire::MAX_FRAME, &p);
                            }
                            Ok(Err(e)) => {
                                self.warn(format_args!("receive failed: {e}"));
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
                r = policy.changed() => {
                    if r.is_err() {
                        return false;
                    }
                    policy.borrow_and_update();
                }
                _ = check.tick() => {
                    if ifindex(self.ifname) != Some(self.index) {
                        return true;
                    }
                }
            }
        }
    }

    fn on_frame(&mut self, frame: &[u8], oversized: bool, policy: &Policy) {
        let ns = match if oversized {
            Err(wire::NsDrop::Oversized)
        } else {
            wire::parse(frame)
        } {
            Ok(ns) => ns,
            Err(d) => {
                self.counters.drop("nd", d.as_str());
                self.warn(format_args!("solicitation dropped: {}", d.as_str()));
                return;
            }
        };
        if wire::decide(&ns, policy).is_err() {
            return;
        }
        if !self.bucket.take(Instant::now()) {
            self.counters.drop("nd", "rate_limited");
            return;
        }
        let na = wire::advertisement(&ns, self.mac, policy.gateway);
        // SAFETY: send of a live buffer on a socket bound to the interface.
        let n = unsafe { libc::send(self.fd, na.as_ptr().cast(), na.len(), 0) };
        if n < 0 {
            debug!(interface = %self.ifname, error = %std::io::Error::last_os_error(), "nd: send failed");
            self.counters.drop("nd", "send_failed");
        } else {
            self.counters.update(|c| c.nd_answered += 1);
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            warn!(interface = %self.ifname, suppressed, "nd: {what}");
        }
    }
}
