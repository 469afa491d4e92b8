//! libvirt: reading l3hv's intent out of domain XML ([`metadata`], pure)
//! and the agent's own libvirt connection ([`events`]: reconcile of running
//! domains and event following). The hook uses only [`metadata`]; nothing
//! here is ever on the hook's call path into libvirt.

#[cfg(feature = "libvirt")]
pub mod events;
pub mod metadata;
