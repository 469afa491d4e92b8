//! BFD sessions on tokio: one receive socket per local (uplink) address on
//! UDP 3784, demultiplexed by source address (RFC 5881 §3: one session per
//! peer and interface); one task and one send socket per session, from a
//! source port in 49152-65535 with TTL / hop limit 255. Only packets that
//! arrive with TTL 255 are accepted (RFC 5881 §5, GTSM).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::fsm::{Fsm, Snapshot, Timers, Transition};
use super::packet::{self, AuthKey, AuthType, Diag, State};
use crate::config::{BfdConfig, Config};
use crate::services::sockopt;

/// UDP port of single-hop BFD control packets (RFC 5881 §4).
pub const PORT: u16 = 3784;

/// What a BFD session is for: the BGP session of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdPeer {
    pub name: String,
    pub local: IpAddr,
    pub remote: IpAddr,
}

/// What `l3hv peers` shows of a BFD session.
#[derive(Debug, Clone, Serialize)]
pub struct BfdStatus {
    pub local: IpAddr,
    pub remote: IpAddr,
    pub state: State,
    pub diag: Diag,
    pub remote_state: State,
    pub remote_diag: Diag,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    /// Negotiated transmit interval; absent when the peer wants none.
    pub tx_interval_ms: Option<f64>,
    pub detection_time_ms: f64,
    pub remote_multiplier: u8,
    pub since_unix: u64,
    /// Resumed Up after an agent restart, not yet confirmed by the peer.
    pub resumed: bool,
    pub auth: Option<AuthType>,
    /// Always false: the sessions share the agent's fate (the C bit).
    pub control_plane_independent: bool,
    /// Transitions to Up.
    pub up_transitions: u64,
    /// Confirmed Up sessions that went down: what tears BGP down.
    pub failures: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub send_errors: u64,
    /// Dropped packets by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn timers(c: &BfdConfig) -> Timers {
    Timers {
        min_tx: c.min_tx,
        min_rx: c.min_rx,
        multiplier: c.multiplier,
    }
}

fn auth_key(c: &BfdConfig) -> Option<AuthKey> {
    let a = c.auth.as_ref()?;
    AuthKey::new(a.kind, a.key_id, a.key.as_bytes())
}

/// From the receive socket to a session.
#[derive(Debug)]
enum Rx {
    Packet(Vec<u8>),
    /// Dropped before the session could parse it (TTL, size).
    Dropped(&'static str),
}

/// The sessions that were Up, kept in `<state_dir>/bfd.json` so a
/// restarted agent resumes them (docs/bfd-and-graceful-restart.md).
struct Store {
    path: PathBuf,
    sessions: Mutex<BTreeMap<String, Snapshot>>,
}

impl Store {
    fn load(dir: &Path) -> Self {
        let path = dir.join("bfd.json");
        let sessions = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            sessions: Mutex::new(sessions),
        }
    }

    fn take(&self, name: &str) -> Option<Snapshot> {
        self.sessions.lock().ok()?.get(name).copied()
    }

    fn set(&self, name: &str, snap: Option<Snapshot>) {
        let Ok(mut m) = self.sessions.lock() else {
            return;
        };
        match snap {
            Some(s) => m.insert(name.to_string(), s),
            None => m.remove(name),
        };
        let Ok(bytes) = serde_json::to_vec_pretty(&*m) else {
            return;
        };
        let tmp = self.path.with_extension("json.tmp");
        let r = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            warn!(path = %self.path.display(), error = %e, "cannot save bfd sessions");
        }
    }
}

/// Demultiplexing of one local address: remote address → its session.
type Sessions = Arc<std::sync::Mutex<HashMap<IpAddr, mpsc::Sender<Rx>>>>;

/// The BFD sessions of the agent. Sessions come and go with the BGP
/// sessions they serve (a configuration reload), one receive task per
/// local address.
pub struct Bfd {
    store: Arc<Store>,
    receivers: BTreeMap<IpAddr, Sessions>,
    /// BFD's own thread: its timers must not wait behind the agent's
    /// passes or a burst of BGP updates on their thread (at 100 ms x 3
    /// that caused false failures of healthy paths under load).
    runtime: tokio::runtime::Handle,
}

/// Gives the calling thread (BFD's) a nice value of -10: its packets are
/// due every few tens of milliseconds and must not queue behind the
/// agent's passes or the VMs. Needs CAP_SYS_NICE (root without the
/// unit's bounding set, or `Nice=` on the service); without it the thread
/// keeps the process's priority.
fn raise_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10)
    };
    if r != 0 {
        debug!(error = %std::io::Error::last_os_error(), "bfd thread keeps the process priority");
    }
}

/// Starts the thread BFD runs on (a single-threaded tokio runtime).
fn bfd_runtime() -> tokio::runtime::Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("l3hv-bfd".into())
        .spawn(move || {
            raise_priority();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "no runtime for bfd");
                    return;
                }
            };
            let _ = tx.send(rt.handle().clone());
            rt.block_on(std::future::pending::<()>());
        });
    match spawned.ok().and_then(|_| rx.recv().ok()) {
        Some(h) => h,
        None => {
            // Timers on the agent's thread can wait behind a long pass:
            // false failures at short intervals. Better than no BFD.
            warn!("no thread of its own for bfd: it shares the agent's");
            tokio::runtime::Handle::current()
        }
    }
}

/// One running BFD session: its status, and what stops or retimes it.
pub struct BfdSession {
    pub status: watch::Receiver<BfdStatus>,
    config: watch::Sender<BfdConfig>,
    task: tokio::task::JoinHandle<()>,
    peer: BfdPeer,
}

impl BfdSession {
    /// New timers for a running session: a poll sequence when it is Up.
    /// (Authentication changes restart the session: see `bgp::Manager`.)
    pub fn retime(&self, cfg: &BfdConfig) {
        self.config.send_if_modified(|c| {
            let changed = c != cfg;
            *c = cfg.clone();
            changed
        });
    }
}

impl Bfd {
    pub fn new(config: &Config) -> Self {
        Self {
            store: Arc::new(Store::load(&config.hypervisor.state_dir)),
            receivers: BTreeMap::new(),
            runtime: bfd_runtime(),
        }
    }

    /// Starts the session of `peer` (resumed Up when the previous agent
    /// left it Up).
    pub fn add(&mut self, cfg: &BfdConfig, peer: BfdPeer) -> BfdSession {
        let (tx, rx) = mpsc::channel(64);
        let runtime = &self.runtime;
        let sessions = self.receivers.entry(peer.local).or_insert_with(|| {
            let sessions: Sessions = Arc::default();
            runtime.spawn(receive(peer.local, sessions.clone()));
            sessions
        });
        if let Ok(mut m) = sessions.lock() {
            m.insert(peer.remote, tx);
        }
        let now = Instant::now();
        let key = auth_key(cfg);
        // Meticulous SHA1 numbers every packet: a resumed session could
        // not continue the sequence, so it starts afresh.
        let resumable = cfg.auth.as_ref().is_none_or(|a| !a.kind.meticulous());
        let fsm = match self.store.take(&peer.name).filter(|_| resumable) {
            Some(s) => {
                info!(peer = %peer.name, disc = s.local_disc, "bfd session resumed up");
                Fsm::resume(s, timers(cfg), key, now)
            }
            None => Fsm::new(fastrand::u32(1..), timers(cfg), key, fastrand::u32(..), now),
        };
        let (status_tx, status_rx) = watch::channel(status_of(&peer, &fsm, cfg));
        let (config_tx, config_rx) = watch::channel(cfg.clone());
        let task = self.runtime.spawn(run_session(
            peer.clone(),
            fsm,
            rx,
            status_tx,
            config_rx,
            self.store.clone(),
        ));
        BfdSession {
            status: status_rx,
            config: config_tx,
            task,
            peer,
        }
    }

    /// Stops a session (its BGP session was removed or reconfigured); what
    /// it saved for a restart goes too.
    pub fn remove(&mut self, session: BfdSession) {
        session.task.abort();
        if let Some(sessions) = self.receivers.get(&session.peer.local) {
            if let Ok(mut m) = sessions.lock() {
                m.remove(&session.peer.remote);
            }
        }
        self.store.set(&session.peer.name, None);
    }
}

fn status_of(peer: &BfdPeer, f: &Fsm, cfg: &BfdConfig) -> BfdStatus {
    BfdStatus {
        local: peer.local,
        remote: peer.remote,
        state: f.state,
        diag: f.diag,
        remote_state: f.remote_state,
        remote_diag: f.remote_diag,
        local_discriminator: f.local_disc,
        remote_discriminator: f.remote_disc,
        tx_interval_ms: f.tx_interval().map(|d| d.as_secs_f64() * 1000.0),
        detection_time_ms: f.detection_time().as_secs_f64() * 1000.0,
        remote_multiplier: f.remote_multiplier(),
        since_unix: now_unix(),
        resumed: f.resumed,
        auth: cfg.auth.as_ref().map(|a| a.kind),
        control_plane_independent: false,
        up_transitions: 0,
        failures: 0,
        packets_in: 0,
        packets_out: 0,
        send_errors: 0,
        dropped: BTreeMap::new(),
    }
}

fn udp_socket(local: IpAddr) -> std::io::Result<Socket> {
    let domain = if local.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    // Bind before the reconciler has added the uplink address (or before
    // DAD has finished with it): packets flow as soon as it exists.
    if local.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    Ok(s)
}

/// The receive socket of one local address.
fn bind_receive(local: IpAddr) -> std::io::Result<UdpSocket> {
    let s = udp_socket(local)?;
    s.set_reuse_address(true)?;
    if local.is_ipv6() {
        sockopt::set_int(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            1,
        )?;
    } else {
        sockopt::set_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
    }
    s.bind(&SocketAddr::new(local, PORT).into())?;
    UdpSocket::from_std(s.into())
}

/// The send socket of one session: TTL 255, DSCP CS6 (network control),
/// a source port in 49152-65535 (RFC 5881 §4).
fn bind_send(local: IpAddr) -> std::io::Result<UdpSocket> {
    let mut last = None;
    for _ in 0..64 {
        let s = udp_socket(local)?;
        if local.is_ipv6() {
            s.set_unicast_hops_v6(255)?;
            s.set_tclass_v6(0xc0)?;
        } else {
            s.set_ttl_v4(255)?;
            s.set_tos_v4(0xc0)?;
        }
        let port = fastrand::u16(49152..=65535);
        match s.bind(&SocketAddr::new(local, port).into()) {
            Ok(()) => return UdpSocket::from_std(s.into()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free source port")))
}

/// Receives on `local`:3784 and hands each packet to its session.
async fn receive(local: IpAddr, sessions: Sessions) {
    let socket = loop {
        match bind_receive(local) {
            Ok(s) => break s,
            Err(e) => {
                warn!(%local, error = %e, "bfd receive socket not bound yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    debug!(%local, "bfd listening");
    let fd = socket.as_raw_fd();
    let mut buf = [0u8; packet::MAX_LEN + 1];
    let mut foreign = 0u64;
    loop {
        if let Err(e) = socket.readable().await {
            warn!(%local, error = %e, "bfd receive failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let got = if local.is_ipv6() {
            sockopt::recv_v6(fd, &mut buf)
                .map(|r| (r.len, r.truncated, IpAddr::V6(*r.from.ip()), r.hop_limit))
        } else {
            sockopt::recv_v4(fd, &mut buf)
                .map(|r| (r.len, r.truncated, IpAddr::V4(*r.from.ip()), r.ttl))
        };
        let (len, truncated, from, ttl) = match got {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Clear tokio's readiness so the next await waits.
                let _ = socket.try_recv(&mut []);
                continue;
            }
            Err(e) => {
                debug!(%local, error = %e, "bfd recvmsg");
                continue;
            }
        };
        let tx = sessions.lock().ok().and_then(|m| m.get(&from).cloned());
        let Some(tx) = tx else {
            foreign += 1;
            if foreign.is_power_of_two() {
                debug!(%local, %from, count = foreign, "bfd packet from no configured peer dropped");
            }
            continue;
        };
        // The session counts what is dropped for it.
        let msg = if truncated {
            Rx::Dropped("oversized")
        } else if ttl != Some(255) {
            Rx::Dropped("ttl")
        } else {
            Rx::Packet(buf[..len].to_vec())
        };
        let _ = tx.try_send(msg);
    }
}

async fn run_session(
    peer: BfdPeer,
    mut fsm: Fsm,
    mut rx: mpsc::Receiver<Rx>,
    status: watch::Sender<BfdStatus>,
    mut config: watch::Receiver<BfdConfig>,
    store: Arc<Store>,
) {
    let socket = loop {
        match bind_send(peer.local) {
            Ok(s) => break s,
            Err(e) => {
                warn!(peer = %peer.name, error = %e, "bfd send socket not bound yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let dst = SocketAddr::new(peer.remote, PORT);
    let mut warned = 0u64;
    loop {
        let deadline = tokio::time::Instant::from_std(fsm.next_deadline());
        let mut send_now = None;
        tokio::select! {
            p = rx.recv() => {
                let p = match p {
                    None => return,
                    Some(Rx::Packet(p)) => p,
                    Some(Rx::Dropped(why)) => {
                        status.send_modify(|s| *s.dropped.entry(why).or_default() += 1);
                        continue;
                    }
                };
                let now = Instant::now();
                match fsm.receive(&p, now) {
                    Ok(out) => {
                        status.send_modify(|s| s.packets_in += 1);
                        if let Some(t) = out.transition {
                            on_transition(&peer, &fsm, t, &status, &store);
                        }
                        if fsm.resumed != status.borrow().resumed {
                            status.send_modify(|s| s.resumed = fsm.resumed);
                        }
                        if out.send_now {
                            send_now = Some(out.fin);
                        }
                    }
                    Err(d) => {
                        warned += 1;
                        if warned.is_power_of_two() {
                            warn!(peer = %peer.name, reason = %d, count = warned, "bfd packet dropped");
                        }
                        status.send_modify(|s| *s.dropped.entry(d.kind()).or_default() += 1);
                    }
                }
            }
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                let cfg = config.borrow_and_update().clone();
                info!(peer = %peer.name, min_tx = ?cfg.min_tx, min_rx = ?cfg.min_rx, multiplier = cfg.multiplier, "bfd timers changed");
                fsm.reconfigure(timers(&cfg));
                send_now = Some(false);
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if let Some(t) = fsm.on_timer(now) {
                    on_transition(&peer, &fsm, t, &status, &store);
                    send_now = Some(false);
                } else if fsm.tx_due(now) {
                    send_now = Some(false);
                }
            }
        }
        if let Some(fin) = send_now {
            let bytes = fsm.transmit(Instant::now(), fin, fastrand::f64());
            let ok = socket.try_send_to(&bytes, dst).is_ok();
            status.send_modify(|s| {
                if ok {
                    s.packets_out += 1;
                } else {
                    s.send_errors += 1;
                }
                s.tx_interval_ms = fsm.tx_interval().map(|d| d.as_secs_f64() * 1000.0);
                s.detection_time_ms = fsm.detection_time().as_secs_f64() * 1000.0;
                s.remote_multiplier = fsm.remote_multiplier();
                s.remote_discriminator = fsm.remote_disc;
                s.remote_state = fsm.remote_state;
                s.resumed = fsm.resumed;
            });
        }
    }
}

fn on_transition(
    peer: &BfdPeer,
    fsm: &Fsm,
    t: Transition,
    status: &watch::Sender<BfdStatus>,
    store: &Store,
) {
    let confirmed_up = t.from == State::Up && !t.unconfirmed;
    if t.to == State::Up || t.from == State::Up {
        info!(peer = %peer.name, from = t.from.as_str(), to = t.to.as_str(), diag = ?t.diag, "bfd session");
    } else {
        debug!(peer = %peer.name, from = t.from.as_str(), to = t.to.as_str(), diag = ?t.diag, "bfd session");
    }
    status.send_modify(|s| {
        s.state = t.to;
        s.diag = t.diag;
        s.since_unix = now_unix();
        s.remote_state = fsm.remote_state;
        s.remote_diag = fsm.remote_diag;
        s.remote_discriminator = fsm.remote_disc;
        s.resumed = fsm.resumed;
        if t.to == State::Up {
            s.up_transitions += 1;
        }
        if confirmed_up {
            s.failures += 1;
        }
    });
    if t.to == State::Up {
        store.set(&peer.name, Some(fsm.snapshot()));
    } else if t.from == State::Up {
        store.set(&peer.name, None);
    }
}
