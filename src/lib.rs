//! session-proxy: a reverse proxy that gives any HTTP application server-side sessions.
//!
//! A request's path through the code: [`server`] accepts it, [`proxy`] runs the session
//! steps around [`upstream`], which forwards it; [`store`] keeps the sessions and
//! [`session`] holds the rules for IDs, cookies, the header protocol and exclusions.
//! [`admin`] serves health, readiness, metrics and session revocation on its own port.

pub mod admin;
pub mod config;
pub mod demo;
pub mod http1;
pub mod logging;
pub mod metrics;
pub mod problem;
pub mod proxy;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod upstream;
