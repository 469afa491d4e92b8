//! The agent: the one task that owns the intent, the kernel reconciler and
//! the status. Everything else talks to it with [`Command`]s.
//!
//! ```text
//!  control socket ──┐            ┌──────────── Agent (one task) ────────────┐
//!  (later: D-Bus,   ├─ Command ─►│ intent ─► Store (persist)                 │
//!   hook, libvirt)  ┘   mpsc     │   └──► desired ─► plan ─► netlink apply ──┼─► kernel
//!                                │ timer ─► reconcile (level-based repair)   │
//!                  ◄── reply ────│ status (last report, per-interface state) │
//!                     oneshot    │ watchdog tick ─► WATCHDOG=1 (systemd)     │
//!  SIGHUP ─ Reload ─────────────►│ reload: diff configs, apply the live part │
//!                                └─────────────────────┬─────────────────────┘
//!   watch (read-only): intent, ReconcileStats ◄─────────┘  (DHCP/RA, metrics)
//! ```
//!
//! Commands that arrive together are applied together: the intent changes,
//! is persisted once, and one reconcile serves them all. No timer sits
//! between a command and the kernel.

pub mod reload;
pub mod routes;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::intent::store::{Store, StoreError, Writer};
use crate::intent::{Intent, IntentError, VmIntent};
use crate::netlink::{Kernel, NetlinkError, apply::ApplyReport, sysctl};
use crate::reconcile::{self, KernelOp};
use crate::rib::{Rib, RibEvent};
use crate::systemd::Watchdog;
pub use status::{ReconcileReport, ReconcileStats, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot start the intent writer's thread: {0}")]
    Writer(std::io::Error),
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

/// Longest time a restarted agent keeps learned routes it found in the
/// kernel while its sessions relearn them.
const LEARNED_HOLD: Duration = Duration::from_secs(60);

/// How many of the latest VM removals the agent remembers by name.
const REMOVALS_KEPT: usize = 4096;

/// First retry delay after a failed reconcile pass.
const RETRY_MIN: Duration = Duration::from_secs(1);

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
    /// Like `SetVm`, unless the VM was removed after the agent's removal
    /// count was `since` ([`Command::Removals`]): the libvirt reconcile's
    /// domains, listed before a hook's `release` that the agent took
    /// first, must not bring a stopped VM back.
    SetVmUnlessRemoved {
        vm: VmIntent,
        since: u64,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// How many VM removals the agent has taken so far.
    Removals {
        reply: oneshot::Sender<u64>,
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
    /// The learned routes (`l3hv routes`), within `filter` if given.
    Routes {
        filter: Option<ipnet::IpNet>,
        reply: oneshot::Sender<Vec<routes::RouteView>>,
    },
    /// Reconcile now and report.
    Reconcile {
        reply: oneshot::Sender<ReconcileReport>,
    },
    /// Paths learned or lost by a BGP session (no reply).
    Rib(RibEvent),
    /// The kernel's links changed (netlink notification): reconcile now.
    /// `links`: what the notifications said, per link; `None` when some
    /// were lost (socket overrun): a full pass.
    LinksChanged {
        links: crate::netlink::monitor::LinkBurst,
    },
    /// Switch to a new (already validated) configuration: the part that can
    /// change live is applied by a reconcile, the rest is kept and named in
    /// the reply's notes. Refused when the intent does not fit the new file.
    Reload {
        config: Box<Config>,
        reply: oneshot::Sender<Result<Vec<String>, ApiError>>,
    },
}

/// A cheap handle for sending commands to the agent.
#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::Sender<Command>,
    intent: watch::Receiver<Arc<Intent>>,
    announce: watch::Receiver<Arc<Intent>>,
    stats: watch::Receiver<Arc<ReconcileStats>>,
    config: watch::Receiver<Arc<Config>>,
}

impl AgentHandle {
    /// A read-only view of the intent, updated after every change is
    /// persisted and its callers answered. Services that serve VMs (DHCP,
    /// RA) and the D-Bus signals follow it; they never write intent.
    pub fn subscribe_intent(&self) -> watch::Receiver<Arc<Intent>> {
        self.intent.clone()
    }

    /// The intent as soon as the kernel has a change's local routes, before
    /// it is durable and its caller answered: the BGP speaker announces
    /// from it, so the route leaves this hypervisor without waiting for the
    /// disk or the services. A change that cannot be persisted is undone
    /// here too.
    pub fn subscribe_announce(&self) -> watch::Receiver<Arc<Intent>> {
        self.announce.clone()
    }

    /// The configuration in force, updated by every accepted reload (the
    /// BGP speaker follows it).
    pub fn subscribe_config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.clone()
    }

    /// A read-only view of the reconcile totals and the last report,
    /// updated after every pass (the metrics endpoint follows it).
    pub fn subscribe_reconcile(&self) -> watch::Receiver<Arc<ReconcileStats>> {
        self.stats.clone()
    }

    /// Asks the agent to switch to `config`; the notes name what needs a
    /// restart.
    pub async fn reload(&self, config: Config) -> Result<Vec<String>, ApiError> {
        self.call(|reply| Command::Reload {
            config: Box::new(config),
            reply,
        })
        .await?
    }

    /// Says the kernel's links changed: the agent looks again unless its
    /// mirror already has them so, dumps links, addresses and rules, and
    /// everything when an uplink is among them or they are not known (see
    /// [`Command::LinksChanged`]).
    pub async fn links_changed(&self, links: crate::netlink::monitor::LinkBurst) {
        let _ = self.tx.send(Command::LinksChanged { links }).await;
    }

    /// Hands learned paths to the RIB (BGP import → RIB → kernel).
    pub async fn rib(&self, event: RibEvent) {
        let _ = self.tx.send(Command::Rib(event)).await;
    }

    /// Hands learned paths to the RIB without waiting: gives the event
    /// back when the agent's queue is full (a long pass is running), so a
    /// BGP session can go on sending KEEPALIVEs instead of waiting here
    /// past its hold time. A stopped agent takes (and drops) the event.
    pub fn try_rib(&self, event: RibEvent) -> Result<(), RibEvent> {
        match self.tx.try_send(Command::Rib(event)) {
            Err(mpsc::error::TrySendError::Full(Command::Rib(event))) => Err(event),
            _ => Ok(()),
        }
    }

    /// Waits for room in the agent's queue, then hands `event` over; for
    /// a `select!` branch (cancelling it loses nothing: the event is only
    /// taken once there is room).
    pub async fn rib_when_ready(&self, event: &mut Option<RibEvent>) {
        if event.is_none() {
            return std::future::pending().await;
        }
        if let Ok(permit) = self.tx.reserve().await
            && let Some(event) = event.take()
        {
            permit.send(Command::Rib(event));
        } else {
            // The agent stopped: nothing will read the event.
            *event = None;
        }
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

/// A handle with no agent behind it, for testing what talks to the agent:
/// commands wait in `rx` until the test reads them.
#[cfg(test)]
pub(crate) struct Detached {
    pub rx: mpsc::Receiver<Command>,
    _intent: watch::Sender<Arc<Intent>>,
    _stats: watch::Sender<Arc<ReconcileStats>>,
    _config: watch::Sender<Arc<Config>>,
}

#[cfg(test)]
impl AgentHandle {
    pub(crate) fn detached(capacity: usize, config: Config) -> (Self, Detached) {
        let (tx, rx) = mpsc::channel(capacity);
        let (intent_tx, intent) = watch::channel(Arc::new(Intent::default()));
        let (stats_tx, stats) = watch::channel(Arc::new(ReconcileStats::default()));
        let (config_tx, config) = watch::channel(Arc::new(config));
        (
            Self {
                tx,
                announce: intent.clone(),
                intent,
                stats,
                config,
            },
            Detached {
                rx,
                _intent: intent_tx,
                _stats: stats_tx,
                _config: config_tx,
            },
        )
    }
}

/// A pass this large (operations planned, or paths in the RIB) leaves
/// enough freed memory behind to be worth handing back to the system.
const BIG_PASS: usize = 10_000;

/// At most this many changed prefixes in one batch are planned alone
/// (`pass_scoped`); a larger batch (a table being learned) takes the pass
/// over everything, which is cheaper per prefix by then.
const SCOPED_MAX: usize = 4096;

/// What a reconcile pass starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A full dump: the repair path (timer, link events, `l3hv reconcile`).
    Full,
    /// Intent changed: the cache as it is when it is whole, else links,
    /// addresses and rules dumped and the learned state from the cache.
    Intent,
    /// Only the RIB changed: the same.
    Rib,
    /// Links changed (not an uplink): links, addresses and rules dumped,
    /// the learned state from the cache.
    Links,
}

pub struct Agent {
    config: Config,
    store: Store,
    /// Saves `intent` on a thread of its own (durable before callers are
    /// answered).
    writer: Writer,
    intent: Intent,
    /// Learned routes (from the BGP sessions).
    rib: Rib,
    /// After a (re)start, learned routes already in the kernel are kept
    /// until every session has sent End-of-RIB or this deadline passes: a
    /// restarted agent must not withdraw what BGP is about to relearn.
    learned_hold: Option<Instant>,
    /// The first dump was checked for learned state to hold.
    hold_checked: bool,
    /// The kernel as the last pass left it, when that pass dumped it or
    /// mirrored every change it made: RIB and intent changes plan against
    /// it, or take its routes, nexthop objects and proxy entries when its
    /// host part is not valid (the full pass stays the repair path: on the
    /// timer, link events, `l3hv reconcile`, after any refusal).
    cache: Option<reconcile::ObservedKernel>,
    /// The cache's links, addresses, rules and sysctls are as the last pass
    /// left them (it changed routes only); otherwise only its routes,
    /// nexthop objects and proxy entries are, and a pass dumps the rest.
    cache_host_valid: bool,
    /// The cache's route count when its map was last rebuilt with full
    /// nodes (0 after a dump): see `btree::compact_past`.
    cache_compacted: usize,
    /// Prefixes the RIB has heard of since start: their kernel routes
    /// follow the RIB even during the hold (a withdrawal is a withdrawal).
    relearned: BTreeSet<IpNet>,
    /// Sessions that completed their initial table.
    end_of_rib: BTreeSet<Arc<str>>,
    sessions_expected: usize,
    kernel: Kernel,
    /// Whether the kernel has nexthop objects (probed at start; `None`
    /// when the probe itself failed).
    nexthop_support: Option<bool>,
    /// The nexthop objects, groups and group keys of the last pass: what
    /// the failover fast path shrinks.
    last_groups: reconcile::DesiredKernel,
    /// `last_groups` is every learned nexthop use in the kernel: the pass
    /// that computed it ran without the restart hold, which keeps routes
    /// (and the groups or objects they point at) it did not compute. Only
    /// then does the fast path delete objects (`groups::failover_writes`).
    groups_exact: bool,
    /// The fast path that ran before the next pass: (groups, duration).
    fast_path: Option<(usize, Duration)>,
    /// ifindex of each VM link whose sysctls were last confirmed.
    verified: BTreeMap<String, u32>,
    /// Host and uplink sysctls (path, value) the last pass left as wanted.
    host_settled: BTreeMap<reconcile::SysctlPath, String>,
    last: Option<ReconcileReport>,
    /// Link deletions planned by the last pass, applied after its callers
    /// got their answer: deleting a netdev waits for RCU grace periods
    /// (12-58 ms here) and must stay off the hook's path. The VM's routes
    /// and addresses are already gone by then; the next command waits
    /// behind this, so a re-created tap of the same name is never raced.
    deferred: Vec<KernelOp>,
    started: SystemTime,
    /// When the next level-based pass runs: the configured interval after
    /// a clean pass, sooner (backing off) after a failed one.
    next_reconcile: Instant,
    retry: Duration,
    rx: mpsc::Receiver<Command>,
    /// The intent once this hypervisor forwards to it (BGP announces it).
    published: watch::Sender<Arc<Intent>>,
    /// A changed intent to publish as soon as the pass has applied it.
    announce: Option<Arc<Intent>>,
    /// Interfaces of the VMs the next pass changes: the mirror's entry for
    /// each is checked against the kernel's ifindex before it is trusted.
    touched: BTreeSet<String>,
    /// VM removals taken so far, and the count at each VM's last one
    /// (`Command::SetVmUnlessRemoved`), for the last [`REMOVALS_KEPT`]
    /// removals at least.
    removals: u64,
    removed_at: BTreeMap<String, u64>,
    /// Links this agent created (name, ifindex) since the last link
    /// notifications were looked at: created down, their notifications
    /// say "was down" without anyone else having touched them.
    created: BTreeSet<(String, u32)>,
    /// Links whose notifications said they went down since the cache took
    /// their routes and proxy entries: the next pass writes what it wants
    /// on them again even when the link is up again (the kernel deleted
    /// those).
    bounced: BTreeSet<String>,
    /// The intent once it is durable and its callers were answered
    /// (DHCP, RA, ND, D-Bus signals).
    settled: watch::Sender<Arc<Intent>>,
    /// Counters of the DHCP/RA services, shown in status when set.
    services: Option<crate::services::Registry>,
    stats: ReconcileStats,
    stats_published: watch::Sender<Arc<ReconcileStats>>,
    config_published: watch::Sender<Arc<Config>>,
    watchdog: Option<Watchdog>,
}

impl Agent {
    /// Loads the persisted intent and connects to the kernel. Refuses to
    /// start on a corrupt intent file: sweeping with an empty intent would
    /// tear down every running VM.
    pub fn new(config: Config) -> Result<(Self, AgentHandle), AgentError> {
        let store = Store::open(&config.hypervisor.state_dir)?;
        let intent = store.load()?;
        let writer = Writer::spawn(store.clone()).map_err(AgentError::Writer)?;
        let kernel = Kernel::connect(config.kernel.route_protocol)?;
        let nexthop_support = match crate::netlink::nexthop::supported() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot probe for kernel nexthop objects");
                None
            }
        };
        match (config.kernel.nexthop_objects, nexthop_support) {
            (crate::config::NexthopObjects::On, Some(false)) => warn!(
                "kernel.nexthop_objects = \"on\" but this kernel has no nexthop objects: learned routes will be refused"
            ),
            (setting, support) => info!(
                setting = setting.as_str(),
                kernel_support = ?support,
                "learned routes through nexthop objects: {}",
                nexthop_mode(setting, support)
            ),
        }
        let (tx, rx) = mpsc::channel(1024);
        let (published, announce_rx) = watch::channel(Arc::new(intent.clone()));
        let (settled, intent_rx) = watch::channel(Arc::new(intent.clone()));
        let (stats_published, stats_rx) = watch::channel(Arc::new(ReconcileStats::default()));
        let (config_published, config_rx) = watch::channel(Arc::new(config.clone()));
        let sessions_expected = if config.bgp.enabled {
            crate::bgp::peer_specs(&config).len()
        } else {
            0
        };
        let learned_hold = (sessions_expected > 0).then(|| Instant::now() + LEARNED_HOLD);
        info!(
            vms = intent.vms.len(),
            path = %store.path().display(),
            "loaded intent"
        );
        Ok((
            Self {
                config,
                store,
                writer,
                intent,
                rib: Rib::default(),
                learned_hold,
                hold_checked: false,
                relearned: BTreeSet::new(),
                cache: None,
                cache_host_valid: false,
                cache_compacted: 0,
                end_of_rib: BTreeSet::new(),
                sessions_expected,
                kernel,
                nexthop_support,
                last_groups: reconcile::DesiredKernel::default(),
                groups_exact: false,
                fast_path: None,
                verified: BTreeMap::new(),
                host_settled: BTreeMap::new(),
                last: None,
                deferred: Vec::new(),
                started: SystemTime::now(),
                next_reconcile: Instant::now(),
                retry: RETRY_MIN,
                rx,
                published,
                announce: None,
                touched: BTreeSet::new(),
                removals: 0,
                removed_at: BTreeMap::new(),
                created: BTreeSet::new(),
                bounced: BTreeSet::new(),
                settled,
                services: None,
                stats: ReconcileStats::default(),
                stats_published,
                config_published,
                watchdog: None,
            },
            AgentHandle {
                tx,
                intent: intent_rx,
                announce: announce_rx,
                stats: stats_rx,
                config: config_rx,
            },
        ))
    }

    /// The first reconcile, from the persisted intent alone.
    pub async fn initial_reconcile(&mut self) -> &ReconcileReport {
        self.reconcile().await;
        self.apply_deferred().await;
        self.last.as_ref().expect("reconcile sets the report")
    }

    /// Sends `WATCHDOG=1` from the loop at the watchdog's interval.
    pub fn set_watchdog(&mut self, watchdog: Option<Watchdog>) {
        self.watchdog = watchdog;
    }

    /// Runs until every [`AgentHandle`] is dropped.
    pub async fn run(mut self) {
        // The watchdog ticks in this loop, between commands and passes: a
        // loop stuck in one of them stops the pings and systemd restarts us.
        let mut watchdog = self.watchdog.as_ref().map(|w| {
            let mut t = tokio::time::interval(w.interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let next = tokio::time::Instant::from_std(self.next_reconcile);
            tokio::select! {
                _ = async { match watchdog.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                    if let Some(w) = &self.watchdog {
                        w.ping();
                    }
                }
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let mut batch = vec![cmd];
                    while let Ok(more) = self.rx.try_recv() {
                        batch.push(more);
                    }
                    self.on_commands(batch).await;
                }
                _ = tokio::time::sleep_until(next) => {
                    self.reconcile().await;
                    self.apply_deferred().await;
                }
            }
        }
    }

    async fn on_commands(&mut self, batch: Vec<Command>) {
        let taken = Instant::now();
        let mut changed = false;
        let mut rib_changed = false;
        let mut session_down = false;
        // Partial withdrawals that took a hop out of groups: a remote
        // fabric path failing.
        let mut lost_hops: Vec<crate::rib::PartialWithdrawal> = Vec::new();
        let mut waiting: Vec<(Option<String>, Reply)> = Vec::new();
        let mut later = Vec::new();
        // The learned prefixes this batch changes, with their selections
        // before it, while only UPDATEs changed the RIB: a pass over them
        // alone (`pass_scoped`). `None`: the pass over everything, also
        // from the start when no scoped pass could run (nothing recorded).
        let mut scope: Option<reconcile::scoped::Before> =
            (self.nexthop_objects() && self.learned_hold.is_none() && self.cache.is_some())
                .then(BTreeMap::new);
        for cmd in batch {
            let cmd = match cmd {
                Command::SetVmUnlessRemoved { vm, since, reply } => {
                    if self.removed_at.get(&vm.name).is_some_and(|r| *r > since) {
                        info!(vm = %vm.name, "not set: removed after the caller looked");
                        let _ = reply.send(Ok(()));
                        continue;
                    }
                    Command::SetVm { vm, reply }
                }
                other => other,
            };
            match cmd {
                Command::SetVm { vm, reply } => match self.check_vm(&vm) {
                    Ok(()) => {
                        if self.intent.vms.get(&vm.name) != Some(&vm) {
                            changed = true;
                            let before = self.intent.vms.get(&vm.name).into_iter();
                            for i in before.chain([&vm]).flat_map(|v| &v.interfaces) {
                                self.touched.insert(i.name.clone());
                            }
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
                Command::Rib(event) => {
                    match &event {
                        RibEvent::EndOfRib { session } => {
                            self.end_of_rib.insert(session.clone());
                            if self.learned_hold.is_some()
                                && self.end_of_rib.len() >= self.sessions_expected
                            {
                                info!("every session sent End-of-RIB; learned routes converge now");
                                self.learned_hold = None;
                                self.relearned.clear();
                                rib_changed = true;
                                scope = None;
                            }
                        }
                        RibEvent::SessionDown { session } => {
                            self.end_of_rib.remove(session);
                            session_down = true;
                            if self.nexthop_objects() {
                                // Forwarding first: the groups lose this
                                // session's hops before the RIB drops its
                                // paths one by one (O(paths)).
                                let lost = self.rib.hops_only_of(session);
                                if !lost.is_empty() {
                                    self.failover_fast_path(false, &lost, &[]).await;
                                }
                            }
                        }
                        RibEvent::SessionStale { session, .. } => {
                            self.end_of_rib.remove(session);
                            session_down = true;
                        }
                        RibEvent::SweepStale { .. } => {}
                        RibEvent::Update {
                            announce, withdraw, ..
                        } => {
                            if !withdraw.is_empty() && self.nexthop_objects() {
                                // Forwarding first, at the first UPDATE
                                // that shows a path failing: a batch taken
                                // late holds a reflector's withdrawals of
                                // thousands of prefixes, and applying them
                                // all to the RIB first cost a failover
                                // 6-12 ms (BENCHMARKS.md).
                                let new: Vec<_> = self
                                    .rib
                                    .partially_withdrawn(&event)
                                    .into_iter()
                                    .filter(|w| {
                                        !lost_hops.iter().any(|l| {
                                            l.origin == w.origin && l.hop == w.hop && l.v6 == w.v6
                                        })
                                    })
                                    .collect();
                                if !new.is_empty()
                                    && self.failover_fast_path(false, &[], &new).await
                                {
                                    // The scoped pass after the batch (when
                                    // it is one) finds the groups as the
                                    // fast path left them: it computes their
                                    // members from the same hop counts
                                    // (`groups::shrink_withdrawn` follows
                                    // `groups::members`) and plans against
                                    // the cache the fast path updated. A
                                    // pass over every route here cost each
                                    // remote hypervisor 0.4-0.7 s of its
                                    // thread per failing path at 100,000
                                    // routes (BENCHMARKS.md).
                                    lost_hops.extend(new);
                                }
                            }
                            if self.learned_hold.is_some() {
                                self.relearned.extend(announce.iter().map(|(p, _, _)| *p));
                                self.relearned.extend(withdraw.iter().map(|(p, _)| *p));
                            }
                        }
                    }
                    let update = match scope.as_mut() {
                        Some(before) => {
                            let update = reconcile::scoped::record(before, &self.rib, &event);
                            if before.len() > SCOPED_MAX {
                                scope = None;
                            }
                            update
                        }
                        None => matches!(event, RibEvent::Update { .. }),
                    };
                    let changed_rib = self.rib.apply(event);
                    if changed_rib && !update {
                        scope = None;
                    }
                    rib_changed |= changed_rib;
                }
                Command::RemoveVm { name, reply } => {
                    self.removals += 1;
                    self.removed_at.insert(name.clone(), self.removals);
                    if self.removed_at.len() > 2 * REMOVALS_KEPT {
                        // A reconcile's scan takes seconds, not thousands
                        // of removals: older entries can go (unique VM
                        // names would otherwise grow this forever).
                        let floor = self.removals.saturating_sub(REMOVALS_KEPT as u64);
                        self.removed_at.retain(|_, r| *r > floor);
                    }
                    if self.intent.vms.remove(&name).is_some() {
                        info!(vm = %name, "remove vm");
                        changed = true;
                    }
                    waiting.push((None, reply));
                }
                // In batch order: a removal after it is counted after it.
                Command::Removals { reply } => {
                    let _ = reply.send(self.removals);
                }
                other => later.push(other),
            }
        }
        // The intent is written (in place, fdatasync, rename) by its own
        // thread while the kernel pass runs: the disk's latency (0.1 ms
        // here, far more on a busy disk) does not delay the VM's routes.
        // Callers are answered only once it is durable. A crash in between
        // leaves kernel state the restarted agent sweeps (the caller got no
        // answer); a failed write is undone below, kernel included.
        let saving = changed.then(|| self.writer.save(self.intent.clone()));
        // A full pass when asked for, or when an uplink changed: a carrier
        // loss makes the kernel delete the nexthop objects on it and flush
        // routes of their emptied groups, which only a full dump sees.
        // Other link events (a tap made or deleted by us, QEMU opening it,
        // an adopted interface appearing) dump the links, addresses and
        // rules alone: at 100,000 learned routes the full dump they took
        // held the next VM's hook up 0.1-0.3 s.
        // And none when every link is as the mirror has it: the agent's own
        // taps (created, configured, deleted) and QEMU opening them (the
        // carrier) take no pass at all, where the next VM's hook would have
        // waited behind one.
        let asked = later.iter().any(|c| match c {
            Command::Reconcile { .. } => true,
            Command::LinksChanged { links } => links.as_ref().is_none_or(|l| {
                let uplinks = self.uplink_names();
                l.iter()
                    .any(|(name, note)| uplinks.contains(name) && !self.uplink_steady(name, note))
            }),
            _ => false,
        });
        let links = later.iter().any(|c| match c {
            Command::LinksChanged { links: Some(l) } => !self.mirror_has(l),
            _ => false,
        });
        for c in &later {
            if let Command::LinksChanged { links: Some(l) } = c {
                let ours = |name: &String, note: &crate::netlink::monitor::LinkNote| {
                    self.created.contains(&(name.clone(), note.index))
                };
                let down = l
                    .iter()
                    .filter(|(name, note)| note.was_down && !ours(name, note))
                    .map(|(name, _)| name.clone())
                    .collect::<Vec<_>>();
                self.bounced.extend(down);
            }
        }
        if later
            .iter()
            .any(|c| matches!(c, Command::LinksChanged { .. }))
        {
            self.created.clear();
        }
        if rib_changed && session_down {
            // Forwarding first: the groups lose their dead members in place
            // (O(groups)) before the full recompute (O(routes)). Partial
            // withdrawals had theirs in the loop.
            self.failover_fast_path(true, &[], &[]).await;
        }
        let mut intent = changed.then(|| Arc::new(self.intent.clone()));
        // Published once the kernel has the local routes (by the pass, right
        // after its apply): BGP must not announce a VM before this
        // hypervisor can forward to it.
        self.announce = intent.clone();
        if asked {
            self.reconcile().await;
        } else if changed || links {
            // The learned prefixes changed in the same batch go with it (all
            // of them when they are not known).
            let learned = if rib_changed {
                scope
            } else {
                Some(BTreeMap::new())
            };
            let kind = if links { Pass::Links } else { Pass::Intent };
            self.pass(kind, learned).await;
        } else if rib_changed {
            let scoped = match scope {
                Some(before) if !before.is_empty() => self.pass_scoped(before).await,
                _ => false,
            };
            if !scoped {
                self.reconcile_incremental().await;
            }
        }
        if let Some(announce) = self.announce.take() {
            // A pass that stopped before applying (a failed dump).
            self.published.send_replace(announce);
        }
        if let Some(saving) = saving {
            let saved = saving.await;
            if let Err(e) = saved {
                // Not persisted: back to what the disk holds, in memory,
                // in the kernel and towards BGP, and the change is refused.
                warn!(error = %e, "cannot persist intent; change refused and undone");
                match self.store.load() {
                    Ok(i) => self.intent = i,
                    Err(le) => warn!(error = %le, "cannot reload intent"),
                }
                self.reconcile().await;
                let undone = Arc::new(self.intent.clone());
                self.published.send_replace(undone.clone());
                self.settled.send_replace(undone);
                intent = None;
                for (_, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(ApiError::Internal(e.clone())));
                }
            }
        }
        if !waiting.is_empty() {
            let report = self.last.clone().unwrap_or_default();
            for (vm, reply) in waiting {
                let _ = reply.send(vm_result(vm.as_deref(), &self.intent, &report));
                self.stats.record_intent_call(taken.elapsed());
            }
            self.stats_published
                .send_replace(Arc::new(self.stats.clone()));
        }
        if let Some(intent) = intent {
            // The services (DHCP and RA need the tap and its gateway
            // addresses) start after the callers have their answer: their
            // sockets and tasks, made on the same two cores, held the answer
            // to a VM's `prepare` up when they went first.
            self.settled.send_replace(intent);
        }
        for cmd in later {
            match cmd {
                Command::ListVms { reply } => {
                    let _ = reply.send(self.intent.vms.values().cloned().collect());
                }
                Command::Status { reply } => {
                    let _ = reply.send(self.status());
                }
                Command::Routes { filter, reply } => {
                    let _ = reply.send(self.routes(filter).await);
                }
                Command::Reconcile { reply } => {
                    let _ = reply.send(self.last.clone().unwrap_or_default());
                }
                Command::Reload { config, reply } => {
                    let _ = reply.send(self.on_reload(*config).await);
                }
                Command::SetVm { .. }
                | Command::SetVmUnlessRemoved { .. }
                | Command::Removals { .. }
                | Command::RemoveVm { .. }
                | Command::Rib(_)
                | Command::LinksChanged { .. } => {}
            }
        }
        self.apply_deferred().await;
    }

    /// Is a notification about an uplink one that changes nothing the
    /// agent programs through it: the same link, up and with carrier
    /// throughout the burst and when last dumped, so its nexthop objects
    /// are still there? IPv6 coming up on it, its addrconf state, an MTU
    /// change (to 1280 or more): each took a full pass (a dump of every
    /// learned route) where `mirror_has` now finds nothing to do.
    fn uplink_steady(&self, name: &str, note: &crate::netlink::monitor::LinkNote) -> bool {
        let Some(cache) = self.cache.as_ref().filter(|_| self.cache_host_valid) else {
            return false;
        };
        !note.deleted
            && note.up
            && note.carrier
            && !note.was_down
            && !note.carrier_lost
            // Under 1280 the kernel took IPv6 (and its addresses) off it.
            && note.mtu.is_none_or(|m| m >= 1280)
            && cache.carrier.contains(name)
            && cache
                .links
                .get(name)
                .is_some_and(|o| o.ifindex == note.index && o.up)
    }

    /// Does the mirror already have every link of `links` as the
    /// notifications say it is (index, up, alias, or gone)? Links that are
    /// not l3hv's (not in the mirror or the intent, no alias) count as
    /// known.
    fn mirror_has(&self, links: &BTreeMap<String, crate::netlink::monitor::LinkNote>) -> bool {
        let Some(cache) = self.cache.as_ref().filter(|_| self.cache_host_valid) else {
            return false;
        };
        let sink = &self.config.kernel.sink_interface;
        links
            .iter()
            .all(|(name, note)| match cache.links.get(name) {
                Some(o) if note.deleted => o.ifindex != note.index,
                Some(o) => {
                    o.ifindex == note.index
                    && o.up == note.up
                    && o.alias == note.alias
                    // Down at some point: only as this agent created it.
                    && (!note.was_down || self.created.contains(&(name.clone(), note.index)))
                }
                None => {
                    note.deleted
                        || (note.alias.is_none()
                            && name != sink
                            && !self.intent.interfaces().any(|(_, i)| i.name == *name))
                }
            })
    }

    /// Are learned routes programmed through nexthop objects?
    fn nexthop_objects(&self) -> bool {
        nexthop_mode(self.config.kernel.nexthop_objects, self.nexthop_support) == "objects"
    }

    /// How learned routes go to the kernel, which holds `observed`.
    fn nexthops<'a>(&self, observed: &'a reconcile::ObservedKernel) -> reconcile::Nexthops<'a> {
        if self.nexthop_objects() {
            reconcile::Nexthops::Objects(&observed.groups)
        } else {
            reconcile::Nexthops::Multipath
        }
    }

    /// After a session went down (`session_down`, `lost`: the (origin,
    /// hop) pairs it takes away) or a partial withdrawal (`withdrawn`):
    /// takes the lost members out of every nexthop group in place, from
    /// the last pass's groups and the RIB alone (no desired/plan over every
    /// route, no dump): by deleting the objects that leave all their
    /// groups, and replacing the groups that lose a member still used
    /// elsewhere (`groups::failover_writes`). The pass that follows finds
    /// the groups right. True when it changed groups.
    async fn failover_fast_path(
        &mut self,
        session_down: bool,
        lost: &[(std::net::IpAddr, crate::rib::Hop)],
        withdrawn: &[crate::rib::PartialWithdrawal],
    ) -> bool {
        if !self.nexthop_objects() || self.learned_hold.is_some() || self.cache.is_none() {
            return false;
        }
        let t = Instant::now();
        let mut shrunk = if session_down {
            reconcile::groups::shrink(&self.last_groups, &self.rib)
        } else {
            Vec::new()
        };
        if !lost.is_empty() || !withdrawn.is_empty() {
            // After a session-down shrink, of what is left: a copy of the
            // groups alone (`last_groups` also holds every local route,
            // whose copy cost a remote failover 14-41 ms at 100,000).
            let after;
            let base = if shrunk.is_empty() {
                &self.last_groups
            } else {
                let mut groups = self.last_groups.groups.clone();
                for (id, m) in &shrunk {
                    groups.insert(*id, m.clone());
                }
                after = reconcile::DesiredKernel {
                    nexthops: self.last_groups.nexthops.clone(),
                    groups,
                    group_keys: self.last_groups.group_keys.clone(),
                    group_use: self.last_groups.group_use.clone(),
                    ..Default::default()
                };
                &after
            };
            let more = if withdrawn.is_empty() {
                reconcile::groups::shrink_hops(base, lost)
            } else {
                reconcile::groups::shrink_withdrawn(base, withdrawn)
            };
            for (id, m) in more {
                shrunk.retain(|(i, _)| *i != id);
                shrunk.push((id, m));
            }
        }
        if shrunk.is_empty() {
            return false;
        }
        // Objects that leave all their groups are deleted (the kernel
        // takes them out of every group, O(groups)); only groups losing a
        // member still used elsewhere are replaced (O(routes) for IPv6 and
        // in compat mode): `groups::failover_writes`. With probed ids the
        // scoped pass must see deletions as its own, and after a pass
        // under the restart hold the kernel may hold routes on objects it
        // does not know: replace only.
        let (delete, replace) = match self.cache.as_ref() {
            Some(cache) if !self.last_groups.probed && self.groups_exact => {
                reconcile::groups::failover_writes(
                    &cache.groups,
                    &self.last_groups.groups,
                    &self.last_groups.direct,
                    &shrunk,
                )
            }
            _ => (BTreeSet::new(), shrunk.clone()),
        };
        let computed = t.elapsed();
        let plan = reconcile::Plan {
            add_groups: replace
                .iter()
                .map(|(id, members)| KernelOp::AddGroup {
                    id: *id,
                    members: members.iter().copied().collect(),
                    replace: true,
                })
                .collect(),
            remove_nexthops: delete
                .iter()
                .map(|id| KernelOp::DelNexthop {
                    id: *id,
                    group: false,
                })
                .collect(),
            ..Default::default()
        };
        let applied = self.kernel.apply(&plan).await;
        let took = t.elapsed();
        let written = took - computed;
        for f in &applied.failed {
            warn!(op = ?f.op, error = %f.error, "kernel refused");
        }
        if applied.failed.is_empty() {
            if let Some(cache) = self.cache.as_mut() {
                reconcile::groups::failover_written(cache, &mut self.last_groups, &shrunk, &delete);
            }
        } else {
            // The full pass that follows dumps again.
            self.cache = None;
        }
        info!(
            groups = shrunk.len(),
            replaced = replace.len(),
            objects_deleted = delete.len(),
            compute_ms = computed.as_secs_f64() * 1e3,
            write_ms = written.as_secs_f64() * 1e3,
            duration_ms = took.as_secs_f64() * 1e3,
            "path lost: nexthop groups updated in place"
        );
        self.fast_path = Some((shrunk.len(), took));
        // (Published with the pass that follows.)
        self.stats
            .record_failover(took, delete.len(), replace.len());
        true
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
        // The cached links follow (see `pass`); after a refusal the next
        // pass dumps them.
        match self.cache.as_mut() {
            Some(cache) if applied.failed.is_empty() => {
                for op in &plan.delete_links {
                    if let KernelOp::DeleteLink { name } = op {
                        cache.links.remove(name);
                        // The kernel flushes its proxy entries with it (the
                        // pass did not delete them one by one).
                        cache.proxies.retain(|(link, _)| link != name);
                    }
                }
            }
            _ => self.cache_host_valid = false,
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

    /// Switches to a new configuration: keeps what cannot change live,
    /// refuses a file the current intent does not fit, reconciles.
    async fn on_reload(&mut self, new: Config) -> Result<Vec<String>, ApiError> {
        let (effective, notes) = reload::merge(&self.config, new);
        for vm in self.intent.vms.values() {
            vm.validate(&effective)
                .map_err(|e| ApiError::Invalid(format!("vm {}: {e}", vm.name)))?;
        }
        for n in &notes {
            warn!(note = %n, "reload: kept the running value");
        }
        let changed = effective != self.config;
        self.config = effective;
        self.sessions_expected = if self.config.bgp.enabled {
            crate::bgp::peer_specs(&self.config).len()
        } else {
            0
        };
        self.config_published
            .send_replace(Arc::new(self.config.clone()));
        if changed {
            info!("configuration reloaded; reconciling");
            self.verified.clear();
            self.host_settled.clear();
            self.reconcile().await;
        } else {
            info!("configuration reloaded; nothing changed for the agent");
        }
        Ok(notes)
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

    /// A pass over the learned prefixes `before` names alone, against the
    /// cached kernel state ([`reconcile::scoped`]): O(changed prefixes)
    /// where the other passes are O(learned routes). False when it cannot
    /// run (no whole cache, the hold, a session relearning, RTA_MULTIPATH
    /// mode) or the change touches a nexthop group: the caller runs the
    /// pass over everything.
    async fn pass_scoped(&mut self, before: reconcile::scoped::Before) -> bool {
        let start = Instant::now();
        if !self.nexthop_objects()
            || self.learned_hold.is_some()
            || !self.cache_host_valid
            || self.rib.is_syncing(Instant::now())
        {
            return false;
        }
        let Some(cache) = self.cache.as_ref() else {
            return false;
        };
        let plan = match reconcile::scoped::plan(
            &self.config,
            &self.intent,
            &self.rib,
            &before,
            &mut self.last_groups,
            cache,
            true,
        ) {
            Ok(p) => p,
            Err(reason) => {
                debug!(
                    reason,
                    prefixes = before.len(),
                    "the change needs the pass over every route"
                );
                return false;
            }
        };
        let (fast_path_groups, fast_path) = self.fast_path.take().unwrap_or_default();
        let mut report = ReconcileReport {
            at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            observed: "scoped",
            learned_scoped: true,
            fast_path_groups,
            fast_path,
            compute: start.elapsed(),
            planned: plan.len(),
            conflicts: self
                .last
                .as_ref()
                .map(|r| r.conflicts.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        let t = Instant::now();
        let applied = if plan.is_empty() {
            ApplyReport::default()
        } else {
            self.kernel.apply(&plan).await
        };
        report.apply = t.elapsed();
        for f in &applied.failed {
            warn!(op = ?f.op, error = %f.error, "kernel refused");
        }
        if applied.failed.is_empty() {
            if let Some(cache) = self.cache.as_mut() {
                for op in plan.phases().into_iter().flatten() {
                    cache.mirror(op);
                }
            }
        } else {
            // The kernel is not what the cache says: the next pass dumps
            // it and repairs, soon (backing off).
            self.cache = None;
            self.cache_host_valid = false;
            self.schedule_next(true);
        }
        report.applied = applied.applied;
        report.failed = applied.failed;
        report.duration = start.elapsed();
        if report.planned > 0 {
            info!(
                planned = report.planned,
                applied = report.applied,
                failed = report.failed.len(),
                prefixes = before.len(),
                duration_ms = report.duration.as_secs_f64() * 1e3,
                compute_ms = report.compute.as_secs_f64() * 1e3,
                apply_ms = report.apply.as_secs_f64() * 1e3,
                observed = report.observed,
                "reconciled"
            );
        }
        self.finish(report);
        true
    }

    /// One level-based pass: dump, read sysctls, plan, apply.
    async fn reconcile(&mut self) {
        self.pass(Pass::Full, None).await
    }

    /// A pass for learned-route changes: plans against the cached kernel
    /// state when there is one (no dump), else a full pass.
    async fn reconcile_incremental(&mut self) {
        self.pass(Pass::Rib, None).await
    }

    /// `learned`: for an intent or links pass, the learned prefixes changed
    /// since the last pass (`reconcile::scoped::Before`), which are planned
    /// with those the intent makes local or gives back; `None`: unknown,
    /// every learned route is computed.
    async fn pass(&mut self, kind: Pass, learned: Option<reconcile::scoped::Before>) {
        let start = Instant::now();
        // An intent change recomputes what the VMs want (O(VMs)) and plans
        // learned routes only where it makes prefixes local or gives them
        // back (`plan_host`): a VM start on a hypervisor with 100,000
        // learned routes does not recompute them (it took 0.1-0.3 s).
        let mut host_only = matches!(kind, Pass::Intent | Pass::Links)
            && learned.is_some()
            && self.cache.is_some()
            && self.nexthop_objects()
            && self.learned_hold.is_none()
            && !self.rib.is_syncing(Instant::now());
        // The learned routes are added once the kernel is known: whether
        // a key keeps its group depends on whether the kernel has it
        // (`reconcile::groups`, "Direct keys").
        let mut desired = reconcile::desired_host(&self.config, &self.intent, &self.rib);
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
        if let Some((groups, took)) = self.fast_path.take() {
            report.fast_path_groups = groups;
            report.fast_path = took;
        }
        let t = Instant::now();
        let cached = match kind {
            Pass::Full => None,
            Pass::Intent | Pass::Rib | Pass::Links => self.cache.take(),
        };
        // RIB and intent changes plan against the cache as it is when the
        // pass it comes from changed only routes (its mirror is whole): a
        // VM start then dumps nothing (0.2 ms of a 1.3 ms prepare).
        // Otherwise they dump links, addresses and rules (what grows with
        // VMs) and take routes, nexthop objects and proxy entries (what
        // grows with learned routes) from the cache: a VM start never
        // dumps 100,000 learned routes. The full dump stays the repair path
        // (timer, link events, which also cover links changed under us,
        // `l3hv reconcile`, after any refusal).
        // An intent change also needs every link it wants to be known: an
        // interface created under us moments ago (its link event is still
        // in the 50 ms debounce) is not in the cache, so that pass dumps.
        // And the interfaces of the VMs this pass changes must be the ones
        // the mirror knows (same ifindex): an adopted interface deleted and
        // created again under us moments ago looks unchanged by name.
        let touched = std::mem::take(&mut self.touched);
        let links_known = |c: &reconcile::ObservedKernel| {
            desired
                .links
                .iter()
                .all(|(name, l)| match c.links.get(name) {
                    Some(o) => {
                        !touched.contains(name)
                            || crate::netlink::tap::ifindex(name) == Some(o.ifindex)
                    }
                    None => {
                        matches!(l.ownership, reconcile::Ownership::Created { .. })
                            && crate::netlink::tap::ifindex(name).is_none()
                    }
                })
        };
        let incremental = self.cache_host_valid
            && match (&cached, kind) {
                (Some(_), Pass::Rib) => true,
                (Some(c), Pass::Intent) => links_known(c),
                _ => false,
            };
        let host_dump = cached.is_some() && !incremental;
        let dumped = match cached {
            Some(c) if incremental => Ok(c),
            Some(c) => self
                .kernel
                .dump_host(&self.uplink_names())
                .await
                .map(|mut o| {
                    // A link gone, made again (a new ifindex) or set down
                    // since the cache took its routes and proxy entries
                    // with it: they are not carried over.
                    // (Down and up again meanwhile: `bounced`, below.)
                    let stale: BTreeSet<&String> = c
                        .links
                        .iter()
                        .filter(|(name, was)| {
                            o.links
                                .get(*name)
                                .is_none_or(|now| now.ifindex != was.ifindex || (was.up && !now.up))
                        })
                        .map(|(name, _)| name)
                        .collect();
                    let kept =
                        |oif: &Option<String>| oif.as_ref().is_none_or(|l| !stale.contains(l));
                    let mut routes = c.routes;
                    let mut duplicates = c.duplicate_routes;
                    let mut proxies = c.proxies;
                    if !stale.is_empty() {
                        routes.retain(|_, a| kept(&a.oif));
                        duplicates.retain(|(_, a)| kept(&a.oif));
                        proxies.retain(|(l, _)| !stale.contains(l));
                    }
                    o.routes = routes;
                    o.duplicate_routes = duplicates;
                    o.nexthops = c.nexthops;
                    o.groups = c.groups;
                    o.proxies = proxies;
                    o
                }),
            None => {
                // The dump sees the kernel as it is: what the notifications
                // still pending would have said is in it (and `created`
                // stays bounded without link notifications).
                self.bounced.clear();
                self.created.clear();
                self.kernel.dump(&self.uplink_names()).await
            }
        };
        report.observed = if incremental {
            "cache"
        } else if host_dump {
            "host"
        } else {
            // A dumped route map is built by ascending inserts.
            self.cache_compacted = 0;
            "full"
        };
        self.cache = None;
        self.cache_host_valid = false;
        report.dump = t.elapsed();
        let mut observed = match dumped {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "kernel dump failed");
                report.error = Some(e.to_string());
                report.duration = start.elapsed();
                self.schedule_next(true);
                self.finish(report);
                return;
            }
        };
        if !self.hold_checked {
            self.hold_checked = true;
            // A cold start (no learned route or nexthop group of a previous
            // run in the kernel) has nothing to hold.
            let metric = self.config.kernel.learned_route_metric;
            if observed.groups.is_empty() && !observed.routes.keys().any(|id| id.metric == metric) {
                self.learned_hold = None;
            }
        }
        let t = Instant::now();
        if incremental {
            // Sysctls were settled by the pass the cache comes from.
            observed.sysctls.clear();
        }
        // Host and uplink sysctls too, unless only the RIB changed: which
        // of them are wanted follows the intent (the first VM of a
        // shared-/64 fabric wants proxy_ndp), so the cache's pass may not
        // have settled the ones an intent change adds.
        // Against the cache, those the last pass left at the value wanted
        // now are not read again: eight files, five system calls each, of
        // every VM start (a change made under us is the periodic full
        // pass's to repair, as for the routes).
        let unsettled = BTreeMap::new();
        let host = if !incremental {
            Some(&unsettled)
        } else if kind != Pass::Rib {
            Some(&self.host_settled)
        } else {
            None
        };
        let reads = reconcile::sysctls_to_read(&desired, &observed, &self.verified, host);
        // Read in place: the agent's thread runs only the agent and the
        // BGP sessions (see [`spawn`]), and /proc/sys reads take microseconds, where a hop to
        // a blocking thread and back costs two wake-ups (tens of µs each on
        // a virtual machine, much more in the tail).
        observed.sysctls.extend(sysctl::read_many(&reads.read));
        observed
            .sysctls
            .extend(reads.absent.into_iter().map(|p| (p, None)));
        report.sysctls = t.elapsed();
        let t = Instant::now();
        if !host_only {
            reconcile::add_learned(
                &self.config,
                &self.rib,
                &mut desired,
                self.nexthops(&observed),
            );
        }
        let host_plan = host_only.then(|| {
            reconcile::scoped::plan_intent(
                &self.config,
                &self.intent,
                &self.rib,
                &desired,
                learned.unwrap_or_default(),
                &mut self.last_groups,
                &observed,
            )
        });
        let mut plan = match host_plan {
            Some(Ok(p)) => p,
            Some(Err(reason)) => {
                debug!(reason, "the intent change needs the pass over every route");
                // The learned side refused: everything, as usual.
                host_only = false;
                reconcile::add_learned(
                    &self.config,
                    &self.rib,
                    &mut desired,
                    self.nexthops(&observed),
                );
                reconcile::plan(&desired, &observed)
            }
            None => reconcile::plan(&desired, &observed),
        };
        report.learned_scoped = host_only;
        // Links that went down and up again since the cache took their
        // routes and proxy entries: the kernel deleted those, or not (the
        // notification may predate this agent configuring the link), so
        // what is wanted on them is written again as replacements.
        let bounced = std::mem::take(&mut self.bounced);
        if !bounced.is_empty() {
            let on = |l: &String| bounced.contains(l) && observed.links.contains_key(l);
            let planned: BTreeSet<reconcile::RouteId> = plan
                .add_routes
                .iter()
                .filter_map(|op| match op {
                    KernelOp::AddRoute { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            let routes = desired
                .routes
                .iter()
                .filter(|(id, a)| a.oif.as_ref().is_some_and(on) && !planned.contains(id))
                .map(|(id, a)| KernelOp::AddRoute {
                    id: *id,
                    attrs: a.clone(),
                    replace: true,
                });
            let proxies =
                desired
                    .proxies
                    .iter()
                    .filter(|(l, _)| on(l))
                    .map(|(l, a)| KernelOp::AddProxy {
                        ifname: l.clone(),
                        addr: *a,
                    });
            let again: Vec<KernelOp> = routes
                .chain(proxies)
                .filter(|op| !plan.add_routes.contains(op))
                .collect();
            plan.add_routes.extend(again);
        }
        if let Some(until) = self.learned_hold {
            if Instant::now() < until {
                // Keep only what nothing else claims: a learned route whose
                // prefix is now local (or routed otherwise) goes at once.
                let metric = self.config.kernel.learned_route_metric;
                // A prefix the RIB has heard of since start follows the RIB;
                // one routed by a local VM goes at once. The blackhole at
                // the bottom of the table claims nothing.
                let claimed = |id: &reconcile::RouteId| {
                    let first = reconcile::RouteId { metric: 0, ..*id };
                    let last = reconcile::RouteId {
                        metric: u32::MAX,
                        ..*id
                    };
                    self.relearned.contains(&id.dst)
                        || desired
                            .routes
                            .range(first..=last)
                            .any(|(_, a)| a.kind == reconcile::RouteKind::Unicast)
                };
                plan.remove.retain(|op| {
                    !matches!(op, KernelOp::DelRoute { id, .. } if id.metric == metric && !claimed(id))
                });
                // The kept routes keep their groups whole: no group or
                // object goes, no member leaves a group (sessions still
                // relearning add them back).
                plan.remove_groups.clear();
                plan.remove_nexthops.clear();
                // A group all of whose routes are relearned follows the RIB
                // like they do: a session that goes down during the hold
                // (BFD, a reflector) still takes its members out.
                let mut stale_groups: BTreeSet<u32> = BTreeSet::new();
                for (id, attrs) in &desired.routes {
                    if let Some(g) = attrs.nh_id {
                        if !self.relearned.contains(&id.dst) {
                            stale_groups.insert(g);
                        }
                    }
                }
                plan.add_groups.retain_mut(|op| {
                    let KernelOp::AddGroup {
                        id,
                        members,
                        replace: true,
                    } = op
                    else {
                        return true;
                    };
                    if !stale_groups.contains(id) {
                        return true;
                    }
                    let Some(have) = observed.groups.get(id) else {
                        return true;
                    };
                    let union: BTreeSet<u32> = have.iter().chain(members.iter()).copied().collect();
                    if union == *have {
                        return false;
                    }
                    *members = union.into_iter().collect();
                    true
                });
            } else {
                self.learned_hold = None;
                self.relearned.clear();
            }
        }
        compute += t.elapsed();
        report.compute = compute;
        report.planned = plan.len();
        let t = Instant::now();
        self.deferred = std::mem::take(&mut plan.delete_links);
        let applied = if plan.is_empty() {
            ApplyReport::default()
        } else {
            debug!(ops = plan.len(), "applying plan");
            self.kernel.apply(&plan).await
        };
        if let Some(announce) = self.announce.take() {
            // Before the pass's bookkeeping: the route leaves for the
            // reflectors as soon as this hypervisor forwards to it. The
            // sessions run on this thread (`spawn`): they write their
            // UPDATEs now, not when this task next waits (on the intent's
            // fsync, after the bookkeeping: +20-30 us to the reflector).
            self.published.send_replace(announce);
            tokio::task::yield_now().await;
        }
        for f in &applied.failed {
            warn!(op = ?f.op, error = %f.error, "kernel refused");
        }
        // The kernel's routes, nexthop objects and proxy entries are known
        // without a dump when every change went through (links, addresses
        // and sysctls do not move them; a tap deleted after the pass had
        // its routes deleted by it first). Links, addresses and rules are
        // known too: the mirror below applies this pass's changes to them
        // (and `apply_deferred` its link deletions), so the next VM start
        // dumps nothing (a host dump was 0.3 ms of every `prepare`).
        // Changes made under us arrive as link events, whose pass dumps.
        let mirrorable = applied.failed.is_empty() && observed.duplicate_routes.is_empty();
        let mut host_valid = mirrorable;
        // Host and uplink sysctls now as wanted: those the pass read (or
        // the pass before settled) and wrote without a refusal.
        let refused: BTreeSet<&str> = applied
            .failed
            .iter()
            .filter_map(|f| match &f.op {
                KernelOp::Sysctl { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect();
        let mut settled: BTreeMap<reconcile::SysctlPath, String> = BTreeMap::new();
        let wanted = desired
            .host_sysctls
            .iter()
            .map(|(p, v)| (p.clone(), v))
            .chain(
                desired
                    .uplinks
                    .iter()
                    .filter(|(name, _)| observed.links.contains_key(*name))
                    .flat_map(|(name, u)| u.sysctls.iter().map(|(s, v)| (s.path(name), v))),
            );
        for (path, value) in wanted {
            if !refused.contains(path.as_str()) {
                settled.insert(path, value.clone());
            }
        }
        self.host_settled = settled;
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
            let created = |op: &KernelOp| matches!(op, KernelOp::CreateTap { name: n, .. } | KernelOp::CreateSink { name: n } if n == name);
            let idx = match observed.links.get(name) {
                Some(o) => Some(o.ifindex),
                // Created in this pass (a link that appeared meanwhile was
                // not configured by it: not verified).
                None if plan.create_links.iter().any(created) => crate::netlink::tap::ifindex(name),
                None => None,
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
                dump_ms = report.dump.as_secs_f64() * 1e3,
                sysctls_ms = report.sysctls.as_secs_f64() * 1e3,
                compute_ms = report.compute.as_secs_f64() * 1e3,
                apply_ms = report.apply.as_secs_f64() * 1e3,
                observed = report.observed,
                "reconciled"
            );
        } else {
            debug!(
                duration_ms = report.duration.as_secs_f64() * 1e3,
                "reconciled, no change"
            );
        }
        if mirrorable {
            for phase in plan.phases() {
                for op in phase {
                    if observed.mirror(op) {
                        continue;
                    }
                    match op {
                        KernelOp::CreateTap { name, .. } | KernelOp::CreateSink { name } => {
                            match crate::netlink::tap::ifindex(name) {
                                Some(ifindex) => {
                                    self.created.insert((name.clone(), ifindex));
                                    observed.links.insert(
                                        name.clone(),
                                        reconcile::ObservedLink {
                                            name: name.clone(),
                                            ifindex,
                                            up: false,
                                            alias: None,
                                            addresses: BTreeSet::new(),
                                        },
                                    );
                                }
                                None => host_valid = false,
                            }
                        }
                        KernelOp::SetAlias { name, alias } => match observed.links.get_mut(name) {
                            // An empty alias (a released adopted link) is
                            // none, as the kernel reports it.
                            Some(l) => l.alias = (!alias.is_empty()).then(|| alias.clone()),
                            None => host_valid = false,
                        },
                        KernelOp::SetUp { name } => match observed.links.get_mut(name) {
                            Some(l) => l.up = true,
                            None => host_valid = false,
                        },
                        KernelOp::AddAddress { ifname, addr, .. } => {
                            match observed.links.get_mut(ifname) {
                                Some(l) => {
                                    l.addresses.insert(*addr);
                                }
                                None => host_valid = false,
                            }
                        }
                        KernelOp::DelAddress { ifname, addr } => {
                            if let Some(l) = observed.links.get_mut(ifname) {
                                l.addresses.remove(addr);
                            }
                        }
                        KernelOp::AddRule { rule } => {
                            observed.rules.insert(rule.clone());
                        }
                        KernelOp::DelRule { rule } => {
                            observed.rules.remove(rule);
                        }
                        KernelOp::DelForeignRule { v6, priority } => {
                            observed.foreign_rules.remove(&(*v6, *priority));
                        }
                        // Deleted links: in `apply_deferred`. Sysctls are
                        // read again by every pass that wants them.
                        KernelOp::DeleteLink { .. } | KernelOp::Sysctl { .. } => {}
                        // Mirrored above.
                        KernelOp::AddRoute { .. }
                        | KernelOp::DelRoute { .. }
                        | KernelOp::AddProxy { .. }
                        | KernelOp::DelProxy { .. }
                        | KernelOp::AddNexthop { .. }
                        | KernelOp::AddGroup { .. }
                        | KernelOp::DelNexthop { .. } => {}
                    }
                }
            }
            self.cache = Some(observed);
            self.cache_host_valid = host_valid;
        }
        if !host_only {
            // (Otherwise `plan_intent` updated them.)
            self.last_groups = reconcile::DesiredKernel {
                nexthops: std::mem::take(&mut desired.nexthops),
                groups: std::mem::take(&mut desired.groups),
                direct: std::mem::take(&mut desired.direct),
                group_keys: std::mem::take(&mut desired.group_keys),
                group_use: std::mem::take(&mut desired.group_use),
                local: std::mem::take(&mut desired.local),
                host_routes: std::mem::take(&mut desired.host_routes),
                probed: desired.probed,
                ..Default::default()
            };
            // (A hold that expired in this pass was lifted above.)
            self.groups_exact = self.learned_hold.is_none();
        }
        // What this pass built is dropped before the mirror is rebuilt, so
        // the two never add up.
        let big = report.planned >= BIG_PASS || report.observed == "full";
        drop(desired);
        drop(plan);
        let mut compacted = false;
        if let Some(cache) = &mut self.cache {
            compacted = crate::btree::compact_past(&mut cache.routes, &mut self.cache_compacted);
        }
        if (big && self.rib.prefix_count() >= BIG_PASS) || compacted {
            // glibc keeps what a big pass freed (the desired state, the
            // plan, a dump: hundreds of MB at 1,000,000 routes) in its
            // arenas; malloc_trim(3) gives the free pages back. Off the
            // agent's task: it walks every arena.
            tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only releases free memory; it takes
                // the arenas' locks itself.
                unsafe { libc::malloc_trim(0) };
            });
        }
        self.schedule_next(!report.failed.is_empty());
        self.finish(report);
    }

    /// Keeps the report and publishes the totals.
    fn finish(&mut self, report: ReconcileReport) {
        self.stats.record(&report);
        self.stats_published
            .send_replace(Arc::new(self.stats.clone()));
        // Trimming costs a few hundred microseconds: only after passes big
        // enough to have left much memory behind.
        let large = report.planned > 1000
            || (report.observed != "scoped" && self.rib.prefix_count() > 10_000);
        self.last = Some(report);
        if large {
            trim_heap();
        }
    }

    fn schedule_next(&mut self, failed: bool) {
        let interval = self.config.kernel.reconcile_interval;
        if failed {
            self.next_reconcile = Instant::now() + self.retry.min(interval);
            self.retry = (self.retry * 2).min(interval);
        } else {
            self.next_reconcile = Instant::now() + interval;
            self.retry = RETRY_MIN;
        }
        if let Some(until) = self.learned_hold {
            self.next_reconcile = self.next_reconcile.min(until);
        }
    }

    async fn routes(&mut self, filter: Option<ipnet::IpNet>) -> Vec<routes::RouteView> {
        let dumped;
        let observed = match &self.cache {
            Some(c) => c,
            None => {
                dumped = self
                    .kernel
                    .dump(&self.uplink_names())
                    .await
                    .unwrap_or_default();
                &dumped
            }
        };
        let desired = reconcile::desired_with(
            &self.config,
            &self.intent,
            &self.rib,
            self.nexthops(observed),
        );
        let failed: BTreeMap<reconcile::RouteId, String> = self
            .last
            .iter()
            .flat_map(|r| r.failed.iter())
            .filter_map(|f| match &f.op {
                KernelOp::AddRoute { id, .. } => Some((*id, f.error.clone())),
                _ => None,
            })
            .collect();
        routes::build(&self.config, &self.rib, &desired, observed, &failed, filter)
    }

    fn status(&self) -> Status {
        let mut s = status::build(
            &self.config,
            &self.intent,
            &self.rib,
            self.last.as_ref(),
            self.started,
        );
        s.services = self.services.as_ref().map(|r| r.snapshot());
        s.reconcile_passes = self.stats.passes;
        s.reconcile_scoped_passes = self.stats.scoped;
        s.reconcile_full_passes = self.stats.full;
        s.nexthops = status::NexthopStatus {
            mode: nexthop_mode(self.config.kernel.nexthop_objects, self.nexthop_support).into(),
            setting: self.config.kernel.nexthop_objects.as_str().into(),
            kernel_support: self.nexthop_support,
            objects: self.last_groups.nexthops.len(),
            groups: self.last_groups.groups.len(),
            direct: self.last_groups.direct.len(),
            failovers: self.stats.failovers,
            failover_objects_deleted: self.stats.failover_objects_deleted,
            failover_groups_replaced: self.stats.failover_groups_replaced,
        };
        s
    }

    /// Shows the counters of the DHCP/RA services in status.
    pub fn set_services(&mut self, registry: crate::services::Registry) {
        self.services = Some(registry);
    }
}

/// `objects` or `multipath`: what `kernel.nexthop_objects` comes to on a
/// kernel with (or without) nexthop objects.
fn nexthop_mode(setting: crate::config::NexthopObjects, support: Option<bool>) -> &'static str {
    use crate::config::NexthopObjects;
    match (setting, support) {
        (NexthopObjects::On, _) | (NexthopObjects::Auto, Some(true)) => "objects",
        _ => "multipath",
    }
}

/// Gives the memory of a pass's transient state (dumps, desired, plan)
/// back to the system: glibc keeps freed arenas otherwise, and a pass over
/// 100,000 routes would leave its peak resident for good.
fn trim_heap() {
    // SAFETY: malloc_trim has no preconditions; it only releases free
    // memory at the top of the heap and in unused arenas.
    unsafe {
        libc::malloc_trim(0);
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

/// Spawns the agent loop on a thread of its own; returns the thread and a
/// handle to its runtime, where l3hvd starts the BGP speaker.
///
/// Resolves when `thread` ends, saying how (its panic message if it
/// panicked). The agent's thread never ends while l3hvd runs (its loop
/// lives as long as the handles the process holds): when it does, its
/// runtime and the BGP sessions on it are gone, and l3hvd must exit at once
/// (systemd restarts it) instead of answering calls it can no longer serve
/// until the watchdog notices. The join waits on a plain thread of its own,
/// which does not hold up the process's exit.
pub fn thread_exit(
    thread: std::thread::JoinHandle<()>,
) -> impl std::future::Future<Output = String> + Send + 'static {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("l3hv-agent-join".into())
        .spawn(move || {
            let how = match thread.join() {
                Ok(()) => "returned".to_string(),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    format!("panicked: {msg}")
                }
            };
            let _ = tx.send(how);
        });
    if let Err(e) = &spawned {
        // Without the watcher, the watchdog is what notices.
        warn!(error = %e, "cannot watch the agent's thread");
    }
    async move {
        match rx.await {
            Ok(how) => how,
            Err(_) => std::future::pending().await,
        }
    }
}

/// A thread and a single-threaded runtime of its own: a pass computes over
/// the whole RIB without yielding (0.1-0.6 s at 1,000,000 routes) and
/// wrote its routes without yielding (seconds), and on
/// the shared workers that held up whatever was queued behind it, a BGP
/// session's KEEPALIVEs up to 1.65 s late (a reflector with a 3 s hold
/// time reset the session; BENCHMARKS.md), DHCP and the API alike. Its
/// netlink connection is opened again there; timers and sockets it made
/// before stay with the main runtime, which keeps driving them.
///
/// The BGP sessions run on this runtime too: an UPDATE read is in the RIB
/// and its route in the kernel without a wake-up of another thread, and a
/// VM's UPDATE leaves right after its routes (each crossing was 30-40 us
/// at the median and hundreds at p90 on both hypervisors). The pass makes
/// room for them: its kernel writes yield between slices of 4,096
/// operations (`Kernel::apply`) and the dumps are async; what does not
/// yield is its computation (up to 0.6 s at 1,000,000 routes), which a
/// KEEPALIVE may wait for, well inside a 3 s hold time's second.
pub fn spawn(
    agent: Agent,
) -> std::io::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)> {
    let (htx, hrx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("l3hv-agent".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _ = htx.send(rt.handle().clone());
                    rt.block_on(async move {
                        let mut agent = agent;
                        // The netlink connection's reader on this thread too:
                        // driven from the main runtime, every request and its
                        // answer crossed threads (a 1,000,000-route learn took
                        // 17.0 s instead of 12.2, with 4 s more system time).
                        match Kernel::connect(agent.config.kernel.route_protocol) {
                            Ok(k) => agent.kernel = k,
                            Err(e) => {
                                warn!(error = %e, "netlink connection stays on the main runtime")
                            }
                        }
                        agent.run().await
                    })
                }
                Err(e) => tracing::error!(error = %e, "cannot start the agent's runtime"),
            }
        })?;
    let handle = hrx
        .recv()
        .map_err(|_| std::io::Error::other("the agent's runtime did not start"))?;
    Ok((thread, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The libvirt reconcile lists a domain running, its hook's `release`
    /// reaches the agent first (`virsh destroy` during a reconnect): the
    /// reconcile's late `set` must not bring the VM back (it did, for a
    /// few ms: tap, routes and BGP announcement of a stopped guest).
    #[test]
    fn a_vm_removed_after_the_callers_count_is_not_set_again() {
        crate::testutil::in_private_netns(|| async {
            let dir = std::env::temp_dir().join(format!(
                "l3hv-agent-removals-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let text = crate::config::tests::MIN.replace(
                "[hypervisor]\n",
                &format!("[hypervisor]\nstate_dir = \"{}\"\n", dir.display()),
            );
            let config = crate::config::parse("t.toml", &text).expect("config");
            let (agent, handle) = Agent::new(config).expect("agent");
            let vm: VmIntent = serde_json::from_value(serde_json::json!({
                "name": "vm1",
                "interfaces": [{"name": "t1", "mac": "52:54:00:00:00:01",
                                "fabric": "public", "ipv4": ["203.0.113.1"]}],
            }))
            .expect("vm");
            let vms = || handle.call(|reply| Command::ListVms { reply });
            let body = async {
                let since = handle
                    .call(|reply| Command::Removals { reply })
                    .await
                    .unwrap();
                // The release, then the reconcile's set from before it.
                handle
                    .call(|reply| Command::RemoveVm {
                        name: "vm1".into(),
                        reply,
                    })
                    .await
                    .unwrap()
                    .unwrap();
                let set = |since| {
                    let vm = vm.clone();
                    handle.call(move |reply| Command::SetVmUnlessRemoved { vm, since, reply })
                };
                set(since).await.unwrap().unwrap();
                assert!(vms().await.unwrap().is_empty(), "brought back");
                // Counted after the removal: set.
                let now = handle
                    .call(|reply| Command::Removals { reply })
                    .await
                    .unwrap();
                assert_eq!(now, since + 1);
                set(now).await.unwrap().unwrap();
                assert_eq!(vms().await.unwrap().len(), 1);
            };
            tokio::select! {
                _ = agent.run() => panic!("the agent stopped"),
                _ = body => {}
            }
            let _ = std::fs::remove_dir_all(&dir);
        });
    }

    #[tokio::test]
    async fn a_panicking_agent_thread_is_noticed_with_its_message() {
        let t = std::thread::spawn(|| panic!("boom {}", 7));
        assert_eq!(thread_exit(t).await, "panicked: boom 7");
        let t = std::thread::spawn(|| std::panic::panic_any(3u8));
        assert_eq!(thread_exit(t).await, "panicked: (no message)");
        let t = std::thread::spawn(|| {});
        assert_eq!(thread_exit(t).await, "returned");
        // A thread that runs on is not an exit.
        let (stop, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = wait.recv();
        });
        let exit = thread_exit(t);
        tokio::pin!(exit);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut exit)
                .await
                .is_err()
        );
        drop(stop);
        assert_eq!(exit.await, "returned");
    }
}
