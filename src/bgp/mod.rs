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

/// Read-only view of every session's status.
#[derive(Clone, Default)]
pub struct BgpHandle {
    sessions: Vec<(
        watch::Receiver<SessionStatus>,
        Option<watch::Receiver<BfdStatus>>,
    )>,
}

impl BgpHandle {
    /// Every session with its BFD session.
    pub fn peers(&self) -> Vec<SessionStatus> {
        self.sessions
            .iter()
            .map(|(s, bfd)| {
                let mut s = s.borrow().clone();
                s.bfd = bfd.as_ref().map(|b| b.borrow().clone());
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
/// learned paths to its RIB. Returns the status handle.
pub fn start(config: Arc<Config>, agent: AgentHandle) -> BgpHandle {
    let mut handle = BgpHandle::default();
    if !config.bgp.enabled {
        return handle;
    }
    let mut listeners: BTreeMap<IpAddr, HashMap<IpAddr, mpsc::Sender<TcpStream>>> = BTreeMap::new();
    let specs = peer_specs(&config);
    // One BFD session per BGP session (issue 8).
    let mut bfd = bfd::io::start(
        &config,
        specs
            .iter()
            .map(|s| BfdPeer {
                name: s.name.clone(),
                local: s.local,
                remote: s.remote,
            })
            .collect(),
    );
    for spec in specs {
        let bfd = bfd.remove(&spec.name);
        let (tx, rx) = mpsc::channel(4);
        listeners
            .entry(spec.local)
            .or_default()
            .insert(spec.remote, tx);
        let (session, status) =
            session::Session::new(spec, config.clone(), agent.clone(), rx, bfd.clone());
        handle.sessions.push((status, bfd));
        tokio::spawn(session.run());
    }
    for (local, peers) in listeners {
        tokio::spawn(listen(
            local,
            config.bgp.port,
            config.bgp.gtsm,
            config.bgp.password.clone(),
            peers,
        ));
    }
    handle
}

/// Passive side: accepts connections on one uplink address and hands each
/// to the session of its remote address; others are closed. Binding is
/// retried until the address exists (the reconciler adds it).
async fn listen(
    local: IpAddr,
    port: u16,
    gtsm: bool,
    password: Option<String>,
    peers: HashMap<IpAddr, mpsc::Sender<TcpStream>>,
) {
    let remotes: Vec<IpAddr> = peers.keys().copied().collect();
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
            Ok((stream, from)) => match peers.get(&from.ip()) {
                Some(tx) => {
                    let _ = tx.try_send(stream);
                }
                None => tracing::debug!(%from, "bgp connection from an unknown peer closed"),
            },
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
