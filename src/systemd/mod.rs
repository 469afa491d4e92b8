//! systemd service integration: the `sd_notify(3)` protocol, written by
//! hand (one datagram per state change on `$NOTIFY_SOCKET`).
//!
//! `l3hvd` sends `READY=1` once its first reconcile has finished,
//! `RELOADING=1` / `READY=1` around a `systemctl reload`, `STOPPING=1` on the
//! way out; the agent loop sends `WATCHDOG=1` (see [`Watchdog`]). Outside
//! systemd (no `$NOTIFY_SOCKET`) every call is a no-op. Never blocks: the
//! socket is a datagram socket and a failed send is only logged.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify socket {path}: {source}")]
    Send {
        path: String,
        source: std::io::Error,
    },
    #[error("notify socket {0}: not a usable address")]
    Address(String),
}

/// Where to send notifications: `$NOTIFY_SOCKET` read once at start.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// A filesystem path, or an abstract name (`@...` in the variable).
    target: Option<String>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; absent or empty: notifications are dropped.
    pub fn from_env() -> Self {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        Self { target }
    }

    /// A notifier that sends nothing (tests, or outside systemd).
    pub fn disabled() -> Self {
        Self { target: None }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one `KEY=value` message (several separated by newlines).
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let err = |source| NotifyError::Send {
            path: target.clone(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(err)?;
        if let Some(name) = target.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|_| NotifyError::Address(target.clone()))?;
            socket.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
        } else if target.starts_with('/') {
            socket
                .send_to(state.as_bytes(), PathBuf::from(target))
                .map_err(err)?;
        } else {
            // vsock: addresses (VMs) are not supported.
            return Err(NotifyError::Address(target.clone()));
        }
        Ok(())
    }

    /// Like [`Notifier::notify`], logging a failure instead of returning it.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the monotonic timestamp systemd 253+ expects.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

/// CLOCK_MONOTONIC in microseconds.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The service watchdog: `WATCHDOG=1` every `interval` (half of
/// `$WATCHDOG_USEC`), sent from the agent's loop so a stuck loop stops
/// the pings and systemd restarts the agent.
#[derive(Debug, Clone)]
pub struct Watchdog {
    pub interval: Duration,
    notifier: Notifier,
}

impl Watchdog {
    /// From `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, when it names another
    /// process the watchdog is not ours). None when not asked for.
    pub fn from_env(notifier: &Notifier) -> Option<Self> {
        let usec = std::env::var("WATCHDOG_USEC").ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        let interval = watchdog_interval(&usec)?;
        notifier.enabled().then(|| Self {
            interval,
            notifier: notifier.clone(),
        })
    }

    pub fn ping(&self) {
        self.notifier.send("WATCHDOG=1");
    }
}

/// Half of `WATCHDOG_USEC` (systemd's advice), at least 1ms.
pub fn watchdog_interval(usec: &str) -> Option<Duration> {
    let usec: u64 = usec.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_half() {
        assert_eq!(watchdog_interval("30000000"), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval("0"), None);
        assert_eq!(watchdog_interval("x"), None);
        assert_eq!(watchdog_interval("1"), Some(Duration::from_millis(1)));
    }

    #[test]
    fn sends_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(path.display().to_string()),
        };
        n.ready("ok");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
    }

    #[test]
    fn disabled_is_silent() {
        assert!(Notifier::disabled().notify("READY=1").is_ok());
    }
}
