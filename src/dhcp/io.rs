//! The DHCPv4 socket of one VM interface.
//!
//! Owns a UDP socket bound to 0.0.0.0:67 with SO_BINDTODEVICE(interface)
//! (it receives DISCOVERs whatever the tap's addresses; one such socket per
//! tap shares the port), the permanent neighbour entry that lets a unicast
//! OFFER/ACK reach a client without an address, and the interface's rate
//! limit. Replies leave with IP_PKTINFO naming this interface and the
//! gateway address as source, so they can never leave elsewhere. The task
//! waits (polling) for an interface that does not exist yet and reopens
//! its socket when the interface is re-created.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use dhcproto::v4::MessageType;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::DhcpError;
use super::server::{self, Binding, Destination, DropReason, Outcome};
use crate::netlink::Kernel;
use crate::netlink::tap::ifindex;
use crate::services::limit::{LogLimit, TokenBucket};
use crate::services::{Counters, INTERFACE_POLL, sockopt, unix_now, wait_for_interface};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// Answers per interface: a burst, then a steady rate. A client needs two
/// per exchange; a VM flooding valid requests gets no more than this.
const BURST: u32 = 40;
const PER_SECOND: u32 = 20;
/// Receive buffer: larger than any request we accept, so oversized
/// datagrams show up as such instead of being silently cut.
const RECV_BUFFER: usize = 2048;
/// A send that cannot go out at once is given up after this.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// Opens the socket of `ifname`.
pub fn open(ifname: &str) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Socket {
        ifname: ifname.to_string(),
        source,
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.bind_device(Some(ifname.as_bytes())).map_err(err)?;
    s.set_broadcast(true).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, SERVER_PORT)).into())
        .map_err(err)?;
    UdpSocket::from_std(s.into()).map_err(err)
}

enum Ended {
    /// The binding is gone: the interface left the intent.
    Stop,
    /// The interface vanished or was re-created: open again.
    Reopen,
}

/// Serves `ifname` until `binding` closes.
pub async fn serve(
    ifname: String,
    mut binding: watch::Receiver<Binding>,
    kernel: Option<Kernel>,
    counters: Counters,
) {
    let mut log = LogLimit::new(Duration::from_secs(10));
    loop {
        // Wait for the interface (QEMU may not have opened the tap yet).
        let Some(index) = wait_for_interface(&ifname, &mut binding).await else {
            return;
        };
        let socket = match open(&ifname) {
            Ok(s) => s,
            Err(e) => {
                if log.allow(Instant::now()).is_some() {
                    warn!(error = %e, "dhcp: cannot open; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(INTERFACE_POLL) => continue,
                    r = binding.changed() => if r.is_err() { return } else { continue },
                }
            }
        };
        debug!(interface = %ifname, ifindex = index, "dhcp: listening");
        counters.update(|c| c.dhcp_listening = true);
        let mut port = Port {
            ifname: &ifname,
            index,
            socket,
            kernel: kernel.as_ref(),
            counters: &counters,
            bucket: TokenBucket::new(BURST, PER_SECOND, Instant::now()),
            log: LogLimit::new(Duration::from_secs(10)),
            neighbour: None,
        };
        let ended = port.run(&mut binding).await;
        port.forget_neighbour().await;
        counters.update(|c| c.dhcp_listening = false);
        match ended {
            Ended::Stop => return,
            Ended::Reopen => debug!(interface = %ifname, "dhcp: interface changed; reopening"),
        }
    }
}

struct Port<'a> {
    ifname: &'a str,
    index: u32,
    socket: UdpSocket,
    kernel: Option<&'a Kernel>,
    counters: &'a Counters,
    bucket: TokenBucket,
    log: LogLimit,
    /// The neighbour entry we installed (address), if any.
    neighbour: Option<Ipv4Addr>,
}

impl Port<'_> {
    async fn run(&mut self, binding: &mut watch::Receiver<Binding>) -> Ended {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut check = tokio::time::interval(INTERFACE_POLL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        let b = binding.borrow().clone();
                        self.on_packet(&buf[..n.min(buf.len())], from, &b).await;
                    }
                    Err(e) => {
                        self.warn(format_args!("receive failed: {e}"));
                        if ifindex(self.ifname) != Some(self.index) {
                            return Ended::Reopen;
                        }
                        // Never spin on a persistent error.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                r = binding.changed() => {
                    if r.is_err() {
                        return Ended::Stop;
                    }
                    let b = binding.borrow_and_update().clone();
                    if self.neighbour.is_some_and(|a| a != b.address) {
                        self.forget_neighbour().await;
                    }
                }
                _ = check.tick() => {
                    if ifindex(self.ifname) != Some(self.index) {
                        return Ended::Reopen;
                    }
                }
            }
        }
    }

    async fn on_packet(&mut self, packet: &[u8], from: SocketAddr, b: &Binding) {
        if packet.len() > server::MAX_REQUEST {
            self.counters.drop("dhcp", "oversized");
            self.warn(format_args!(
                "{} byte datagram from {from} dropped",
                packet.len()
            ));
            return;
        }
        let outcome = server::reply(packet, b);
        match outcome {
            Outcome::Reply { kind, bytes, to } => {
                if !self.bucket.take(Instant::now()) {
                    self.counters.drop("dhcp", DropReason::RateLimited.as_str());
                    self.warn(format_args!("rate limit: {kind:?} not answered"));
                    return;
                }
                match self.send(&bytes, to, b).await {
                    Ok(()) => {
                        let lease = kind == MessageType::Ack && bytes.get(16..20) != Some(&[0; 4]);
                        self.counters.update(|c| {
                            c.dhcp_served += 1;
                            if lease {
                                c.dhcp_last_lease_unix = Some(unix_now());
                            }
                        });
                        if lease {
                            debug!(interface = %self.ifname, address = %b.address, "dhcp: lease acknowledged");
                        }
                    }
                    Err(e) => {
                        self.counters.drop("dhcp", "send_failed");
                        self.warn(format_args!("sending {kind:?} failed: {e}"));
                    }
                }
            }
            Outcome::Noted(MessageType::Decline) => {
                self.counters.drop("dhcp", "declined");
                self.warn(format_args!(
                    "DECLINE: the VM says {} is already in use on its link",
                    b.address
                ));
            }
            Outcome::Noted(kind) => {
                info!(interface = %self.ifname, ?kind, "dhcp: client released its lease");
            }
            Outcome::Dropped(reason) => {
                self.counters.drop("dhcp", reason.as_str());
                if reason == DropReason::Malformed {
                    self.warn(format_args!("malformed packet from {from} dropped"));
                } else {
                    debug!(interface = %self.ifname, reason = reason.as_str(), "dhcp: dropped");
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8], to: Destination, b: &Binding) -> std::io::Result<()> {
        let dst = match to {
            Destination::Broadcast => Ipv4Addr::BROADCAST,
            Destination::Client(a) => a,
            Destination::Offered { address, mac } => {
                if self.ensure_neighbour(address, mac.0).await {
                    address
                } else {
                    // No entry: the client could not answer ARP for an
                    // address it does not have yet. Broadcast instead.
                    Ipv4Addr::BROADCAST
                }
            }
        };
        let fd = self.socket.as_raw_fd();
        let dst = SocketAddrV4::new(dst, CLIENT_PORT);
        let index = self.index;
        let send = self.socket.async_io(Interest::WRITABLE, || {
            sockopt::send_v4(fd, bytes, dst, b.server, index)
        });
        match tokio::time::timeout(SEND_TIMEOUT, send).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Installs `address → mac` on the interface once; true when present.
    async fn ensure_neighbour(&mut self, address: Ipv4Addr, mac: [u8; 6]) -> bool {
        if self.neighbour == Some(address) {
            return true;
        }
        let Some(kernel) = self.kernel else {
            return false;
        };
        match kernel
            .neigh_replace(self.index, IpAddr::V4(address), mac)
            .await
        {
            Ok(()) => {
                self.neighbour = Some(address);
                true
            }
            Err(e) => {
                self.warn(format_args!("neighbour entry for {address}: {e}"));
                false
            }
        }
    }

    /// Removes our neighbour entry (on an adopted interface it would
    /// outlive us; on a deleted tap it is already gone).
    async fn forget_neighbour(&mut self) {
        let (Some(kernel), Some(address)) = (self.kernel, self.neighbour.take()) else {
            return;
        };
        if ifindex(self.ifname) != Some(self.index) {
            return;
        }
        if let Err(e) = kernel.neigh_del(self.index, IpAddr::V4(address)).await {
            debug!(interface = %self.ifname, error = %e, "dhcp: neighbour entry not removed");
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            warn!(interface = %self.ifname, suppressed, "dhcp: {what}");
        }
    }
}
