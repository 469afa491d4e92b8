//! Kernel reconciliation, the pure half: what the kernel must hold
//! ([`desired`]), what differs from what it holds ([`plan`]), and which
//! sysctls need reading. The effectful half lives in [`crate::netlink`].

pub mod desired;
pub mod groups;
pub mod model;
pub mod plan;
pub mod scoped;

use std::collections::BTreeMap;

pub use desired::{Nexthops, add_learned, desired, desired_host, desired_with};
pub use model::*;
pub use plan::{KernelOp, Plan, plan, plan_host};

/// Which sysctl files to read before planning: the host and uplink ones
/// (few; with `host`, but for those `host` says the last pass left at the
/// value wanted now), those of VM links not yet verified at their current
/// ifindex, and those of adopted links being released (with the kernel's
/// defaults).
/// `verified` maps a link name to the ifindex whose sysctls were last
/// confirmed; a recreated link gets a new ifindex and is read again.
///
/// The sysctls of VM links the kernel does not have yet come back in
/// [`SysctlReads::absent`]: there is nothing to read (the files appear with
/// the link), they are all to be written.
pub fn sysctls_to_read(
    desired: &DesiredKernel,
    observed: &ObservedKernel,
    verified: &BTreeMap<String, u32>,
    host: Option<&BTreeMap<SysctlPath, String>>,
) -> SysctlReads {
    let mut out: Vec<SysctlPath> = Vec::new();
    let mut absent: Vec<SysctlPath> = Vec::new();
    if let Some(settled) = host {
        let unsettled = |path: &SysctlPath, value: &String| settled.get(path) != Some(value);
        out.extend(
            desired
                .host_sysctls
                .iter()
                .filter(|(p, v)| unsettled(p, v))
                .map(|(p, _)| p.clone()),
        );
        for (name, u) in &desired.uplinks {
            out.extend(
                u.sysctls
                    .iter()
                    .map(|(s, v)| (s.path(name), v))
                    .filter(|(p, v)| unsettled(p, v))
                    .map(|(p, _)| p),
            );
        }
    }
    for (name, l) in &desired.links {
        match observed.links.get(name).map(|o| o.ifindex) {
            None => absent.extend(l.sysctls.keys().map(|s| s.path(name))),
            Some(idx) if verified.get(name) != Some(&idx) => {
                out.extend(l.sysctls.keys().map(|s| s.path(name)));
            }
            Some(_) => {}
        }
    }
    let releasing: Vec<&String> = observed
        .links
        .iter()
        .filter(|(n, o)| {
            !desired.links.contains_key(*n) && o.ownership() == Some(Ownership::Adopted)
        })
        .map(|(n, _)| n)
        .collect();
    if !releasing.is_empty() {
        for s in desired::VM_SYSCTLS {
            out.push(s.default_path());
            out.extend(releasing.iter().map(|n| s.path(n)));
        }
    }
    SysctlReads { read: out, absent }
}

/// What [`sysctls_to_read`] found to read, and what has no file yet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SysctlReads {
    pub read: Vec<SysctlPath>,
    pub absent: Vec<SysctlPath>,
}
