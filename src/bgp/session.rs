//! One BGP session on tokio: the TCP connection (GTSM, bound to the uplink
//! address), the OPEN exchange, timers, UPDATE processing into the
//! Adj-RIB-In and export of the intent's routes. Decisions (negotiation,
//! policy, codec) are made by the pure modules; this file does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use ipnet::IpNet;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::codec::{
    self, Afi, Announce, Codec, LocalOpen, Message, Nlri, Notification, PathAttrs, RefreshKind,
};
use super::fsm::{self, Negotiated, State};
use super::policy::{self, ImportPolicy, RefusalCounts};
use crate::agent::AgentHandle;
use crate::bfd::BfdStatus;
use crate::config::{BgpConfig, Config};
use crate::intent::Intent;
use crate::rib::{Path, RibEvent};

/// A session's Adj-RIB-In: every accepted path, with the attributes of
/// the UPDATE that carried it (shared by its prefixes).
pub type AdjRibIn = BTreeMap<Nlri, Arc<PathAttrs>>;

/// Where a session's tables go when it ends, to be freed once the RIB has
/// its `SessionDown`: at 100,000 prefixes freeing the Adj-RIB-In and
/// Adj-RIB-Out held the agent's thread 5-50 ms, between a BFD Down (or
/// any other end) and the failover fast path (benches/bfd_failover.py,
/// BENCHMARKS.md). Freed on the same thread, after the fast path: a
/// thread of their own competed for the two cores with the rest of the
/// failover (worse in the same benchmark).
type Parked = Arc<std::sync::Mutex<Vec<Box<dyn Send>>>>;

/// A table that goes to the session's [`Parked`] when dropped.
struct FreedLater<T: Send + 'static> {
    value: Option<T>,
    park: Parked,
}

impl<T: Send + 'static> FreedLater<T> {
    fn new(value: T, park: &Parked) -> Self {
        Self {
            value: Some(value),
            park: Arc::clone(park),
        }
    }
}

impl<T: Send + 'static> std::ops::Deref for FreedLater<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Some from `new` until `drop`.
        self.value.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl<T: Send + 'static> std::ops::DerefMut for FreedLater<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<T: Send + 'static> Drop for FreedLater<T> {
    fn drop(&mut self) {
        if let Some(t) = self.value.take()
            && let Ok(mut parked) = self.park.lock()
        {
            parked.push(Box::new(t));
        }
        // (A poisoned lock: freed here, as before.)
    }
}

/// How long after Established the initial table goes out (see
/// `Session::established`).
const INITIAL_EXPORT_DELAY: Duration = Duration::from_millis(5);

/// How many received paths `l3hv peers --json` lists per session.
const RECEIVED_SAMPLE: usize = 1000;

/// Static description of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSpec {
    pub name: String,
    pub fabric: String,
    pub path: String,
    pub local: IpAddr,
    pub remote: IpAddr,
    /// The uplink interface the session runs on.
    pub uplink: String,
    /// Next hops announced (next-hop-self): the uplink's addresses.
    pub next_hop_v4: Option<IpAddr>,
    pub next_hop_v6: Option<IpAddr>,
    pub uplink_addresses: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub messages_in: u64,
    pub messages_out: u64,
    pub updates_in: u64,
    pub updates_out: u64,
    pub notifications_in: u64,
    pub notifications_out: u64,
    pub treated_as_withdraw: u64,
    pub refused: RefusalCounts,
    pub established_transitions: u64,
    /// ROUTE-REFRESH requests answered (RFC 2918 / 7313).
    pub refreshes_answered: u64,
}

/// A received path as kept in the Adj-RIB-In.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceivedPath {
    pub prefix: IpNet,
    pub path_id: Option<u32>,
    pub next_hop: Option<IpAddr>,
    pub local_pref: Option<u32>,
}

/// What `l3hv peers` shows of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionStatus {
    pub peer: PeerSpec,
    pub state: State,
    pub since_unix: u64,
    pub negotiated: Option<Negotiated>,
    pub prefixes_received: usize,
    pub prefixes_advertised: usize,
    pub end_of_rib_received: Vec<Afi>,
    pub counters: Counters,
    pub last_error: Option<String>,
    pub received: Vec<ReceivedPath>,
    /// The BFD session of this peer (filled in by `BgpHandle::peers`).
    pub bfd: Option<BfdStatus>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("sent notification {0}")]
    Sent(Notification),
    #[error("received notification {0}")]
    Received(Notification),
    #[error("peer closed the connection")]
    Closed,
    #[error("encode: {0}")]
    Encode(#[from] codec::CodecError),
}

pub struct Session {
    spec: PeerSpec,
    bgp: BgpConfig,
    config: Arc<Config>,
    local_open: LocalOpen,
    intent: watch::Receiver<Arc<Intent>>,
    status: watch::Sender<SessionStatus>,
    policy: ImportPolicy,
    rib: AgentHandle,
    /// Connections the peer opened to us (from the listener).
    incoming: Option<mpsc::Receiver<TcpStream>>,
    /// Shared copies of the session and uplink names for every path.
    name: Arc<str>,
    uplink: Arc<str>,
    /// The BFD session of this peer, if BFD is enabled.
    bfd: Option<watch::Receiver<BfdStatus>>,
    /// Set by the speaker when the session is removed or reconfigured:
    /// the NOTIFICATION to close an established session with.
    stop: watch::Receiver<Option<Notification>>,
    /// The tables of the connection that just ended ([`FreedLater`]).
    parked: Parked,
}

/// Resolves when the session is asked to stop.
async fn stopped(stop: &mut watch::Receiver<Option<Notification>>) -> Notification {
    let got = stop
        .wait_for(|s| s.is_some())
        .await
        .map(|n| n.clone().unwrap_or_else(|| Notification::new(6, 3, vec![])));
    match got {
        Ok(n) => n,
        // The speaker is gone: the agent is stopping.
        Err(_) => std::future::pending().await,
    }
}

/// Resolves when the BFD session reports a new failure (a confirmed Up
/// that went down) after `seen` failures; never without BFD.
async fn bfd_failed(bfd: &mut Option<watch::Receiver<BfdStatus>>, seen: u64) {
    let Some(rx) = bfd else {
        return std::future::pending().await;
    };
    if rx.wait_for(|s| s.failures > seen).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when the BFD session has come Up more than `seen` times.
async fn bfd_came_up(bfd: &mut Option<watch::Receiver<BfdStatus>>, seen: u64) {
    let Some(rx) = bfd else {
        return std::future::pending().await;
    };
    if rx.wait_for(|s| s.up_transitions > seen).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Session {
    fn bfd_counts(&self) -> (u64, u64) {
        self.bfd.as_ref().map_or((0, 0), |b| {
            let b = b.borrow();
            (b.failures, b.up_transitions)
        })
    }

    pub fn new(
        spec: PeerSpec,
        config: Arc<Config>,
        rib: AgentHandle,
        incoming: mpsc::Receiver<TcpStream>,
        bfd: Option<watch::Receiver<BfdStatus>>,
        stop: watch::Receiver<Option<Notification>>,
    ) -> (Self, watch::Receiver<SessionStatus>) {
        let intent = rib.subscribe_announce();
        let spec_name = spec.name.clone();
        let spec_uplink = spec.uplink.clone();
        let bgp = config.bgp.clone();
        let local_open = LocalOpen {
            asn: config.hypervisor.asn,
            hold_time: bgp.hold_time.as_secs().min(65535) as u16,
            bgp_id: config.hypervisor.router_id,
            add_path_send: bgp.add_path_send,
            graceful_restart: bgp.graceful_restart.map(|d| d.as_secs().min(4095) as u16),
        };
        let policy = ImportPolicy::new(&config, &spec.fabric, &spec.uplink_addresses, &bgp.accept);
        let (status, rx) = watch::channel(SessionStatus {
            peer: spec.clone(),
            state: State::Idle,
            since_unix: now_unix(),
            negotiated: None,
            prefixes_received: 0,
            prefixes_advertised: 0,
            end_of_rib_received: vec![],
            counters: Counters::default(),
            last_error: None,
            received: vec![],
            bfd: None,
        });
        (
            Self {
                spec,
                bgp,
                config,
                local_open,
                intent,
                status,
                policy,
                rib,
                incoming: Some(incoming),
                name: Arc::from(spec_name.as_str()),
                uplink: Arc::from(spec_uplink.as_str()),
                bfd,
                stop,
                parked: Parked::default(),
            },
            rx,
        )
    }

    fn set_state(&self, state: State) {
        self.status.send_modify(|s| {
            if s.state != state {
                s.state = state;
                s.since_unix = now_unix();
            }
        });
    }

    /// Runs forever: connect, serve, back off, retry.
    pub async fn run(mut self) {
        let Some(mut incoming) = self.incoming.take() else {
            return;
        };
        let mut failures = 0u32;
        let mut pending: Option<TcpStream> = None;
        // When BFD last came Up and restarted the connect (fsm::retry_wait).
        let mut bfd_kick: Option<Instant> = None;
        // Graceful restart helper: one generation per restart of the peer.
        let mut stale_generation = 0u64;
        let mut stop = self.stop.clone();
        loop {
            if stop.borrow().is_some() {
                self.set_state(State::Idle);
                return;
            }
            self.set_state(State::Connect);
            let started = Instant::now();
            // Active open, unless the peer connects to us first (then its
            // connection is used).
            // A connect started while the path was down may sit in SYN
            // retransmission: BFD coming Up restarts it at once.
            let (_, ups) = self.bfd_counts();
            let mut bfd_up = self.bfd.clone();
            let stream = match pending.take() {
                Some(s) => Ok(s),
                None => tokio::select! {
                    r = self.connect() => r.map_err(SessionEnd::Connect),
                    Some(s) = incoming.recv() => Ok(s),
                    _ = stopped(&mut stop) => continue,
                    _ = bfd_came_up(&mut bfd_up, ups) => {
                        bfd_kick = Some(Instant::now());
                        continue;
                    }
                },
            };
            let end = match stream {
                Ok(stream) => {
                    let serve = self.serve(stream);
                    tokio::pin!(serve);
                    loop {
                        // Biased: an established session sees the stop
                        // itself and closes with its NOTIFICATION first.
                        tokio::select! {
                            biased;
                            r = &mut serve => break r,
                            Some(other) = incoming.recv() => refuse_collision(other).await,
                            _ = stopped(&mut stop) => break Err(SessionEnd::Closed),
                        }
                    }
                }
                Err(e) => Err(e),
            };
            let end = match end {
                Ok(()) => return,
                Err(e) => e,
            };
            let was_established = self.status.borrow().state == State::Established;
            if was_established {
                // (Splits a failover's time: the session's own teardown
                // above, the RIB's queue below.)
                debug!(peer = %self.spec.name, "session ended: telling the RIB");
                // Only for families the peer said it preserves: a peer
                // that is merely "GR aware" lists none.
                let (restart_time, families) = self
                    .status
                    .borrow()
                    .negotiated
                    .as_ref()
                    .map(|n| (n.graceful_restart, n.graceful_restart_families.clone()))
                    .unwrap_or_default();
                let restart_time = restart_time.filter(|t| *t > 0 && !families.is_empty());
                // RFC 4724 §4.2: a connection that ended without a
                // NOTIFICATION (the peer's process restarted, TCP reset)
                // leaves the peer's paths in place, stale, for its restart
                // time. A NOTIFICATION either way (hold timer, BFD down,
                // errors) is a hard down.
                // A session the speaker stops (removed, reconfigured) is
                // never graceful: its paths go now.
                let graceful = matches!(end, SessionEnd::Closed | SessionEnd::Io(_))
                    && stop.borrow().is_none();
                match restart_time {
                    Some(t) if graceful => {
                        stale_generation += 1;
                        info!(peer = %self.spec.name, restart_time = t, "graceful restart: paths kept stale");
                        self.rib
                            .rib(RibEvent::SessionStale {
                                session: self.name.clone(),
                                generation: stale_generation,
                                keep_v4: families.contains(&Afi::Ipv4),
                                keep_v6: families.contains(&Afi::Ipv6),
                            })
                            .await;
                        let rib = self.rib.clone();
                        let session = self.name.clone();
                        let generation = stale_generation;
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(u64::from(t))).await;
                            rib.rib(RibEvent::SweepStale {
                                session,
                                generation,
                            })
                            .await;
                        });
                    }
                    _ => {
                        self.rib
                            .rib(RibEvent::SessionDown {
                                session: self.name.clone(),
                            })
                            .await;
                    }
                }
            }
            match &end {
                SessionEnd::Connect(_) => {
                    debug!(peer = %self.spec.name, error = %end, "session down")
                }
                _ => warn!(peer = %self.spec.name, error = %end, "session down"),
            }
            // The RIB has the news; the agent (on this thread) acts on it
            // before the old tables are freed.
            let parked: Vec<Box<dyn Send>> = self
                .parked
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default();
            if !parked.is_empty() {
                tokio::task::yield_now().await;
            }
            drop(parked);
            self.status.send_modify(|s| {
                s.last_error = Some(end.to_string());
                s.negotiated = None;
                s.received.clear();
                s.prefixes_received = 0;
                s.prefixes_advertised = 0;
                s.end_of_rib_received.clear();
            });
            self.set_state(State::Active);
            if was_established && started.elapsed() > Duration::from_secs(60) {
                failures = 0;
            }
            let jitter = (now_unix() as u8).wrapping_mul(37) ^ (self.spec.name.len() as u8);
            let wait = fsm::backoff(
                self.bgp.connect_retry,
                Duration::from_secs(60),
                failures,
                jitter,
            );
            failures = failures.saturating_add(1);
            let wait = fsm::retry_wait(wait, bfd_kick.map(|t| t.elapsed()));
            // A connection from the peer ends the wait at once; so does
            // BFD coming Up: the path is back, reconnect without backoff.
            let (_, ups) = self.bfd_counts();
            let mut bfd = self.bfd.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Some(s) = incoming.recv() => pending = Some(s),
                _ = stopped(&mut stop) => {}
                _ = bfd_came_up(&mut bfd, ups) => {
                    debug!(peer = %self.spec.name, "bfd up: reconnecting now");
                    failures = 0;
                    bfd_kick = Some(Instant::now());
                }
            }
        }
    }

    /// Active open from the uplink address with GTSM.
    async fn connect(&self) -> std::io::Result<TcpStream> {
        let socket = match self.spec.remote {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if self.bgp.gtsm {
            gtsm(&socket, self.spec.remote.is_ipv6())?;
        }
        if let Some(key) = &self.bgp.password {
            md5(&socket, self.spec.remote, key.as_bytes())?;
        }
        socket.set_nodelay(true)?;
        socket.bind(SocketAddr::new(self.spec.local, 0))?;
        let remote = SocketAddr::new(self.spec.remote, self.bgp.port);
        match tokio::time::timeout(Duration::from_secs(5), socket.connect(remote)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )),
        }
    }

    async fn send(&self, stream: &mut TcpStream, bytes: &[u8]) -> Result<(), SessionEnd> {
        stream.write_all(bytes).await?;
        self.status.send_modify(|s| s.counters.messages_out += 1);
        Ok(())
    }

    async fn notify(&self, stream: &mut TcpStream, n: Notification) -> SessionEnd {
        let _ = stream.write_all(&codec::notification(&n)).await;
        let _ = stream.shutdown().await;
        self.status
            .send_modify(|s| s.counters.notifications_out += 1);
        SessionEnd::Sent(n)
    }

    /// Reads one whole message, or `None` at EOF.
    async fn read(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        codec: &Codec,
    ) -> Result<Message, SessionEnd> {
        loop {
            match Codec::frame(buf) {
                Ok(Some(len)) => {
                    let frame = buf.split_to(len);
                    self.status.send_modify(|s| s.counters.messages_in += 1);
                    return match codec.decode(&frame) {
                        Ok(m) => Ok(m),
                        Err(n) => Err(self.notify(stream, n).await),
                    };
                }
                Ok(None) => {}
                Err(n) => return Err(self.notify(stream, n).await),
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(SessionEnd::Closed);
            }
        }
    }

    async fn serve(&self, mut stream: TcpStream) -> Result<(), SessionEnd> {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        self.send(&mut stream, &codec::open(&self.local_open)?)
            .await?;
        self.set_state(State::OpenSent);
        // RFC 4271 §8.2.2: a large hold time while waiting for the OPEN.
        let open = match tokio::time::timeout(
            Duration::from_secs(240),
            self.read(&mut stream, &mut buf, &Codec::default()),
        )
        .await
        {
            Err(_) => {
                return Err(self
                    .notify(&mut stream, Notification::new(4, 0, vec![]))
                    .await);
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Message::Open(o))) => o,
            Ok(Ok(Message::Notification(n))) => return Err(SessionEnd::Received(n)),
            Ok(Ok(_)) => {
                return Err(self
                    .notify(&mut stream, Notification::new(5, 1, vec![]))
                    .await);
            }
        };
        let (negotiated, codec) =
            match fsm::negotiate(&self.local_open, self.config.hypervisor.asn, &open) {
                Ok(x) => x,
                Err(n) => return Err(self.notify(&mut stream, n).await),
            };
        self.send(&mut stream, &codec::keepalive()).await?;
        self.set_state(State::OpenConfirm);
        let hold = negotiated.hold_time;
        let wait = if hold.is_zero() {
            Duration::from_secs(240)
        } else {
            hold
        };
        match tokio::time::timeout(wait, self.read(&mut stream, &mut buf, &codec)).await {
            Err(_) => {
                return Err(self
                    .notify(&mut stream, Notification::new(4, 0, vec![]))
                    .await);
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Message::KeepAlive)) => {}
            Ok(Ok(Message::Notification(n))) => return Err(SessionEnd::Received(n)),
            Ok(Ok(_)) => {
                return Err(self
                    .notify(&mut stream, Notification::new(5, 2, vec![]))
                    .await);
            }
        }
        info!(peer = %self.spec.name, remote_id = %negotiated.remote_id, hold = ?hold, "established");
        self.status.send_modify(|s| {
            s.negotiated = Some(negotiated.clone());
            s.counters.established_transitions += 1;
            s.last_error = None;
        });
        self.set_state(State::Established);
        self.established(stream, buf, codec, negotiated).await
    }

    fn wanted(&self) -> BTreeSet<IpNet> {
        policy::export(&self.config, &self.intent.borrow(), &self.spec.fabric)
    }

    async fn advertise(
        &self,
        stream: &mut TcpStream,
        codec: &Codec,
        negotiated: &Negotiated,
        add: &[IpNet],
        remove: &[IpNet],
    ) -> Result<usize, SessionEnd> {
        let mut msgs = Vec::new();
        if !remove.is_empty() {
            msgs.extend(codec::withdraw(codec, remove)?);
        }
        // RFC 8950: on a path without an IPv4 address, IPv4 prefixes go
        // with the IPv6 next hop when the peer agreed to it.
        let v4_next_hop = self.spec.next_hop_v4.or(if negotiated.extended_next_hop {
            self.spec.next_hop_v6
        } else {
            None
        });
        for (v6, nh) in [(false, v4_next_hop), (true, self.spec.next_hop_v6)] {
            let prefixes: Vec<IpNet> = add
                .iter()
                .filter(|p| p.addr().is_ipv6() == v6)
                .copied()
                .collect();
            let family_ok = if v6 { negotiated.ipv6 } else { negotiated.ipv4 };
            if prefixes.is_empty() || !family_ok {
                continue;
            }
            let Some(next_hop) = nh else { continue };
            msgs.extend(codec::announce(
                codec,
                &Announce {
                    prefixes,
                    next_hop,
                    local_pref: self.bgp.local_pref,
                },
            )?);
        }
        let n = msgs.len();
        // One write for the whole batch.
        let all: Vec<u8> = msgs.concat();
        if !all.is_empty() {
            stream.write_all(&all).await?;
        }
        self.status.send_modify(|s| {
            s.counters.messages_out += n as u64;
            s.counters.updates_out += n as u64;
        });
        Ok(n)
    }

    async fn established(
        &self,
        mut stream: TcpStream,
        mut buf: BytesMut,
        codec: Codec,
        negotiated: Negotiated,
    ) -> Result<(), SessionEnd> {
        let mut intent = self.intent.clone();
        // A moment between our KEEPALIVE and our table: BIRD 2 before 2.14
        // (Debian 12 ships 2.0.12) that reads both in one go enters
        // Established, queues its own export and then sleeps in poll() with
        // it queued, up to 3 s (its fix "IO: Fix race condition in event
        // processing", 6a242b3ec). Our table arriving after that read wakes
        // it. The first KEEPALIVE below bounds what is left of the race.
        tokio::time::sleep(INITIAL_EXPORT_DELAY).await;
        let mut advertised = FreedLater::new(self.wanted(), &self.parked);
        let initial: Vec<IpNet> = advertised.iter().copied().collect();
        self.advertise(&mut stream, &codec, &negotiated, &initial, &[])
            .await?;
        let mut eor = Vec::new();
        for m in codec::end_of_rib(negotiated.ipv4, negotiated.ipv6)? {
            eor.extend(m);
        }
        stream.write_all(&eor).await?;
        self.status
            .send_modify(|s| s.prefixes_advertised = advertised.len());

        // Attributes are shared by every prefix of the UPDATE that carried
        // them.
        let mut adj_in = FreedLater::new(AdjRibIn::new(), &self.parked);
        // Its size when last rebuilt with full nodes (btree::compact_past).
        let mut adj_in_compacted = 0;
        // Enhanced route refresh in progress, per family (IPv4, IPv6): the
        // paths not announced again yet.
        let mut refreshing: [Option<BTreeSet<Nlri>>; 2] = [None, None];
        let keepalive = negotiated.keepalive;
        let hold = negotiated.hold_time;
        // The first KEEPALIVE one second after Established (RFC 4271 §4.4:
        // no more often than one per second), the next every `keepalive`:
        // a peer that sleeps with its table queued (the BIRD race above)
        // wakes on it instead of at its next timer, seconds later.
        let period = if keepalive.is_zero() {
            Duration::from_secs(3600)
        } else {
            keepalive
        };
        let mut ka = tokio::time::interval_at(
            tokio::time::Instant::now() + period.min(Duration::from_secs(1)),
            period,
        );
        // Ticks missed while a write waited on the peer are not made up in
        // a burst: still one KEEPALIVE per period at most.
        ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_in = Instant::now();
        let (bfd_failures, _) = self.bfd_counts();
        let mut bfd = self.bfd.clone();
        let mut stop = self.stop.clone();
        // Messages that arrived with the peer's KEEPALIVE during the OPEN
        // exchange are already in `buf`: handle them first, not when the
        // next bytes arrive (the peer's next KEEPALIVE, seconds later: its
        // whole table waited that long after a reconnect).
        let mut buffered = !buf.is_empty();
        // A RIB event the agent had no room for (it is in a long pass):
        // the session stops reading, so TCP holds the peer back, but goes
        // on sending KEEPALIVEs and serving the other branches; it never
        // waits on the agent inside a branch (at 1,000,000 routes that
        // wait outlasted a 3 s hold time).
        let mut pending: Option<RibEvent> = None;
        loop {
            let hold_left = if hold.is_zero() {
                Duration::from_secs(3600)
            } else {
                hold.saturating_sub(last_in.elapsed())
            };
            tokio::select! {
                _ = self.rib.rib_when_ready(&mut pending), if pending.is_some() => {
                    // Not reading meanwhile was our doing: the peer's hold
                    // time counts from here.
                    last_in = Instant::now();
                    buffered = !buf.is_empty();
                }
                _ = ka.tick(), if !keepalive.is_zero() => {
                    stream.write_all(&codec::keepalive()).await?;
                    self.status.send_modify(|s| s.counters.messages_out += 1);
                }
                _ = tokio::time::sleep(hold_left), if pending.is_none() => {
                    // The peer's messages may be waiting in the socket
                    // (this task ran late, or both branches were ready at
                    // once): they count, the hold timer has not expired.
                    match stream.try_read_buf(&mut buf) {
                        Ok(0) => return Err(SessionEnd::Closed),
                        Ok(_) => {
                            last_in = Instant::now();
                            buffered = true;
                            continue;
                        }
                        Err(_) => {}
                    }
                    let n = Notification::new(4, 0, vec![]);
                    let _ = stream.write_all(&codec::notification(&n)).await;
                    return Err(SessionEnd::Sent(n));
                }
                n = stopped(&mut stop) => {
                    // Removed (Cease / Peer De-configured) or reconfigured
                    // (Cease / Other Configuration Change), RFC 4486.
                    let _ = stream.write_all(&codec::notification(&n)).await;
                    let _ = stream.shutdown().await;
                    linger(stream);
                    self.status.send_modify(|s| s.counters.notifications_out += 1);
                    return Err(SessionEnd::Sent(n));
                }
                _ = bfd_failed(&mut bfd, bfd_failures) => {
                    debug!(peer = %self.spec.name, "bfd down: closing the session");
                    // The data path is gone: Cease / BFD Down (RFC 9384).
                    // It may well not arrive; it never delays the failover
                    // (a non-blocking write into the socket buffer).
                    let n = Notification::new(6, 10, vec![]);
                    let _ = stream.try_write(&codec::notification(&n));
                    self.status.send_modify(|s| s.counters.notifications_out += 1);
                    return Err(SessionEnd::Sent(n));
                }
                changed = intent.changed() => {
                    if changed.is_err() { return Ok(()); }
                    let wanted = self.wanted();
                    let add: Vec<IpNet> = wanted.difference(&advertised).copied().collect();
                    let remove: Vec<IpNet> = advertised.difference(&wanted).copied().collect();
                    if !add.is_empty() || !remove.is_empty() {
                        self.advertise(&mut stream, &codec, &negotiated, &add, &remove).await?;
                        *advertised = wanted;
                        self.status.send_modify(|s| s.prefixes_advertised = advertised.len());
                    }
                }
                read = async {
                    if buffered {
                        Ok(usize::MAX)
                    } else {
                        stream.read_buf(&mut buf).await
                    }
                }, if pending.is_none() => {
                    buffered = false;
                    if read? == 0 {
                        return Err(SessionEnd::Closed);
                    }
                    last_in = Instant::now();
                    loop {
                        let len = match Codec::frame(&buf) {
                            Ok(Some(len)) => len,
                            Ok(None) => break,
                            Err(n) => {
                                let _ = stream.write_all(&codec::notification(&n)).await;
                                return Err(SessionEnd::Sent(n));
                            }
                        };
                        let frame = buf.split_to(len);
                        self.status.send_modify(|s| s.counters.messages_in += 1);
                        let msg = match codec.decode(&frame) {
                            Ok(m) => m,
                            Err(n) => {
                                let _ = stream.write_all(&codec::notification(&n)).await;
                                self.status.send_modify(|s| s.counters.notifications_out += 1);
                                return Err(SessionEnd::Sent(n));
                            }
                        };
                        match msg {
                            Message::KeepAlive => {}
                            Message::Notification(n) => {
                                self.status.send_modify(|s| s.counters.notifications_in += 1);
                                return Err(SessionEnd::Received(n));
                            }
                            Message::Open(_) => {
                                let n = Notification::new(5, 3, vec![]);
                                let _ = stream.write_all(&codec::notification(&n)).await;
                                return Err(SessionEnd::Sent(n));
                            }
                            Message::RouteRefresh { afi: None, .. } => {}
                            Message::RouteRefresh { afi: Some(afi), kind: RefreshKind::Request } => {
                                // RFC 2918: re-send the Adj-RIB-Out of the
                                // family; framed by BoRR/EoRR when both
                                // sides speak enhanced route refresh
                                // (RFC 7313), so the peer can sweep.
                                let v6 = afi == Afi::Ipv6;
                                let all: Vec<IpNet> = advertised
                                    .iter()
                                    .filter(|p| p.addr().is_ipv6() == v6)
                                    .copied()
                                    .collect();
                                let enhanced = negotiated.enhanced_route_refresh;
                                if enhanced {
                                    self.send(&mut stream, &codec::route_refresh(afi, RefreshKind::Begin)).await?;
                                }
                                self.advertise(&mut stream, &codec, &negotiated, &all, &[]).await?;
                                if enhanced {
                                    self.send(&mut stream, &codec::route_refresh(afi, RefreshKind::End)).await?;
                                }
                                self.status.send_modify(|s| s.counters.refreshes_answered += 1);
                            }
                            Message::RouteRefresh { afi: Some(afi), kind } => {
                                // RFC 7313 from the peer: at Beginning of
                                // Route Refresh its paths of the family go
                                // stale; at the End those not announced
                                // again are withdrawn.
                                if !negotiated.enhanced_route_refresh {
                                    continue;
                                }
                                let i = usize::from(afi == Afi::Ipv6);
                                if kind == RefreshKind::Begin {
                                    refreshing[i] = Some(
                                        adj_in
                                            .keys()
                                            .filter(|n| n.prefix.addr().is_ipv6() == (i == 1))
                                            .copied()
                                            .collect(),
                                    );
                                } else if let Some(stale) = refreshing[i].take() {
                                    let withdraw: Vec<(IpNet, Option<u32>)> = stale
                                        .into_iter()
                                        .filter(|n| adj_in.remove(n).is_some())
                                        .map(|n| (n.prefix, n.path_id))
                                        .collect();
                                    let count = adj_in.len();
                                    self.status.send_modify(|s| s.prefixes_received = count);
                                    if !withdraw.is_empty() {
                                        let event = RibEvent::Update {
                                            session: self.name.clone(),
                                            fabric: self.spec.fabric.clone(),
                                            announce: vec![],
                                            withdraw,
                                        };
                                        if let Err(event) = self.rib.try_rib(event) {
                                            pending = Some(event);
                                            break;
                                        }
                                    }
                                }
                            }
                            Message::Update(u) => {
                                for stale in refreshing.iter_mut().flatten() {
                                    for n in &u.announce {
                                        stale.remove(n);
                                    }
                                }
                                let (event, close) = self.on_update(u, &mut adj_in);
                                crate::btree::compact_past(&mut adj_in, &mut adj_in_compacted);
                                match (event, &close) {
                                    (Some(event), Some(_)) => self.rib.rib(event).await,
                                    (Some(event), None) => {
                                        if let Err(event) = self.rib.try_rib(event) {
                                            pending = Some(event);
                                        }
                                    }
                                    (None, _) => {}
                                }
                                if let Some(n) = close {
                                    let _ = stream.write_all(&codec::notification(&n)).await;
                                    self.status.send_modify(|s| s.counters.notifications_out += 1);
                                    return Err(SessionEnd::Sent(n));
                                }
                                if pending.is_some() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Applies one UPDATE to the Adj-RIB-In; returns what the RIB must
    /// learn, and a NOTIFICATION when the session must close (maximum
    /// prefixes).
    fn on_update(
        &self,
        u: codec::Update,
        adj_in: &mut AdjRibIn,
    ) -> (Option<RibEvent>, Option<Notification>) {
        let mut refused = Vec::new();
        let mut announce = Vec::new();
        let mut withdraw = Vec::new();
        for w in &u.withdraw {
            if adj_in.remove(w).is_some() {
                withdraw.push((w.prefix, w.path_id));
            }
        }
        if let Some(attrs) = u.attrs.clone().map(Arc::new) {
            let attrs = &attrs;
            for n in &u.announce {
                match (self.policy.check(&n.prefix, attrs), attrs.next_hop) {
                    (Ok(()), Some(next_hop)) => {
                        adj_in.insert(*n, Arc::clone(attrs));
                        announce.push((
                            n.prefix,
                            n.path_id,
                            Path {
                                next_hop,
                                uplink: self.uplink.clone(),
                                local_pref: attrs.local_pref.unwrap_or(100),
                                as_path_len: attrs.as_path_len,
                                originator: attrs.originator_id,
                            },
                        ));
                    }
                    (Err(r), _) => {
                        if adj_in.remove(n).is_some() {
                            withdraw.push((n.prefix, n.path_id));
                        }
                        refused.push(r);
                    }
                    (Ok(()), None) => {}
                }
            }
        }
        let mut event = (!announce.is_empty() || !withdraw.is_empty()).then(|| RibEvent::Update {
            session: self.name.clone(),
            fabric: self.spec.fabric.clone(),
            announce,
            withdraw,
        });
        if u.end_of_rib.is_some() {
            let (ipv4, ipv6) = self
                .status
                .borrow()
                .negotiated
                .as_ref()
                .map_or((true, false), |n| (n.ipv4, n.ipv6));
            let mut have = self.status.borrow().end_of_rib_received.clone();
            if let Some(v4) = u.end_of_rib {
                have.push(if v4 { Afi::Ipv4 } else { Afi::Ipv6 });
            }
            let complete =
                (!ipv4 || have.contains(&Afi::Ipv4)) && (!ipv6 || have.contains(&Afi::Ipv6));
            if complete && event.is_none() {
                event = Some(RibEvent::EndOfRib {
                    session: self.name.clone(),
                });
            }
        }
        let over = adj_in.len() > self.bgp.max_prefixes;
        self.status.send_modify(|s| {
            s.counters.updates_in += 1;
            if u.treated_as_withdraw {
                s.counters.treated_as_withdraw += 1;
                *s.counters
                    .refused
                    .entry(policy::Refusal::Malformed)
                    .or_default() += 1;
            }
            for r in &refused {
                *s.counters.refused.entry(*r).or_default() += 1;
            }
            if let Some(v4) = u.end_of_rib {
                let afi = if v4 { Afi::Ipv4 } else { Afi::Ipv6 };
                if !s.end_of_rib_received.contains(&afi) {
                    s.end_of_rib_received.push(afi);
                }
            }
            s.prefixes_received = adj_in.len();
            // A sample for `l3hv peers --json`: kept current while small,
            // refreshed at End-of-RIB when large (rebuilding it per UPDATE
            // would cost O(table) each time).
            if adj_in.len() <= RECEIVED_SAMPLE || u.end_of_rib.is_some() {
                s.received = adj_in
                    .iter()
                    .take(RECEIVED_SAMPLE)
                    .map(|(n, a)| ReceivedPath {
                        prefix: n.prefix,
                        path_id: n.path_id,
                        next_hop: a.next_hop,
                        local_pref: a.local_pref,
                    })
                    .collect();
            }
        });
        if over {
            // RFC 4486 §4: Cease / Maximum Number of Prefixes Reached, data:
            // AFI, SAFI, upper bound.
            let mut data = vec![0, 1, 1];
            data.extend_from_slice(
                &(self.bgp.max_prefixes.min(u32::MAX as usize) as u32).to_be_bytes(),
            );
            return (event, Some(Notification::new(6, 1, data)));
        }
        (event, None)
    }
}

/// TCP-MD5 (RFC 2385): sign and require signatures for segments to and
/// from `peer` on this socket (on a listener: for connections it accepts
/// from `peer`). Hand-written: libc has no `tcp_md5sig` for Linux.
pub(crate) fn md5(
    socket: &impl std::os::fd::AsRawFd,
    peer: IpAddr,
    key: &[u8],
) -> std::io::Result<()> {
    /// linux/tcp.h
    const TCP_MD5SIG: libc::c_int = 14;
    const TCP_MD5SIG_MAXKEYLEN: usize = 80;
    #[repr(C)]
    struct TcpMd5Sig {
        addr: libc::sockaddr_storage,
        flags: u8,
        prefixlen: u8,
        keylen: u16,
        ifindex: libc::c_int,
        key: [u8; TCP_MD5SIG_MAXKEYLEN],
    }
    if key.len() > TCP_MD5SIG_MAXKEYLEN {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: all-zero is a valid value for this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a
            // sockaddr_in; we write only its fields.
            let sin = unsafe {
                &mut *(&mut sig.addr as *mut libc::sockaddr_storage as *mut libc::sockaddr_in)
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
        }
        IpAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut sig.addr as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6)
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
        }
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: fd is a valid socket; sig outlives the call and its size is
    // passed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_MD5SIG,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Closes a connection we sent a NOTIFICATION on (and shut down for
/// writing) only once the peer has closed its side, or after 2 s: closed
/// with the peer's messages unread (a KEEPALIVE or UPDATE in flight), the
/// kernel answers them with a reset, and a peer that reads the reset first
/// never sees the NOTIFICATION (BIRD 2 then logged "Connection reset by
/// peer" instead of the Cease of a removed session). Off the session's
/// path: a task of its own.
fn linger(mut stream: TcpStream) {
    tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        let drained = async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    });
}

/// RFC 4271 §6.8, simplified: the connection already being served wins;
/// the newer one is closed with Cease / Connection Collision Resolution.
async fn refuse_collision(mut stream: TcpStream) {
    let n = Notification::new(6, 7, vec![]);
    let _ = stream.write_all(&codec::notification(&n)).await;
    let _ = stream.shutdown().await;
}

/// GTSM (RFC 5082): send with TTL/hop limit 255 and drop anything that
/// arrived with less (IP_MINTTL / IPV6_MINHOPCOUNT).
pub(crate) fn gtsm(socket: &impl std::os::fd::AsRawFd, v6: bool) -> std::io::Result<()> {
    let fd = socket.as_raw_fd();
    let set = |level, name| crate::services::sockopt::set_int(fd, level, name, 255);
    if v6 {
        set(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)?;
        // IPV6_MINHOPCOUNT = 73 (linux/in6.h).
        set(libc::IPPROTO_IPV6, 73)?;
    } else {
        set(libc::IPPROTO_IP, libc::IP_TTL)?;
        set(libc::IPPROTO_IP, libc::IP_MINTTL)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Command;
    use crate::testutil::in_private_netns;
    use std::net::Ipv4Addr;

    #[test]
    fn a_sessions_tables_are_freed_when_taken_from_the_park_not_before() {
        struct Table(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Table {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let park = Parked::default();
        let mut t = FreedLater::new(vec![1u8], &park);
        t.push(2);
        assert_eq!(*t, [1, 2]);
        drop(t);
        let t = FreedLater::new(Table(Arc::clone(&freed)), &park);
        drop(t);
        assert!(!freed.load(std::sync::atomic::Ordering::SeqCst));
        let parked = std::mem::take(&mut *park.lock().unwrap());
        assert_eq!(parked.len(), 2);
        assert!(!freed.load(std::sync::atomic::Ordering::SeqCst));
        drop(parked);
        assert!(freed.load(std::sync::atomic::Ordering::SeqCst));
    }
    use tokio::net::TcpListener;

    /// Reads whole messages from `stream` into `out` until `deadline`.
    async fn read_until(
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        codec: &Codec,
        deadline: tokio::time::Instant,
        out: &mut Vec<Message>,
    ) {
        loop {
            while let Ok(Some(len)) = Codec::frame(buf) {
                let frame = buf.split_to(len);
                out.push(codec.decode(&frame).expect("the session's message decodes"));
            }
            match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
                Ok(Ok(0)) | Err(_) => return,
                Ok(r) => {
                    r.expect("read");
                }
            }
        }
    }

    /// A session on loopback whose peer (returned) has sent its OPEN with
    /// `hold_time` and a KEEPALIVE; the agent's queue has room for one
    /// event.
    async fn session_with_peer(
        hold_time: u16,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<Result<(), SessionEnd>>,
        crate::agent::Detached,
    ) {
        let config = crate::config::parse("t.toml", crate::config::tests::MIN).expect("config");
        let (handle, agent) = AgentHandle::detached(1, config.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut peer = TcpStream::connect(addr).await.expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        let spec = PeerSpec {
            name: "public-a".into(),
            fabric: "public".into(),
            path: "a".into(),
            local: addr.ip(),
            remote: addr.ip(),
            uplink: "lo".into(),
            next_hop_v4: Some(addr.ip()),
            next_hop_v6: None,
            uplink_addresses: vec!["10.0.0.1/24".parse().expect("net")],
        };
        let (_incoming_tx, incoming) = mpsc::channel(1);
        let (_stop_tx, stop) = watch::channel(None);
        let (session, _status) = Session::new(spec, Arc::new(config), handle, incoming, None, stop);
        let session = tokio::spawn(async move { session.serve(ours).await });
        let open = codec::open(&LocalOpen {
            asn: 65000,
            hold_time,
            bgp_id: Ipv4Addr::new(198, 51, 100, 1),
            add_path_send: false,
            graceful_restart: None,
        })
        .expect("open");
        peer.write_all(&open).await.expect("write");
        peer.write_all(&codec::keepalive()).await.expect("write");
        (peer, session, agent)
    }

    /// With a 90 s hold time (KEEPALIVEs every 30 s) the first KEEPALIVE
    /// after Established still comes after one second: it wakes a peer that
    /// sleeps with its table queued (BIRD 2.0.12), and no sooner, since
    /// RFC 4271 allows one per second.
    #[test]
    fn the_first_keepalive_comes_one_second_after_established() {
        in_private_netns(|| async {
            let (mut peer, session, _agent) = session_with_peer(90).await;
            let peer_codec = Codec::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let t0 = tokio::time::Instant::now();
            // OPEN, the KEEPALIVE of OpenConfirm, End-of-RIB.
            read_until(
                &mut peer,
                &mut buf,
                &peer_codec,
                t0 + Duration::from_millis(900),
                &mut got,
            )
            .await;
            let keepalives = |got: &[Message]| {
                got.iter()
                    .filter(|m| matches!(m, Message::KeepAlive))
                    .count()
            };
            assert_eq!(keepalives(&got), 1, "{got:?}");
            assert!(
                got.iter().any(|m| matches!(m, Message::Update(_))),
                "{got:?}"
            );
            read_until(
                &mut peer,
                &mut buf,
                &peer_codec,
                t0 + Duration::from_millis(1600),
                &mut got,
            )
            .await;
            assert_eq!(keepalives(&got), 2, "{got:?}");
            assert!(!session.is_finished());
            session.abort();
        });
    }

    /// The bug this guards against: the session handed each UPDATE to the
    /// agent and waited when the agent's queue was full (a pass of several
    /// seconds at 1,000,000 routes), sending no KEEPALIVE meanwhile, and
    /// the reflector reset it when its hold time ran out.
    #[test]
    fn keepalives_go_on_while_the_agent_is_too_busy_to_take_updates() {
        in_private_netns(|| async {
            // The reflector's side: OPEN with a 3 s hold time (a KEEPALIVE
            // every second from the session), KEEPALIVE, then 40 UPDATEs;
            // the agent is "in a pass" until the test starts reading.
            let (mut peer, session, mut agent) = session_with_peer(3).await;
            let peer_codec = Codec::default();
            let updates = 40;
            for i in 0..updates {
                for m in codec::announce(
                    &peer_codec,
                    &Announce {
                        prefixes: vec![format!("203.0.113.{}/32", i + 1).parse().expect("net")],
                        next_hop: "10.0.0.2".parse().expect("ip"),
                        local_pref: 100,
                    },
                )
                .expect("update")
                {
                    peer.write_all(&m).await.expect("write");
                }
            }

            // 3.5 s with the agent taking nothing: the session must keep
            // its side of the hold time (and not close on ours either).
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
            read_until(&mut peer, &mut buf, &peer_codec, deadline, &mut got).await;
            let keepalives = got
                .iter()
                .filter(|m| matches!(m, Message::KeepAlive))
                .count();
            assert!(
                !got.iter().any(|m| matches!(m, Message::Notification(_))),
                "the session closed: {got:?}"
            );
            // One answers the OPEN; then one per second.
            assert!(keepalives >= 3, "{keepalives} KEEPALIVEs in 3.5 s: {got:?}");
            assert!(!session.is_finished());

            // The agent comes back: every UPDATE reaches it, in order.
            let mut seen = Vec::new();
            while seen.len() < updates {
                let cmd = tokio::time::timeout(Duration::from_secs(5), agent.rx.recv())
                    .await
                    .expect("the session hands over every UPDATE")
                    .expect("command");
                let Command::Rib(RibEvent::Update { announce, .. }) = cmd else {
                    panic!("unexpected command {cmd:?}");
                };
                seen.extend(announce.into_iter().map(|(p, _, _)| p.to_string()));
            }
            let want: Vec<String> = (1..=updates).map(|i| format!("203.0.113.{i}/32")).collect();
            assert_eq!(seen, want);
            session.abort();
        });
    }
}
