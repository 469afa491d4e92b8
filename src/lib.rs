//! l3hv: turn a KVM/libvirt hypervisor into an L3 router for its VMs.
//!
//! Data flows one way: control commands -> [`agent`] -> [`intent`] ->
//! [`reconcile`] (pure desired/plan) -> [`netlink`] (the only kernel code).

pub mod agent;
pub mod bfd;
pub mod bgp;
pub mod btree;
pub mod cli;
pub mod config;
pub mod control;
pub mod dbus;
pub mod dhcp;
#[doc(hidden)]
pub mod fuzzing;
pub mod hook;
pub mod intent;
pub mod libvirt;
pub mod logging;
pub mod metrics;
pub mod nd;
pub mod netlink;
pub mod ra;
pub mod reconcile;
pub mod rib;
pub mod services;
pub mod systemd;
#[cfg(test)]
mod testutil;
