//! The local control socket: newline-delimited JSON requests on a Unix
//! socket (root only), mapped one to one onto agent [`Command`]s.
//!
//! It is how `l3hv status` reaches the agent and the intent entry point the
//! tests use; the D-Bus API maps onto the same commands. It holds no state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::agent::{AgentHandle, ApiError, Command};
use crate::bgp::BgpHandle;
use crate::intent::VmIntent;

/// Longest request line accepted; longer input is refused, not buffered.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    ListVms,
    SetVm {
        vm: VmIntent,
    },
    RemoveVm {
        name: String,
    },
    Reconcile,
    Peers,
    /// Learned routes, within `prefix` if given.
    Routes {
        #[serde(default)]
        prefix: Option<ipnet::IpNet>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(ApiError),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: no answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("control socket {path}: bad answer: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(err)?;
        }
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves connections until the listener fails.
pub async fn serve(listener: UnixListener, agent: AgentHandle, bgp: BgpHandle) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let bgp = bgp.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, agent, bgp).await {
                        debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, agent: AgentHandle, bgp: BgpHandle) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_REQUEST {
            Response::Error(ApiError::Invalid(format!(
                "request longer than {MAX_REQUEST} bytes"
            )))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(req, &agent, &bgp).await,
                Err(e) => Response::Error(ApiError::Invalid(format!("bad request: {e}"))),
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
        out.push(b'\n');
        write.write_all(&out).await?;
        if line.len() > MAX_REQUEST {
            return Ok(());
        }
    }
}

use tokio::io::AsyncReadExt;

async fn handle(req: Request, agent: &AgentHandle, bgp: &BgpHandle) -> Response {
    fn value<T: Serialize>(v: T) -> Response {
        match serde_json::to_value(v) {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Error(ApiError::Internal(e.to_string())),
        }
    }
    let result = match req {
        Request::Status => agent
            .call(|reply| Command::Status { reply })
            .await
            .map(|st| {
                let mut v = serde_json::to_value(st).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert(
                        "peers".into(),
                        serde_json::to_value(bgp.peers()).unwrap_or_default(),
                    );
                }
                Response::Ok(v)
            }),
        Request::Peers => Ok(value(bgp.peers())),
        Request::Routes { prefix } => agent
            .call(|reply| Command::Routes {
                filter: prefix,
                reply,
            })
            .await
            .map(value),
        Request::ListVms => agent
            .call(|reply| Command::ListVms { reply })
            .await
            .map(value),
        Request::Reconcile => agent
            .call(|reply| Command::Reconcile { reply })
            .await
            .map(value),
        Request::SetVm { vm } => match agent.call(|reply| Command::SetVm { vm, reply }).await {
            Ok(r) => r.map(|()| Response::Ok(serde_json::Value::Null)),
            Err(e) => Err(e),
        },
        Request::RemoveVm { name } => {
            match agent.call(|reply| Command::RemoveVm { name, reply }).await {
                Ok(r) => r.map(|()| Response::Ok(serde_json::Value::Null)),
                Err(e) => Err(e),
            }
        }
    };
    result.unwrap_or_else(Response::Error)
}

/// The longest answer [`request_blocking`] reads.
const MAX_ANSWER: usize = 16 << 20;

/// [`request`] without a runtime, for `l3hv hook`: a runtime's epoll,
/// eventfd and signal pipe were most of the system calls of a hook besides
/// its one round trip. The whole call is bounded by `timeout`.
pub fn request_blocking(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    use std::io::{ErrorKind, Read, Write};
    let err = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let timed_out = || ControlError::Timeout {
        path: path.to_path_buf(),
        timeout,
    };
    let slow = |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        (!left.is_zero()).then_some(left).ok_or_else(timed_out)
    };
    // SO_SNDTIMEO bounds connect() on a Unix socket too: an agent that no
    // longer accepts, its backlog full, would otherwise block the hook (and
    // libvirt behind it) for good.
    let socket =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(err)?;
    socket.set_write_timeout(Some(left()?)).map_err(err)?;
    socket
        .connect(&socket2::SockAddr::unix(path).map_err(err)?)
        .map_err(|e| if slow(&e) { timed_out() } else { err(e) })?;
    let mut stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(socket));
    let line = line(req).map_err(err)?;
    stream.set_write_timeout(Some(left()?)).map_err(err)?;
    stream
        .write_all(&line)
        .map_err(|e| if slow(&e) { timed_out() } else { err(e) })?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"\n") {
        stream.set_read_timeout(Some(left()?)).map_err(err)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if slow(&e) => return Err(timed_out()),
            Err(e) => return Err(err(e)),
        }
        if answer.len() > MAX_ANSWER {
            break;
        }
    }
    answer_of(path, &answer)
}

/// A request as it goes on the socket: one line of JSON.
fn line(req: &Request) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    Ok(line)
}

fn answer_of(path: &Path, answer: &[u8]) -> Result<Response, ControlError> {
    serde_json::from_slice::<Response>(answer).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Sends one request and waits (bounded) for its answer.
pub async fn request(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let err = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let fut = async {
        let mut stream = UnixStream::connect(path).await.map_err(err)?;
        stream
            .write_all(&line(req).map_err(err)?)
            .await
            .map_err(err)?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await.map_err(err)?;
        answer_of(path, answer.as_bytes())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ControlError::Timeout {
            path: path.to_path_buf(),
            timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};

    /// The hook's blocking call: an answer, an agent that never answers
    /// (bounded by the timeout) and one that hangs up.
    #[test]
    fn a_blocking_request_is_answered_or_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            for (i, conn) in listener.incoming().take(3).enumerate() {
                let mut conn = conn.expect("accept");
                let mut line = String::new();
                std::io::BufReader::new(&conn)
                    .read_line(&mut line)
                    .expect("request");
                assert!(line.contains("remove_vm"), "{line}");
                match i {
                    0 => conn.write_all(b"{\"ok\":null}\n").expect("answer"),
                    1 => held.push(conn),
                    _ => drop(conn),
                }
            }
            held
        });
        let req = Request::RemoveVm { name: "vm1".into() };
        let r = request_blocking(&path, &req, Duration::from_secs(5));
        assert!(matches!(r, Ok(Response::Ok(_))), "{r:?}");
        let t = std::time::Instant::now();
        let r = request_blocking(&path, &req, Duration::from_millis(200));
        assert!(matches!(r, Err(ControlError::Timeout { .. })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let r = request_blocking(&path, &req, Duration::from_secs(5));
        assert!(matches!(r, Err(ControlError::Protocol { .. })), "{r:?}");
        drop(server.join());
        let r = request_blocking(&dir.path().join("none"), &req, Duration::from_secs(1));
        assert!(matches!(r, Err(ControlError::Socket { .. })), "{r:?}");
        // An agent that accepts nothing more, its backlog full: connect()
        // itself is bounded.
        let full = dir.path().join("full.sock");
        let listener = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .expect("socket");
        listener
            .bind(&socket2::SockAddr::unix(&full).expect("addr"))
            .expect("bind");
        listener.listen(0).expect("listen");
        let addr = socket2::SockAddr::unix(&full).expect("addr");
        let mut queued = Vec::new();
        loop {
            let c = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
                .expect("socket");
            c.set_nonblocking(true).expect("nonblocking");
            match c.connect(&addr) {
                Ok(()) => queued.push(c),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
            assert!(queued.len() < 1000, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(request_blocking(&full, &req, Duration::from_millis(200)));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("connect() to a full backlog was not bounded");
        assert!(matches!(r, Err(ControlError::Timeout { .. })), "{r:?}");
    }
}
