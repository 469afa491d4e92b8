//! tracing setup: human or JSON lines on stderr; RUST_LOG overrides the
//! configured level. The level can change at run time (`systemctl reload`)
//! through the returned [`LogHandle`]; the format cannot.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log level {level:?}: {reason}")]
    Level { level: String, reason: String },
}

/// Changes the level filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
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
}

pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    LogHandle {
        handle: installed.is_ok().then_some(handle),
    }
}
