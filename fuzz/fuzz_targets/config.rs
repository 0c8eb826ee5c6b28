//! The configuration file: `Config::load_from` on arbitrary YAML text.
//!
//! Input: the text of the config file. It is written to a temporary file of this
//! process (the loader reads a path) and loaded with no environment and no flags.
//!
//! Invariants:
//! - loading never panics: a bad file is an `Err` with a message;
//! - an accepted configuration prints (`session-proxy check`), and when nothing in it is
//!   masked, the printed YAML loads back to the same configuration.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use session_proxy::config::{Config, Overrides};

static PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    std::env::temp_dir().join(format!(
        "session-proxy-fuzz-config-{}.yaml",
        std::process::id()
    ))
});

fn load(text: &[u8]) -> Result<Config, String> {
    std::fs::write(&*PATH, text).expect("temporary config file is writable");
    let flags = Overrides {
        config: Some(PATH.clone()),
        ..Default::default()
    };
    Config::load_from(&flags, std::iter::empty()).map_err(|e| e.0)
}

fn masks_something(config: &Config) -> bool {
    let s = &config.store;
    config.session.secret.is_some()
        || !config.session.secret_fallbacks.is_empty()
        || config.admin_token.is_some()
        || s.url.iter().any(|u| u.contains('@'))
        || s.sentinel
            .iter()
            .flat_map(|x| &x.nodes)
            .any(|u| u.contains('@'))
        || s.cluster
            .iter()
            .flat_map(|x| &x.nodes)
            .any(|u| u.contains('@'))
}

fuzz_target!(|data: &[u8]| {
    let Ok(config) = load(data) else {
        return;
    };
    let printed = config.to_masked_yaml();
    if masks_something(&config) {
        return;
    }
    let reloaded = load(printed.as_bytes())
        .unwrap_or_else(|e| panic!("printed configuration does not load: {e}\n{printed}"));
    let (a, b) = (
        serde_json::to_value(&config).expect("config serialises"),
        serde_json::to_value(&reloaded).expect("config serialises"),
    );
    assert_eq!(a, b, "printed configuration loads differently:\n{printed}");
});
