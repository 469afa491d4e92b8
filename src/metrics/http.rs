//! A minimal HTTP/1.1 server for `GET /metrics`: one request per
//! connection, `Connection: close`, bounded request size and time. Enough
//! for Prometheus and curl; anything else gets 404/405/400. Never reads a
//! request body.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{MetricsError, Sources};

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `openmetrics`: the client's Accept names OpenMetrics (Prometheus
    /// does); others get the Prometheus text format.
    Metrics {
        head_only: bool,
        openmetrics: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// PURE: routes a request head (the bytes up to the blank line).
pub fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Route::BadRequest;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    let openmetrics = String::from_utf8_lossy(head).lines().skip(1).any(|h| {
        h.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text")
        })
    });
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics {
            head_only: false,
            openmetrics,
        },
        ("HEAD", "/metrics") => Route::Metrics {
            head_only: true,
            openmetrics,
        },
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves scrapes until the listener fails.
pub async fn serve(listener: TcpListener, sources: Sources) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let sources = sources.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &sources).await {
                        debug!(%peer, error = %e, "metrics connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let mut content_type = "text/plain; charset=utf-8";
    let (code, body, head_only) = if !complete {
        ("400 Bad Request", "bad request\n".to_string(), false)
    } else {
        match route(&head) {
            Route::Metrics {
                head_only,
                openmetrics,
            } => match sources.scrape().await {
                Ok(text) if openmetrics => {
                    content_type = OPENMETRICS;
                    ("200 OK", text, head_only)
                }
                Ok(text) => {
                    content_type = PROMETHEUS_TEXT;
                    ("200 OK", super::to_prometheus_text(&text), head_only)
                }
                Err(e) => {
                    warn!(error = %e, "metrics scrape failed");
                    ("503 Service Unavailable", format!("{e}\n"), head_only)
                }
            },
            Route::NotFound => ("404 Not Found", "try /metrics\n".into(), false),
            Route::MethodNotAllowed => ("405 Method Not Allowed", "GET only\n".into(), false),
            Route::BadRequest => ("400 Bad Request", "bad request\n".into(), false),
        }
    };
    let mut out = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = |openmetrics| Route::Metrics {
            head_only: false,
            openmetrics,
        };
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            get(false)
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), get(false));
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"),
            get(true)
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics {
                head_only: true,
                openmetrics: false
            }
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }
}
