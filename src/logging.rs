//! Logs to stderr, as text or JSON, filtered by `RUST_LOG` or `log.level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG` wins over `log.level`; the default shows
/// one access-log line per request (`info`).
pub fn init(config: &LogConfig) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let hint = match rust_log.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(rust_log) => rust_log_hint(rust_log),
        None => config.level.as_deref().and_then(level_hint),
    };
    if let Some(hint) = hint {
        // Said outside the log: the filter may well let nothing through.
        say_outside(config.format, "WARN", &hint);
    }
    let filter = filter(rust_log, config.level.as_deref());
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

/// Writes one line to stderr past the log's filter, in the log's format: as JSON, with
/// the fields the log's own JSON lines have, so that a pipeline reading them takes it too.
pub fn say_outside(format: LogFormat, level: &str, message: &str) {
    match format {
        LogFormat::Text => eprintln!("session-proxy: {message}"),
        LogFormat::Json => {
            let mut timestamp = String::new();
            let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
            let line = serde_json::json!({
                "timestamp": timestamp,
                "level": level,
                "message": message,
                "target": "session_proxy",
            });
            eprintln!("{line}");
        }
    }
}

/// Where the proxy and the libraries it uses log: a bare `RUST_LOG` directive naming one
/// of these means "all of this target's events".
const TARGETS: [&str; 10] = [
    "session_proxy",
    "hyper",
    "hyper_util",
    "h2",
    "redis",
    "tokio",
    "rustls",
    "mio",
    "tower",
    "tracing",
];

/// What is likely wrong with a `RUST_LOG` that names neither a level nor a target the
/// proxy logs under (`warning`, `inf`): valid syntax, read as the name of a target, and
/// so letting no line of the proxy's through. `None` when it looks meant.
fn misread(rust_log: &str) -> Option<String> {
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    let odd = rust_log
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('='))
        .find(|d| {
            let target = d.split(['[', '{', ':']).next().unwrap_or_default();
            !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)) && !TARGETS.contains(&target)
        })?;
    Some(format!(
        "RUST_LOG's `{odd}` is neither a level (trace, debug, info, warn, error, off) nor a \
         target the proxy logs under, so it lets none of the proxy's log lines through; \
         did you mean a level, or target=level?"
    ))
}

/// What is likely wrong with a `RUST_LOG`, if anything: a filter that does not parse
/// (`session_proxy=warning`), which is ignored for `log.level`; a bare word that is
/// neither a level nor a target the proxy logs under; a filter that asks for lines but
/// lets none of the proxy's own through (`hyper=debug` alone).
fn rust_log_hint(rust_log: &str) -> Option<String> {
    if rust_log.trim().is_empty() {
        return None;
    }
    if let Err(e) = EnvFilter::try_new(rust_log) {
        return Some(format!(
            "RUST_LOG `{rust_log}` is not a valid filter ({e}), so it is ignored and \
             `log.level` applies; use a level (trace, debug, info, warn, error, off) or \
             target=level"
        ));
    }
    misread(rust_log).or_else(|| {
        silences_own_lines(rust_log).then(|| {
            format!(
                "RUST_LOG `{rust_log}` lets none of the proxy's own log lines through, \
                 errors included (they are under the target `{OWN_TARGET}`); add a level \
                 for the rest, e.g. `warn,{rust_log}`"
            )
        })
    })
}

/// What is likely wrong with a `log.level` (checked for syntax with the configuration):
/// a filter that asks for lines but lets none of the proxy's own through.
fn level_hint(level: &str) -> Option<String> {
    silences_own_lines(level).then(|| {
        format!(
            "log.level `{level}` lets none of the proxy's own log lines through, errors \
             included (they are under the target `{OWN_TARGET}`); add a level for the \
             rest, e.g. `warn,{level}`"
        )
    })
}

/// The target every log line of the proxy's own is under (or under a module of it).
const OWN_TARGET: &str = "session_proxy";

/// Whether a filter asks for some log lines but lets none of the proxy's own through:
/// `hyper=debug` alone, or a misspelt `sessionproxy=info`. A filter that turns the
/// proxy's lines off itself (`off`, `off,hyper=info`, `hyper=debug,session_proxy=off`)
/// is taken as meant.
pub fn silences_own_lines(filter: &str) -> bool {
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    let mut asks = false;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (target.trim(), Some(level.trim())),
            None if LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) => {
                ("", Some(directive))
            }
            None => (directive, None),
        };
        if level.is_some_and(|l| l.eq_ignore_ascii_case("off") || l == "0") {
            if target.is_empty() || OWN_TARGET.starts_with(target) || target.starts_with(OWN_TARGET)
            {
                return false;
            }
            continue;
        }
        asks = true;
        // A directive limited to spans or fields does not reach the lines outside them.
        if target.contains(['[', '{']) {
            continue;
        }
        // Targets match as prefixes: `session` covers `session_proxy`, and
        // `session_proxy::access` the access log.
        if OWN_TARGET.starts_with(target) || target.starts_with(OWN_TARGET) {
            return false;
        }
    }
    asks
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

    #[test]
    fn a_filter_that_hides_every_line_of_the_proxy_is_told_from_one_that_is_meant() {
        for silencing in [
            "hyper=debug",
            "sessionproxy=info",
            "bogus=debug",
            "redis[span]=debug",
            "session_proxy[request]=info",
        ] {
            assert!(silences_own_lines(silencing), "{silencing}");
        }
        for meant in [
            "",
            "off",
            "0",
            "hyper=off",
            "info",
            "4",
            "warn,hyper=debug",
            "session_proxy=info",
            "session_proxy::access=info",
            "session=debug",
            "=info",
            "hyper=debug,session_proxy=error",
            // The proxy's lines turned off on purpose.
            "off,hyper=info",
            "hyper=debug,session_proxy=off",
            "session_proxy=off",
        ] {
            assert!(!silences_own_lines(meant), "{meant}");
        }
    }

    #[test]
    fn a_rust_log_that_does_not_parse_or_hides_the_proxy_gets_a_hint() {
        let hint = rust_log_hint("session_proxy=warning").unwrap();
        assert!(hint.contains("not a valid filter"), "{hint}");
        assert!(hint.contains("`log.level` applies"), "{hint}");
        // The fallback the hint announces is the one `filter` takes.
        assert_eq!(
            filter(Some("session_proxy=warning".into()), Some("error")).max_level_hint(),
            Some(LevelFilter::ERROR)
        );
        let hint = rust_log_hint("hyper=debug").unwrap();
        assert!(hint.contains("none of the proxy's own"), "{hint}");
        assert!(hint.contains("`warn,hyper=debug`"), "{hint}");
        for meant in [
            "",
            "debug",
            "warn,hyper=debug",
            "session_proxy=debug",
            "off",
        ] {
            assert_eq!(rust_log_hint(meant), None, "{meant}");
        }
        let hint = level_hint("hyper=debug").unwrap();
        assert!(hint.starts_with("log.level `hyper=debug`"), "{hint}");
        assert_eq!(level_hint("hyper=debug,session_proxy=off"), None);
    }

    #[test]
    fn a_rust_log_that_lets_nothing_through_is_pointed_out() {
        for odd in ["warning", "inf", "info,warnings", "bogus::x"] {
            assert!(misread(odd).is_some(), "{odd}");
        }
        for meant in [
            "",
            "warn",
            "INFO",
            "session_proxy",
            "warn,hyper",
            "info,session_proxy::access=off",
            "redis[span]=debug",
        ] {
            assert_eq!(misread(meant), None, "{meant}");
        }
    }
}
