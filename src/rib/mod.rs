//! PURE Loc-RIB: every path learned from every session (ADD-PATH paths
//! from several hypervisors included), per fabric, and the selection that
//! the kernel gets: the best paths by LOCAL_PREF then AS_PATH length, and
//! all of them with distinct next hops installed as ECMP (the seed's BIRD
//! "merge paths"). A local VM route always wins on its own hypervisor; that
//! is decided where local and learned routes meet, in
//! `reconcile::desired`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::Serialize;

/// A path as the RIB keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Path {
    pub next_hop: IpAddr,
    /// The uplink the session runs on: the next hop is reached through it.
    pub uplink: Arc<str>,
    pub local_pref: u32,
    pub as_path_len: usize,
    /// ORIGINATOR_ID (RFC 4456 §8), added by the route reflector: the
    /// hypervisor that announced the path, whichever reflector carried it.
    pub originator: Option<Ipv4Addr>,
}

impl Path {
    /// Who stands behind this path: its ORIGINATOR_ID, or its next hop
    /// when it has none (a path the reflector originated itself). The
    /// nexthop group of a prefix is keyed by these (reconcile::groups).
    pub fn origin(&self) -> IpAddr {
        self.originator.map_or(self.next_hop, IpAddr::V4)
    }
}

/// What a session reports to the RIB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RibEvent {
    /// Paths added or replaced, and withdrawn, by one session.
    Update {
        session: Arc<str>,
        fabric: String,
        announce: Vec<(IpNet, Option<u32>, Path)>,
        withdraw: Vec<(IpNet, Option<u32>)>,
    },
    /// The session went down: all its paths go.
    SessionDown { session: Arc<str> },
    /// The session received End-of-RIB for every family it negotiated: its
    /// initial table is complete (RFC 4724). Paths kept stale across the
    /// peer's restart and not refreshed since go now.
    EndOfRib { session: Arc<str> },
    /// Graceful restart helper (RFC 4724 §4.2): the session's connection
    /// ended without a NOTIFICATION and the peer advertised graceful
    /// restart: its paths stay, marked stale, until it is back and has sent
    /// End-of-RIB or `SweepStale` of the same generation comes.
    /// Paths of families the peer does not preserve go at once.
    SessionStale {
        session: Arc<str>,
        generation: u64,
        keep_v4: bool,
        keep_v6: bool,
    },
    /// The peer's restart time passed: its stale paths go.
    SweepStale { session: Arc<str>, generation: u64 },
}

/// A session whose paths are (partly) stale.
#[derive(Debug, Clone, Default)]
struct Stale {
    /// Graceful restart generation.
    generation: u64,
    v4: bool,
    v6: bool,
    /// (prefix, path id) announced again since.
    refreshed: BTreeSet<(IpNet, Option<u32>)>,
}

/// One ECMP member as installed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Hop {
    pub gateway: IpAddr,
    pub uplink: Arc<str>,
}

/// Paths of one origin over one hop that an UPDATE withdraws while their
/// prefixes keep another path of that origin ([`Rib::partially_withdrawn`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialWithdrawal {
    pub origin: IpAddr,
    pub hop: Hop,
    /// Of IPv6 prefixes (their groups are apart from the IPv4 ones).
    pub v6: bool,
    /// How many prefixes.
    pub prefixes: usize,
}

/// The ECMP set of a prefix with the origins of its paths.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selected {
    /// Sorted, without duplicates.
    pub hops: Vec<Hop>,
    /// [`Path::origin`] of every selected path, sorted, without duplicates.
    pub origins: Vec<IpAddr>,
}

/// What a stored path says besides its id, interned ([`AttrTable`]): the
/// paths of a reflector's feed share a handful of these (one per origin,
/// fabric path and policy), so a path costs its 12-byte [`Stored`] rather
/// than these 40 bytes. Fabric, session and uplink are indexes into the
/// RIB's name table, the AS_PATH length a u16 (an UPDATE cannot carry
/// more). With their path counts, they are also what the failover fast
/// path asks which hops are still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Attrs {
    fabric: u32,
    next_hop: IpAddr,
    local_pref: u32,
    as_path_len: u16,
    originator: Option<Ipv4Addr>,
    session: u32,
    uplink: u32,
}

impl Attrs {
    fn origin(&self) -> IpAddr {
        self.originator.map_or(self.next_hop, IpAddr::V4)
    }
    fn rank(&self) -> (u32, std::cmp::Reverse<u16>) {
        (self.local_pref, std::cmp::Reverse(self.as_path_len))
    }
}

/// Interned [`Attrs`] with a count of the paths holding each; a slot whose
/// last path went is reused.
#[derive(Debug, Clone, Default)]
struct AttrTable {
    slots: Vec<(Attrs, u32)>,
    index: HashMap<Attrs, u32>,
    free: Vec<u32>,
}

impl AttrTable {
    /// One more path with `a`: its index.
    fn intern(&mut self, a: Attrs) -> u32 {
        if let Some(&i) = self.index.get(&a) {
            self.slots[i as usize].1 += 1;
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = (a, 1);
                i
            }
            None => {
                self.slots.push((a, 1));
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.index.insert(a, i);
        i
    }

    /// One path fewer with `i`.
    fn release(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        slot.1 -= 1;
        if slot.1 == 0 {
            self.index.remove(&slot.0);
            self.free.push(i);
        }
    }

    fn get(&self, i: u32) -> &Attrs {
        // Every index comes from `intern` and is released once.
        &self.slots[i as usize].0
    }

    /// Every attribute set some path holds.
    fn in_use(&self) -> impl Iterator<Item = &Attrs> {
        self.slots.iter().filter(|(_, n)| *n > 0).map(|(a, _)| a)
    }

    /// Distinct attribute sets in use.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }
}

/// A path as the RIB stores it: its interned attributes and its path id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    attrs: u32,
    path_id: Option<u32>,
}

/// The paths of one prefix: almost always one (one fabric path, one
/// origin) or two (both fabric paths), kept inline without an allocation
/// of their own; more spill into a vector. 32 bytes (48 when a path was
/// 44 bytes itself; a BTreeMap per prefix cost ~1 KiB). By hand rather
/// than a `SmallVec<[Stored; 2]>` (as small only with smallvec's `union`
/// feature): a spill here grows by one path, not by doubling, and goes
/// back inline when paths leave, which a SmallVec does only when asked.
#[derive(Debug, Clone)]
enum Paths {
    One(Stored),
    Two([Stored; 2]),
    /// None (a prefix whose last path just went) or three and more.
    Many(Vec<Stored>),
}

impl Paths {
    fn new() -> Self {
        Paths::Many(Vec::new())
    }

    fn push(&mut self, p: Stored) {
        match self {
            Paths::Many(v) if v.is_empty() => *self = Paths::One(p),
            Paths::One(one) => *self = Paths::Two([*one, p]),
            Paths::Two([a, b]) => {
                let mut v = Vec::with_capacity(3);
                v.extend([*a, *b, p]);
                *self = Paths::Many(v);
            }
            Paths::Many(v) => {
                // Exact growth: paths past three come one at a time.
                v.reserve_exact(1);
                v.push(p);
            }
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Stored) -> bool) {
        *self = match self {
            Paths::One(p) if keep(p) => return,
            Paths::One(_) => Paths::new(),
            Paths::Two([a, b]) => match (keep(a), keep(b)) {
                (true, true) => return,
                (true, false) => Paths::One(*a),
                (false, true) => Paths::One(*b),
                (false, false) => Paths::new(),
            },
            Paths::Many(v) => {
                v.retain(|p| keep(p));
                match v.as_slice() {
                    [] => Paths::new(),
                    [one] => Paths::One(*one),
                    [a, b] => Paths::Two([*a, *b]),
                    _ => return,
                }
            }
        };
    }
}

impl std::ops::Deref for Paths {
    type Target = [Stored];
    fn deref(&self) -> &[Stored] {
        match self {
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Two(two) => two,
            Paths::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for Paths {
    fn deref_mut(&mut self) -> &mut [Stored] {
        match self {
            Paths::One(p) => std::slice::from_mut(p),
            Paths::Two(two) => two,
            Paths::Many(v) => v,
        }
    }
}

impl<'a> IntoIterator for &'a Paths {
    type Item = &'a Stored;
    type IntoIter = std::slice::Iter<'a, Stored>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Fabric, session and uplink names, interned: a few dozen over the
/// agent's life (a name stays when its session goes; it comes back with
/// it).
#[derive(Debug, Clone, Default)]
struct Names {
    list: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32>,
}

impl Names {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let i = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = name.into();
        self.list.push(name.clone());
        self.index.insert(name, i);
        i
    }
    fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }
    fn name(&self, i: u32) -> &Arc<str> {
        // Every index comes from `intern`.
        &self.list[i as usize]
    }
}

/// How long a session that came back counts as relearning its table when
/// it sends no End-of-RIB (FRR without graceful restart sends none).
pub const SYNC_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Rib {
    /// fabric → prefix → paths.
    fabrics: BTreeMap<String, BTreeMap<IpNet, Paths>>,
    /// Prefixes added since the tables were last rebuilt (btree::compact_when_grown).
    grown: usize,
    names: Names,
    /// The attributes of every stored path, interned, with their path
    /// counts.
    attrs: AttrTable,
    /// Sessions in a graceful restart: the generation, and the paths the
    /// peer announced again since (the others are stale).
    stale: BTreeMap<Arc<str>, Stale>,
    /// Sessions that went down (or stale) while the RIB ran and have not
    /// announced anything since.
    recovering: BTreeSet<Arc<str>>,
    /// Sessions that came back and are relearning their table: until
    /// End-of-RIB, or until the instant given.
    syncing: BTreeMap<Arc<str>, Instant>,
}

impl Rib {
    /// Applies an event; returns true when anything changed.
    pub fn apply(&mut self, event: RibEvent) -> bool {
        match event {
            RibEvent::Update {
                session,
                fabric,
                announce,
                withdraw,
            } => {
                if let Some(st) = self.stale.get_mut(&session) {
                    st.refreshed
                        .extend(announce.iter().map(|(p, id, _)| (*p, *id)));
                }
                if !announce.is_empty() && self.recovering.remove(&session) {
                    self.syncing
                        .insert(session.clone(), Instant::now() + SYNC_WINDOW);
                }
                let fid = self.names.intern(&fabric);
                let table = self.fabrics.entry(fabric).or_default();
                let attrs = &mut self.attrs;
                let mut changed = false;
                if let Some(sid) = self.names.get(&session) {
                    for (prefix, id) in withdraw {
                        if let Some(paths) = table.get_mut(&prefix) {
                            let before = paths.len();
                            paths.retain(|p| {
                                let gone = attrs.get(p.attrs).session == sid && p.path_id == id;
                                if gone {
                                    attrs.release(p.attrs);
                                }
                                !gone
                            });
                            changed |= paths.len() != before;
                            if paths.is_empty() {
                                table.remove(&prefix);
                            }
                        }
                    }
                }
                if announce.is_empty() {
                    return changed;
                }
                let sid = self.names.intern(&session);
                for (prefix, id, path) in announce {
                    let new = Attrs {
                        fabric: fid,
                        next_hop: path.next_hop,
                        local_pref: path.local_pref,
                        as_path_len: u16::try_from(path.as_path_len).unwrap_or(u16::MAX),
                        originator: path.originator,
                        session: sid,
                        uplink: self.names.intern(&path.uplink),
                    };
                    let paths = match table.entry(prefix) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            self.grown += 1;
                            e.insert(Paths::new())
                        }
                    };
                    match paths
                        .iter_mut()
                        .find(|p| attrs.get(p.attrs).session == sid && p.path_id == id)
                    {
                        Some(old) => {
                            if *attrs.get(old.attrs) != new {
                                attrs.release(old.attrs);
                                old.attrs = attrs.intern(new);
                                changed = true;
                            }
                        }
                        None => {
                            paths.push(Stored {
                                attrs: attrs.intern(new),
                                path_id: id,
                            });
                            changed = true;
                        }
                    }
                }
                crate::btree::compact_when_grown(table, &mut self.grown);
                changed
            }
            RibEvent::EndOfRib { session } => {
                self.recovering.remove(&session);
                self.syncing.remove(&session);
                self.sweep(&session, None)
            }
            RibEvent::SessionStale {
                session,
                generation,
                keep_v4,
                keep_v6,
            } => {
                self.syncing.remove(&session);
                self.recovering.insert(session.clone());
                let changed = self.remove_paths(&session, |prefix, _| match prefix {
                    IpNet::V4(_) => !keep_v4,
                    IpNet::V6(_) => !keep_v6,
                });
                self.stale.insert(
                    session,
                    Stale {
                        generation,
                        v4: keep_v4,
                        v6: keep_v6,
                        refreshed: BTreeSet::new(),
                    },
                );
                changed
            }
            RibEvent::SweepStale {
                session,
                generation,
            } => self.sweep(&session, Some(generation)),
            RibEvent::SessionDown { session } => {
                self.stale.remove(&session);
                self.syncing.remove(&session);
                self.recovering.insert(session.clone());
                self.remove_paths(&session, |_, _| true)
            }
        }
    }

    /// Removes the stale paths of `session` (those not announced again
    /// since it went stale), if it is stale in `generation` (any).
    fn sweep(&mut self, session: &Arc<str>, generation: Option<u64>) -> bool {
        match self.stale.get(session) {
            Some(st) if generation.is_none_or(|g| g == st.generation) => {}
            _ => return false,
        }
        let Some(st) = self.stale.remove(session) else {
            return false;
        };
        self.remove_paths(session, |prefix, id| {
            let family = if prefix.addr().is_ipv6() {
                st.v6
            } else {
                st.v4
            };
            family && !st.refreshed.contains(&(*prefix, id))
        })
    }

    fn remove_paths(
        &mut self,
        session: &Arc<str>,
        doomed: impl Fn(&IpNet, Option<u32>) -> bool,
    ) -> bool {
        let Some(sid) = self.names.get(session) else {
            return false;
        };
        let mut changed = false;
        let attrs = &mut self.attrs;
        for table in self.fabrics.values_mut() {
            table.retain(|prefix, paths| {
                let before = paths.len();
                paths.retain(|p| {
                    let gone = attrs.get(p.attrs).session == sid && doomed(prefix, p.path_id);
                    if gone {
                        attrs.release(p.attrs);
                    }
                    !gone
                });
                changed |= paths.len() != before;
                !paths.is_empty()
            });
        }
        changed
    }

    /// Sessions whose paths are kept stale (graceful restart helper).
    pub fn stale_sessions(&self) -> Vec<Arc<str>> {
        self.stale.keys().cloned().collect()
    }

    /// The ECMP set of every prefix of `fabric`.
    pub fn selected(&self, fabric: &str) -> BTreeMap<IpNet, BTreeSet<Hop>> {
        let mut out = BTreeMap::new();
        let Some(table) = self.fabrics.get(fabric) else {
            return out;
        };
        for (prefix, paths) in table {
            let hops = self.best(paths);
            if !hops.is_empty() {
                out.insert(*prefix, hops);
            }
        }
        out
    }

    /// The ECMP set of every prefix of `fabric`, with the origins of the
    /// selected paths (what nexthop groups are keyed by).
    pub fn selected_with_origins(&self, fabric: &str) -> Vec<(IpNet, Selected)> {
        let Some(table) = self.fabrics.get(fabric) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(table.len());
        for (prefix, paths) in table {
            if let Some(s) = self.select(paths) {
                out.push((*prefix, s));
            }
        }
        out
    }

    /// The ECMP set of one prefix of `fabric`, with the origins of its
    /// paths (`None`: the fabric has no path for it). The same selection
    /// as [`Rib::selected_with_origins`], in O(log prefixes).
    pub fn selection(&self, fabric: &str, prefix: &IpNet) -> Option<Selected> {
        self.select(self.fabrics.get(fabric)?.get(prefix)?)
    }

    fn select(&self, paths: &[Stored]) -> Option<Selected> {
        let top = paths.iter().map(|p| self.a(p).rank()).max()?;
        // Exact-size sorted vectors: a BTreeSet per prefix allocated a
        // whole B-tree node (~45 MB at 100,000 prefixes).
        let tied = paths.iter().filter(|p| self.a(p).rank() == top).count();
        let mut s = Selected {
            hops: Vec::with_capacity(tied),
            origins: Vec::with_capacity(tied),
        };
        for p in paths {
            if self.a(p).rank() == top {
                s.hops.push(self.hop(p));
                s.origins.push(self.a(p).origin());
            }
        }
        s.hops.sort_unstable();
        s.hops.dedup();
        s.origins.sort_unstable();
        s.origins.dedup();
        Some(s)
    }

    /// The prefixes of `fabric` whose address lies inside `net` (of any
    /// length), in order: O(log prefixes + matches).
    pub fn prefixes_within<'a>(
        &'a self,
        fabric: &str,
        net: IpNet,
    ) -> impl Iterator<Item = &'a IpNet> + use<'a> {
        // IpNet orders by family, then address, then prefix length.
        let (lo, hi) = match net {
            IpNet::V4(n) => (
                ipnet::Ipv4Net::new(n.network(), 0).map(IpNet::V4),
                ipnet::Ipv4Net::new(n.broadcast(), 32).map(IpNet::V4),
            ),
            IpNet::V6(n) => (
                ipnet::Ipv6Net::new(n.network(), 0).map(IpNet::V6),
                ipnet::Ipv6Net::new(n.broadcast(), 128).map(IpNet::V6),
            ),
        };
        let table = self.fabrics.get(fabric);
        let range = match (table, lo, hi) {
            (Some(t), Ok(lo), Ok(hi)) => Some(t.range(lo..=hi).map(|(p, _)| p)),
            _ => None,
        };
        range.into_iter().flatten()
    }

    /// Is a session relearning its table at `now` (its hops join groups
    /// early, see [`Rib::syncing_hops`])?
    pub fn is_syncing(&self, now: Instant) -> bool {
        self.syncing.values().any(|until| now < *until)
    }

    /// Every (origin, hop) that some path of `fabric` still has (the
    /// failover fast path checks group members against it): from the
    /// attribute sets paths hold, O(distinct attributes) rather than a scan
    /// of every path (2.9-22 ms of a failover at 100,000 paths).
    pub fn live_hops(&self, fabric: &str) -> BTreeSet<(IpAddr, Hop)> {
        let Some(fid) = self.names.get(fabric) else {
            return BTreeSet::new();
        };
        let keys: BTreeSet<(IpAddr, IpAddr, u32)> = self
            .attrs
            .in_use()
            .filter(|a| a.fabric == fid)
            .map(|a| (a.origin(), a.next_hop, a.uplink))
            .collect();
        keys.into_iter()
            .map(|(origin, gateway, uplink)| (origin, self.hop_of(gateway, uplink)))
            .collect()
    }

    /// The (origin, hop) pairs only `session` has paths through: what its
    /// going down takes out of the nexthop groups. O(distinct attributes),
    /// so the groups can shrink before the RIB drops the session's paths
    /// one by one (tens of ms at 100,000 paths).
    pub fn hops_only_of(&self, session: &str) -> Vec<(IpAddr, Hop)> {
        let Some(sid) = self.names.get(session) else {
            return Vec::new();
        };
        let (mine, others): (BTreeSet<_>, BTreeSet<_>) = self
            .attrs
            .in_use()
            .map(|a| {
                (
                    a.session == sid,
                    (a.fabric, a.origin(), a.next_hop, a.uplink),
                )
            })
            .partition(|(is_mine, _)| *is_mine);
        let others: BTreeSet<_> = others.into_iter().map(|(_, k)| k).collect();
        mine.into_iter()
            .map(|(_, k)| k)
            .filter(|k| !others.contains(k))
            .map(|(_, origin, gateway, uplink)| (origin, self.hop_of(gateway, uplink)))
            .collect()
    }

    fn hop_of(&self, gateway: IpAddr, uplink: u32) -> Hop {
        Hop {
            gateway,
            uplink: self.names.name(uplink).clone(),
        }
    }

    /// Every (origin, hop) that a path of `fabric` from a session still
    /// relearning its table at `now` has (see `SYNC_WINDOW`): a fabric path
    /// that came back. Nexthop groups take such a hop at its first
    /// re-announcement instead of when the last of the origin's prefixes
    /// has it again (reconcile::groups). Empty, without a scan, when no
    /// session is relearning.
    pub fn syncing_hops(&self, fabric: &str, now: Instant) -> BTreeSet<(IpAddr, Hop)> {
        let mut out = BTreeSet::new();
        let live: BTreeSet<u32> = self
            .syncing
            .iter()
            .filter(|(_, until)| now < **until)
            .filter_map(|(s, _)| self.names.get(s))
            .collect();
        if live.is_empty() {
            return out;
        }
        let Some(table) = self.fabrics.get(fabric) else {
            return out;
        };
        for paths in table.values() {
            for p in paths {
                if live.contains(&self.a(p).session) {
                    let item = (self.a(p).origin(), self.hop(p));
                    if !out.contains(&item) {
                        out.insert(item);
                    }
                }
            }
        }
        out
    }

    /// The prefixes of `fabric` with their paths as (session, path id,
    /// path), for `l3hv routes`.
    pub fn table(
        &self,
        fabric: &str,
    ) -> impl Iterator<Item = (&IpNet, impl Iterator<Item = (&Arc<str>, Option<u32>, Path)>)> {
        self.fabrics
            .get(fabric)
            .into_iter()
            .flat_map(|t| t.iter())
            .map(|(prefix, paths)| {
                (
                    prefix,
                    paths
                        .iter()
                        .map(|p| (self.names.name(self.a(p).session), p.path_id, self.path(p))),
                )
            })
    }

    /// The attributes of a stored path.
    fn a(&self, p: &Stored) -> &Attrs {
        self.attrs.get(p.attrs)
    }

    fn hop(&self, p: &Stored) -> Hop {
        let a = self.a(p);
        self.hop_of(a.next_hop, a.uplink)
    }

    fn path(&self, p: &Stored) -> Path {
        let a = self.a(p);
        Path {
            next_hop: a.next_hop,
            uplink: self.names.name(a.uplink).clone(),
            local_pref: a.local_pref,
            as_path_len: a.as_path_len as usize,
            originator: a.originator,
        }
    }

    /// Best paths: highest LOCAL_PREF, then shortest AS_PATH; every path
    /// tied on both is a member of the ECMP set (one member per next hop).
    fn best(&self, paths: &[Stored]) -> BTreeSet<Hop> {
        let Some(top) = paths.iter().map(|p| self.a(p).rank()).max() else {
            return BTreeSet::new();
        };
        paths
            .iter()
            .filter(|p| self.a(p).rank() == top)
            .map(|p| self.hop(p))
            .collect()
    }

    /// The paths an UPDATE withdraws whose prefix keeps another path of
    /// the same origin, counted per (origin, hop, family): a partial
    /// withdrawal, the sign of a fabric path failing for that origin when
    /// it is many prefixes (a whole prefix withdrawn is a VM going, not a
    /// path; a few partial ones, the paths of a stopping VM's prefixes
    /// withdrawn one reflector after the other). Call before applying the
    /// event.
    pub fn partially_withdrawn(&self, event: &RibEvent) -> Vec<PartialWithdrawal> {
        let RibEvent::Update {
            session,
            fabric,
            withdraw,
            ..
        } = event
        else {
            return Vec::new();
        };
        let Some(table) = self.fabrics.get(fabric) else {
            return Vec::new();
        };
        let Some(sid) = self.names.get(session) else {
            return Vec::new();
        };
        // Looked up once per path, not by scanning the list (an UPDATE may
        // withdraw thousands of prefixes).
        let withdrawn: BTreeSet<(IpNet, Option<u32>)> = withdraw.iter().copied().collect();
        let mut out: Vec<PartialWithdrawal> = Vec::new();
        for (prefix, id) in withdraw {
            let Some(paths) = table.get(prefix) else {
                continue;
            };
            let Some(p) = paths
                .iter()
                .find(|p| self.a(p).session == sid && p.path_id == *id)
            else {
                continue;
            };
            let hop = self.hop(p);
            let origin = self.a(p).origin();
            // Another path of the same origin survives this UPDATE.
            let survivors = paths.iter().any(|q| {
                let qa = self.a(q);
                qa.origin() == origin
                    && !(qa.session == sid && withdrawn.contains(&(*prefix, q.path_id)))
            });
            if !survivors {
                continue;
            }
            // A handful of distinct entries per UPDATE: a list is enough.
            let v6 = prefix.addr().is_ipv6();
            match out
                .iter_mut()
                .find(|w| w.origin == origin && w.hop == hop && w.v6 == v6)
            {
                Some(w) => w.prefixes += 1,
                None => out.push(PartialWithdrawal {
                    origin,
                    hop,
                    v6,
                    prefixes: 1,
                }),
            }
        }
        out
    }

    pub fn path_count(&self) -> usize {
        self.fabrics
            .values()
            .flat_map(|t| t.values())
            .map(|p| p.len())
            .sum()
    }

    pub fn prefix_count(&self) -> usize {
        self.fabrics.values().map(|t| t.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counted hops equal a scan of every path, whatever happened.
    #[test]
    fn live_hops_follow_every_kind_of_change() {
        fn scanned(rib: &Rib, fabric: &str) -> BTreeSet<(IpAddr, Hop)> {
            rib.fabrics
                .get(fabric)
                .into_iter()
                .flat_map(|t| t.values())
                .flat_map(|paths| paths.iter())
                .map(|p| (rib.a(p).origin(), rib.hop(p)))
                .collect()
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let mut rib = Rib::default();
        for step in 0..3000 {
            let session: Arc<str> = format!("s{}", rng.u8(0..4)).into();
            let prefix: IpNet = format!("203.0.113.{}/32", rng.u8(0..20)).parse().unwrap();
            let id = rng.bool().then(|| rng.u32(0..3));
            let path = Path {
                next_hop: IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.u8(1..4))),
                uplink: format!("up{}", rng.u8(0..2)).as_str().into(),
                local_pref: 100,
                as_path_len: 0,
                originator: rng.bool().then(|| Ipv4Addr::new(10, 0, 0, rng.u8(1..3))),
            };
            let event = match rng.u8(0..13) {
                0..=5 => RibEvent::Update {
                    session,
                    fabric: "public".into(),
                    announce: vec![(prefix, id, path)],
                    withdraw: vec![],
                },
                6..=7 => RibEvent::Update {
                    session,
                    fabric: "public".into(),
                    announce: vec![],
                    withdraw: vec![(prefix, id)],
                },
                8 => RibEvent::SessionDown { session },
                9 => RibEvent::SessionStale {
                    session,
                    generation: step,
                    keep_v4: rng.bool(),
                    keep_v6: true,
                },
                10 => RibEvent::EndOfRib { session },
                11 => RibEvent::SweepStale {
                    session,
                    generation: step.saturating_sub(u64::from(rng.u8(0..30))),
                },
                _ => {
                    // Several paths at once, announced and withdrawn.
                    let mut announce = vec![(prefix, id, path.clone())];
                    let other: IpNet = format!("203.0.113.{}/32", rng.u8(0..20)).parse().unwrap();
                    announce.push((other, id, path));
                    RibEvent::Update {
                        session,
                        fabric: "public".into(),
                        announce,
                        withdraw: vec![(
                            format!("203.0.113.{}/32", rng.u8(0..20)).parse().unwrap(),
                            rng.bool().then(|| rng.u32(0..3)),
                        )],
                    }
                }
            };
            // What a session going down would take away, by a scan.
            let s0: Arc<str> = "s0".into();
            let only: BTreeSet<(IpAddr, Hop)> = rib.hops_only_of(&s0).into_iter().collect();
            let of = |mine: bool| -> BTreeSet<(IpAddr, Hop)> {
                rib.fabrics
                    .values()
                    .flat_map(|t| t.values())
                    .flat_map(|paths| paths.iter())
                    .filter(|p| (**rib.names.name(rib.a(p).session) == *s0) == mine)
                    .map(|p| (rib.a(p).origin(), rib.hop(p)))
                    .collect()
            };
            let want: BTreeSet<_> = of(true).difference(&of(false)).cloned().collect();
            assert_eq!(only, want, "step {step}");
            rib.apply(event);
            assert_eq!(
                rib.live_hops("public"),
                scanned(&rib, "public"),
                "step {step}"
            );
            // Every interned attribute set counts exactly the paths that
            // hold it; none outlives its last path.
            let mut held: HashMap<u32, u32> = HashMap::new();
            for paths in rib.fabrics.values().flat_map(|t| t.values()) {
                for p in paths {
                    *held.entry(p.attrs).or_default() += 1;
                }
            }
            assert_eq!(rib.attrs.len(), held.len(), "step {step}");
            for (i, n) in &held {
                assert_eq!(rib.attrs.slots[*i as usize].1, *n, "step {step}");
                assert_eq!(rib.attrs.index.get(rib.attrs.get(*i)), Some(i));
            }
        }
    }

    #[test]
    fn a_prefix_keeps_one_path_inline_and_spills_and_shrinks_back() {
        assert!(
            std::mem::size_of::<Paths>() <= 32,
            "{}",
            std::mem::size_of::<Paths>()
        );
        let stored = |attrs| Stored {
            attrs,
            path_id: None,
        };
        let ids = |p: &Paths| p.iter().map(|s| s.attrs).collect::<Vec<_>>();
        let mut p = Paths::new();
        assert!(p.is_empty());
        p.push(stored(1));
        assert!(matches!(p, Paths::One(_)));
        p.push(stored(2));
        assert!(matches!(p, Paths::Two(_)));
        p.push(stored(3));
        p.push(stored(5));
        assert!(matches!(p, Paths::Many(_)));
        assert_eq!(ids(&p), [1, 2, 3, 5]);
        p.retain(|s| s.attrs != 3);
        assert!(matches!(p, Paths::Many(_)));
        p.retain(|s| s.attrs != 5);
        assert!(matches!(p, Paths::Two(_)));
        assert_eq!(ids(&p), [1, 2]);
        p.retain(|s| s.attrs == 2);
        assert!(matches!(p, Paths::One(s) if s.attrs == 2));
        p.push(stored(6));
        p.retain(|s| s.attrs == 2);
        assert!(matches!(p, Paths::One(s) if s.attrs == 2));
        p.retain(|_| false);
        assert!(p.is_empty());
        p.push(stored(4));
        assert!(matches!(p, Paths::One(s) if s.attrs == 4));
    }

    #[test]
    fn paths_of_many_sessions_keep_their_names_and_uplinks() {
        let mut rib = Rib::default();
        for i in 0..40u32 {
            let p = Path {
                next_hop: IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i)),
                uplink: Arc::from(format!("up{}", i % 3).as_str()),
                local_pref: 100,
                as_path_len: usize::MAX,
                originator: None,
            };
            rib.apply(announce(&format!("s{i}"), "203.0.113.3/32", Some(i), p));
        }
        let (_, paths) = rib.table("public").next().unwrap();
        let paths: Vec<_> = paths.collect();
        assert_eq!(paths.len(), 40);
        for (i, (s, id, p)) in paths.iter().enumerate() {
            assert_eq!(s.as_ref(), format!("s{i}"));
            assert_eq!(*id, Some(i as u32));
            assert_eq!(&*p.uplink, format!("up{}", i % 3));
            // Saturated into the stored u16, still the longest.
            assert_eq!(p.as_path_len, u16::MAX as usize);
        }
        rib.apply(RibEvent::SessionDown {
            session: "s7".into(),
        });
        assert_eq!(rib.path_count(), 39);
        // A session never heard of withdraws nothing.
        assert!(!rib.apply(RibEvent::SessionDown {
            session: "nobody".into(),
        }));
    }

    fn path(nh: &str, uplink: &str, lp: u32) -> Path {
        Path {
            next_hop: nh.parse().unwrap(),
            uplink: Arc::from(uplink),
            local_pref: lp,
            as_path_len: 0,
            originator: None,
        }
    }

    fn announce(session: &str, prefix: &str, id: Option<u32>, p: Path) -> RibEvent {
        RibEvent::Update {
            session: session.into(),
            fabric: "public".into(),
            announce: vec![(prefix.parse().unwrap(), id, p)],
            withdraw: vec![],
        }
    }

    #[test]
    fn both_fabric_paths_make_an_ecmp_set() {
        let mut rib = Rib::default();
        assert!(rib.apply(announce(
            "a",
            "203.0.113.3/32",
            None,
            path("198.51.100.102", "a-public", 100)
        )));
        assert!(rib.apply(announce(
            "b",
            "203.0.113.3/32",
            None,
            path("198.51.100.202", "b-public", 100)
        )));
        let sel = rib.selected("public");
        assert_eq!(sel[&"203.0.113.3/32".parse().unwrap()].len(), 2);
        // Same path again: no change.
        assert!(!rib.apply(announce(
            "a",
            "203.0.113.3/32",
            None,
            path("198.51.100.102", "a-public", 100)
        )));
    }

    #[test]
    fn add_path_anycast_and_session_down() {
        let mut rib = Rib::default();
        rib.apply(announce(
            "a",
            "203.0.113.10/32",
            Some(1),
            path("198.51.100.101", "a-public", 100),
        ));
        rib.apply(announce(
            "a",
            "203.0.113.10/32",
            Some(2),
            path("198.51.100.102", "a-public", 100),
        ));
        rib.apply(announce(
            "b",
            "203.0.113.10/32",
            Some(1),
            path("198.51.100.201", "b-public", 100),
        ));
        assert_eq!(rib.selected("public").values().next().unwrap().len(), 3);
        assert!(rib.apply(RibEvent::SessionDown {
            session: "a".into()
        }));
        assert_eq!(rib.selected("public").values().next().unwrap().len(), 1);
        assert!(rib.apply(RibEvent::SessionDown {
            session: "b".into()
        }));
        assert!(rib.selected("public").is_empty());
        assert_eq!(rib.path_count(), 0);
    }

    #[test]
    fn graceful_restart_keeps_stale_paths_until_end_of_rib_or_the_timer() {
        let mut rib = Rib::default();
        for prefix in ["203.0.113.3/32", "203.0.113.4/32"] {
            rib.apply(announce(
                "a",
                prefix,
                None,
                path("198.51.100.102", "a-public", 100),
            ));
        }
        let stale = |g| RibEvent::SessionStale {
            session: "a".into(),
            generation: g,
            keep_v4: true,
            keep_v6: false,
        };
        rib.apply(announce(
            "a",
            "2001:db8::3/128",
            None,
            path("2001:db8:1::102", "a-public", 100),
        ));
        assert!(rib.apply(stale(1)), "the IPv6 path goes");
        assert_eq!(rib.path_count(), 2, "IPv4 paths kept");
        // Back: one prefix announced again, then End-of-RIB.
        rib.apply(announce(
            "a",
            "203.0.113.3/32",
            None,
            path("198.51.100.102", "a-public", 100),
        ));
        assert!(rib.apply(RibEvent::EndOfRib {
            session: "a".into()
        }));
        assert_eq!(rib.path_count(), 1);
        assert!(rib.stale_sessions().is_empty());
        // The restart timer of an older generation does nothing; of the
        // current one, it sweeps.
        rib.apply(stale(2));
        assert!(!rib.apply(RibEvent::SweepStale {
            session: "a".into(),
            generation: 1
        }));
        assert_eq!(rib.path_count(), 1);
        assert!(rib.apply(RibEvent::SweepStale {
            session: "a".into(),
            generation: 2
        }));
        assert_eq!(rib.path_count(), 0);
        // A hard down while stale removes everything at once.
        rib.apply(announce(
            "a",
            "203.0.113.3/32",
            None,
            path("198.51.100.102", "a-public", 100),
        ));
        rib.apply(stale(3));
        assert!(rib.apply(RibEvent::SessionDown {
            session: "a".into()
        }));
        assert_eq!(rib.path_count(), 0);
        assert!(rib.stale_sessions().is_empty());
    }

    #[test]
    fn local_pref_then_as_path_select() {
        let mut rib = Rib::default();
        rib.apply(announce(
            "a",
            "0.0.0.0/0",
            None,
            path("198.51.100.1", "a-public", 200),
        ));
        rib.apply(announce(
            "b",
            "0.0.0.0/0",
            None,
            path("198.51.100.129", "b-public", 100),
        ));
        let sel = rib.selected("public");
        let hops = &sel[&"0.0.0.0/0".parse().unwrap()];
        assert_eq!(hops.len(), 1);
        assert_eq!(&*hops.iter().next().unwrap().uplink, "a-public");
    }

    #[test]
    fn withdraw_removes_only_that_path() {
        let mut rib = Rib::default();
        rib.apply(announce(
            "a",
            "203.0.113.3/32",
            Some(1),
            path("198.51.100.102", "a-public", 100),
        ));
        rib.apply(announce(
            "a",
            "203.0.113.3/32",
            Some(2),
            path("198.51.100.103", "a-public", 100),
        ));
        assert!(rib.apply(RibEvent::Update {
            session: "a".into(),
            fabric: "public".into(),
            announce: vec![],
            withdraw: vec![("203.0.113.3/32".parse().unwrap(), Some(1))],
        }));
        assert_eq!(rib.path_count(), 1);
    }
}
