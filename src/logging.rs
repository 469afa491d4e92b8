//! tracing setup: human or JSON lines on stderr; RUST_LOG overrides the
//! configured level. The level can change at run time (`systemctl reload`)
//! through the returned [`LogHandle`]; the format cannot.
//!
//! Lines are written by a thread of their own (`tracing-appender`'s
//! non-blocking writer), never by the thread that logs: the agent's thread
//! (BGP sessions, the failover fast path) wrote to stderr itself, and a
//! slow stderr (the journal, a file under writeback) held it there: single
//! writes took 2-3 ms in `strace -T` during failovers, between a session's
//! BFD Down and the RIB hearing of it. When the writer falls behind by
//! more than [`BUFFERED_LINES`], further lines are dropped, not waited for
//! (counted: [`LogHandle::dropped_lines`]).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log level {level:?}: {reason}")]
    Level { level: String, reason: String },
}

/// Lines the writer thread may fall behind by before lines are dropped.
pub const BUFFERED_LINES: usize = 128_000;

/// Changes the level filter of the installed subscriber; the last clone
/// dropped flushes the lines still queued.
#[derive(Clone)]
pub struct LogHandle {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    dropped: Option<tracing_appender::non_blocking::ErrorCounter>,
    _flush: Option<std::sync::Arc<tracing_appender::non_blocking::WorkerGuard>>,
}

impl LogHandle {
    /// Switches to `level`, unless RUST_LOG (which wins) is set. Returns
    /// whether the filter changed.
    pub fn set_level(&self, level: &str) -> Result<bool, LogError> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(false);
        }
        let err = |reason: String| LogError::Level {
            level: level.to_string(),
            reason,
        };
        let filter = EnvFilter::try_new(level).map_err(|e| err(e.to_string()))?;
        match &self.handle {
            Some(h) => h.reload(filter).map_err(|e| err(e.to_string()))?,
            None => return Ok(false),
        }
        Ok(true)
    }

    /// Lines dropped because the writer thread fell behind.
    pub fn dropped_lines(&self) -> usize {
        self.dropped.as_ref().map_or(0, |c| c.dropped_lines())
    }
}

pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("l3hv-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(writer),
            )
            .try_init(),
    };
    LogHandle {
        handle: installed.is_ok().then_some(handle),
        dropped: Some(dropped),
        _flush: Some(std::sync::Arc::new(guard)),
    }
}
