//! Configuration: built-in defaults < config file < environment < command-line flags.
//!
//! The file and the environment are merged as a JSON tree first, then deserialised into
//! [`Config`] in one go, so that an unknown key or a wrong type anywhere is reported with
//! its full path (`session.max_age`) and where it came from. [`Config::validate`] then
//! checks the values serde cannot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

const ENV_PREFIX: &str = "SESSION_PROXY_";

/// The whole configuration. Field docs are the reference; `proxy.yaml.example` shows
/// every key with its default.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// The application: `http://host:port`, with an optional path prefix.
    pub upstream: String,
    /// Address of `/healthz`, `/readyz`, `/metrics` and `/sessions`; `null` turns it off.
    pub admin_listen: Option<SocketAddr>,
    pub session: SessionConfig,
    pub store: StoreConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    /// Bearer token that `/sessions` on the admin port requires, when set.
    pub admin_token: Option<String>,
    /// Every request comes through a proxy of the operator's (an ingress, a load
    /// balancer) that overwrites `X-Forwarded-Proto`, `-Host`, `-Port` and `-Prefix`:
    /// they are passed on as it set them, rather than replaced or removed.
    pub trust_forwarded: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstream: "http://127.0.0.1:3000".into(),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            session: SessionConfig::default(),
            store: StoreConfig::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            admin_token: None,
            trust_forwarded: false,
        }
    }
}

/// The session cookie, the header protocol and the session's lifetime.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub cookie_name: String,
    /// Seconds: the cookie's Max-Age and the stored session's TTL.
    pub max_age: u64,
    pub path: String,
    pub domain: Option<String>,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    /// Random bytes in a session ID (16–64).
    pub id_bytes: usize,
    /// Each request that reads a session resets its TTL and re-sends the cookie.
    pub renew_on_access: bool,
    /// Globs on the request path; matching requests get no session.
    pub exclude: Vec<String>,
    pub request_header: String,
    pub update_header: String,
    pub patch_header: String,
    pub rotate_header: String,
    pub handle_header: String,
    /// Largest session, as JSON bytes, accepted from the application.
    pub max_bytes: usize,
    /// Seconds the old ID stays readable after a rotation.
    pub rotate_grace: u64,
    /// Seconds after creation at which a session ends whatever its activity.
    pub absolute_timeout: Option<u64>,
    /// Key that signs session cookies (`<id>.<mac>`).
    pub secret: Option<String>,
    /// Former secrets: cookies signed with them are accepted and re-signed.
    pub secret_fallbacks: Vec<String>,
    /// Top-level session key naming the user, for the per-user index.
    pub user_key: Option<String>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie_name: "session".into(),
            max_age: 1_209_600,
            path: "/".into(),
            domain: None,
            secure: false,
            http_only: true,
            same_site: SameSite::Lax,
            id_bytes: 32,
            renew_on_access: false,
            exclude: Vec::new(),
            request_header: "X-Session".into(),
            update_header: "X-Session-Update".into(),
            patch_header: "X-Session-Patch".into(),
            rotate_header: "X-Session-Rotate".into(),
            handle_header: "X-Session-Handle".into(),
            max_bytes: 4096,
            rotate_grace: 10,
            absolute_timeout: None,
            secret: None,
            secret_fallbacks: Vec::new(),
            user_key: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreType {
    Memory,
    Redis,
}

/// Where sessions are kept.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    #[serde(rename = "type")]
    pub kind: StoreType,
    /// Memory store bound.
    pub max_sessions: usize,
    /// Redis URL (standalone).
    pub url: Option<String>,
    pub key_prefix: String,
    pub sentinel: Option<SentinelConfig>,
    pub cluster: Option<ClusterConfig>,
    /// Seconds to connect to Redis.
    pub connect_timeout: f64,
    /// Seconds Redis has to answer one command.
    pub response_timeout: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreType::Memory,
            max_sessions: 1_000_000,
            url: None,
            key_prefix: "session:".into(),
            sentinel: None,
            cluster: None,
            connect_timeout: 1.0,
            response_timeout: 1.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    pub master: String,
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub nodes: Vec<String>,
}

/// Seconds, fractions allowed.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub upstream_connect: f64,
    pub upstream_response: f64,
    pub header_read: f64,
    /// How long a client may leave a response unread (its socket full) before its
    /// connection is closed.
    pub client_send: f64,
    /// How long a client may pause while sending a request body before the request is
    /// cut off.
    pub client_body: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            upstream_connect: 5.0,
            upstream_response: 60.0,
            header_read: 10.0,
            client_send: 60.0,
            client_body: 60.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest client request head → 431.
    pub max_header_bytes: usize,
    /// Client connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Threads serving client connections, each with a runtime of its own; 0: one per
    /// CPU the process may use.
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16384,
            max_connections: 10_000,
            workers: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds the listener still accepts after SIGTERM.
    pub drain_delay: f64,
    /// Seconds in-flight requests and tunnels get to finish.
    pub timeout: f64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: 5.0,
            timeout: 30.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub level: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: None,
        }
    }
}

/// A configuration problem, said the way a user can act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid configuration: `{key}` {why}"))
}

/// The four settings the command line can give.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub store: Option<String>,
    pub admin_listen: Option<String>,
}

impl Config {
    /// Loads the configuration from its four layers, with the process environment.
    pub fn load(flags: &Overrides) -> Result<Config, ConfigError> {
        Config::load_from(flags, std::env::vars())
    }

    /// Loads the configuration with the given environment (tests pass their own).
    pub fn load_from(
        flags: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let services = service_link_names(&env);
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| !is_service_link(k, &services))
            .collect();
        let env_config = match env.iter().find(|(k, _)| k == "SESSION_PROXY_CONFIG") {
            // `--config` wins over the variable, empty or not.
            Some(_) if flags.config.is_some() => None,
            Some((_, v)) if v.trim().is_empty() => {
                return Err(ConfigError(
                    "SESSION_PROXY_CONFIG is set but empty: it must name a config file (unset it to read ./proxy.yaml)".into(),
                ));
            }
            Some((_, v)) => Some(PathBuf::from(v)),
            None => None,
        };
        let path = flags.config.clone().or(env_config).or_else(|| {
            let default = PathBuf::from("proxy.yaml");
            default.exists().then_some(default)
        });

        let mut tree = match &path {
            Some(path) => read_file(path)?,
            None => Value::Object(Map::new()),
        };
        let defaults = serde_json::to_value(Config::default()).unwrap_or(Value::Null);
        for (name, value) in &env {
            if name == "SESSION_PROXY_CONFIG" {
                continue;
            }
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            if key == "store" {
                set_store_spec(&mut tree, value, name)?;
                continue;
            }
            let path: Vec<&str> = key.split("__").collect();
            set_path(&mut tree, &path, env_value(&defaults, &path, value), name)?;
        }
        for (key, flag, value) in [
            ("listen", "--listen", &flags.listen),
            ("upstream", "--upstream", &flags.upstream),
            ("admin_listen", "--admin-listen", &flags.admin_listen),
        ] {
            if let Some(value) = value {
                set_path(&mut tree, &[key], env_value(&defaults, &[key], value), flag)?;
            }
        }
        if let Some(spec) = &flags.store {
            set_store_spec(&mut tree, spec, "--store")?;
        }

        let origin = path
            .as_ref()
            .map(|p| format!(" (file {})", p.display()))
            .unwrap_or_default();
        check_sections(&mut tree, &defaults, "").map_err(|key| {
            ConfigError(format!(
                "invalid configuration: `{key}`{origin}: must be a mapping of keys to values"
            ))
        })?;
        let mut config: Config = serde_path_to_error::deserialize(&tree).map_err(|e| {
            let key = e.path().to_string();
            let why = e.inner().to_string();
            let mut why = expected(&defaults, &tree, &key, &why).unwrap_or(why);
            if holds_secrets(&key) {
                why = redact_quoted(&why);
            }
            // A key set by a flag or from the environment is named as the flag or the
            // variable that set it (the flag when both did, since it wins): an unknown
            // one has no line in any file to look for.
            let by_flag = [
                ("listen", "--listen", &flags.listen),
                ("upstream", "--upstream", &flags.upstream),
                ("admin_listen", "--admin-listen", &flags.admin_listen),
            ]
            .into_iter()
            .find(|(path, _, value)| *path == key && value.is_some())
            .map(|(_, flag, _)| format!(" (flag {flag})"));
            let by_env = || {
                env.iter()
                    .map(|(name, _)| name)
                    .find(|name| env_key_path(name) == key)
                    .map(|name| format!(" (environment variable {name})"))
            };
            let origin = by_flag.or_else(by_env).unwrap_or_else(|| origin.clone());
            ConfigError(format!("invalid configuration: `{key}`{origin}: {why}"))
        })?;
        config.normalize();
        config.validate()?;
        Ok(config)
    }

    /// Settles what the keys imply for one another, so that `check` prints what applies:
    /// a cookie that must be `Secure` (`same_site: none`, a `__Secure-` or `__Host-`
    /// name) is; an empty `log.level` is no level (as an empty environment value is).
    fn normalize(&mut self) {
        let s = &mut self.session;
        let name = s.cookie_name.to_ascii_lowercase();
        if s.same_site == SameSite::None
            || name.starts_with("__secure-")
            || name.starts_with("__host-")
        {
            s.secure = true;
        }
        if self
            .log
            .level
            .as_deref()
            .is_some_and(|l| l.trim().is_empty())
        {
            self.log.level = None;
        }
    }

    /// Checks the rules serde's types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.session;
        crate::upstream::UpstreamUrl::parse(&self.upstream).map_err(|e| invalid("upstream", e))?;
        if s.cookie_name.is_empty() || s.cookie_name.len() > 256 {
            return Err(invalid("session.cookie_name", "must be 1–256 characters"));
        }
        if !s.cookie_name.bytes().all(is_token_byte) {
            return Err(invalid(
                "session.cookie_name",
                "must be a cookie token: visible ASCII without separators ()<>@,;:\\\"/[]?={} or spaces",
            ));
        }
        // Browsers drop a `__Host-` cookie that names a domain or a path other than `/`.
        if s.cookie_name.to_ascii_lowercase().starts_with("__host-")
            && (s.domain.is_some() || s.path != "/")
        {
            return Err(invalid(
                "session.cookie_name",
                "starts with __Host-, which browsers accept only with `session.path: /` and no `session.domain`",
            ));
        }
        if !(1..=MAX_LIFETIME).contains(&s.max_age) {
            return Err(invalid(
                "session.max_age",
                format!("must be between 1 and {MAX_LIFETIME} seconds (ten years)"),
            ));
        }
        if s.rotate_grace > MAX_LIFETIME {
            return Err(invalid(
                "session.rotate_grace",
                format!("must be at most {MAX_LIFETIME} seconds (ten years)"),
            ));
        }
        if !s.path.starts_with('/') || !s.path.bytes().all(is_cookie_attr_byte) {
            return Err(invalid(
                "session.path",
                "must start with / and hold no spaces, `;` or control characters",
            ));
        }
        if let Some(domain) = &s.domain
            && (domain.is_empty()
                || !domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'))
        {
            return Err(invalid(
                "session.domain",
                "must be a host name (letters, digits, '.', '-')",
            ));
        }
        if crate::session::id::IdShape::new(s.id_bytes).is_none() {
            return Err(invalid("session.id_bytes", "must be between 16 and 64"));
        }
        if !(16..=1 << 20).contains(&s.max_bytes) {
            return Err(invalid(
                "session.max_bytes",
                "must be between 16 and 1048576",
            ));
        }
        // Paths start with `/`: a glob that cannot begin with one (`*.css`: `*` stops at
        // `/`; `static/**`) would be accepted and never match.
        if let Some(glob) = s.exclude.iter().find(|g| {
            !(["/", "**", "*/", "{", "["]
                .iter()
                .any(|start| g.starts_with(start)))
        }) {
            return Err(invalid(
                "session.exclude",
                format!(
                    "`{glob}` can never match: request paths start with `/` (e.g. `/static/**`, `/**/*.css`)"
                ),
            ));
        }
        crate::session::exclude::Exclusions::new(&s.exclude)
            .map_err(|e| invalid("session.exclude", e))?;
        let headers = [
            ("session.request_header", &s.request_header),
            ("session.update_header", &s.update_header),
            ("session.patch_header", &s.patch_header),
            ("session.rotate_header", &s.rotate_header),
            ("session.handle_header", &s.handle_header),
        ];
        for (i, (key, name)) in headers.iter().enumerate() {
            let parsed = http::HeaderName::try_from(name.as_str())
                .map_err(|_| invalid(key, format!("`{name}` is not a valid header name")))?;
            if crate::upstream::is_hop_by_hop(&parsed)
                || RESERVED_HEADERS.contains(&parsed.as_str())
            {
                return Err(invalid(
                    key,
                    format!("`{name}` is a header the proxy cannot use"),
                ));
            }
            if headers[..i]
                .iter()
                .any(|(_, other)| other.eq_ignore_ascii_case(name))
            {
                return Err(invalid(
                    key,
                    format!("`{name}` is already used by another session header"),
                ));
            }
        }
        if s.absolute_timeout
            .is_some_and(|t| !(1..=MAX_LIFETIME).contains(&t))
        {
            return Err(invalid(
                "session.absolute_timeout",
                format!("must be between 1 and {MAX_LIFETIME} seconds (ten years), or null"),
            ));
        }
        for (key, secret) in s.secret.iter().map(|v| ("session.secret", v)).chain(
            s.secret_fallbacks
                .iter()
                .map(|v| ("session.secret_fallbacks", v)),
        ) {
            if secret.chars().count() < 16 {
                return Err(invalid(
                    key,
                    "must be at least 16 characters (32 random bytes recommended)",
                ));
            }
        }
        if !s.secret_fallbacks.is_empty() && s.secret.is_none() {
            return Err(invalid(
                "session.secret_fallbacks",
                "needs session.secret to be set",
            ));
        }
        if s.user_key.as_deref() == Some("") {
            return Err(invalid("session.user_key", "must not be empty"));
        }
        if let Some(admin) = self.admin_listen
            && same_socket(self.listen, admin)
        {
            return Err(invalid(
                "admin_listen",
                format!(
                    "`{admin}` is also `listen` (`{}`): the two need different ports",
                    self.listen
                ),
            ));
        }
        self.validate_store()?;
        for (key, secs, min) in [
            (
                "timeouts.upstream_connect",
                self.timeouts.upstream_connect,
                f64::MIN_POSITIVE,
            ),
            (
                "timeouts.upstream_response",
                self.timeouts.upstream_response,
                f64::MIN_POSITIVE,
            ),
            (
                "timeouts.header_read",
                self.timeouts.header_read,
                f64::MIN_POSITIVE,
            ),
            (
                "timeouts.client_send",
                self.timeouts.client_send,
                f64::MIN_POSITIVE,
            ),
            (
                "timeouts.client_body",
                self.timeouts.client_body,
                f64::MIN_POSITIVE,
            ),
            (
                "store.connect_timeout",
                self.store.connect_timeout,
                f64::MIN_POSITIVE,
            ),
            (
                "store.response_timeout",
                self.store.response_timeout,
                f64::MIN_POSITIVE,
            ),
            ("shutdown.drain_delay", self.shutdown.drain_delay, 0.0),
            ("shutdown.timeout", self.shutdown.timeout, 0.0),
        ] {
            if !(secs.is_finite() && secs >= min && secs <= MAX_SECONDS) {
                let least = if min > 0.0 { "above 0" } else { "0 or more" };
                return Err(invalid(
                    key,
                    format!("must be a number of seconds {least}, at most {MAX_SECONDS:e}"),
                ));
            }
        }
        if self.limits.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "must be at least 1024"));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.workers > 1024 {
            return Err(invalid(
                "limits.workers",
                "must be at most 1024 (0: one per CPU)",
            ));
        }
        if let Some(level) = &self.log.level {
            check_log_level(level).map_err(|e| invalid("log.level", e))?;
        }
        if self.admin_token.as_deref() == Some("") {
            return Err(invalid(
                "admin_token",
                "must not be empty; use null to turn it off",
            ));
        }
        // It travels in an HTTP header, where other bytes cannot be compared as written
        // and whitespace around a value is dropped.
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim() != t || !t.bytes().all(|b| b == b' ' || b.is_ascii_graphic()))
        {
            return Err(invalid(
                "admin_token",
                "must be printable ASCII, with no space at either end",
            ));
        }
        Ok(())
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let st = &self.store;
        if st.max_sessions == 0 {
            return Err(invalid("store.max_sessions", "must be at least 1"));
        }
        if st.kind == StoreType::Memory {
            let redis = [
                ("store.url", st.url.is_some()),
                ("store.sentinel", st.sentinel.is_some()),
                ("store.cluster", st.cluster.is_some()),
            ];
            return match redis.iter().find(|(_, given)| *given) {
                Some((key, _)) => Err(invalid(
                    key,
                    "is set but `store.type` is `memory`: set `store.type: redis` to use Redis, or remove it",
                )),
                None => Ok(()),
            };
        }
        let given = [
            st.url.is_some(),
            st.sentinel.is_some(),
            st.cluster.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(
                "store",
                "of type redis needs exactly one of `store.url`, `store.sentinel` or `store.cluster`",
            ));
        }
        let urls = st
            .url
            .iter()
            .map(|u| ("store.url", u))
            .chain(
                st.sentinel
                    .iter()
                    .flat_map(|s| s.nodes.iter().map(|u| ("store.sentinel.nodes", u))),
            )
            .chain(
                st.cluster
                    .iter()
                    .flat_map(|c| c.nodes.iter().map(|u| ("store.cluster.nodes", u))),
            );
        for (key, url) in urls {
            check_redis_url(url).map_err(|why| invalid(key, why))?;
        }
        if st
            .sentinel
            .as_ref()
            .is_some_and(|s| s.nodes.is_empty() || s.master.is_empty())
        {
            return Err(invalid(
                "store.sentinel",
                "needs a master name and at least one node",
            ));
        }
        if st.cluster.as_ref().is_some_and(|c| c.nodes.is_empty()) {
            return Err(invalid("store.cluster.nodes", "needs at least one node"));
        }
        Ok(())
    }

    /// The effective configuration as YAML, with secrets and passwords masked.
    pub fn to_masked_yaml(&self) -> String {
        let mut c = self.clone();
        let mask = |s: &mut String| *s = "********".into();
        c.session.secret.iter_mut().for_each(mask);
        c.session.secret_fallbacks.iter_mut().for_each(mask);
        c.admin_token.iter_mut().for_each(mask);
        let mask_urls = |urls: &mut Vec<String>| urls.iter_mut().for_each(|u| *u = mask_url(u));
        c.store.url = c.store.url.as_deref().map(mask_url);
        c.store
            .sentinel
            .iter_mut()
            .for_each(|s| mask_urls(&mut s.nodes));
        c.store
            .cluster
            .iter_mut()
            .for_each(|s| mask_urls(&mut s.nodes));
        serde_saphyr::to_string(&c)
            .unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }
}

/// Longest timeout or delay, in seconds (~31 years).
const MAX_SECONDS: f64 = 1e9;

/// Longest `max_age`, `absolute_timeout` or `rotate_grace`: ten years, in seconds.
const MAX_LIFETIME: u64 = 10 * 365 * 24 * 3600;

/// Standard fields that mean something to HTTP, to the application or to the proxy
/// itself: a session header of that name would break requests or answers.
const RESERVED_HEADERS: [&str; 17] = [
    "cookie",
    "set-cookie",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "authorization",
    "cache-control",
    "location",
    "date",
    "expect",
    "range",
    "www-authenticate",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "accept",
];

/// Sections that are off by default: a mapping when given.
const OPTIONAL_SECTIONS: [&str; 2] = ["store.sentinel", "store.cluster"];

/// Checks that every section of the merged `tree` is a mapping (serde would read a list
/// into a section by position), and drops an empty one (`session:` with every key
/// commented out), whose defaults then apply. `Err` names the key at fault.
fn check_sections(tree: &mut Value, defaults: &Value, prefix: &str) -> Result<(), String> {
    let Value::Object(map) = tree else {
        return Ok(());
    };
    let mut empty = Vec::new();
    for (key, value) in map.iter_mut() {
        let path = format!("{prefix}{key}");
        let default = defaults.get(key).unwrap_or(&Value::Null);
        if !default.is_object() && !OPTIONAL_SECTIONS.contains(&path.as_str()) {
            continue;
        }
        match value {
            Value::Null if default.is_object() => empty.push(key.clone()),
            Value::Null => {}
            Value::Object(_) => check_sections(value, default, &format!("{path}."))?,
            _ => return Err(path),
        }
    }
    for key in empty {
        map.remove(&key);
    }
    Ok(())
}

/// The values of the keys that take one of a few words.
const CHOICES: [(&str, &str); 3] = [
    ("session.same_site", "one of `lax`, `strict` or `none`"),
    ("store.type", "`memory` or `redis`"),
    ("log.format", "`text` or `json`"),
];

/// What `key` takes, said for a user, when serde refused the type or number given
/// (`why`): serde speaks of Rust's types (`u64`, `f64`) or, for a number that does not
/// fit the type, only of an "invalid number". `None` keeps serde's message.
fn expected(defaults: &Value, tree: &Value, key: &str, why: &str) -> Option<String> {
    if !(why.starts_with("invalid type")
        || why.starts_with("invalid value")
        || why == "invalid number"
        || why == "invalid socket address syntax")
        || key.contains('[')
    {
        return None;
    }
    let path: Vec<&str> = key.split('.').collect();
    let given = match path.iter().try_fold(tree, |v, k| v.get(k))? {
        Value::String(text) => format!("\"{text}\""),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
        other => other.to_string(),
    };
    let default = path.iter().try_fold(defaults, |v, k| v.get(k))?;
    let wants = if let Some((_, choices)) = CHOICES.iter().find(|(k, _)| *k == key) {
        (*choices).to_string()
    } else if key == "listen" {
        "an IP address and port such as 127.0.0.1:8080 or [::]:8080 (names are not looked up)"
            .into()
    } else if key == "admin_listen" {
        "an IP address and port such as 127.0.0.1:9901, or null to turn the admin port off".into()
    } else {
        match default {
            Value::Bool(_) => "true or false".into(),
            Value::Number(n) if n.is_u64() => "a whole number, 0 or more".into(),
            Value::Number(_) => "a number of seconds (fractions allowed)".into(),
            Value::String(_) => "text".into(),
            Value::Array(_) => "a list of text".into(),
            Value::Null if takes_text(defaults, &path) => "text, or null".into(),
            Value::Null if OPTIONAL_SECTIONS.contains(&key) => "a mapping of keys, or null".into(),
            Value::Null => "a whole number of seconds, or null".into(),
            Value::Object(_) => "a mapping of keys to values".into(),
        }
    };
    // A secret's value is never repeated, whatever its type.
    if holds_secrets(key) {
        return Some(format!("must be {wants}"));
    }
    Some(format!("must be {wants}, not {given}"))
}

/// The YAML parser's message, without the advice it gives programmers.
fn plain_yaml_error(message: &str) -> String {
    if message.contains("multiple YAML documents") {
        return "the file holds more than one YAML document (`---`); use one".into();
    }
    if message.contains("budget breached") {
        return "the file expands to too many values (anchors and aliases)".into();
    }
    if message.contains("recursive references") {
        return "an alias refers to the value that holds it".into();
    }
    // The only string read from a null is a mapping's key (values name their key).
    if let Some((place, _)) = message.split_once("cannot deserialize null into string") {
        return format!("{place}a key is empty: every key must be a name such as `listen`");
    }
    match message.split_once(", set DuplicateKeyPolicy") {
        Some((duplicate, _)) => format!("{duplicate} (each key may appear once)"),
        None => message.to_string(),
    }
}

/// Whether the value at `key` (a path as serde reports it) may hold a secret or a
/// password, so that an error about it must not repeat it.
fn holds_secrets(key: &str) -> bool {
    key == "store"
        || [
            "session.secret",
            "admin_token",
            "store.url",
            "store.sentinel",
            "store.cluster",
        ]
        .iter()
        .any(|secret| key.starts_with(secret))
}

/// `message` with every quoted value masked (serde quotes the value it refused).
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (n, part) in parts.enumerate() {
        out.push('"');
        // Every other part is inside quotes.
        if n % 2 == 0 && !part.is_empty() {
            out.push_str(if part.contains('@') || part.contains("://") {
                "********@…"
            } else {
                "********"
            });
        } else {
            out.push_str(part);
        }
    }
    out
}

/// A Redis URL the store can use, checked as start-up will parse it.
fn check_redis_url(url: &str) -> Result<(), String> {
    let masked = mask_url(url);
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!("`{masked}` is not a redis:// or rediss:// URL"));
    }
    if url.contains('#') {
        return Err(format!(
            "`{masked}`: URL fragments such as `#insecure` are not supported (a rediss:// \
             certificate is always verified; give its CA in SSL_CERT_FILE)"
        ));
    }
    let refused = |e: redis::RedisError| {
        // Its text names the part at fault and never repeats the URL.
        let why = e.to_string();
        let why = why.split(" - ").next().unwrap_or_default().to_string();
        format!(
            "`{masked}` is not a valid Redis URL ({why}): redis://[user:password@]host:port[/db] or rediss://…"
        )
    };
    redis::Client::open(url).map_err(refused)?;
    Ok(())
}

/// A `log.level` filter whose every directive names a level: a bare word that is not one
/// (`infoo`) would be taken as a target and silence every log line.
fn check_log_level(filter: &str) -> Result<(), String> {
    // Names, or the numbers tracing also reads (0: off … 5: trace).
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "`{directive}` names no level: use trace, debug, info, warn, error or off, or \
                 target=level (target=trace for all of a target's events)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A Redis URL with its password replaced by `********`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL as written (`redis:/:pw@host`, a typo): whatever precedes the last
        // `@` may be a password.
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("********@{host}"),
            None => url.to_string(),
        };
    };
    // The last `@` ends the user information, as it does for the URL parser: a password
    // may hold an `@` of its own.
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:********@{host}")
        }
        None => url.to_string(),
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)
}

fn is_cookie_attr_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b';'
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    // YAML 1.2 booleans only: `off`, `no` or `on` are text, as in the environment (a
    // `log.level: off` must not turn into `false`).
    let options = serde_saphyr::options! { strict_booleans: true };
    let tree: Value = serde_saphyr::from_str_with_options(&text, options).map_err(|e| {
        // The parser's message carries a source snippet over several lines; its first
        // line already says where and what.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        let first = first.strip_prefix("error: ").unwrap_or(first);
        ConfigError(format!(
            "config file {} is not valid YAML: {}",
            path.display(),
            plain_yaml_error(first)
        ))
    })?;
    match tree {
        Value::Null => Ok(Value::Object(Map::new())),
        Value::Object(_) => Ok(tree),
        _ => Err(ConfigError(format!(
            "config file {} must be a mapping of keys to values",
            path.display()
        ))),
    }
}

/// `--store` / `SESSION_PROXY_STORE`: `memory` or a Redis URL.
fn set_store_spec(tree: &mut Value, spec: &str, source: &str) -> Result<(), ConfigError> {
    if spec == "memory" {
        // The memory store replaces whatever Redis a lower layer named.
        for key in ["url", "sentinel", "cluster"] {
            set_path(tree, &["store", key], Value::Null, source)?;
        }
        set_path(tree, &["store", "type"], Value::from("memory"), source)
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        set_path(tree, &["store", "type"], Value::from("redis"), source)?;
        // The URL names the whole topology: it replaces a Sentinel or Cluster from a
        // lower layer rather than conflict with it.
        set_path(tree, &["store", "sentinel"], Value::Null, source)?;
        set_path(tree, &["store", "cluster"], Value::Null, source)?;
        set_path(tree, &["store", "url"], Value::from(spec), source)
    } else {
        Err(ConfigError(format!(
            "invalid configuration: {source} must be `memory` or a redis:// or rediss:// URL, not `{}`",
            mask_url(spec)
        )))
    }
}

/// Turns an environment or flag value into the type the key's default has: numbers and
/// booleans parsed, lists split on commas (or given as a JSON list, for items that hold
/// one); `null`, or an empty value, for a key that is
/// off by default turns it off. Except a secret: an empty one is checked like one in the
/// file (an error), since a template that left it empty must not turn the protection off.
fn env_value(defaults: &Value, path: &[&str], raw: &str) -> Value {
    let default = path.iter().try_fold(defaults, |v, k| v.get(k));
    let scalar = |raw: &str| -> Value {
        let t = raw.trim();
        if t.eq_ignore_ascii_case("true") {
            return Value::Bool(true);
        }
        if t.eq_ignore_ascii_case("false") {
            return Value::Bool(false);
        }
        match serde_json::from_str::<serde_json::Number>(t) {
            Ok(n) => Value::Number(n),
            // `.5` or `5.`, which YAML reads as numbers too.
            Err(_) => match t.parse::<f64>().ok().filter(|n| n.is_finite()) {
                Some(n) if t.bytes().any(|b| b.is_ascii_digit()) => Value::from(n),
                _ => Value::String(raw.to_string()),
            },
        }
    };
    if raw.trim() == "null" {
        return Value::Null;
    }
    match default {
        Some(Value::Null) if raw.trim().is_empty() && !SECRETS.contains(&path) => Value::Null,
        Some(Value::String(_)) => Value::String(raw.to_string()),
        // A list in JSON form, for items that hold commas (`["/{a,b}/**"]`); anything
        // else that starts with `[` is an item like any other.
        Some(Value::Array(_))
            if raw.trim_start().starts_with('[')
                && serde_json::from_str::<Vec<String>>(raw).is_ok() =>
        {
            serde_json::from_str(raw).unwrap_or(Value::Null)
        }
        Some(Value::Array(_)) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        // A key that is off by default: a text key (a token, a secret) keeps the value as
        // written even when it is all digits; the others are typed as usual.
        Some(Value::Null) if takes_text(defaults, path) => Value::String(raw.to_string()),
        Some(Value::Null) => scalar(raw),
        _ if path.last() == Some(&"nodes") => env_value(&Value::Array(vec![]), &[], raw),
        _ => scalar(raw),
    }
}

/// Keys whose value is a secret.
const SECRETS: [&[&str]; 2] = [&["admin_token"], &["session", "secret"]];

/// Whether the key at `path`, null by default, holds text: the defaults still
/// deserialise with a string there.
fn takes_text(defaults: &Value, path: &[&str]) -> bool {
    let mut probe = defaults.clone();
    set_path(&mut probe, path, Value::String(String::new()), "probe").is_ok()
        && serde_json::from_value::<Config>(probe).is_ok()
}

/// Whether binding both addresses would collide: the same port (not 0, which picks a
/// free one) on the same address, on an address and its family's wildcard, or on
/// anything and the IPv6 wildcard (which takes IPv4 too, as Linux binds it by default).
/// An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) binds its IPv4 address.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let v6_wildcard = |ip: std::net::IpAddr| ip.is_ipv6() && ip.is_unspecified();
    a.port() == b.port()
        && a.port() != 0
        && (x == y
            || v6_wildcard(x)
            || v6_wildcard(y)
            || (x.is_ipv4() == y.is_ipv4() && (x.is_unspecified() || y.is_unspecified())))
}

/// The key path (`session.max_age`) an environment variable sets.
fn env_key_path(name: &str) -> String {
    name.get(ENV_PREFIX.len()..)
        .unwrap_or_default()
        .to_ascii_lowercase()
        .replace("__", ".")
}

/// Kubernetes gives every pod variables for each Service in its namespace
/// (`enableServiceLinks`): for a Service named `session-proxy` or `session-proxy-…`,
/// `SESSION_PROXY_[…_]SERVICE_HOST`, `…SERVICE_PORT[_NAME]`, `…PORT` and
/// `…PORT_8080_TCP[_PROTO|_PORT|_ADDR]`. The Services present are the ones whose
/// `SERVICE_HOST` is set: here, what follows `SESSION_PROXY_` up to it (`ADMIN_`, say,
/// or nothing).
fn service_link_names(env: &[(String, String)]) -> Vec<String> {
    env.iter()
        .filter_map(|(name, _)| name.get(ENV_PREFIX.len()..))
        .filter(|key| !key.contains("__"))
        .filter_map(|key| key.strip_suffix("SERVICE_HOST"))
        .filter(|service| service.is_empty() || service.ends_with('_'))
        .map(str::to_owned)
        .collect()
}

/// Whether a variable is one of a Service's links (see [`service_link_names`]). No key is
/// named like them, so they are not taken for (unknown) keys; a variable that only looks
/// like one (`SESSION_PROXY_LISTEN_PORT` without `SESSION_PROXY_LISTEN_SERVICE_HOST`)
/// still is.
fn is_service_link(name: &str, services: &[String]) -> bool {
    let key = name.get(ENV_PREFIX.len()..).unwrap_or_default();
    services.iter().any(|service| {
        key.strip_prefix(service.as_str()).is_some_and(|link| {
            link == "SERVICE_HOST"
                || link == "SERVICE_PORT"
                || link.starts_with("SERVICE_PORT_")
                || link == "PORT"
                || link.starts_with("PORT_")
        })
    })
}

fn set_path(
    tree: &mut Value,
    path: &[&str],
    value: Value,
    source: &str,
) -> Result<(), ConfigError> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut node = tree;
    for key in parents {
        if node.is_null() {
            *node = Value::Object(Map::new());
        }
        let Some(map) = node.as_object_mut() else {
            return Err(ConfigError(format!(
                "invalid configuration: {source} sets a key below `{key}`, which is not a section"
            )));
        };
        node = map
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if node.is_null() {
        *node = Value::Object(Map::new());
    }
    match node.as_object_mut() {
        Some(map) => {
            map.insert(last.to_string(), value);
            Ok(())
        }
        None => Err(ConfigError(format!(
            "invalid configuration: {source} sets a key below a value that is not a section"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("sp-config-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.yaml");
        let flags = match yaml {
            Some(text) => {
                std::fs::write(&path, text).unwrap();
                Overrides {
                    config: Some(path),
                    ..Default::default()
                }
            }
            None => Overrides::default(),
        };
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let loaded = Config::load_from(&flags, env);
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(map) = v {
            for (k, v) in map {
                let path = format!("{prefix}{k}");
                key_paths(v, &format!("{path}."), out);
                out.push(path);
            }
        }
    }

    #[test]
    fn example_file_shows_every_key_with_its_default() {
        let text = include_str!("../proxy.yaml.example");
        let example: Value = serde_saphyr::from_str(text).unwrap();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let (mut shown, mut known) = (vec![], vec![]);
        key_paths(&example, "", &mut shown);
        key_paths(&defaults, "", &mut known);
        shown.sort();
        known.sort();
        assert_eq!(shown, known);
        let loaded = load(Some(text), &[]).unwrap();
        assert_eq!(
            serde_json::to_string(&loaded).unwrap(),
            serde_json::to_string(&Config::default()).unwrap()
        );
    }

    #[test]
    fn defaults_apply_without_a_file() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.session.cookie_name, "session");
        assert_eq!(c.session.max_age, 1_209_600);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let yaml = "listen: 127.0.0.1:7000\nsession:\n  max_age: 10\n";
        let env = [
            ("SESSION_PROXY_SESSION__MAX_AGE", "3600"),
            ("SESSION_PROXY_STORE__KEY_PREFIX", "app:"),
            ("SESSION_PROXY_SESSION__EXCLUDE", "/static/**, /health"),
            ("SESSION_PROXY_LISTEN", "127.0.0.1:7001"),
        ];
        let c = load(Some(yaml), &env).unwrap();
        assert_eq!(c.session.max_age, 3600);
        assert_eq!(c.store.key_prefix, "app:");
        assert_eq!(c.session.exclude, vec!["/static/**", "/health"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:7001");
    }

    #[test]
    fn digits_from_the_environment_stay_text_for_text_keys() {
        let digits = "12345678901234567890123456789012";
        let env = [
            ("SESSION_PROXY_ADMIN_TOKEN", digits),
            ("SESSION_PROXY_SESSION__SECRET", digits),
            ("SESSION_PROXY_SESSION__USER_KEY", "123"),
            ("SESSION_PROXY_SESSION__DOMAIN", "007"),
            ("SESSION_PROXY_SESSION__ABSOLUTE_TIMEOUT", "3600"),
        ];
        let c = load(None, &env).unwrap();
        assert_eq!(c.admin_token.as_deref(), Some(digits));
        assert_eq!(c.session.secret.as_deref(), Some(digits));
        assert_eq!(c.session.user_key.as_deref(), Some("123"));
        assert_eq!(c.session.domain.as_deref(), Some("007"));
        assert_eq!(c.session.absolute_timeout, Some(3600));
        let e = load(None, &[("SESSION_PROXY_SESSION__ABSOLUTE_TIMEOUT", "soon")]).unwrap_err();
        assert!(e.0.contains("session.absolute_timeout"), "{e}");
    }

    #[test]
    fn an_empty_environment_value_turns_a_key_off_but_never_a_secret() {
        let yaml = "admin_token: s3cretTokenValue\nsession:\n  secret: abcdefghijklmnopqrstu\n";
        for (name, key) in [
            ("SESSION_PROXY_ADMIN_TOKEN", "admin_token"),
            ("SESSION_PROXY_SESSION__SECRET", "session.secret"),
        ] {
            let e = load(Some(yaml), &[(name, "")]).unwrap_err();
            assert!(e.0.contains(key), "{name}: {e}");
        }
        let c = load(Some(yaml), &[("SESSION_PROXY_ADMIN_TOKEN", "null")]).unwrap();
        assert_eq!(c.admin_token, None, "`null` turns it off");
        // Other keys that are off by default: empty is off, as before.
        let yaml = "session:\n  domain: example.com\n  user_key: uid\n  absolute_timeout: 60\nlog:\n  level: debug\n";
        let env = [
            ("SESSION_PROXY_SESSION__DOMAIN", ""),
            ("SESSION_PROXY_SESSION__USER_KEY", ""),
            ("SESSION_PROXY_SESSION__ABSOLUTE_TIMEOUT", ""),
            ("SESSION_PROXY_LOG__LEVEL", ""),
        ];
        let c = load(Some(yaml), &env).unwrap();
        assert_eq!(c.session.domain, None);
        assert_eq!(c.session.user_key, None);
        assert_eq!(c.session.absolute_timeout, None);
        assert_eq!(c.log.level, None);
    }

    #[test]
    fn an_admin_token_with_inner_spaces_is_accepted() {
        let c = load(
            None,
            &[("SESSION_PROXY_ADMIN_TOKEN", "correct horse battery staple")],
        )
        .unwrap();
        assert_eq!(
            c.admin_token.as_deref(),
            Some("correct horse battery staple")
        );
    }

    #[test]
    fn an_admin_token_that_cannot_travel_in_a_header_is_refused() {
        for token in [
            "tökén-1234567890",
            "token-with-space ",
            " lead",
            "tab\there",
        ] {
            let e = load(None, &[("SESSION_PROXY_ADMIN_TOKEN", token)]).unwrap_err();
            assert!(e.0.contains("admin_token"), "{token:?}: {e}");
        }
    }

    #[test]
    fn a_section_must_be_a_mapping_and_an_empty_one_takes_the_defaults() {
        refused(&[
            ("session: [max_age, 5]\n", "`session`"),
            ("timeouts: []\n", "`timeouts`"),
            (
                "store: {type: redis, sentinel: [m, [redis://a:1]]}\n",
                "`store.sentinel`",
            ),
            (
                "store: {type: redis, cluster: [[redis://a:1]]}\n",
                "`store.cluster`",
            ),
        ]);
        let e = load(Some("log: []\n"), &[]).unwrap_err();
        assert!(e.0.contains("must be a mapping of keys to values"), "{e}");
        // Every key of a section commented out leaves the section empty (null).
        let c = load(Some("session:\n#  max_age: 5\nlog:\n"), &[]).unwrap();
        assert_eq!(c.session.max_age, 1_209_600);
    }

    #[test]
    fn redis_settings_need_the_redis_store() {
        refused(&[
            ("store:\n  url: redis://127.0.0.1:1/0\n", "store.url"),
            (
                "store:\n  type: memory\n  sentinel: {master: m, nodes: [redis://a:1]}\n",
                "store.sentinel",
            ),
            (
                "store:\n  cluster: {nodes: [redis://a:1]}\n",
                "store.cluster",
            ),
        ]);
        let e = load(None, &[("SESSION_PROXY_STORE__URL", "redis://127.0.0.1:1")]).unwrap_err();
        assert!(e.0.contains("`store.type` is `memory`"), "{e}");
        // `memory` from the command line or the environment replaces the file's Redis.
        let yaml = "store:\n  type: redis\n  sentinel: {master: m, nodes: [redis://a:1]}\n";
        let c = load(Some(yaml), &[("SESSION_PROXY_STORE", "memory")]).unwrap();
        assert_eq!(c.store.kind, StoreType::Memory);
        assert!(c.store.url.is_none() && c.store.sentinel.is_none());
    }

    #[test]
    fn only_true_and_false_are_booleans_in_the_file() {
        let c = load(Some("log:\n  level: off\n"), &[]).unwrap();
        assert_eq!(c.log.level.as_deref(), Some("off"));
        let e = load(Some("session:\n  secure: on\n"), &[]).unwrap_err();
        assert!(
            e.0.contains("`session.secure`") && e.0.contains("true or false"),
            "{e}"
        );
        let c = load(Some("session:\n  secure: True\n"), &[]).unwrap();
        assert!(c.session.secure);
    }

    #[test]
    fn an_empty_log_level_is_no_level() {
        let c = load(Some("log:\n  level: \"\"\n"), &[]).unwrap();
        assert_eq!(c.log.level, None);
    }

    #[test]
    fn a_cookie_that_must_be_secure_is_shown_secure() {
        for yaml in [
            "session:\n  same_site: none\n",
            "session:\n  cookie_name: __Secure-sid\n",
            "session:\n  cookie_name: __host-sid\n",
        ] {
            let c = load(Some(yaml), &[]).unwrap();
            assert!(c.session.secure, "{yaml}");
            assert!(c.to_masked_yaml().contains("secure: true"), "{yaml}");
        }
        refused(&[
            (
                "session:\n  cookie_name: __Host-sid\n  path: /app\n",
                "session.cookie_name",
            ),
            (
                "session:\n  cookie_name: __Host-sid\n  domain: example.com\n",
                "session.cookie_name",
            ),
        ]);
    }

    #[test]
    fn type_errors_say_what_the_key_takes() {
        for (yaml, says) in [
            (
                "session:\n  max_age: \"3600\"\n",
                "must be a whole number, 0 or more, not \"3600\"",
            ),
            (
                "session:\n  max_age: -5\n",
                "must be a whole number, 0 or more, not -5",
            ),
            ("session:\n  id_bytes: 32.5\n", "not 32.5"),
            (
                "timeouts:\n  header_read: soon\n",
                "must be a number of seconds",
            ),
            (
                "session:\n  same_site: null\n",
                "one of `lax`, `strict` or `none`",
            ),
            ("log:\n  format: 1\n", "must be `text` or `json`"),
            (
                "listen: 1\n",
                "an IP address and port such as 127.0.0.1:8080",
            ),
            (
                "listen: localhost:8080\n",
                "(names are not looked up), not \"localhost:8080\"",
            ),
            (
                "admin_listen: 'off'\n",
                "or null to turn the admin port off, not \"off\"",
            ),
            ("session:\n  exclude: 5\n", "must be a list of text"),
            (
                "session:\n  absolute_timeout: x\n",
                "a whole number of seconds, or null",
            ),
            ("timeouts:\n  header_read: 1e10\n", "above 0, at most 1e9"),
            ("shutdown:\n  drain_delay: -1\n", "0 or more, at most 1e9"),
        ] {
            let e = load(Some(yaml), &[]).unwrap_err();
            assert!(e.0.contains(says), "{yaml}: {e}");
            assert!(!e.0.contains("u64") && !e.0.contains("f64"), "{yaml}: {e}");
            // Set in the file only: never said to come from anywhere else.
            assert!(!e.0.contains("environment"), "{yaml}: {e}");
        }
        let e = load(Some("listen: localhost:8080\n"), &[]).unwrap_err();
        assert!(e.0.contains("`listen` (file "), "{e}");
        let e = load(Some("session:\n  secret: 1234567890123456789\n"), &[]).unwrap_err();
        assert!(!e.0.contains("1234567890123456789"), "{e}");
    }

    #[test]
    fn yaml_errors_give_no_advice_to_programmers() {
        for (yaml, says) in [
            (
                "listen: 1\nlisten: 2\n",
                "duplicate mapping key: listen (each key may appear once)",
            ),
            ("a: 1\n---\nb: 2\n", "more than one YAML document"),
            (
                "session:\n  exclude: &x [\"/a\", *x]\n",
                "an alias refers to the value that holds it",
            ),
            (": : :\n", "line 1 column 1: a key is empty"),
            ("session:\n  ~: 3\n", "line 2 column 3: a key is empty"),
        ] {
            let e = load(Some(yaml), &[]).unwrap_err();
            assert!(e.0.contains(says), "{yaml}: {e}");
            assert!(!e.0.contains("Option<"), "{yaml}: {e}");
        }
    }

    #[test]
    fn the_environment_reads_what_the_file_reads() {
        let env = [
            ("SESSION_PROXY_SESSION__SECURE", "TRUE"),
            ("SESSION_PROXY_SESSION__HTTP_ONLY", "False"),
            ("SESSION_PROXY_TIMEOUTS__UPSTREAM_CONNECT", ".5"),
            (
                "SESSION_PROXY_SESSION__EXCLUDE",
                r#"["/{a,b}/**", "/static/**"]"#,
            ),
        ];
        let c = load(None, &env).unwrap();
        // Not a JSON list: an item like any other.
        let fallback = "[old-secret-0123456789";
        let d = load(
            Some("session:\n  secret: current-secret-0123456789\n"),
            &[("SESSION_PROXY_SESSION__SECRET_FALLBACKS", fallback)],
        )
        .unwrap();
        assert_eq!(d.session.secret_fallbacks, vec![fallback]);
        assert!(c.session.secure && !c.session.http_only);
        assert_eq!(c.timeouts.upstream_connect, 0.5);
        assert_eq!(c.session.exclude, vec!["/{a,b}/**", "/static/**"]);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = load(Some("session:\n  max_agee: 5\n"), &[]).unwrap_err();
        assert!(e.0.contains("max_agee"), "{e}");
        let e = load(None, &[("SESSION_PROXY_SESSION__NOPE", "1")]).unwrap_err();
        assert!(e.0.contains("nope"), "{e}");
        assert!(
            e.0.contains("environment variable SESSION_PROXY_SESSION__NOPE"),
            "{e}"
        );
        let e = load(None, &[("SESSION_PROXY_SESSION__MAX_AGE", "soon")]).unwrap_err();
        assert!(e.0.contains("SESSION_PROXY_SESSION__MAX_AGE"), "{e}");
    }

    /// Kubernetes gives each pod variables for every Service in its namespace: a Service
    /// named `session-proxy` must not stop the proxy from starting.
    #[test]
    fn kubernetes_service_links_are_not_keys() {
        let links = [
            ("SESSION_PROXY_PORT", "tcp://10.96.0.12:8080"),
            ("SESSION_PROXY_SERVICE_HOST", "10.96.0.12"),
            ("SESSION_PROXY_SERVICE_PORT", "8080"),
            ("SESSION_PROXY_SERVICE_PORT_HTTP", "8080"),
            ("SESSION_PROXY_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
            ("SESSION_PROXY_PORT_8080_TCP_PROTO", "tcp"),
            ("SESSION_PROXY_PORT_8080_TCP_PORT", "8080"),
            ("SESSION_PROXY_PORT_8080_TCP_ADDR", "10.96.0.12"),
        ];
        let c = load(None, &links).unwrap();
        assert_eq!(c.listen, Config::default().listen);
        // Those of a Service named `session-proxy-admin`.
        let admin = [
            ("SESSION_PROXY_ADMIN_SERVICE_HOST", "10.96.0.13"),
            ("SESSION_PROXY_ADMIN_SERVICE_PORT", "9901"),
            ("SESSION_PROXY_ADMIN_PORT", "tcp://10.96.0.13:9901"),
            ("SESSION_PROXY_ADMIN_PORT_9901_TCP_ADDR", "10.96.0.13"),
        ];
        load(None, &admin).unwrap();
        // Anything else stays an unknown key, a look-alike without its Service too.
        for name in ["SESSION_PROXY_PORTS", "SESSION_PROXY_LISTEN_PORT"] {
            let e = load(None, &[(name, "1")]).unwrap_err();
            assert!(e.0.contains(name), "{e}");
        }
        let e = load(None, &[links[1], ("SESSION_PROXY_LISTEN_PORT", "1")]).unwrap_err();
        assert!(e.0.contains("SESSION_PROXY_LISTEN_PORT"), "{e}");
    }

    #[test]
    fn the_admin_port_cannot_be_the_listener() {
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "[::]:8080"),
            ("0.0.0.0:8080", "[::]:8080"),
            ("0.0.0.0:8080", "[::ffff:127.0.0.1]:8080"),
            ("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"),
        ] {
            let yaml = format!("listen: \"{listen}\"\nadmin_listen: \"{admin}\"\n");
            let e = load(Some(&yaml), &[]).unwrap_err();
            assert!(e.0.contains("admin_listen"), "{e}");
        }
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("0.0.0.0:8080", "0.0.0.0:9901"),
            // Different families, neither the IPv6 wildcard: both bind.
            ("0.0.0.0:8080", "[::1]:8080"),
        ] {
            let yaml = format!("listen: \"{listen}\"\nadmin_listen: \"{admin}\"\n");
            load(Some(&yaml), &[]).unwrap();
        }
    }

    #[test]
    fn an_empty_config_variable_is_named() {
        let e = load(None, &[("SESSION_PROXY_CONFIG", "")]).unwrap_err();
        assert!(e.0.contains("SESSION_PROXY_CONFIG"), "{e}");
        // `--config` wins over it, empty or not.
        let c = load(
            Some("session:\n  max_age: 7\n"),
            &[("SESSION_PROXY_CONFIG", "")],
        );
        assert_eq!(c.unwrap().session.max_age, 7);
    }

    /// A bad value a flag gave is blamed on the flag, not on a valid variable it
    /// overrode.
    #[test]
    fn a_bad_flag_is_named_over_the_variable_it_overrides() {
        let flags = Overrides {
            listen: Some("nonsense".into()),
            ..Default::default()
        };
        let env = [(
            "SESSION_PROXY_LISTEN".to_string(),
            "127.0.0.1:1".to_string(),
        )];
        let e = Config::load_from(&flags, env).unwrap_err();
        assert!(
            e.0.contains("--listen") && !e.0.contains("SESSION_PROXY_LISTEN"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_and_values_name_the_key() {
        let e = load(Some("session:\n  max_age: soon\n"), &[]).unwrap_err();
        assert!(e.0.contains("session.max_age"), "{e}");
        let e = load(Some("session:\n  max_age: 0\n"), &[]).unwrap_err();
        assert!(e.0.contains("session.max_age"), "{e}");
        let e = load(Some("session:\n  cookie_name: \"a b\"\n"), &[]).unwrap_err();
        assert!(e.0.contains("session.cookie_name"), "{e}");
        let e = load(
            Some(&format!("session:\n  cookie_name: {}\n", "a".repeat(257))),
            &[],
        )
        .unwrap_err();
        assert!(e.0.contains("session.cookie_name"), "{e}");
        let e = load(Some("store:\n  type: redis\n"), &[]).unwrap_err();
        assert!(e.0.contains("store"), "{e}");
    }

    /// Each YAML must be refused with a message naming `key`.
    fn refused(cases: &[(&str, &str)]) {
        for (yaml, key) in cases {
            match load(Some(yaml), &[]) {
                Ok(_) => panic!("accepted: {yaml}"),
                Err(e) => assert!(e.0.contains(key), "{yaml}: {e}"),
            }
        }
    }

    #[test]
    fn values_that_cannot_work_are_refused_before_start_up() {
        refused(&[
            // Durations past any use overflow the store's arithmetic.
            (
                "session:\n  max_age: 18446744073709551615\n",
                "session.max_age",
            ),
            ("session:\n  max_age: 315360001\n", "session.max_age"),
            (
                "session:\n  absolute_timeout: 10000000000000000\n",
                "session.absolute_timeout",
            ),
            (
                "session:\n  rotate_grace: 10000000000000000\n",
                "session.rotate_grace",
            ),
            // 15 characters, 30 bytes.
            ("session:\n  secret: ééééééééééééééé\n", "session.secret"),
            // Globs that can never match a path.
            ("session:\n  exclude: ['*.css']\n", "session.exclude"),
            ("session:\n  exclude: ['static/**']\n", "session.exclude"),
            ("session:\n  exclude: ['']\n", "session.exclude"),
            // Names HTTP or the application already use.
            (
                "session:\n  update_header: Set-Cookie\n",
                "session.update_header",
            ),
            (
                "session:\n  request_header: Content-Length\n",
                "session.request_header",
            ),
            ("session:\n  handle_header: Host\n", "session.handle_header"),
            (
                "session:\n  patch_header: Authorization\n",
                "session.patch_header",
            ),
            // A level name with a typo would be read as a target and silence every line.
            ("log:\n  level: infoo\n", "log.level"),
            ("log:\n  level: session_proxy=infoo\n", "log.level"),
            ("upstream: http://127.0.0.1:65536\n", "upstream"),
            ("upstream: http://127.0.0.1:abc\n", "upstream"),
        ]);
        let store = |url: &str| format!("store:\n  type: redis\n  url: '{url}'\n");
        let cases: Vec<String> = [
            "redis://h:99999",
            "redis://h:notaport/0",
            "redis://h:6379/abc",
            "redis://",
            "rediss://h:6379#insecure",
        ]
        .iter()
        .map(|u| store(u))
        .collect();
        refused(
            &cases
                .iter()
                .map(|y| (y.as_str(), "store.url"))
                .collect::<Vec<_>>(),
        );
        refused(&[(
            "store:\n  type: redis\n  cluster: {nodes: ['redis://a:1', 'redis://b:x']}\n",
            "store.cluster.nodes",
        )]);
        // What stays accepted.
        for yaml in [
            "session:\n  exclude: ['{/static,/assets}/**', '*/static/**']\n",
            "log:\n  level: '3'\n",
            "log:\n  level: 'warn,session_proxy=4'\n",
            "session:\n  exclude: ['/static/**', '**/*.css']\n",
            "log:\n  level: 'warn,session_proxy::access=info'\n",
            "log:\n  level: 'warn,hyper=debug'\n",
            "log:\n  level: 'hyper=off'\n",
            // Hides the proxy's own lines: said at start-up, not refused.
            "log:\n  level: 'hyper=debug'\n",
            "session:\n  max_age: 315360000\n  absolute_timeout: 315360000\n",
            "store:\n  type: redis\n  url: 'redis://:pw@127.0.0.1:6379/2'\n",
        ] {
            load(Some(yaml), &[]).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
    }

    #[test]
    fn errors_never_repeat_a_secret() {
        // The YAML, the environment, and the secret that must not show.
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case; 5] = [
            (
                "session:\n  secret_fallbacks: MyOldSecretValue0001\n",
                &[],
                "MyOldSecretValue0001",
            ),
            (
                "store:\n  type: redis\n  cluster: {nodes: 'redis://:ClusterPw99@h:7000'}\n",
                &[],
                "ClusterPw99",
            ),
            (
                "store:\n  type: redis\n",
                &[(
                    "SESSION_PROXY_STORE__SENTINEL",
                    "redis://:EnvSentPw@h:26379",
                )],
                "EnvSentPw",
            ),
            (
                "store:\n  type: redis\n  url: 'redis:/:TopSecret99@h:6379'\n",
                &[],
                "TopSecret99",
            ),
            (
                "",
                &[("SESSION_PROXY_STORE", "redis//:TopSecret98@h:6379")],
                "TopSecret98",
            ),
        ];
        for (yaml, env, secret) in cases {
            let e = load(Some(yaml), env).unwrap_err();
            assert!(!e.0.contains(secret), "{yaml} {env:?}: {e}");
        }
    }

    #[test]
    fn store_spec_selects_redis() {
        let c = load(
            None,
            &[("SESSION_PROXY_STORE", "redis://:pw@127.0.0.1:6379/2")],
        )
        .unwrap();
        assert_eq!(c.store.kind, StoreType::Redis);
        let printed = c.to_masked_yaml();
        assert!(!printed.contains("pw@"), "{printed}");
    }

    #[test]
    fn store_spec_replaces_a_sentinel_or_cluster_from_the_file() {
        for topology in [
            "sentinel: {master: m, nodes: [\"redis://10.0.0.1:26379\"]}",
            "cluster: {nodes: [\"redis://10.0.0.1:7000\"]}",
        ] {
            let yaml = format!("store:\n  type: redis\n  {topology}\n");
            let env = [("SESSION_PROXY_STORE", "redis://127.0.0.1:6379/1")];
            let c = load(Some(&yaml), &env).unwrap();
            assert_eq!(c.store.url.as_deref(), Some("redis://127.0.0.1:6379/1"));
            assert!(c.store.sentinel.is_none() && c.store.cluster.is_none());
        }
    }

    #[test]
    fn redis_passwords_are_masked_whole() {
        assert_eq!(
            mask_url("redis://:p@ssWORDtail@127.0.0.1:6379/0"),
            "redis://:********@127.0.0.1:6379/0"
        );
        assert_eq!(
            mask_url("rediss://app:pw@10.0.0.1"),
            "rediss://app:********@10.0.0.1"
        );
        assert_eq!(mask_url("redis://10.0.0.1/2"), "redis://10.0.0.1/2");
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let c = load(
            Some("session:\n  secret: aaaaaaaaaaaaaaaaaaaaaaa\nadmin_token: tttttttttt\n"),
            &[],
        )
        .unwrap();
        let printed = c.to_masked_yaml();
        assert!(
            !printed.contains("aaaaaaaa") && !printed.contains("tttttttttt"),
            "{printed}"
        );
    }
}
