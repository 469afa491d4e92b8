//! The embedded BGP speaker: MP-BGP sessions to the route reflectors of
//! every fabric path. `codec` is the only user of the codec crate; `fsm`,
//! `policy` are pure; `session` does the I/O. Never touches the kernel: what
//! it learns goes to the RIB (issue 6), what it announces comes from intent.
pub mod codec;
pub mod fsm;
pub mod policy;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use ipnet::IpNet;
use tokio::sync::watch;

use crate::agent::AgentHandle;
use crate::bfd::{self, BfdPeer, BfdStatus};
use crate::config::Config;
pub use session::SessionStatus;

/// Read-only view of every session's status (and its BFD session's).
#[derive(Clone, Default)]
pub struct BgpHandle {
    sessions: Arc<std::sync::RwLock<BTreeMap<String, Entry>>>,
}

#[derive(Clone)]
struct Entry {
    status: watch::Receiver<SessionStatus>,
    bfd: Option<watch::Receiver<BfdStatus>>,
}

impl BgpHandle {
    /// Every session with its BFD session.
    pub fn peers(&self) -> Vec<SessionStatus> {
        let Ok(sessions) = self.sessions.read() else {
            return Vec::new();
        };
        sessions
            .values()
            .map(|e| {
                let mut s = e.status.borrow().clone();
                s.bfd = e.bfd.as_ref().map(|b| b.borrow().clone());
                s
            })
            .collect()
    }
}

/// The sessions the configuration asks for: one per reflector of each
/// fabric path, from the uplink address of the reflector's family.
pub fn peer_specs(config: &Config) -> Vec<session::PeerSpec> {
    let mut out = Vec::new();
    for u in config.uplinks() {
        let addrs = &u.config.addresses;
        let pick = |v6: bool| {
            addrs
                .iter()
                .find(|a| a.addr().is_ipv6() == v6)
                .map(IpNet::addr)
        };
        for r in &u.config.reflectors {
            let local = addrs
                .iter()
                .find(|a| a.contains(r))
                .or_else(|| addrs.iter().find(|a| a.addr().is_ipv6() == r.is_ipv6()))
                .map(IpNet::addr);
            let Some(local) = local else { continue };
            out.push(session::PeerSpec {
                name: format!("{}-{}-{}", u.fabric, u.path, r),
                fabric: u.fabric.to_string(),
                path: u.path.to_string(),
                local,
                remote: *r,
                uplink: u.config.interface.clone(),
                next_hop_v4: pick(false),
                next_hop_v6: pick(true),
                uplink_addresses: addrs.clone(),
            });
        }
    }
    out
}

/// Starts every session; they follow the agent's intent (export) and hand
/// learned paths to its RIB, and the agent's configuration: a reload
/// starts, stops or restarts only the sessions whose configuration
/// changed. Returns the status handle.
pub fn start(config: Arc<Config>, agent: AgentHandle) -> BgpHandle {
    let handle = BgpHandle::default();
    if !config.bgp.enabled {
        return handle;
    }
    let mut manager = Manager {
        running: BTreeMap::new(),
        listeners: BTreeMap::new(),
        bfd: bfd::io::Bfd::new(&config),
        handle: handle.clone(),
        agent: agent.clone(),
    };
    let mut configs = agent.subscribe_config();
    tokio::spawn(async move {
        manager.apply(&config).await;
        while configs.changed().await.is_ok() {
            let c = configs.borrow_and_update().clone();
            manager.apply(&c).await;
        }
    });
    handle
}

/// What a running session was started with: a difference restarts it.
/// BFD timers are not part of it (a running BFD session is retimed by a
/// poll sequence); whether BFD runs and its authentication are.
#[derive(Debug, Clone, PartialEq)]
struct SessionConfig {
    spec: session::PeerSpec,
    bgp: crate::config::BgpConfig,
    router_id: std::net::Ipv4Addr,
    asn: u32,
    bfd: Option<Option<crate::config::BfdAuthConfig>>,
}

struct Running {
    config: SessionConfig,
    stop: watch::Sender<Option<codec::Notification>>,
    task: tokio::task::JoinHandle<()>,
    bfd: Option<bfd::io::BfdSession>,
}

/// Passive-side demultiplexing of one local address: remote → session.
type Accepts = Arc<std::sync::Mutex<HashMap<IpAddr, mpsc::Sender<TcpStream>>>>;

struct Manager {
    running: BTreeMap<String, Running>,
    listeners: BTreeMap<IpAddr, Accepts>,
    bfd: bfd::io::Bfd,
    handle: BgpHandle,
    agent: AgentHandle,
}

impl Manager {
    async fn apply(&mut self, config: &Arc<Config>) {
        let wanted: BTreeMap<String, SessionConfig> = peer_specs(config)
            .into_iter()
            .map(|spec| {
                (
                    spec.name.clone(),
                    SessionConfig {
                        spec,
                        bgp: config.bgp.clone(),
                        router_id: config.hypervisor.router_id,
                        asn: config.hypervisor.asn,
                        bfd: config.bfd.enabled.then(|| config.bfd.auth.clone()),
                    },
                )
            })
            .collect();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            let same = wanted.get(&name) == self.running.get(&name).map(|r| &r.config);
            if same {
                // BFD timers follow at once (a poll sequence).
                if let Some(b) = self.running.get(&name).and_then(|r| r.bfd.as_ref()) {
                    b.retime(&config.bfd);
                }
                continue;
            }
            let Some(r) = self.running.remove(&name) else {
                continue;
            };
            // RFC 4486: 6/3 Peer De-configured, 6/6 Other Configuration
            // Change.
            let (subcode, what) = if wanted.contains_key(&name) {
                (6, "reconfigured")
            } else {
                (3, "removed")
            };
            tracing::info!(peer = %name, "bgp session {what}: stopping it");
            self.stop(r, codec::Notification::new(6, subcode, vec![]))
                .await;
        }
        for (name, sc) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            self.launch(config, sc);
        }
    }

    async fn stop(&mut self, r: Running, why: codec::Notification) {
        let spec = &r.config.spec;
        if let Some(accepts) = self.listeners.get(&spec.local) {
            if let Ok(mut m) = accepts.lock() {
                m.remove(&spec.remote);
            }
        }
        if let Ok(mut m) = self.handle.sessions.write() {
            m.remove(&spec.name);
        }
        let _ = r.stop.send(Some(why));
        // The session withdraws its paths from the RIB before it ends; a
        // new one of the same name must not start before that.
        let mut task = r.task;
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
            self.agent
                .rib(crate::rib::RibEvent::SessionDown {
                    session: Arc::from(spec.name.as_str()),
                })
                .await;
        }
        if let Some(b) = r.bfd {
            self.bfd.remove(b);
        }
    }

    fn launch(&mut self, config: &Arc<Config>, sc: SessionConfig) {
        let spec = sc.spec.clone();
        let bfd = config.bfd.enabled.then(|| {
            self.bfd.add(
                &config.bfd,
                BfdPeer {
                    name: spec.name.clone(),
                    local: spec.local,
                    remote: spec.remote,
                },
            )
        });
        let (tx, rx) = mpsc::channel(4);
        let accepts = self.listeners.entry(spec.local).or_insert_with(|| {
            let accepts: Accepts = Arc::default();
            tokio::spawn(listen(
                spec.local,
                config.bgp.port,
                config.bgp.gtsm,
                config.bgp.password.clone(),
                accepts.clone(),
            ));
            accepts
        });
        if let Ok(mut m) = accepts.lock() {
            m.insert(spec.remote, tx);
        }
        let (stop, stop_rx) = watch::channel(None);
        let bfd_status = bfd.as_ref().map(|b| b.status.clone());
        let (session, status) = session::Session::new(
            spec.clone(),
            config.clone(),
            self.agent.clone(),
            rx,
            bfd_status.clone(),
            stop_rx,
        );
        if let Ok(mut m) = self.handle.sessions.write() {
            m.insert(
                spec.name.clone(),
                Entry {
                    status,
                    bfd: bfd_status,
                },
            );
        }
        let task = tokio::spawn(session.run());
        self.running.insert(
            spec.name.clone(),
            Running {
                config: sc,
                stop,
                task,
                bfd,
            },
        );
    }
}

/// Passive side: accepts connections on one uplink address and hands each
/// to the session of its remote address; others are closed. Binding is
/// retried until the address exists (the reconciler adds it).
async fn listen(local: IpAddr, port: u16, gtsm: bool, password: Option<String>, peers: Accepts) {
    let remotes: Vec<IpAddr> = peers
        .lock()
        .map(|m| m.keys().copied().collect())
        .unwrap_or_default();
    let listener = loop {
        match bind(local, port, gtsm, password.as_deref(), &remotes) {
            Ok(l) => break l,
            Err(e) => {
                tracing::debug!(%local, error = %e, "bgp listener not bound yet");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!(%local, port, "bgp listening");
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                // As on the active side: an UPDATE must not wait behind
                // an unacknowledged segment (Nagle), whichever side won
                // the connection collision.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%from, error = %e, "TCP_NODELAY");
                }
                match peers.lock().ok().and_then(|m| m.get(&from.ip()).cloned()) {
                    Some(tx) => {
                        let _ = tx.try_send(stream);
                    }
                    None => tracing::debug!(%from, "bgp connection from an unknown peer closed"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "bgp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

fn bind(
    local: IpAddr,
    port: u16,
    gtsm: bool,
    password: Option<&str>,
    remotes: &[IpAddr],
) -> std::io::Result<TcpListener> {
    let socket = match local {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if gtsm {
        // Accepted sockets inherit TTL 255 and the minimum TTL.
        session::gtsm(&socket, local.is_ipv6())?;
    }
    if let Some(key) = password {
        for r in remotes {
            session::md5(&socket, *r, key.as_bytes())?;
        }
    }
    socket.bind(SocketAddr::new(local, port))?;
    socket.listen(16)
}
