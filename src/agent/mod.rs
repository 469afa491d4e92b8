//! The agent: the one task that owns the intent, the kernel reconciler and
//! the status. Everything else talks to it with [`Command`]s.
//!
//! ```text
//!  control socket ──┐            ┌──────────── Agent (one task) ────────────┐
//!  (later: D-Bus,   ├─ Command ─►│ intent ─► Store (persist)                 │
//!   hook, libvirt)  ┘   mpsc     │   └──► desired ─► plan ─► netlink apply ──┼─► kernel
//!                                │ timer ─► reconcile (level-based repair)   │
//!                  ◄── reply ────│ status (last report, per-interface state) │
//!                     oneshot    └───────────────────────────────────────────┘
//! ```
//!
//! Commands that arrive together are applied together: the intent changes,
//! is persisted once, and one reconcile serves them all. No timer sits
//! between a command and the kernel.

pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::intent::store::{Store, StoreError};
use crate::intent::{Intent, IntentError, VmIntent};
use crate::netlink::{Kernel, NetlinkError, apply::ApplyReport, sysctl};
use crate::reconcile::{self, KernelOp};
pub use status::{ReconcileReport, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// An error returned to an API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum ApiError {
    /// The request itself is wrong; nothing changed.
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The intent was accepted and persisted, but the kernel refused part of
    /// it; the agent keeps retrying.
    #[error("kernel: {0}")]
    Kernel(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<IntentError> for ApiError {
    fn from(e: IntentError) -> Self {
        match e {
            IntentError::UnknownVm(_) => ApiError::NotFound(e.to_string()),
            _ => ApiError::Invalid(e.to_string()),
        }
    }
}

/// Where the verdict of an intent change goes.
type Reply = oneshot::Sender<Result<(), ApiError>>;

/// What the API can ask of the agent.
#[derive(Debug)]
pub enum Command {
    /// Add or replace a VM's interfaces.
    SetVm {
        vm: VmIntent,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Remove a VM (idempotent: an unknown VM is not an error).
    RemoveVm {
        name: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    ListVms {
        reply: oneshot::Sender<Vec<VmIntent>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// Reconcile now and report.
    Reconcile {
        reply: oneshot::Sender<ReconcileReport>,
    },
}

/// A cheap handle for sending commands to the agent.
#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::Sender<Command>,
    intent: watch::Receiver<Arc<Intent>>,
}

impl AgentHandle {
    /// A read-only view of the intent, updated after every change is
    /// persisted. Services that serve VMs (DHCP, RA) follow it; they never
    /// write intent.
    pub fn subscribe_intent(&self) -> watch::Receiver<Arc<Intent>> {
        self.intent.clone()
    }

    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ApiError::Internal("agent stopped".into()))?;
        rx.await
            .map_err(|_| ApiError::Internal("agent dropped the request".into()))
    }
}

pub struct Agent {
    config: Config,
    store: Store,
    intent: Intent,
    kernel: Kernel,
    /// ifindex of each VM link whose sysctls were last confirmed.
    verified: BTreeMap<String, u32>,
    last: Option<ReconcileReport>,
    /// Link deletions planned by the last pass, applied after its callers
    /// got their answer: deleting a netdev waits for RCU grace periods
    /// (12-58 ms here) and must stay off the hook's path. The VM's routes
    /// and addresses are already gone by then; the next command waits
    /// behind this, so a re-created tap of the same name is never raced.
    deferred: Vec<KernelOp>,
    started: SystemTime,
    rx: mpsc::Receiver<Command>,
    published: watch::Sender<Arc<Intent>>,
}

impl Agent {
    /// Loads the persisted intent and connects to the kernel. Refuses to
    /// start on a corrupt intent file: sweeping with an empty intent would
    /// tear down every running VM.
    pub fn new(config: Config) -> Result<(Self, AgentHandle), AgentError> {
        let store = Store::open(&config.hypervisor.state_dir)?;
        let intent = store.load()?;
        let kernel = Kernel::connect(config.kernel.route_protocol)?;
        let (tx, rx) = mpsc::channel(1024);
        let (published, intent_rx) = watch::channel(Arc::new(intent.clone()));
        info!(
            vms = intent.vms.len(),
            path = %store.path().display(),
            "loaded intent"
        );
        Ok((
            Self {
                config,
                store,
                intent,
                kernel,
                verified: BTreeMap::new(),
                last: None,
                deferred: Vec::new(),
                started: SystemTime::now(),
                rx,
                published,
            },
            AgentHandle {
                tx,
                intent: intent_rx,
            },
        ))
    }

    /// The first reconcile, from the persisted intent alone.
    pub async fn initial_reconcile(&mut self) -> &ReconcileReport {
        self.reconcile().await;
        self.apply_deferred().await;
        self.last.as_ref().expect("reconcile sets the report")
    }

    /// Runs until every [`AgentHandle`] is dropped.
    pub async fn run(mut self) {
        let mut timer = tokio::time::interval(self.config.kernel.reconcile_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer.reset();
        loop {
            tokio::select! {
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let mut batch = vec![cmd];
                    while let Ok(more) = self.rx.try_recv() {
                        batch.push(more);
                    }
                    self.on_commands(batch).await;
                }
                _ = timer.tick() => {
                    self.reconcile().await;
                    self.apply_deferred().await;
                }
            }
        }
    }

    async fn on_commands(&mut self, batch: Vec<Command>) {
        let mut changed = false;
        let mut waiting: Vec<(Option<String>, Reply)> = Vec::new();
        let mut later = Vec::new();
        for cmd in batch {
            match cmd {
                Command::SetVm { vm, reply } => match self.check_vm(&vm) {
                    Ok(()) => {
                        if self.intent.vms.get(&vm.name) != Some(&vm) {
                            changed = true;
                        }
                        let name = vm.name.clone();
                        info!(vm = %name, interfaces = vm.interfaces.len(), "set vm");
                        self.intent.vms.insert(name.clone(), vm);
                        waiting.push((Some(name), reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Command::RemoveVm { name, reply } => {
                    if self.intent.vms.remove(&name).is_some() {
                        info!(vm = %name, "remove vm");
                        changed = true;
                    }
                    waiting.push((None, reply));
                }
                other => later.push(other),
            }
        }
        if changed {
            if let Err(e) = self.store.save(&self.intent) {
                // Not persisted: undo in memory so memory and disk agree.
                warn!(error = %e, "cannot persist intent; change refused");
                match self.store.load() {
                    Ok(i) => self.intent = i,
                    Err(le) => warn!(error = %le, "cannot reload intent"),
                }
                for (_, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(ApiError::Internal(e.to_string())));
                }
            } else {
                self.published.send_replace(Arc::new(self.intent.clone()));
            }
        }
        if !waiting.is_empty() || later.iter().any(|c| matches!(c, Command::Reconcile { .. })) {
            if changed || later.iter().any(|c| matches!(c, Command::Reconcile { .. })) {
                self.reconcile().await;
            }
            let report = self.last.clone().unwrap_or_default();
            for (vm, reply) in waiting {
                let _ = reply.send(vm_result(vm.as_deref(), &self.intent, &report));
            }
        }
        for cmd in later {
            match cmd {
                Command::ListVms { reply } => {
                    let _ = reply.send(self.intent.vms.values().cloned().collect());
                }
                Command::Status { reply } => {
                    let _ = reply.send(self.status());
                }
                Command::Reconcile { reply } => {
                    let _ = reply.send(self.last.clone().unwrap_or_default());
                }
                Command::SetVm { .. } | Command::RemoveVm { .. } => {}
            }
        }
        self.apply_deferred().await;
    }

    /// Applies the link deletions the last pass left for after its replies.
    async fn apply_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let plan = reconcile::Plan {
            delete_links: std::mem::take(&mut self.deferred),
            ..Default::default()
        };
        let t = Instant::now();
        let applied = self.kernel.apply(&plan).await;
        for f in &applied.failed {
            warn!(op = ?f.op, error = %f.error, "kernel refused");
        }
        if let Some(report) = self.last.as_mut() {
            report.applied += applied.applied;
            report.failed.extend(applied.failed);
            report.apply += t.elapsed();
        }
        debug!(
            duration_ms = t.elapsed().as_secs_f64() * 1e3,
            "deferred link deletions applied"
        );
    }

    fn check_vm(&self, vm: &VmIntent) -> Result<(), ApiError> {
        vm.validate(&self.config)?;
        self.intent.check_insert(vm)?;
        Ok(())
    }

    fn uplink_names(&self) -> BTreeSet<String> {
        self.config
            .uplinks()
            .iter()
            .map(|u| u.config.interface.clone())
            .collect()
    }

    /// One level-based pass: dump, read sysctls, plan, apply.
    async fn reconcile(&mut self) {
        let start = Instant::now();
        let desired = reconcile::desired(&self.config, &self.intent);
        let mut compute = start.elapsed();
        for c in &desired.conflicts {
            warn!(conflict = %c, "intent conflict");
        }
        let mut report = ReconcileReport {
            at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            conflicts: desired.conflicts.clone(),
            ..Default::default()
        };
        let t = Instant::now();
        let dumped = self.kernel.dump(&self.uplink_names()).await;
        report.dump = t.elapsed();
        let mut observed = match dumped {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "kernel dump failed");
                report.error = Some(e.to_string());
                report.duration = start.elapsed();
                self.last = Some(report);
                return;
            }
        };
        let t = Instant::now();
        let paths = reconcile::sysctls_to_read(&desired, &observed, &self.verified);
        if !paths.is_empty() {
            let read = tokio::task::spawn_blocking(move || sysctl::read_many(&paths))
                .await
                .unwrap_or_default();
            observed.sysctls.extend(read);
        }
        report.sysctls = t.elapsed();
        let t = Instant::now();
        let plan = reconcile::plan(&desired, &observed);
        compute += t.elapsed();
        report.compute = compute;
        report.planned = plan.len();
        let t = Instant::now();
        let mut plan = plan;
        self.deferred = std::mem::take(&mut plan.delete_links);
        let applied = if plan.is_empty() {
            ApplyReport::default()
        } else {
            debug!(ops = plan.len(), "applying plan");
            self.kernel.apply(&plan).await
        };
        for f in &applied.failed {
            warn!(op = ?f.op, error = %f.error, "kernel refused");
        }
        // Links whose sysctls are now confirmed.
        self.verified.clear();
        let failed_links: BTreeSet<&str> = applied
            .failed
            .iter()
            .filter_map(|f| match &f.op {
                KernelOp::Sysctl { path, .. } => path.split('/').nth(3),
                _ => None,
            })
            .collect();
        for name in desired.links.keys() {
            if failed_links.contains(name.as_str()) {
                continue;
            }
            let idx = match observed.links.get(name) {
                Some(o) => Some(o.ifindex),
                // Created in this pass.
                None => crate::netlink::tap::ifindex(name),
            };
            if let Some(idx) = idx {
                self.verified.insert(name.clone(), idx);
            }
        }
        report.apply = t.elapsed();
        report.applied = applied.applied;
        report.failed = applied.failed;
        report.duration = start.elapsed();
        if report.planned > 0 || !report.failed.is_empty() {
            info!(
                planned = report.planned,
                applied = report.applied,
                failed = report.failed.len(),
                duration_ms = report.duration.as_secs_f64() * 1e3,
                "reconciled"
            );
        } else {
            debug!(
                duration_ms = report.duration.as_secs_f64() * 1e3,
                "reconciled, no change"
            );
        }
        self.last = Some(report);
    }

    fn status(&self) -> Status {
        status::build(&self.config, &self.intent, self.last.as_ref(), self.started)
    }
}

/// The verdict for one VM after a reconcile: kernel refusals that concern
/// its interfaces.
fn vm_result(vm: Option<&str>, intent: &Intent, report: &ReconcileReport) -> Result<(), ApiError> {
    let Some(vm) = vm else { return Ok(()) };
    let Some(v) = intent.vms.get(vm) else {
        return Ok(());
    };
    if let Some(e) = &report.error {
        // The pass did not run: nothing of this VM was applied.
        return Err(ApiError::Kernel(format!("reconcile did not run: {e}")));
    }
    let names: BTreeSet<&str> = v.interfaces.iter().map(|i| i.name.as_str()).collect();
    let errors: Vec<String> = report
        .failed
        .iter()
        .filter(|f| status::op_interface(&f.op).is_some_and(|n| names.contains(n)))
        .map(|f| format!("{}: {}", status::describe(&f.op), f.error))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Kernel(errors.join("; ")))
    }
}

/// Spawns the agent loop; a convenience for binaries and tests.
pub fn spawn(agent: Agent) -> tokio::task::JoinHandle<()> {
    tokio::spawn(agent.run())
}
