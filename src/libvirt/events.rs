//! The agent's own libvirt connection: reconciles running domains when it
//! (re)connects and follows domain events, so VMs started while the agent
//! was down, crashed or destroyed domains (no hook runs for a crash seen
//! only by a restarted agent), hot-plugged NICs and metadata edits (which
//! fire no hook at all) all reach the agent.
//!
//! ```text
//!  libvirt event-loop thread ──callbacks──► DomainEvent ─mpsc─► follow() ──► Sink (agent)
//!  (virEventRunDefaultImpl)   (copy name,                       │  spawn_blocking: lookup,
//!                              never block)                     │  xml_desc, list_all_domains
//!                                                               └─ Closed → reconnect with backoff
//! ```
//!
//! Callbacks run on libvirt's event-loop thread and the domain pointer is
//! only valid during the callback: they copy what they need and send it over
//! a channel. Every libvirt call is blocking and runs in `spawn_blocking`.
//! Nothing here is on the hook's path: the hook never waits for libvirt.
//!
//! What this connection reads can be a moment older than what a hook just
//! did (a reconcile that listed a domain just before `virsh destroy`, say).
//! It converges: every stop is followed by a STOPPED event, which removes
//! the VM again.
//!
//! The connection is off by default (`[libvirt] enabled`); the agent's first
//! reconcile uses the persisted intent alone, so the agent is ready before
//! libvirtd starts.

use std::collections::BTreeSet;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::future::Future;
use std::sync::Once;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::sys;

use crate::agent::{AgentHandle, ApiError, Command};
use crate::config::LibvirtConfig;
use crate::intent::VmIntent;
use crate::libvirt::metadata;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt {uri}: {message}")]
    Libvirt { uri: String, message: String },
    #[error("libvirt event loop: {0}")]
    EventLoop(String),
}

/// Where decisions go: the agent, or a recorder in tests.
pub trait Sink: Clone + Send + Sync + 'static {
    /// Sets the VM, unless it was removed after [`Sink::removals`] gave
    /// `since`: what libvirt said of a domain before its hook released it
    /// is not set again (every set from libvirt goes through this).
    fn set_vm_unless_removed(
        &self,
        vm: VmIntent,
        since: u64,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// How many removals the agent has taken so far.
    fn removals(&self) -> impl Future<Output = Result<u64, ApiError>> + Send;
    fn remove_vm(&self, name: String) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn vm_names(&self) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send;
}

impl Sink for AgentHandle {
    async fn set_vm_unless_removed(&self, vm: VmIntent, since: u64) -> Result<(), ApiError> {
        self.call(|reply| Command::SetVmUnlessRemoved { vm, since, reply })
            .await?
    }
    async fn removals(&self) -> Result<u64, ApiError> {
        self.call(|reply| Command::Removals { reply }).await
    }
    async fn remove_vm(&self, name: String) -> Result<(), ApiError> {
        self.call(|reply| Command::RemoveVm { name, reply }).await?
    }
    async fn vm_names(&self) -> Result<Vec<String>, ApiError> {
        let vms = self.call(|reply| Command::ListVms { reply }).await?;
        Ok(vms.into_iter().map(|v| v.name).collect())
    }
}

/// What a libvirt callback reports, copied out of the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    /// `virDomainEventType` and its detail.
    Lifecycle {
        domain: String,
        event: i32,
        detail: i32,
    },
    DeviceAdded {
        domain: String,
        alias: String,
    },
    DeviceRemoved {
        domain: String,
        alias: String,
    },
    MetadataChanged {
        domain: String,
    },
    /// The connection closed (libvirtd stopped, keepalive timeout).
    Closed {
        reason: i32,
    },
}

/// PURE: what an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Read the domain's live XML and set (or remove) the VM.
    Refresh(String),
    /// The domain stopped: remove its VM if it is l3hv's.
    Stopped(String),
    Reconnect,
    Nothing,
}

pub fn need(event: &DomainEvent) -> Need {
    match event {
        DomainEvent::Lifecycle { domain, event, .. } => match *event as u32 {
            sys::VIR_DOMAIN_EVENT_STARTED | sys::VIR_DOMAIN_EVENT_RESUMED => {
                Need::Refresh(domain.clone())
            }
            sys::VIR_DOMAIN_EVENT_STOPPED => Need::Stopped(domain.clone()),
            _ => Need::Nothing,
        },
        DomainEvent::DeviceAdded { domain, .. }
        | DomainEvent::DeviceRemoved { domain, .. }
        | DomainEvent::MetadataChanged { domain } => Need::Refresh(domain.clone()),
        DomainEvent::Closed { .. } => Need::Reconnect,
    }
}

// ------------------------------------------------------------ event loop --

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on its own thread,
/// once per process. Must run before the first `Connect::open`.
pub fn start_event_loop() -> Result<(), LibvirtError> {
    let mut result = Ok(());
    EVENT_LOOP.call_once(|| {
        // libvirt prints every error on stderr by default; ours are
        // returned and logged once.
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            result = Err(LibvirtError::EventLoop(e.to_string()));
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        warn!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            result = Err(LibvirtError::EventLoop(e.to_string()));
        }
    });
    result
}

type Tx = mpsc::UnboundedSender<DomainEvent>;

/// Copies a C string libvirt owns.
///
/// # Safety
/// `p` is null or a valid NUL-terminated string for the duration of the call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and valid per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// # Safety
/// `dom` is the valid domain pointer libvirt passes to a callback.
unsafe fn domain_name(dom: sys::virDomainPtr) -> String {
    // SAFETY: dom is valid during the callback; the name it returns lives
    // as long as dom.
    unsafe { c_string(sys::virDomainGetName(dom)) }
}

/// # Safety
/// `opaque` is the `Box<Tx>` pointer given at registration, not yet freed.
unsafe fn send(opaque: *mut c_void, event: DomainEvent) {
    // SAFETY: per the contract, opaque points to a live Tx.
    let tx = unsafe { &*(opaque as *const Tx) };
    let _ = tx.send(event);
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes a valid dom and our opaque during the callback.
    unsafe {
        let domain = domain_name(dom);
        send(
            opaque,
            DomainEvent::Lifecycle {
                domain,
                event,
                detail,
            },
        );
    }
    0
}

unsafe extern "C" fn on_device_added(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: libvirt passes valid pointers during the callback.
    unsafe {
        let domain = domain_name(dom);
        let alias = c_string(alias);
        send(opaque, DomainEvent::DeviceAdded { domain, alias });
    }
}

unsafe extern "C" fn on_device_removed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: libvirt passes valid pointers during the callback.
    unsafe {
        let domain = domain_name(dom);
        let alias = c_string(alias);
        send(opaque, DomainEvent::DeviceRemoved { domain, alias });
    }
}

unsafe extern "C" fn on_metadata(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    _nsuri: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: libvirt passes valid pointers during the callback.
    unsafe {
        let domain = domain_name(dom);
        send(opaque, DomainEvent::MetadataChanged { domain });
    }
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: our opaque, valid until on_free.
    unsafe { send(opaque, DomainEvent::Closed { reason }) };
}

unsafe extern "C" fn on_free(opaque: *mut c_void) {
    // SAFETY: libvirt calls this once, when the callback is gone; opaque is
    // the Box<Tx> leaked at registration.
    drop(unsafe { Box::from_raw(opaque as *mut Tx) });
}

fn opaque(tx: &Tx) -> *mut c_void {
    Box::into_raw(Box::new(tx.clone())) as *mut c_void
}

/// A libvirt connection with our callbacks registered; deregisters them on
/// drop.
pub struct Watch {
    conn: Connect,
    ids: Vec<c_int>,
    close_registered: bool,
}

fn last_error(uri: &str) -> LibvirtError {
    LibvirtError::Libvirt {
        uri: uri.to_string(),
        message: virt::error::Error::last_error().to_string(),
    }
}

impl Watch {
    /// Opens `uri` and registers lifecycle, device and metadata callbacks
    /// plus a close callback, all feeding `tx`. Blocking.
    pub fn open(uri: &str, tx: &Tx) -> Result<Self, LibvirtError> {
        start_event_loop()?;
        let conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Libvirt {
            uri: uri.to_string(),
            message: e.to_string(),
        })?;
        let mut watch = Watch {
            conn,
            ids: Vec::new(),
            close_registered: false,
        };
        // SAFETY: each callback is cast to the generic callback type, as
        // libvirt's API requires; libvirt calls it back with the signature
        // that belongs to its event id (libvirt-domain.h), which is the one
        // each function has. `opaque` is a leaked Box<Tx> that libvirt hands
        // to `on_free` exactly once. The connection pointer is valid while
        // `watch.conn` lives.
        unsafe {
            let callbacks: [(u32, sys::virConnectDomainEventGenericCallback); 4] = [
                (
                    sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            c_int,
                            c_int,
                            *mut c_void,
                        ) -> c_int,
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(on_lifecycle)),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            *const c_char,
                            *mut c_void,
                        ),
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(on_device_added)),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            *const c_char,
                            *mut c_void,
                        ),
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(on_device_removed)),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                    Some(std::mem::transmute::<
                        unsafe extern "C" fn(
                            sys::virConnectPtr,
                            sys::virDomainPtr,
                            c_int,
                            *const c_char,
                            *mut c_void,
                        ),
                        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    >(on_metadata)),
                ),
            ];
            for (id, cb) in callbacks {
                let data = opaque(tx);
                let rc = sys::virConnectDomainEventRegisterAny(
                    watch.conn.as_ptr(),
                    std::ptr::null_mut(),
                    id as c_int,
                    cb,
                    data,
                    Some(on_free),
                );
                if rc < 0 {
                    // Not registered: libvirt did not take the data.
                    on_free(data);
                    return Err(last_error(uri));
                }
                watch.ids.push(rc);
            }
            let data = opaque(tx);
            let rc = sys::virConnectRegisterCloseCallback(
                watch.conn.as_ptr(),
                Some(on_close),
                data,
                Some(on_free),
            );
            if rc < 0 {
                // Some drivers (test://) have no close callback; events
                // still work.
                on_free(data);
                debug!(uri, "no close callback on this connection");
            } else {
                watch.close_registered = true;
            }
        }
        Ok(watch)
    }

    pub fn connect(&self) -> &Connect {
        &self.conn
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: the connection is alive; ids came from this connection.
        // Failures (a dead connection) are harmless: closing frees them.
        unsafe {
            for id in self.ids.drain(..) {
                sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id);
            }
            if self.close_registered {
                sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close));
            }
        }
    }
}

// ------------------------------------------------------------- following --

/// What the live XML of a domain says.
#[derive(Debug)]
enum Lookup {
    /// Running, with l3hv metadata.
    Ours(VmIntent),
    /// Running without l3hv metadata.
    NotOurs,
    /// Not running; `ours` tells whether its configuration has l3hv metadata.
    Inactive {
        ours: bool,
    },
    /// No such domain (a transient domain that stopped).
    Gone,
    Error(String),
}

fn no_domain(e: &virt::error::Error) -> bool {
    e.code()
        .is_known_and(|c| c == virt::error::ErrorNumber::NoDomain)
}

fn lookup(conn: &Connect, name: &str) -> Lookup {
    let dom = match conn.lookup_domain_by_name(name) {
        Ok(d) => d,
        Err(e) if no_domain(&e) => return Lookup::Gone,
        Err(e) => return Lookup::Error(e.to_string()),
    };
    let active = match dom.is_active() {
        Ok(a) => a,
        Err(e) => return Lookup::Error(e.to_string()),
    };
    let xml = match dom.xml_desc(0) {
        Ok(x) => x,
        Err(e) if no_domain(&e) => return Lookup::Gone,
        Err(e) => return Lookup::Error(e.to_string()),
    };
    match (active, metadata::parse(&xml)) {
        (true, Ok(Some(vm))) => Lookup::Ours(vm),
        (true, Ok(None)) => Lookup::NotOurs,
        (false, Ok(m)) => Lookup::Inactive { ours: m.is_some() },
        (false, Err(_)) => Lookup::Inactive { ours: true },
        (true, Err(e)) => Lookup::Error(e.to_string()),
    }
}

/// What [`scan`] found.
#[derive(Debug, Default)]
struct Scan {
    /// Running domains with l3hv metadata.
    running: Vec<VmIntent>,
    /// Defined, not running, with l3hv metadata.
    inactive: Vec<String>,
    /// Running domains whose metadata is wrong.
    errors: Vec<String>,
}

fn scan(conn: &Connect) -> Result<Scan, String> {
    let mut ours = Vec::new();
    let mut inactive = Vec::new();
    let mut errors = Vec::new();
    let doms = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(|e| e.to_string())?;
    for d in doms {
        let name = d.name().unwrap_or_default();
        match d.xml_desc(0).map(|x| metadata::parse(&x)) {
            Ok(Ok(Some(vm))) => ours.push(vm),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("domain {name}: {e}")),
        }
    }
    let doms = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)
        .map_err(|e| e.to_string())?;
    for d in doms {
        if let (Ok(name), Ok(xml)) = (d.name(), d.xml_desc(0))
            && !matches!(metadata::parse(&xml), Ok(None))
        {
            inactive.push(name);
        }
    }
    Ok(Scan {
        running: ours,
        inactive,
        errors,
    })
}

/// Follows `uri` forever: connect, reconcile, apply events; reconnect with
/// a doubling backoff (1s up to `reconnect_max`) when the connection fails.
pub async fn run<S: Sink>(config: LibvirtConfig, sink: S) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let uri = config.uri.clone();
        let opened = tokio::task::spawn_blocking(move || Watch::open(&uri, &tx)).await;
        let watch = match opened {
            Ok(Ok(w)) => std::sync::Arc::new(w),
            Ok(Err(e)) => {
                warn!(error = %e, retry_in = ?backoff, "cannot connect to libvirt");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.reconnect_max);
                continue;
            }
            Err(e) => {
                warn!(error = %e, "libvirt connect task failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        info!(uri = %config.uri, "connected to libvirt");
        let mut ours = BTreeSet::new();
        if let Err(e) = reconcile(&watch, &sink, &mut ours).await {
            warn!(error = %e, "libvirt reconcile failed; reconnecting");
            drop_blocking(watch).await;
            continue;
        }
        follow(&watch, &sink, &mut rx, &mut ours).await;
        warn!(uri = %config.uri, "libvirt connection closed; reconnecting");
        drop_blocking(watch).await;
    }
}

async fn drop_blocking(watch: std::sync::Arc<Watch>) {
    let _ = tokio::task::spawn_blocking(move || drop(watch)).await;
}

/// Sets every running l3hv domain, and removes the VMs of domains that are
/// defined but no longer run (stopped while nobody watched).
pub async fn reconcile<S: Sink>(
    watch: &std::sync::Arc<Watch>,
    sink: &S,
    ours: &mut BTreeSet<String>,
) -> Result<(), String> {
    // Counted before the scan: a domain listed running and released by
    // its hook before its VM is set here (`virsh destroy` during a
    // reconnect) is not brought back.
    let since = sink.removals().await.map_err(|e| e.to_string())?;
    let w = watch.clone();
    let Scan {
        running,
        inactive,
        errors,
    } = tokio::task::spawn_blocking(move || scan(w.connect()))
        .await
        .map_err(|e| e.to_string())??;
    for e in errors {
        warn!(error = %e, "domain metadata");
    }
    let known: BTreeSet<String> = sink
        .vm_names()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let count = running.len();
    for vm in running {
        let name = vm.name.clone();
        ours.insert(name.clone());
        if vm.interfaces.is_empty() {
            continue;
        }
        if let Err(e) = sink.set_vm_unless_removed(vm, since).await {
            warn!(vm = %name, error = %e, "agent refused a running domain");
        }
    }
    for name in inactive {
        if known.contains(&name) && !ours.contains(&name) {
            info!(vm = %name, "domain stopped while unwatched; removing");
            if let Err(e) = sink.remove_vm(name.clone()).await {
                warn!(vm = %name, error = %e, "remove failed");
            }
        }
    }
    info!(running = count, "libvirt reconcile done");
    Ok(())
}

/// Applies events until the connection closes.
pub async fn follow<S: Sink>(
    watch: &std::sync::Arc<Watch>,
    sink: &S,
    rx: &mut mpsc::UnboundedReceiver<DomainEvent>,
    ours: &mut BTreeSet<String>,
) {
    let mut alive = tokio::time::interval(Duration::from_secs(5));
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
            _ = alive.tick() => {
                // Drivers without a close callback: poll liveness.
                let w = watch.clone();
                let ok = tokio::task::spawn_blocking(move || w.connect().is_alive().unwrap_or(false))
                    .await
                    .unwrap_or(false);
                if !ok {
                    return;
                }
                continue;
            }
        };
        debug!(?event, "libvirt event");
        match need(&event) {
            Need::Nothing => {}
            Need::Reconnect => return,
            Need::Refresh(name) => {
                // Counted before the domain's XML is read, as in
                // `reconcile`: a domain whose hook released it after the
                // read (`virsh destroy` right after a hot-plug or a
                // metadata change) is not set again from that XML.
                let since = match sink.removals().await {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(vm = %name, error = %e, "agent unreachable; event dropped");
                        continue;
                    }
                };
                let w = watch.clone();
                let n = name.clone();
                let found = tokio::task::spawn_blocking(move || lookup(w.connect(), &n))
                    .await
                    .unwrap_or_else(|e| Lookup::Error(e.to_string()));
                on_lookup(sink, ours, &name, found, since).await;
            }
            Need::Stopped(name) => {
                let w = watch.clone();
                let n = name.clone();
                let found = tokio::task::spawn_blocking(move || lookup(w.connect(), &n))
                    .await
                    .unwrap_or_else(|e| Lookup::Error(e.to_string()));
                let remove = ours.remove(&name) || matches!(found, Lookup::Inactive { ours: true });
                if remove {
                    info!(vm = %name, "domain stopped; removing");
                    if let Err(e) = sink.remove_vm(name.clone()).await {
                        warn!(vm = %name, error = %e, "remove failed");
                    }
                }
            }
        }
    }
}

/// Applies what a lookup of `name` found; `since`: the agent's removal
/// count before the lookup ([`Sink::set_vm_unless_removed`]).
async fn on_lookup<S: Sink>(
    sink: &S,
    ours: &mut BTreeSet<String>,
    name: &str,
    found: Lookup,
    since: u64,
) {
    match found {
        Lookup::Ours(vm) if vm.interfaces.is_empty() => {
            if ours.remove(name) {
                let _ = sink.remove_vm(name.to_string()).await;
            }
        }
        Lookup::Ours(vm) => {
            ours.insert(name.to_string());
            if let Err(e) = sink.set_vm_unless_removed(vm, since).await {
                warn!(vm = %name, error = %e, "agent refused the domain's intent");
            }
        }
        Lookup::NotOurs => {
            // Metadata removed from a running domain.
            if ours.remove(name) {
                let _ = sink.remove_vm(name.to_string()).await;
            }
        }
        Lookup::Inactive { .. } | Lookup::Gone => {}
        Lookup::Error(e) => warn!(vm = %name, error = %e, "cannot read domain"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_map_to_needs() {
        let l = |event: u32| DomainEvent::Lifecycle {
            domain: "d".into(),
            event: event as i32,
            detail: 0,
        };
        assert_eq!(
            need(&l(sys::VIR_DOMAIN_EVENT_STARTED)),
            Need::Refresh("d".into())
        );
        assert_eq!(
            need(&l(sys::VIR_DOMAIN_EVENT_STOPPED)),
            Need::Stopped("d".into())
        );
        assert_eq!(need(&l(sys::VIR_DOMAIN_EVENT_DEFINED)), Need::Nothing);
        assert_eq!(need(&l(sys::VIR_DOMAIN_EVENT_SUSPENDED)), Need::Nothing);
        assert_eq!(
            need(&DomainEvent::MetadataChanged { domain: "d".into() }),
            Need::Refresh("d".into())
        );
        assert_eq!(
            need(&DomainEvent::DeviceRemoved {
                domain: "d".into(),
                alias: "net1".into()
            }),
            Need::Refresh("d".into())
        );
        assert_eq!(need(&DomainEvent::Closed { reason: 1 }), Need::Reconnect);
    }
}
