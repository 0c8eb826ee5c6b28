//! The command line: run the proxy, check a configuration, run the demo, or manage a
//! user's sessions through the admin port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args, Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use session_proxy::config::{Config, Overrides, StoreConfig};
use session_proxy::server::Server;
use session_proxy::{demo, logging};

/// mimalloc: the request path allocates a few dozen small buffers per request across
/// threads, where it is measurably cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A reverse proxy that adds server-side sessions in front of any HTTP application.
#[derive(Parser)]
#[command(name = "session-proxy", version, about)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Clone, Default)]
struct Flags {
    /// Config file (default: ./proxy.yaml when it exists).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Client-facing address, e.g. 0.0.0.0:8080.
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// The application, e.g. http://127.0.0.1:3000 (not with `demo`, which runs its own).
    #[arg(long, global = true, value_name = "URL")]
    upstream: Option<String>,
    /// `memory` or a Redis URL (redis://…, rediss://…); not with `demo`, which uses memory.
    #[arg(long, global = true, value_name = "SPEC")]
    store: Option<String>,
    /// Admin address (`null` turns the admin port off).
    #[arg(long = "admin-listen", global = true, value_name = "ADDR")]
    admin_listen: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print the effective one (secrets masked).
    Check,
    /// Run the proxy in front of a built-in demo application, memory store.
    Demo,
    /// List or revoke a user's sessions through the admin port.
    Sessions {
        #[command(subcommand)]
        action: SessionsAction,
    },
}

#[derive(Subcommand)]
enum SessionsAction {
    /// List the sessions of a user.
    List {
        /// The user, as the session's `session.user_key` names them.
        // Handles and user names may begin with `-`.
        #[arg(long, allow_hyphen_values = true)]
        user: String,
    },
    /// End every session of a user, or one session by its handle.
    #[command(group(ArgGroup::new("which").required(true).args(["user", "handle"])))]
    Revoke {
        /// End every session of this user ("log out everywhere").
        #[arg(long, allow_hyphen_values = true)]
        user: Option<String>,
        /// End the one session with this handle (as `sessions list` shows it).
        #[arg(long, allow_hyphen_values = true)]
        handle: Option<String>,
    },
}

impl Flags {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            store: self.store.clone(),
            admin_listen: self.admin_listen.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("session-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => run(load(&cli.flags)?, Greeting::None).await,
            Some(Command::Check) => {
                let config = load(&cli.flags)?;
                print!("{}", config.to_masked_yaml());
                Ok(())
            }
            Some(Command::Demo) => run_demo(&cli.flags).await,
            Some(Command::Sessions { action }) => sessions(load(&cli.flags)?, action)
                .await
                .map_err(Failure::Unsaid),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Logged) => ExitCode::FAILURE,
        Err(Failure::Unsaid(message)) => {
            eprintln!("session-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command failed.
enum Failure {
    /// Not told yet: printed to stderr as is.
    Unsaid(String),
    /// Already in the log, in the log's format.
    Logged,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::Unsaid(message)
    }
}

fn load(flags: &Flags) -> Result<Config, String> {
    Config::load(&flags.overrides()).map_err(|e| e.to_string())
}

/// What is said on stderr once the proxy listens, past the log's filter.
enum Greeting {
    None,
    /// The demo's invitation to open the proxy in a browser.
    Demo,
}

async fn run(config: Config, greeting: Greeting) -> Result<(), Failure> {
    logging::init(&config.log);
    // From here on the log is set up: a failure goes there, as JSON when so configured,
    // unless the log's filter would drop it.
    let format = config.log.format;
    let server = Server::bind(config).await.map_err(|e| {
        if tracing::enabled!(tracing::Level::ERROR) {
            tracing::error!("{e}");
        } else {
            logging::say_outside(format, "ERROR", &e);
        }
        Failure::Logged
    })?;
    // Only now that the listener is bound: a failed bind says so and nothing else.
    if let (Greeting::Demo, Ok(bound)) = (greeting, server.local_addr()) {
        logging::say_outside(
            format,
            "INFO",
            &format!("demo: open http://{} in a browser", browsable(bound)),
        );
    }
    let shutdown = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: draining (readiness now fails)");
        shutdown.begin_drain();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(1);
    });
    server.run().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the proxy can still be stopped by the OS; never drain.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The demo: the proxy, configured as usual (file, environment, flags), in front of the
/// built-in application, on the memory store.
async fn run_demo(flags: &Flags) -> Result<(), Failure> {
    for (given, flag) in [
        (flags.upstream.is_some(), "--upstream"),
        (flags.store.is_some(), "--store"),
    ] {
        if given {
            return Err(format!(
                "demo runs its own application on the memory store: {flag} is for running the proxy itself"
            )
            .into());
        }
    }
    let mut config = load(flags)?;
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot start the demo application: {e}"))?;
    let app_addr = app.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(demo::serve(app));
    config.upstream = format!("http://{app_addr}");
    config.store = StoreConfig {
        max_sessions: config.store.max_sessions,
        ..StoreConfig::default()
    };
    // The application's stylesheet needs no session; its login names the user.
    config.session.exclude.push("/static/**".into());
    config.session.user_key.get_or_insert_with(|| "user".into());
    config.validate().map_err(|e| e.to_string())?;
    run(config, Greeting::Demo).await
}

/// The address a browser on this machine reaches a listener bound to `bound` at: a
/// wildcard address (`0.0.0.0`, `[::]`) is no place to go, loopback is.
fn browsable(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

async fn sessions(config: Config, action: SessionsAction) -> Result<(), String> {
    let admin = config
        .admin_listen
        .ok_or("admin_listen is off: the sessions commands talk to the admin port")?;
    let (method, target) = match &action {
        SessionsAction::List { user } => ("GET", format!("/sessions?user={}", encode(user))),
        SessionsAction::Revoke {
            user: Some(user), ..
        } => ("DELETE", format!("/sessions?user={}", encode(user))),
        SessionsAction::Revoke {
            handle: Some(handle),
            ..
        } => ("DELETE", format!("/sessions/{}", encode(handle))),
        SessionsAction::Revoke { .. } => return Err("name --user or --handle".into()),
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{target}"));
    if let Some(token) = &config.admin_token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.map_err(|e| {
        format!("cannot reach the admin port at {admin}: {e} (is the proxy running?)")
    })?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    if status.is_success() {
        println!("{text}");
        Ok(())
    } else {
        Err(format!("admin port answered {status}: {text}"))
    }
}

fn encode(value: &str) -> String {
    // Handles are base64url: `-` and `_` stay as they are.
    const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(value, QUERY).to_string()
}
