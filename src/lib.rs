//! session-proxy: a reverse proxy that gives any HTTP application server-side sessions.
//!
//! A request's path through the code: [`server`] accepts it, [`proxy`] runs the session
//! steps around [`upstream`], which forwards it; [`store`] keeps the sessions and
//! [`session`] holds the rules for IDs, cookies, the header protocol and exclusions.

pub mod session;
pub mod store;
