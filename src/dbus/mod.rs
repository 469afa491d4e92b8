//! The D-Bus API: bus name [`BUS_NAME`], object [`OBJECT_PATH`], interface
//! `net.l3hv.Agent1` (versioned: an incompatible change is `Agent2`).
//!
//! A thin mapping onto agent [`Command`]s, exactly like the control socket:
//! it holds no state. Its introspection XML is
//! `packaging/dbus/net.l3hv.Agent1.xml` (checked against the running service
//! by `tests/dbus.rs`), its bus policy `packaging/dbus/net.l3hv.Agent1.conf`.
//!
//! | member | signature | |
//! |---|---|---|
//! | `SetVm(name, interfaces)` | `ss` → `` | add or replace a VM; `interfaces` is the JSON array of `l3hv vm set` |
//! | `RemoveVm(name)` | `s` → `` | idempotent |
//! | `ListVms()` | → `s` | JSON array of VMs |
//! | `GetStatus()` | → `s` | JSON, as `l3hv status --json` |
//! | `Reconcile()` | → `s` | reconcile now; JSON report |
//! | signal `VmChanged(name, state)` | `ss` | `state`: `added`, `updated`, `removed` |
//!
//! Failures are named errors `net.l3hv.Error.{Invalid,NotFound,Kernel,
//! Internal,AccessDenied}` whose message says what is wrong. The mutating
//! methods are refused (AccessDenied) unless the caller is root or in
//! `[dbus] group`, on top of the bus policy.

pub mod client;
pub mod oneshot;

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{debug, info, warn};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, connection, interface};

use crate::agent::{AgentHandle, ApiError, Command};
use crate::config::DbusConfig;
use crate::intent::{Intent, InterfaceIntent, VmIntent};

pub const BUS_NAME: &str = "net.l3hv.Agent1";
pub const OBJECT_PATH: &str = "/net/l3hv/Agent";
pub const INTERFACE: &str = "net.l3hv.Agent1";

/// Longest JSON argument accepted.
pub const MAX_ARGUMENT: usize = 1 << 20;

/// Errors sent to D-Bus callers, named `net.l3hv.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "net.l3hv.Error")]
pub enum DbusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The request is wrong; nothing changed.
    Invalid(String),
    NotFound(String),
    /// Accepted and persisted, but the kernel refused part of it.
    Kernel(String),
    Internal(String),
    /// The caller may not call this method.
    AccessDenied(String),
}

impl From<ApiError> for DbusError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(m) => DbusError::Invalid(m),
            ApiError::NotFound(m) => DbusError::NotFound(m),
            ApiError::Kernel(m) => DbusError::Kernel(m),
            ApiError::Internal(m) => DbusError::Internal(m),
        }
    }
}

impl DbusError {
    /// The error a reply named `name` carries, when it is one of ours
    /// (`net.l3hv.Error.<Variant>`; an unknown variant is `Internal`);
    /// `None` for errors from anyone else (the bus, another service).
    pub fn from_reply(name: &str, message: String) -> Option<Self> {
        Some(match name.strip_prefix("net.l3hv.Error.")? {
            "Invalid" => DbusError::Invalid(message),
            "NotFound" => DbusError::NotFound(message),
            "Kernel" => DbusError::Kernel(message),
            "AccessDenied" => DbusError::AccessDenied(message),
            _ => DbusError::Internal(message),
        })
    }

    /// Back to the agent's error kinds (for the hook's verdict).
    pub fn into_api(self) -> ApiError {
        match self {
            DbusError::Invalid(m) => ApiError::Invalid(m),
            DbusError::NotFound(m) => ApiError::NotFound(m),
            DbusError::Kernel(m) => ApiError::Kernel(m),
            DbusError::Internal(m) => ApiError::Internal(m),
            DbusError::AccessDenied(m) => ApiError::Invalid(format!("access denied: {m}")),
            DbusError::ZBus(e) => ApiError::Internal(e.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbusServeError {
    #[error("d-bus ({bus}): {source}")]
    Connect { bus: String, source: zbus::Error },
}

/// The object served at [`OBJECT_PATH`].
pub struct AgentInterface {
    agent: AgentHandle,
    /// gid allowed to mutate besides root.
    group: Option<(String, Option<u32>)>,
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, DbusError> {
    serde_json::to_string(v).map_err(|e| DbusError::Internal(e.to_string()))
}

#[interface(name = "net.l3hv.Agent1")]
impl AgentInterface {
    /// Adds or replaces the VM `name`. `interfaces` is a JSON array of
    /// interfaces: `[{"name": "tap1", "mac": "52:54:00:00:00:01",
    /// "fabric": "public", "link": "tap", "ipv4": ["203.0.113.1"],
    /// "ipv6": [], "ipv6_prefixes": [], "routed": [{"prefix":
    /// "203.0.113.10/32", "via": "203.0.113.1"}]}]`.
    async fn set_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        interfaces: String,
    ) -> Result<(), DbusError> {
        self.authorize(&header, conn).await?;
        if interfaces.len() > MAX_ARGUMENT {
            return Err(DbusError::Invalid(format!(
                "interfaces: longer than {MAX_ARGUMENT} bytes"
            )));
        }
        let interfaces: Vec<InterfaceIntent> = serde_json::from_str(&interfaces)
            .map_err(|e| DbusError::Invalid(format!("interfaces: {e}")))?;
        let vm = VmIntent { name, interfaces };
        self.agent
            .call(|reply| Command::SetVm { vm, reply })
            .await??;
        Ok(())
    }

    /// Removes the VM `name`; removing an unknown VM succeeds.
    async fn remove_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), DbusError> {
        self.authorize(&header, conn).await?;
        self.agent
            .call(|reply| Command::RemoveVm { name, reply })
            .await??;
        Ok(())
    }

    /// The VMs and their interfaces, a JSON array.
    async fn list_vms(&self) -> Result<String, DbusError> {
        json(&self.agent.call(|reply| Command::ListVms { reply }).await?)
    }

    /// Interfaces, routes and the last reconcile, as JSON.
    async fn get_status(&self) -> Result<String, DbusError> {
        json(&self.agent.call(|reply| Command::Status { reply }).await?)
    }

    /// Reconciles the kernel now; the report as JSON.
    async fn reconcile(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, DbusError> {
        self.authorize(&header, conn).await?;
        json(
            &self
                .agent
                .call(|reply| Command::Reconcile { reply })
                .await?,
        )
    }

    /// A VM's intent changed: `state` is `added`, `updated` or `removed`.
    #[zbus(signal)]
    async fn vm_changed(emitter: &SignalEmitter<'_>, name: &str, state: &str) -> zbus::Result<()>;
}

impl AgentInterface {
    /// Root, or a member of the configured group.
    async fn authorize(&self, header: &Header<'_>, conn: &Connection) -> Result<(), DbusError> {
        let Some(sender) = header.sender() else {
            // A peer-to-peer connection: whoever reached the socket.
            return Ok(());
        };
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| DbusError::Internal(e.to_string()))?;
        let creds = dbus
            .get_connection_credentials(sender.clone().into())
            .await
            .map_err(|e| DbusError::Internal(format!("caller credentials: {e}")))?;
        let Some(uid) = creds.unix_user_id() else {
            return Err(DbusError::AccessDenied("caller has no unix user id".into()));
        };
        if uid == 0 {
            return Ok(());
        }
        if let Some((name, Some(gid))) = &self.group {
            let member = match creds.unix_group_ids() {
                Some(gids) => gids.contains(gid),
                None => groups_of(uid).contains(gid),
            };
            if member {
                return Ok(());
            }
            return Err(DbusError::AccessDenied(format!(
                "uid {uid} is neither root nor in group {name}"
            )));
        }
        Err(DbusError::AccessDenied(format!("uid {uid} is not root")))
    }
}

/// A group's gid (`getgrnam_r`).
fn gid_of(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed `group` is a valid out-parameter (plain pointers and
    // integers).
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is given.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// Every gid of a user (`getpwuid_r` + `getgrouplist`).
fn groups_of(uid: u32) -> Vec<u32> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed `passwd` is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is given.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Vec::new();
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: pw_name points into buf (alive); groups has room for n gids.
    let rc = unsafe { libc::getgrouplist(pw.pw_name, pw.pw_gid, groups.as_mut_ptr(), &mut n) };
    if rc < 0 {
        return vec![pw.pw_gid];
    }
    groups.truncate(n.max(0) as usize);
    groups
}

/// A connection builder for `bus`: `system`, `session` or an address.
pub fn builder(bus: &str) -> zbus::Result<connection::Builder<'static>> {
    Ok(match bus {
        "system" => connection::Builder::system(),
        "session" => connection::Builder::session(),
        address => connection::Builder::address(address.parse::<zbus::Address>()?),
    })
}

/// Connects to the bus, serves the interface and takes [`BUS_NAME`]; then
/// emits `VmChanged` as the agent's intent changes. The connection lives as
/// long as the returned value.
pub async fn serve(config: &DbusConfig, agent: AgentHandle) -> Result<Connection, DbusServeError> {
    let group = config.group.as_ref().map(|g| {
        let gid = gid_of(g);
        if gid.is_none() {
            warn!(group = %g, "dbus.group does not exist; only root may change intent");
        }
        (g.clone(), gid)
    });
    let intent = agent.subscribe_intent();
    let iface = AgentInterface { agent, group };
    let built = async {
        builder(&config.bus)?
            .serve_at(OBJECT_PATH, iface)
            .name(BUS_NAME)
            .build()
            .await
    };
    let conn = built.await.map_err(|source| DbusServeError::Connect {
        bus: config.bus.clone(),
        source,
    })?;
    info!(bus = %config.bus, name = BUS_NAME, "d-bus API ready");
    tokio::spawn(signal_changes(conn.clone(), intent));
    Ok(conn)
}

/// What changed between two intents, VM by VM.
pub fn changes(old: &Intent, new: &Intent) -> Vec<(String, &'static str)> {
    let mut out = BTreeMap::new();
    for (name, vm) in &new.vms {
        match old.vms.get(name) {
            None => {
                out.insert(name.clone(), "added");
            }
            Some(o) if o != vm => {
                out.insert(name.clone(), "updated");
            }
            Some(_) => {}
        }
    }
    for name in old.vms.keys() {
        if !new.vms.contains_key(name) {
            out.insert(name.clone(), "removed");
        }
    }
    out.into_iter().collect()
}

async fn signal_changes(conn: Connection, mut intent: tokio::sync::watch::Receiver<Arc<Intent>>) {
    let mut last = intent.borrow_and_update().clone();
    let emitter = match SignalEmitter::new(&conn, OBJECT_PATH) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot emit d-bus signals");
            return;
        }
    };
    while intent.changed().await.is_ok() {
        // The change's callers were answered just before the intent moved:
        // their replies (woken at the same moment) leave first; a signal
        // may lag, a `prepare` hook waiting behind it should not.
        tokio::task::yield_now().await;
        let now = intent.borrow_and_update().clone();
        for (name, state) in changes(&last, &now) {
            debug!(vm = %name, state, "VmChanged");
            if let Err(e) = AgentInterface::vm_changed(&emitter, &name, state).await {
                warn!(error = %e, "cannot emit VmChanged");
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names zbus gives our errors read back as the same errors.
    #[test]
    fn reply_names_read_back() {
        use zbus::DBusError as _;
        for e in [
            DbusError::Invalid("m".into()),
            DbusError::NotFound("m".into()),
            DbusError::Kernel("m".into()),
            DbusError::Internal("m".into()),
            DbusError::AccessDenied("m".into()),
        ] {
            let back = DbusError::from_reply(e.name().as_str(), "m".into()).expect("ours");
            assert_eq!(back.name(), e.name());
        }
        assert!(
            DbusError::from_reply("org.freedesktop.DBus.Error.ServiceUnknown", "x".into())
                .is_none()
        );
    }

    fn vm(name: &str, tap: &str) -> VmIntent {
        serde_json::from_str(&format!(
            r#"{{"name":"{name}","interfaces":[{{"name":"{tap}","mac":"52:54:00:00:00:01","fabric":"public"}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn changes_are_per_vm() {
        let mut a = Intent::default();
        a.vms.insert("x".into(), vm("x", "t1"));
        a.vms.insert("y".into(), vm("y", "t2"));
        let mut b = a.clone();
        b.vms.remove("x");
        b.vms.insert("y".into(), vm("y", "t3"));
        b.vms.insert("z".into(), vm("z", "t4"));
        assert_eq!(
            changes(&a, &b),
            vec![
                ("x".into(), "removed"),
                ("y".into(), "updated"),
                ("z".into(), "added")
            ]
        );
        assert!(changes(&b, &b).is_empty());
    }

    #[test]
    fn error_names_are_stable() {
        use zbus::DBusError as _;
        assert_eq!(
            DbusError::from(ApiError::Invalid("x".into()))
                .name()
                .as_str(),
            "net.l3hv.Error.Invalid"
        );
        assert_eq!(
            DbusError::NotFound("x".into()).name().as_str(),
            "net.l3hv.Error.NotFound"
        );
        assert_eq!(
            DbusError::Kernel("x".into()).name().as_str(),
            "net.l3hv.Error.Kernel"
        );
        assert_eq!(
            DbusError::Internal("x".into()).name().as_str(),
            "net.l3hv.Error.Internal"
        );
    }

    #[test]
    fn root_group_resolves() {
        assert_eq!(gid_of("root"), Some(0));
        assert_eq!(gid_of("no-such-group-l3hv"), None);
        assert!(groups_of(0).contains(&0));
    }
}
