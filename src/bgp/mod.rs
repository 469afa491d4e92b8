//! The embedded BGP speaker: MP-BGP sessions to the route reflectors of
//! every fabric path. `codec` is the only user of the codec crate; `fsm`,
//! `policy` are pure; `session` does the I/O. Never touches the kernel: what
//! it learns goes to the RIB (issue 6), what it announces comes from intent.
pub mod codec;
pub mod fsm;
pub mod policy;
pub mod session;

use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;

use crate::agent::AgentHandle;
use crate::config::Config;
pub use session::SessionStatus;

/// Read-only view of every session's status.
#[derive(Clone, Default)]
pub struct BgpHandle {
    sessions: Vec<watch::Receiver<SessionStatus>>,
}

impl BgpHandle {
    pub fn peers(&self) -> Vec<SessionStatus> {
        self.sessions.iter().map(|s| s.borrow().clone()).collect()
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
    for spec in peer_specs(&config) {
        let (session, status) = session::Session::new(spec, config.clone(), agent.clone());
        handle.sessions.push(status);
        tokio::spawn(session.run());
    }
    handle
}
