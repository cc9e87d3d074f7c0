//! The rootfork daemon as a library: configuration, the template store, sandbox lifecycle, the
//! gRPC API (server and client), events, metrics and health checks. The `rootfork` binary's
//! `serve` subcommand runs [`daemon::Daemon`]; integration tests run it in-process.

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod events;
pub mod metrics;
pub mod metrics_http;
pub mod names;
pub mod nbd_metrics;
pub mod paced_incoming;
pub mod service;
pub mod unix_listener;
