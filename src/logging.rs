//! Logs to stderr, as text or JSON, filtered by `RUST_LOG` or `log.level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG` wins over `log.level`; the default shows
/// one access-log line per request (`info`).
pub fn init(config: &LogConfig) {
    let filter = filter(std::env::var("RUST_LOG").ok(), config.level.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `RUST_LOG`, else `log.level`, else `info`. An empty `RUST_LOG` (a template that left
/// it blank) counts as unset.
fn filter(rust_log: Option<String>, level: Option<&str>) -> EnvFilter {
    rust_log
        .filter(|f| !f.trim().is_empty())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| level.and_then(|f| EnvFilter::try_new(f).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn rust_log_wins_and_an_empty_one_counts_as_unset() {
        let hint = |rust_log: Option<&str>, level| {
            filter(rust_log.map(str::to_owned), level).max_level_hint()
        };
        assert_eq!(hint(Some("debug"), Some("warn")), Some(LevelFilter::DEBUG));
        assert_eq!(hint(Some(""), Some("warn")), Some(LevelFilter::WARN));
        assert_eq!(hint(Some(" "), None), Some(LevelFilter::INFO));
        assert_eq!(hint(None, None), Some(LevelFilter::INFO));
    }
}
