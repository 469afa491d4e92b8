//! PURE: learned ECMP sets → kernel nexthop objects and groups (the
//! `kernel.nexthop_objects` mode), and the choice of what a group *is*.
//!
//! Called by `desired` (every pass) and by the agent's failover fast path
//! ([`shrink`]). It never talks to the kernel.
//!
//! # Group identity
//!
//! One object per (gateway, uplink); one group per distinct ECMP set; each
//! learned route points at its group (RTA_NH_ID). What makes two prefixes
//! "the same set" decides what a fabric failure costs:
//!
//! - Keyed by the member hops themselves, losing fabric path B changes the
//!   key of every prefix: each route moves to a new group, one
//!   RTM_NEWROUTE per route, O(routes) (100,000 messages at 100k routes).
//! - Keyed by the **origins** of the paths (chosen): the BGP ORIGINATOR_ID
//!   the reflectors add (RFC 4456 §8), i.e. the hypervisor that announced
//!   the prefix, falling back to the next hop for a path without one. Both
//!   fabric paths of a prefix from hv2 carry originator hv2, so losing path
//!   B leaves the key `{hv2}` intact: the routes keep their group id and the
//!   group loses its B member in place, O(groups): path B's object is
//!   deleted, which the kernel takes out of every group at once, or the
//!   group is replaced (RTM_NEWNEXTHOP + NLM_F_REPLACE) where the object
//!   stays in use ([`failover_writes`]). Members = the hops that every
//!   prefix sharing the key has (their intersection; the union if they
//!   have none in common), give or take [`IN_TRANSIT`] prefixes (see
//!   [`members`]).
//!
//! Why the intersection: on a remote hypervisor, a failed path of hv1 shows
//! as the reflector withdrawing hv1's 100,000 prefixes over that path, in
//! many UPDATEs. With the intersection the first UPDATE of withdrawals
//! already takes the member out of `{hv1}`'s group (the hypervisor's
//! prefixes share its fate on a fabric path), instead of the last one,
//! seconds later.
//!
//! The way back is the mirror image: a session that comes back (it went
//! down or stale while the agent ran) relearns its table in many UPDATEs,
//! and the intersection would give the path back only with the last
//! prefix (1.0-1.3 s at 100,000). While such a session relearns (until its
//! End-of-RIB, at most `rib::SYNC_WINDOW`), the hops it announces join the
//! groups of their origins at once (`Rib::syncing_hops`): a path whose
//! session is Established again, next-hop-self, forwards to the origin for
//! all of its prefixes.
//!
//! Why not the strict intersection: a VM starting on hv2 is announced over
//! path A and path B by two reflectors, a fraction of a millisecond apart
//! (and withdrawn the same way when it stops). With the strict
//! intersection, every other hypervisor's group `{hv2}` lost B for that
//! moment and got it back: two group replaces per VM event on every
//! hypervisor of the fleet, each an RCU grace period the kernel waits for
//! under RTNL (`synchronize_net` in `replace_nexthop_grp`), and all of
//! hv2's prefixes on one path meanwhile. So up to [`IN_TRANSIT`] prefixes
//! may lack a hop the others have without taking it out of the group; a
//! new prefix of a known origin then joins its group with both paths at
//! once. A failing path takes all of the origin's prefixes with it, and a
//! reflector withdraws them in UPDATEs of hundreds each (an origin with
//! few prefixes loses them all in the first), so the first such UPDATE
//! still shrinks the group.
//!
//! Trade-off: all prefixes of one originator set share one hop set, as in
//! BGP PIC. If hv2 announced a prefix over path A only (policy on one
//! reflector) while others come over A and B, all of hv2's prefixes use A
//! only; while hv2's prefixes are first learned, the group grows to both
//! paths when the last of them has both. It always forwards correctly
//! (the next hop is hv2 itself, next-hop-self on every path); l3hv does not
//! model per-prefix hop restrictions from the same originator. A path without ORIGINATOR_ID
//! (originated by the reflector itself) is keyed by its next hop: losing it
//! then does change the key of its prefixes (O(those prefixes)), as it
//! should, since that is a real change of who forwards. The same holds when
//! an originator disappears altogether (hv3 of an anycast set {hv2, hv3}
//! dies): its prefixes move to the group `{hv2}`.
//!
//! # Direct keys
//!
//! A group replace costs the kernel an RCU grace period under RTNL
//! (`synchronize_net` in `replace_nexthop_grp`: 0.06 ms on an idle machine,
//! milliseconds when other RTNL work queues behind it, such as a tap being
//! deleted). Creating a group and pointing routes at it costs none. So a
//! key the kernel has no group for yet, with one member and at most
//! [`DIRECT_MAX`] prefixes, has its routes point straight at that member's
//! object ([`Direct`]); when it gets a second member (the same prefixes
//! announced over the other fabric path a fraction of a millisecond
//! later: the first route of a new origin) or more prefixes, its group is
//! created and its few routes rewritten to it (RTM_NEWNEXTHOP +
//! RTM_NEWROUTE replace, no grace period). A key whose group the kernel
//! holds keeps it, down to one member: a failing path is still one group
//! replace and no route write. Which keys have a group is read from the
//! kernel (`in_kernel`), not remembered, so a restarted agent decides as
//! the one before it did and rewrites nothing.
//!
//! # Ids
//!
//! Derived from the key, not adopted from the kernel: an FNV-1a hash of
//! the key placed in l3hv's range ([`NEXTHOP_IDS`], [`GROUP_IDS`]), with
//! linear probing in key order on a collision. A restarted agent computes
//! the same ids from the same RIB, so it finds the kernel already right and
//! rewrites nothing; adopting from the dump could not tell groups apart
//! while the sessions are still relearning (members differ, the key is not
//! in the kernel). Costs: an id in l3hv's range held by a foreign object
//! is refused (create is exclusive), reported, never overwritten; two keys
//! colliding (about 1 in 2,000 at 1,000 groups) depend on which came first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;

use super::model::{DesiredKernel, Direct, GroupKey, GroupUse, NextHopSpec, ObservedKernel};
use crate::rib::{Hop, PartialWithdrawal, Rib, Selected};

/// Ids of l3hv's nexthop objects (below 2^31: some tools print ids signed).
pub const NEXTHOP_IDS: Range<u32> = 0x4000_0000..0x6000_0000;
/// Ids of l3hv's nexthop groups.
pub const GROUP_IDS: Range<u32> = 0x6000_0000..0x8000_0000;

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The id for `name` in `range`, probing past `used`; true when it is not
/// the first one tried (it probed past a collision).
fn place(range: &Range<u32>, name: &str, used: &impl Fn(u32) -> bool) -> (u32, bool) {
    let span = u64::from(range.end - range.start);
    let mut offset = fnv1a(name) % span;
    let mut probed = false;
    loop {
        let id = range.start + offset as u32;
        if !used(id) {
            return (id, probed);
        }
        probed = true;
        offset = (offset + 1) % span;
    }
}

pub(super) fn spec(h: &Hop) -> NextHopSpec {
    NextHopSpec {
        gateway: h.gateway,
        oif: h.uplink.to_string(),
        onlink: true,
    }
}

/// How many prefixes a key may have and still point straight at its one
/// object while the kernel has no group for it (see "Direct keys"): what a
/// pass rewrites when the key gets its group.
pub const DIRECT_MAX: usize = 8;

/// Adds the objects and groups of `fabric`'s `selected` prefixes to `d`;
/// returns the nexthop id each prefix's routes point at, in order (its
/// group, or its key's object for a direct key; `None`: no next hop of the
/// prefix's family). `returning`: (origin, hop) pairs of sessions
/// relearning their table after coming back (`Rib::syncing_hops`); a
/// group takes such a hop as soon as one of its prefixes has it again.
/// `in_kernel`: the groups the kernel holds (a key with one stays a group).
pub fn build(
    fabric: &str,
    selected: &[(IpNet, Selected)],
    returning: &BTreeSet<(IpAddr, Hop)>,
    in_kernel: &BTreeMap<u32, BTreeSet<u32>>,
    d: &mut DesiredKernel,
) -> Vec<Option<u32>> {
    // Intern the keys: (v6, origins) → index.
    let mut index: BTreeMap<(bool, &[IpAddr]), usize> = BTreeMap::new();
    // Per key: the distinct hop sets of its prefixes, with how many
    // prefixes have each (a handful per key: one in the steady state).
    let mut sets: Vec<BTreeMap<BTreeSet<&Hop>, usize>> = Vec::new();
    // Per key: its prefixes, while there are at most DIRECT_MAX.
    let mut few: Vec<Vec<IpNet>> = Vec::new();
    let mut of_prefix: Vec<Option<usize>> = Vec::with_capacity(selected.len());
    for (dst, s) in selected {
        let v6 = dst.addr().is_ipv6();
        let hops: BTreeSet<&Hop> = s
            .hops
            .iter()
            // IPv4 routes may use IPv6 next hops (RFC 8950; the kernel
            // takes them in a group); IPv6 routes never IPv4 ones.
            .filter(|h| !v6 || h.gateway.is_ipv6())
            .collect();
        if hops.is_empty() {
            of_prefix.push(None);
            continue;
        }
        let i = *index.entry((v6, s.origins.as_slice())).or_insert_with(|| {
            sets.push(BTreeMap::new());
            few.push(Vec::new());
            sets.len() - 1
        });
        *sets[i].entry(hops).or_default() += 1;
        if few[i].len() <= DIRECT_MAX {
            few[i].push(*dst);
        }
        of_prefix.push(Some(i));
    }
    // Per key: the hops its prefixes have (what the group gets), and the
    // union (for the hops of a returning session).
    let mut members: Vec<BTreeSet<&Hop>> = sets.iter().map(members).collect();
    let union: Vec<BTreeSet<&Hop>> = sets
        .iter()
        .map(|s| s.keys().flatten().copied().collect())
        .collect();
    // A fabric path that came back (its session relearning) rejoins the
    // groups of its origins at its first re-announcement: the intersection
    // alone would wait for the last of an origin's prefixes (over a second
    // at 100,000 prefixes). Failing paths still leave at once: their
    // session is down, or the withdrawals come over a session that is not
    // relearning.
    if !returning.is_empty() {
        for ((_, origins), &i) in &index {
            members[i].extend(union[i].iter().copied().filter(|h| {
                origins
                    .iter()
                    .any(|o| returning.contains(&(*o, (*h).clone())))
            }));
        }
    }

    // Objects, in hop order (deterministic probing).
    let mut by_spec: BTreeMap<NextHopSpec, u32> =
        d.nexthops.iter().map(|(id, s)| (s.clone(), *id)).collect();
    let all: BTreeSet<&Hop> = members.iter().flatten().copied().collect();
    for h in all {
        let s = spec(h);
        if by_spec.contains_key(&s) {
            continue;
        }
        let (id, probed) = place(
            &NEXTHOP_IDS,
            &format!("{}|{}", h.gateway, h.uplink),
            &|id| d.nexthops.contains_key(&id),
        );
        d.probed |= probed;
        d.nexthops.insert(id, s.clone());
        by_spec.insert(s, id);
    }

    // Groups, in key order.
    let mut keys: Vec<(GroupKey, usize)> = index
        .iter()
        .map(|((v6, origins), i)| {
            (
                GroupKey {
                    fabric: fabric.to_string(),
                    v6: *v6,
                    origins: origins.to_vec(),
                },
                *i,
            )
        })
        .collect();
    keys.sort();
    let mut group_of: Vec<u32> = vec![0; members.len()];
    for (key, i) in keys {
        let (id, probed) = place(&GROUP_IDS, &group_name(&key), &|id| {
            d.group_keys.contains_key(&id)
        });
        d.probed |= probed;
        let ids: BTreeSet<u32> = members[i].iter().map(|h| by_spec[&spec(h)]).collect();
        d.group_keys.insert(id, key);
        let prefixes = sets[i].values().sum();
        group_of[i] = match direct(&ids, prefixes, in_kernel.contains_key(&id)) {
            Some(object) => {
                d.direct.insert(
                    id,
                    Direct {
                        object,
                        prefixes: few[i].iter().copied().collect(),
                    },
                );
                object
            }
            None => {
                d.groups.insert(id, ids);
                id
            }
        };
        d.group_use.insert(
            id,
            GroupUse {
                sets: sets[i]
                    .iter()
                    .map(|(hops, n)| (hops.iter().map(|h| spec(h)).collect(), *n))
                    .collect(),
                returning: !returning.is_empty(),
            },
        );
    }
    of_prefix
        .into_iter()
        .map(|i| i.map(|i| group_of[i]))
        .collect()
}

/// The object a key's routes point at instead of a group (see "Direct
/// keys"): its only member, when it has at most [`DIRECT_MAX`] prefixes
/// and the kernel holds no group for it. Used by the full pass and the
/// scoped one alike.
pub(super) fn direct(members: &BTreeSet<u32>, prefixes: usize, in_kernel: bool) -> Option<u32> {
    match (members.first(), members.len()) {
        (Some(&object), 1) if prefixes <= DIRECT_MAX && !in_kernel => Some(object),
        _ => None,
    }
}

/// How many prefixes of a group's key may lack one of its hops, the others
/// having it, before the hop leaves the group: prefixes whose other path is
/// still on its way (a VM starting or stopping on the origin, a few at
/// once). See the module's documentation.
pub const IN_TRANSIT: usize = 8;

/// A group's members from the hop sets of its prefixes (each with how many
/// prefixes have it): the hops that all but at most [`IN_TRANSIT`] of the
/// prefixes have; the union when no hop is that common (prefixes of one
/// origin with nothing in common still forward through it). Used by the
/// full pass and the scoped one alike, which must agree.
pub(super) fn members<T: Ord + Clone>(sets: &BTreeMap<BTreeSet<T>, usize>) -> BTreeSet<T> {
    let union: BTreeSet<&T> = sets.keys().flatten().collect();
    let common: BTreeSet<T> = union
        .iter()
        .filter(|h| {
            let lacking: usize = sets
                .iter()
                .filter(|(s, _)| !s.contains(**h))
                .map(|(_, n)| *n)
                .sum();
            lacking <= IN_TRANSIT
        })
        .map(|h| (*h).clone())
        .collect();
    if common.is_empty() {
        union.into_iter().cloned().collect()
    } else {
        common
    }
}

/// The id a group of `key` takes when no other group is in its way.
pub(super) fn group_slot(key: &GroupKey) -> u32 {
    place(&GROUP_IDS, &group_name(key), &|_| false).0
}

/// The id an object for `spec` takes when no other object is in its way.
pub(super) fn object_slot(spec: &NextHopSpec) -> u32 {
    place(
        &NEXTHOP_IDS,
        &format!("{}|{}", spec.gateway, spec.oif),
        &|_| false,
    )
    .0
}

fn group_name(key: &GroupKey) -> String {
    format!(
        "{}|{}|{}",
        key.fabric,
        if key.v6 { 6 } else { 4 },
        key.origins
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// The failover fast path: the groups of the last pass (`desired`) with
/// every member whose (origin, hop) no longer has a path in `rib` taken
/// out. Returns only the groups that changed and keep a member, for an
/// in-place replace before the full recompute; an emptied group is left
/// to that recompute (its routes go). O(paths) of scanning, no per-route
/// allocation; the kernel work is O(groups).
pub fn shrink(desired: &DesiredKernel, rib: &Rib) -> Vec<(u32, BTreeSet<u32>)> {
    let fabrics: BTreeSet<&str> = desired
        .group_keys
        .values()
        .map(|k| k.fabric.as_str())
        .collect();
    let live: BTreeMap<&str, BTreeSet<(IpAddr, Hop)>> =
        fabrics.into_iter().map(|f| (f, rib.live_hops(f))).collect();
    let mut out = Vec::new();
    for (id, members) in &desired.groups {
        let Some(key) = desired.group_keys.get(id) else {
            continue;
        };
        let live = &live[key.fabric.as_str()];
        let kept: BTreeSet<u32> = members
            .iter()
            .copied()
            .filter(|m| {
                desired.nexthops.get(m).is_some_and(|s| {
                    let hop = Hop {
                        gateway: s.gateway,
                        uplink: s.oif.as_str().into(),
                    };
                    key.origins
                        .iter()
                        .any(|o| live.contains(&(*o, hop.clone())))
                })
            })
            .collect();
        if !kept.is_empty() && kept != *members {
            out.push((*id, kept));
        }
    }
    out
}

/// The fast path for hops a session going down takes from some origins
/// (`Rib::hops_only_of`): the groups of the last pass without the members
/// those (origin, hop) pairs name, for groups keyed by that origin. Same
/// contract as [`shrink`].
pub fn shrink_hops(desired: &DesiredKernel, lost: &[(IpAddr, Hop)]) -> Vec<(u32, BTreeSet<u32>)> {
    shrink_where(desired, |_, key, s| {
        lost.iter()
            .any(|(origin, hop)| key.origins.contains(origin) && is(hop, s))
    })
}

/// The fast path for a partial withdrawal (`Rib::partially_withdrawn`):
/// the groups of the last pass without the members whose hop those
/// withdrawals take from their origin's prefixes, where the group loses
/// it once they are applied ([`members`] of its hop sets: more than
/// [`IN_TRANSIT`] of its prefixes lacking it, or none left having it).
/// Same contract as [`shrink`].
pub fn shrink_withdrawn(
    desired: &DesiredKernel,
    lost: &[PartialWithdrawal],
) -> Vec<(u32, BTreeSet<u32>)> {
    shrink_where(desired, |id, key, s| {
        let withdrawn: usize = lost
            .iter()
            .filter(|w| w.v6 == key.v6 && key.origins.contains(&w.origin) && is(&w.hop, s))
            .map(|w| w.prefixes)
            .sum();
        if withdrawn == 0 {
            return false;
        }
        let Some(u) = desired.group_use.get(&id) else {
            return true;
        };
        let having: usize = u
            .sets
            .iter()
            .filter(|(hops, _)| hops.contains(s))
            .map(|(_, n)| *n)
            .sum();
        let lacking = u.prefixes().saturating_sub(having);
        lacking + withdrawn > IN_TRANSIT || having <= withdrawn
    })
}

fn is(hop: &Hop, s: &NextHopSpec) -> bool {
    hop.gateway == s.gateway && &*hop.uplink == s.oif.as_str()
}

/// The groups of `desired` without the members `leaves` (group id, its
/// key, the member's object) names; only those that changed and keep a
/// member.
fn shrink_where(
    desired: &DesiredKernel,
    leaves: impl Fn(u32, &GroupKey, &NextHopSpec) -> bool,
) -> Vec<(u32, BTreeSet<u32>)> {
    let mut out = Vec::new();
    for (id, members) in &desired.groups {
        let Some(key) = desired.group_keys.get(id) else {
            continue;
        };
        let kept: BTreeSet<u32> = members
            .iter()
            .copied()
            .filter(|m| desired.nexthops.get(m).is_none_or(|s| !leaves(*id, key, s)))
            .collect();
        if !kept.is_empty() && kept != *members {
            out.push((*id, kept));
        }
    }
    out
}

/// How the fast path writes what [`shrink`] (or [`shrink_hops`],
/// [`shrink_withdrawn`]) computed, against the kernel's groups (`kernel`),
/// the last pass's (`wanted`) and the keys routed straight at an object
/// (`direct`): which objects to delete, and which groups still to replace.
///
/// An object that leaves every group holding it, each of which keeps a
/// member, that no route points at directly and that no group keeps or
/// still wants, is deleted: the kernel
/// takes it out of all its groups at once (`remove_nexthop_from_groups`),
/// O(groups), 0.1 ms at 100,000 routes in IPv4 and IPv6 alike, and sends no
/// route notification. A group replace costs O(routes) instead: for IPv6
/// every route on the group has its cached dsts invalidated (25-50 ms at
/// 100,000 /128s), and with `nexthop_compat_mode` 1 (the kernel's default)
/// a notification is built per route (70-140 ms in either family). Only a
/// group that loses a member which cannot be deleted (some other group or
/// a direct key still uses it) is replaced.
pub fn failover_writes(
    kernel: &BTreeMap<u32, BTreeSet<u32>>,
    wanted: &BTreeMap<u32, BTreeSet<u32>>,
    direct: &BTreeMap<u32, Direct>,
    shrunk: &[(u32, BTreeSet<u32>)],
) -> (BTreeSet<u32>, Vec<(u32, BTreeSet<u32>)>) {
    let after: BTreeMap<u32, &BTreeSet<u32>> = shrunk.iter().map(|(id, m)| (*id, m)).collect();
    let mut leaving: BTreeSet<u32> = BTreeSet::new();
    for (id, kept) in shrunk {
        if let Some(members) = kernel.get(id) {
            leaving.extend(members.difference(kept));
        }
    }
    // Indexed once, not scanned per object: a path failing in a fleet of
    // 1,000 hypervisors leaves 1,000 objects in as many groups.
    let mut held: BTreeSet<u32> = direct.values().map(|d| d.object).collect();
    // (The last pass's view may differ from the mirror's: a member it
    // keeps, or wants in a group it does not shrink, is not deleted.)
    for (_, kept) in shrunk {
        held.extend(kept);
    }
    for (id, members) in wanted {
        if !after.contains_key(id) {
            held.extend(members);
        }
    }
    for (id, members) in kernel {
        // A group not shrunk, or one left empty, holds its members; a
        // shrunk one holds only what it keeps (added above).
        if after.get(id).is_none_or(|kept| kept.is_empty()) {
            held.extend(members);
        }
    }
    leaving.retain(|o| !held.contains(o));
    // Every group must keep a member of its own in the kernel, not only
    // by the last pass's count (`kept` may name an object the kernel's
    // group no longer has): a group the deletes empty is deleted by the
    // kernel with its routes. Such a group's members stay (and it is
    // replaced, which the kernel refuses if `kept` is gone: the full pass
    // then dumps and repairs). One pass: keeping objects never empties
    // another group.
    for members in kernel.values() {
        if members.iter().any(|o| leaving.contains(o)) && members.is_subset(&leaving) {
            leaving.retain(|o| !members.contains(o));
        }
    }
    let replace = shrunk
        .iter()
        .filter(|(id, kept)| {
            kernel.get(id).is_none_or(|members| {
                let left: BTreeSet<u32> = members.difference(&leaving).copied().collect();
                left != *kept
            })
        })
        .cloned()
        .collect();
    (leaving, replace)
}

/// Records what the fast path's writes ([`failover_writes`]: `deleted`
/// objects, groups now `shrunk`) did, in the kernel's mirror and in the
/// last pass's groups: a later scoped pass plans from both.
pub fn failover_written(
    kernel: &mut ObservedKernel,
    last: &mut DesiredKernel,
    shrunk: &[(u32, BTreeSet<u32>)],
    deleted: &BTreeSet<u32>,
) {
    for id in deleted {
        kernel.nexthops.remove(id);
        last.nexthops.remove(id);
    }
    for (id, members) in shrunk {
        kernel.groups.insert(*id, members.clone());
        if let Some(was) = last.groups.insert(*id, members.clone()) {
            // For the scoped pass to delete, if no group holds them then.
            last.dropped
                .extend(was.difference(members).filter(|o| !deleted.contains(o)));
        }
    }
    // (An earlier fast path may have left one for the scoped pass.)
    last.dropped.retain(|o| !deleted.contains(o));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rib::{Path, RibEvent};
    use std::sync::Arc;

    fn path(nh: &str, uplink: &str, originator: Option<&str>) -> Path {
        Path {
            next_hop: nh.parse().unwrap(),
            uplink: Arc::from(uplink),
            local_pref: 100,
            as_path_len: 0,
            originator: originator.map(|o| o.parse().unwrap()),
        }
    }

    fn announce(rib: &mut Rib, session: &str, prefix: &str, p: Path) {
        rib.apply(RibEvent::Update {
            session: session.into(),
            fabric: "public".into(),
            announce: vec![(prefix.parse().unwrap(), None, p)],
            withdraw: vec![],
        });
    }

    /// hv2 (originator 10.0.0.2) announces `n` prefixes over both paths.
    fn rib(n: u32) -> Rib {
        let mut rib = Rib::default();
        for i in 0..n {
            let prefix = format!("203.0.113.{i}/32");
            announce(
                &mut rib,
                "a",
                &prefix,
                path("198.51.100.102", "a-public", Some("10.0.0.2")),
            );
            announce(
                &mut rib,
                "b",
                &prefix,
                path("198.51.100.202", "b-public", Some("10.0.0.2")),
            );
        }
        rib
    }

    /// The full pass's groups over a kernel with no group of l3hv's.
    fn groups_of(rib: &Rib) -> (DesiredKernel, Vec<Option<u32>>) {
        groups_in(rib, &BTreeMap::new())
    }

    /// The full pass's groups over a kernel holding `in_kernel`.
    fn groups_in(
        rib: &Rib,
        in_kernel: &BTreeMap<u32, BTreeSet<u32>>,
    ) -> (DesiredKernel, Vec<Option<u32>>) {
        let mut d = DesiredKernel::default();
        let sel = rib.selected_with_origins("public");
        let returning = rib.syncing_hops("public", std::time::Instant::now());
        let ids = build("public", &sel, &returning, in_kernel, &mut d);
        (d, ids)
    }

    #[test]
    fn one_group_per_originator_set_with_both_paths() {
        let (d, ids) = groups_of(&rib(3));
        assert_eq!(d.nexthops.len(), 2);
        assert_eq!(d.groups.len(), 1);
        let gid = ids[0].unwrap();
        assert!(ids.iter().all(|i| *i == Some(gid)));
        assert!(GROUP_IDS.contains(&gid));
        assert_eq!(d.groups[&gid].len(), 2);
        assert!(d.nexthops.keys().all(|id| NEXTHOP_IDS.contains(id)));
    }

    fn withdraw(rib: &mut Rib, session: &str, prefixes: std::ops::Range<u32>) {
        rib.apply(withdrawal(session, prefixes));
    }

    fn withdrawal(session: &str, prefixes: std::ops::Range<u32>) -> RibEvent {
        RibEvent::Update {
            session: session.into(),
            fabric: "public".into(),
            announce: vec![],
            withdraw: prefixes
                .map(|i| (format!("203.0.113.{i}/32").parse().unwrap(), None))
                .collect(),
        }
    }

    #[test]
    fn the_first_update_withdrawing_a_path_takes_it_out_of_the_originators_group() {
        let n = IN_TRANSIT as u32 + 4;
        let mut r = rib(n);
        let (_, ids) = groups_of(&r);
        let gid = ids[0].unwrap();
        // The reflector of path B withdraws more than IN_TRANSIT of hv2's
        // prefixes (the rest of its UPDATEs still on the way).
        withdraw(&mut r, "b", 0..IN_TRANSIT as u32 + 1);
        let (d, ids_after) = groups_of(&r);
        assert_eq!(ids, ids_after, "same group, routes untouched");
        assert_eq!(d.groups[&gid].len(), 1, "B already out");
        // Prefixes of one originator with no hop in common: the union.
        let mut r = Rib::default();
        announce(
            &mut r,
            "a",
            "203.0.113.1/32",
            path("198.51.100.102", "a-public", Some("10.0.0.2")),
        );
        announce(
            &mut r,
            "b",
            "203.0.113.2/32",
            path("198.51.100.202", "b-public", Some("10.0.0.2")),
        );
        let (d, ids) = groups_of(&r);
        assert_eq!(d.groups[&ids[0].unwrap()].len(), 2);
    }

    #[test]
    fn prefixes_in_transit_leave_their_origins_group_whole() {
        let mut r = rib(3);
        let (kernel, ids) = groups_of(&r);
        let gid = ids[0].unwrap();
        let kernel = kernel.groups;
        let a = || path("198.51.100.102", "a-public", Some("10.0.0.2"));
        // A VM starting on hv2: its prefix over path A, B's UPDATE on its
        // way. It joins hv2's group with both members; nothing else moves.
        announce(&mut r, "a", "203.0.113.100/32", a());
        let (d, ids_now) = groups_in(&r, &kernel);
        assert_eq!(d.groups[&gid].len(), 2);
        assert!(ids_now.iter().all(|i| *i == Some(gid)), "{ids_now:?}");
        // A VM stopping on hv2: its prefix withdrawn over A first.
        withdraw(&mut r, "a", 0..1);
        assert_eq!(groups_in(&r, &kernel).0.groups[&gid].len(), 2);
        // Up to IN_TRANSIT such prefixes at once...
        for i in 101..100 + IN_TRANSIT as u32 {
            announce(&mut r, "a", &format!("203.0.113.{i}/32"), a());
        }
        assert_eq!(groups_in(&r, &kernel).0.groups[&gid].len(), 2);
        // ...and one more is no longer a transit: B leaves the group.
        announce(&mut r, "a", "203.0.113.200/32", a());
        assert_eq!(groups_in(&r, &kernel).0.groups[&gid].len(), 1);
    }

    #[test]
    fn a_new_origins_few_prefixes_point_at_their_object_until_a_second_path() {
        let a = || path("198.51.100.102", "a-public", Some("10.0.0.2"));
        let b = || path("198.51.100.202", "b-public", Some("10.0.0.2"));
        // A new origin's first prefix over path A (B's UPDATE on its way):
        // its routes point at A's object, the kernel gets no group.
        let mut r = Rib::default();
        announce(&mut r, "a", "203.0.113.1/32", a());
        let (d, ids) = groups_of(&r);
        let object = ids[0].unwrap();
        assert!(NEXTHOP_IDS.contains(&object));
        assert_eq!(d.nexthops.len(), 1);
        assert!(d.groups.is_empty());
        let (slot, direct) = d.direct.first_key_value().unwrap();
        assert_eq!(direct.object, object);
        assert_eq!(direct.prefixes.len(), 1);
        assert_eq!(d.group_keys.keys().collect::<Vec<_>>(), [slot]);
        // The second path: a group, created at the key's slot.
        announce(&mut r, "b", "203.0.113.1/32", b());
        let (d, ids) = groups_of(&r);
        assert_eq!(ids[0], Some(*slot));
        assert_eq!(d.groups[slot].len(), 2);
        assert!(d.direct.is_empty());
        // A group the kernel holds stays one, down to one member (a
        // failing path is a group replace, never a route write).
        let kernel = d.groups;
        withdraw(&mut r, "b", 0..2);
        let (d, ids) = groups_in(&r, &kernel);
        assert_eq!(ids[0], Some(*slot));
        assert_eq!(d.groups[slot].len(), 1);
        // The same without the kernel's group: direct again.
        assert_eq!(groups_of(&r).1[0], Some(object));
        // More than DIRECT_MAX prefixes over one path: a group.
        for i in 2..=DIRECT_MAX as u32 {
            announce(&mut r, "a", &format!("203.0.113.{i}/32"), a());
        }
        let (d, ids) = groups_of(&r);
        assert!(ids.iter().all(|i| *i == Some(object)), "{ids:?}");
        assert_eq!(d.direct[slot].prefixes.len(), DIRECT_MAX);
        announce(&mut r, "a", "203.0.113.200/32", a());
        let (d, ids) = groups_of(&r);
        assert!(ids.iter().all(|i| *i == Some(*slot)), "{ids:?}");
        assert_eq!(d.groups[slot].len(), 1);
        assert!(d.direct.is_empty());
    }

    #[test]
    fn a_partial_withdrawal_of_many_shrinks_the_group_at_once_a_whole_one_does_not() {
        let n = IN_TRANSIT as u32 + 4;
        let mut r = rib(n);
        let (before, ids) = groups_of(&r);
        let gid = ids[0].unwrap();
        // Path B of a few prefixes withdrawn: stopping VMs, not a path.
        let few = r.partially_withdrawn(&withdrawal("b", 0..IN_TRANSIT as u32));
        assert_eq!(few.len(), 1, "{few:?}");
        assert_eq!(few[0].prefixes, IN_TRANSIT);
        assert!(shrink_withdrawn(&before, &few).is_empty());
        // Of more: B leaves hv2's group.
        let partial = withdrawal("b", 0..IN_TRANSIT as u32 + 1);
        let lost = r.partially_withdrawn(&partial);
        assert_eq!(lost.len(), 1, "{lost:?}");
        let shrunk = shrink_withdrawn(&before, &lost);
        assert_eq!(shrunk.len(), 1);
        assert_eq!(shrunk[0].0, gid);
        assert_eq!(shrunk[0].1.len(), 1);
        // A prefix withdrawn on its only remaining path is a VM going.
        r.apply(partial);
        let whole = withdrawal("a", 0..IN_TRANSIT as u32 + 1);
        assert!(r.partially_withdrawn(&whole).is_empty());
        // An origin's only prefix losing a path: the group loses it, at once.
        let r = rib(1);
        let (before, _) = groups_of(&r);
        let lost = r.partially_withdrawn(&withdrawal("b", 0..1));
        assert_eq!(shrink_withdrawn(&before, &lost).len(), 1);
        // Without the sets of the group (not from a pass): at once too.
        let mut bare = before.clone();
        bare.group_use.clear();
        assert_eq!(shrink_withdrawn(&bare, &lost).len(), 1);
    }

    #[test]
    fn losing_a_path_keeps_the_group_id_and_shrinks_it() {
        let mut r = rib(3);
        let (before, ids_before) = groups_of(&r);
        let kernel = before.groups.clone();
        r.apply(RibEvent::SessionDown {
            session: "b".into(),
        });
        // The fast path sees the same group lose its B member...
        let shrunk = shrink(&before, &r);
        assert_eq!(shrunk.len(), 1);
        let (gid, kept) = &shrunk[0];
        assert_eq!(Some(*gid), ids_before[0]);
        assert_eq!(kept.len(), 1);
        // ...and the full recompute agrees: same ids, one member.
        let (after, ids_after) = groups_in(&r, &kernel);
        assert_eq!(ids_after, ids_before);
        assert_eq!(after.groups[gid], *kept);
        assert_eq!(after.nexthops.len(), 1);
    }

    #[test]
    fn a_path_that_comes_back_rejoins_at_its_first_reannouncement() {
        let mut r = rib(IN_TRANSIT as u32 + 3);
        let (_, ids) = groups_of(&r);
        let gid = ids[0].unwrap();
        r.apply(RibEvent::SessionDown {
            session: "b".into(),
        });
        assert_eq!(groups_of(&r).0.groups[&gid].len(), 1);
        // Session b is back: its first UPDATE carries one of hv2's
        // prefixes. The group has B again at once, for all of them.
        announce(
            &mut r,
            "b",
            "203.0.113.0/32",
            path("198.51.100.202", "b-public", Some("10.0.0.2")),
        );
        let (d, ids_back) = groups_of(&r);
        assert_eq!(ids_back, ids, "routes untouched");
        assert_eq!(d.groups[&gid].len(), 2, "B back before the last prefix");
        // The window ends with End-of-RIB (or SYNC_WINDOW): then the
        // prefixes' hop sets rule again (here more than IN_TRANSIT of
        // hv2's prefixes lack B).
        let later =
            std::time::Instant::now() + crate::rib::SYNC_WINDOW + std::time::Duration::from_secs(1);
        assert!(r.syncing_hops("public", later).is_empty());
        r.apply(RibEvent::EndOfRib {
            session: "b".into(),
        });
        assert_eq!(groups_of(&r).0.groups[&gid].len(), 1);
        // A session that never went down is never "returning": the first
        // UPDATE withdrawing many prefixes over it still shrinks at once
        // (see above), and its first announcements at start follow the
        // hop sets.
        let fresh = rib(3);
        assert!(
            fresh
                .syncing_hops("public", std::time::Instant::now())
                .is_empty()
        );
    }

    #[test]
    fn ids_are_deterministic_and_keyed_by_origin_not_hops() {
        let (a, ia) = groups_of(&rib(2));
        let (b, ib) = groups_of(&rib(2));
        assert_eq!(a, b);
        assert_eq!(ia, ib);
        // Another originator set: another group.
        let mut r = rib(2);
        announce(
            &mut r,
            "a",
            "203.0.113.10/32",
            path("198.51.100.103", "a-public", Some("10.0.0.3")),
        );
        let (c, ic) = groups_of(&r);
        assert_eq!(c.group_keys.len(), 2);
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.direct.len(), 1, "one prefix over one path");
        assert_ne!(ic[0], ic.last().copied().flatten());
    }

    #[test]
    fn without_originator_the_next_hop_is_the_key() {
        let mut r = Rib::default();
        announce(
            &mut r,
            "a",
            "0.0.0.0/0",
            path("198.51.100.1", "a-public", None),
        );
        announce(
            &mut r,
            "b",
            "0.0.0.0/0",
            path("198.51.100.129", "b-public", None),
        );
        let (d, _) = groups_of(&r);
        let key = d.group_keys.values().next().unwrap();
        assert_eq!(key.origins.len(), 2);
    }

    #[test]
    fn probing_resolves_collisions() {
        let used: BTreeSet<u32> = [0x6000_0000 + (fnv1a("x") % 0x2000_0000) as u32].into();
        let (id, probed) = place(&GROUP_IDS, "x", &|i| used.contains(&i));
        assert!(!used.contains(&id));
        assert!(GROUP_IDS.contains(&id));
        assert!(probed);
        assert_eq!(
            place(&GROUP_IDS, "x", &|_| false),
            (*used.first().unwrap(), false)
        );
    }

    fn set(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_member_leaving_all_its_groups_is_deleted_not_replaced() {
        // Objects 1, 2 (hv2 over A, B), 3, 4 (hv3 over A, B); groups 10
        // {1,2}, 11 {3,4}, 12 {1,2,3,4} (anycast); path B fails.
        let kernel: BTreeMap<u32, BTreeSet<u32>> = [
            (10, set(&[1, 2])),
            (11, set(&[3, 4])),
            (12, set(&[1, 2, 3, 4])),
        ]
        .into();
        let shrunk = vec![(10, set(&[1])), (11, set(&[3])), (12, set(&[1, 3]))];
        let (delete, replace) = failover_writes(&kernel, &kernel, &BTreeMap::new(), &shrunk);
        assert_eq!(delete, set(&[2, 4]));
        assert!(replace.is_empty(), "{replace:?}");
    }

    #[test]
    fn a_member_still_used_elsewhere_is_replaced_out_of_its_group() {
        let kernel: BTreeMap<u32, BTreeSet<u32>> =
            [(10, set(&[1, 2])), (11, set(&[2, 3])), (12, set(&[4, 5]))].into();
        // 2 leaves group 10 only (group 11 is not shrunk); 5 leaves group
        // 12 but a direct key's routes point at it.
        let direct: BTreeMap<u32, Direct> = [(
            13,
            Direct {
                object: 5,
                prefixes: ["203.0.113.9/32".parse().unwrap()].into(),
            },
        )]
        .into();
        let shrunk = vec![(10, set(&[1])), (12, set(&[4]))];
        let (delete, replace) = failover_writes(&kernel, &kernel, &direct, &shrunk);
        assert!(delete.is_empty(), "{delete:?}");
        assert_eq!(replace, shrunk);
    }

    #[test]
    fn an_emptied_group_keeps_its_member_object() {
        // Group 11 would lose its only member: not shrunk (its routes are
        // the full pass's), so object 2 must stay; group 10 is replaced.
        let kernel: BTreeMap<u32, BTreeSet<u32>> = [(10, set(&[1, 2])), (11, set(&[2]))].into();
        let (delete, replace) =
            failover_writes(&kernel, &kernel, &BTreeMap::new(), &[(10, set(&[1]))]);
        assert!(delete.is_empty());
        assert_eq!(replace, vec![(10, set(&[1]))]);
    }

    #[test]
    fn a_kernel_group_the_deletes_would_empty_keeps_its_members() {
        // The last pass's group 10 was {1, 2}; the mirror of the kernel
        // has only 2 (object 1 went with its uplink's carrier): deleting
        // 2 would empty it, and the kernel would delete its routes.
        let kernel: BTreeMap<u32, BTreeSet<u32>> = [(10, set(&[2]))].into();
        let (delete, replace) =
            failover_writes(&kernel, &kernel, &BTreeMap::new(), &[(10, set(&[1]))]);
        assert!(delete.is_empty(), "{delete:?}");
        assert_eq!(replace, vec![(10, set(&[1]))]);
    }

    #[test]
    fn a_group_losing_a_deleted_and_a_kept_member_is_still_replaced() {
        // Group 10 loses 2 (deleted: only there) and 3 (group 11 keeps it).
        let kernel: BTreeMap<u32, BTreeSet<u32>> =
            [(10, set(&[1, 2, 3])), (11, set(&[3, 4]))].into();
        let (delete, replace) =
            failover_writes(&kernel, &kernel, &BTreeMap::new(), &[(10, set(&[1]))]);
        assert_eq!(delete, set(&[2]));
        assert_eq!(replace, vec![(10, set(&[1]))]);
    }

    /// Random groups, direct keys and shrinks, written as the agent does
    /// (replaces, then deletes) to a model of the kernel, which takes a
    /// deleted object out of every group and deletes a group it empties:
    /// every shrunk group ends as `kept`, no other group changes, none is
    /// emptied, no direct key loses its object, none the last pass wants
    /// elsewhere is deleted; and objects do get deleted.
    #[test]
    fn failover_writes_leave_the_kernel_as_shrunk() {
        let mut rng = fastrand::Rng::with_seed(13);
        let mut deletes = 0;
        for case in 0..2000 {
            let mut kernel: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
            for g in 100..100 + rng.u32(1..6) {
                let members: BTreeSet<u32> = (1..9).filter(|_| rng.bool()).collect();
                if !members.is_empty() {
                    kernel.insert(g, members);
                }
            }
            let direct: BTreeMap<u32, Direct> = (200..200 + rng.u32(0..3))
                .map(|id| {
                    let d = Direct {
                        object: rng.u32(1..9),
                        prefixes: BTreeSet::new(),
                    };
                    (id, d)
                })
                .collect();
            let mut shrunk = Vec::new();
            for (id, members) in &kernel {
                if rng.bool() {
                    continue;
                }
                // Sometimes the last pass's view is stale: it keeps an
                // object the kernel's group no longer has.
                let mut kept: BTreeSet<u32> =
                    members.iter().copied().filter(|_| rng.bool()).collect();
                if rng.u8(..) < 30 {
                    kept.insert(rng.u32(1..9));
                }
                if !kept.is_empty() && kept != *members {
                    shrunk.push((*id, kept));
                }
            }
            // The last pass's groups: the mirror's, or wanting one more.
            let mut wanted = kernel.clone();
            if rng.u8(..) < 30 {
                if let Some(members) = wanted.values_mut().next() {
                    members.insert(rng.u32(1..9));
                }
            }
            let (delete, replace) = failover_writes(&kernel, &wanted, &direct, &shrunk);
            for (id, members) in &wanted {
                if !shrunk.iter().any(|(s, _)| s == id) {
                    assert!(members.is_disjoint(&delete), "case {case}: {id} wants it");
                }
            }
            let mut after = kernel.clone();
            for (id, kept) in &replace {
                after.insert(*id, kept.clone());
            }
            for o in &delete {
                for members in after.values_mut() {
                    members.remove(o);
                }
            }
            for (id, members) in &after {
                assert!(!members.is_empty(), "case {case}: group {id} emptied");
            }
            for (id, kept) in &shrunk {
                assert_eq!(after[id], *kept, "case {case}: group {id}");
            }
            for (id, members) in &kernel {
                if !shrunk.iter().any(|(s, _)| s == id) {
                    assert_eq!(after[id], *members, "case {case}: group {id} not shrunk");
                }
            }
            for d in direct.values() {
                assert!(!delete.contains(&d.object), "case {case}");
            }
            deletes += delete.len();
        }
        assert!(deletes > 500, "{deletes} objects deleted in 2,000 cases");
    }
}
