//! The DHCPv6 socket of one VM interface on a `shared-dhcpv6` fabric.
//!
//! Owns a UDP socket bound to [::]:547 with SO_BINDTODEVICE(interface),
//! member of ff02::1:2 on it, and the interface's DHCPv6 rate limit.
//! Replies go to the client's link-local address from the gateway
//! (fe80::1) with IPV6_PKTINFO naming this interface.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::DhcpError;
use super::v6::{self, Binding6, Drop6};
use crate::netlink::tap::ifindex;
use crate::services::limit::{LogLimit, TokenBucket};
use crate::services::{Counters, INTERFACE_POLL, sockopt, unix_now, wait_for_interface};

/// All_DHCP_Relay_Agents_and_Servers (RFC 8415 §7.1).
const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
const BURST: u32 = 20;
const PER_SECOND: u32 = 10;
const RECV_BUFFER: usize = 2048;
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

pub fn open(ifname: &str, index: u32) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Socket {
        ifname: ifname.to_string(),
        source,
    };
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.set_only_v6(true).map_err(err)?;
    s.bind_device(Some(ifname.as_bytes())).map_err(err)?;
    // fe80::1 may be gone already when a last reply leaves.
    s.set_freebind_v6(true).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, v6::SERVER_PORT)).into())
        .map_err(err)?;
    s.join_multicast_v6(&ALL_SERVERS, index).map_err(err)?;
    UdpSocket::from_std(s.into()).map_err(err)
}

/// Serves `ifname` until `binding` closes. `source` is the gateway (fe80::1).
pub async fn serve(
    ifname: String,
    mut binding: watch::Receiver<Binding6>,
    source: Ipv6Addr,
    counters: Counters,
) {
    let mut log = LogLimit::new(Duration::from_secs(10));
    let mut bucket = TokenBucket::new(BURST, PER_SECOND, Instant::now());
    'open: loop {
        let Some(index) = wait_for_interface(&ifname, &mut binding).await else {
            return;
        };
        let socket = match open(&ifname, index) {
            Ok(s) => s,
            Err(e) => {
                if log.allow(Instant::now()).is_some() {
                    warn!(error = %e, "dhcpv6: cannot open; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(INTERFACE_POLL) => continue,
                    r = binding.changed() => if r.is_err() { return } else { continue },
                }
            }
        };
        debug!(interface = %ifname, "dhcpv6: listening");
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut check = tokio::time::interval(INTERFACE_POLL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    let (n, from) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            if log.allow(Instant::now()).is_some() {
                                warn!(interface = %ifname, error = %e, "dhcpv6: receive failed");
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let SocketAddr::V6(from) = from else { continue };
                    let b = binding.borrow().clone();
                    let result = if n > v6::MAX_REQUEST {
                        counters.drop("dhcpv6", "oversized");
                        continue;
                    } else {
                        v6::reply(&buf[..n], &b)
                    };
                    let r = match result {
                        Ok(r) if bucket.take(Instant::now()) => r,
                        Ok(_) => {
                            counters.drop("dhcpv6", Drop6::RateLimited.as_str());
                            continue;
                        }
                        Err(d) => {
                            counters.drop("dhcpv6", d.as_str());
                            if d == Drop6::Malformed && log.allow(Instant::now()).is_some() {
                                warn!(interface = %ifname, %from, "dhcpv6: malformed packet dropped");
                            }
                            continue;
                        }
                    };
                    let dst = SocketAddrV6::new(*from.ip(), v6::CLIENT_PORT, 0, index);
                    let fd = socket.as_raw_fd();
                    let send = socket.async_io(Interest::WRITABLE, || {
                        sockopt::send_v6(fd, &r.bytes, dst, source, index)
                    });
                    match tokio::time::timeout(SEND_TIMEOUT, send).await {
                        Ok(Ok(_)) => counters.update(|c| {
                            c.dhcpv6_served += 1;
                            if r.lease {
                                c.dhcpv6_last_lease_unix = Some(unix_now());
                            }
                        }),
                        _ => counters.drop("dhcpv6", "send_failed"),
                    }
                }
                r = binding.changed() => if r.is_err() { return },
                _ = check.tick() => {
                    if ifindex(&ifname) != Some(index) {
                        continue 'open;
                    }
                }
            }
        }
    }
}
