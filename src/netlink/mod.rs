//! The only code that talks to the kernel: netlink dumps into
//! [`ObservedKernel`](crate::reconcile::ObservedKernel), execution of a
//! [`Plan`](crate::reconcile::Plan), tap ioctls and sysctl files.
//!
//! It decides nothing: what to change comes from `reconcile`. Kernel quirks
//! are handled here, each with a comment saying why.

pub mod apply;
pub mod dump;
pub mod links;
pub mod monitor;
pub mod neigh;
pub mod nexthop;
pub mod sysctl;
pub mod tap;

use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink dump of {what}: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("nexthop {what}: {source}")]
    Nexthop {
        what: &'static str,
        source: nexthop::NexthopError,
    },
    #[error("netlink {what}: {source}")]
    Request {
        what: &'static str,
        source: rtnetlink::Error,
    },
}

/// A netlink connection to the kernel of the current network namespace.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
    protocol: u8,
    /// Nexthop objects have their own socket (hand codec), kept open.
    nexthops: std::sync::Arc<std::sync::Mutex<nexthop::Channel>>,
}

impl Kernel {
    /// Opens the connection; its reader task runs on the current runtime.
    pub fn connect(protocol: u8) -> Result<Self, NetlinkError> {
        use rtnetlink::sys::AsyncSocket;
        let (mut conn, handle, _) = rtnetlink::new_connection()?;
        // Strict checking makes the kernel filter route dumps by protocol
        // (RTM_GETROUTE with rtm_protocol set): a dump then carries only
        // l3hv's routes, not every local/broadcast entry of every tap. On a
        // kernel without it the dump is just larger; we filter again.
        if let Err(e) = conn
            .socket_mut()
            .socket_mut()
            .set_netlink_get_strict_chk(true)
        {
            tracing::debug!(error = %e, "NETLINK_GET_STRICT_CHK unavailable");
        }
        tokio::spawn(conn);
        Ok(Self {
            handle,
            protocol,
            nexthops: Default::default(),
        })
    }

    pub fn protocol(&self) -> u8 {
        self.protocol
    }
}

/// The errno of a netlink error reply, positive (`libc::ENOENT`, ...).
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}
