//! The client side of `net.l3hv.Agent1`, used by `l3hv hook` and tests.

use std::time::Duration;

use zbus::Connection;

use super::{DbusError, builder};

#[zbus::proxy(
    interface = "net.l3hv.Agent1",
    default_service = "net.l3hv.Agent1",
    default_path = "/net/l3hv/Agent"
)]
pub trait Agent1 {
    async fn set_vm(&self, name: &str, interfaces: &str) -> Result<(), DbusError>;
    async fn remove_vm(&self, name: &str) -> Result<(), DbusError>;
    async fn list_vms(&self) -> Result<String, DbusError>;
    async fn get_status(&self) -> Result<String, DbusError>;
    async fn reconcile(&self) -> Result<String, DbusError>;
    #[zbus(signal)]
    async fn vm_changed(&self, name: &str, state: &str) -> zbus::Result<()>;
}

/// Connects to `bus` (`system`, `session` or an address); every method
/// call on it gives up after `timeout`.
pub async fn connect(bus: &str, timeout: Duration) -> zbus::Result<Connection> {
    builder(bus)?.method_timeout(timeout).build().await
}
