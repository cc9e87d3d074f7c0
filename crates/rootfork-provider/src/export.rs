//! One sandbox's NBD export: rootfork-nbd's socket server with a single named export on a
//! per-sandbox Unix socket, stopped on drop.
//!
//! [`ExportServer::shutdown`] is the graceful path (listener closed and socket file removed,
//! connections drained, in-flight requests given a grace period); [`ExportServer::hand_over`]
//! stops for a daemon restart (no request refused: the clients reconnect to the next server);
//! dropping stops the server with no grace so a dropped provider never leaves a listener or
//! threads behind.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::BlockDevice;
use rootfork_nbd::{Export, ServeOptions, Server, StatsSnapshot};

use crate::error::{ProviderError, Result};

/// How long a graceful shutdown waits for in-flight requests.
const GRACE: Duration = Duration::from_secs(5);

/// A running per-sandbox NBD server.
pub(crate) struct ExportServer {
    server: Option<Server>,
}

impl ExportServer {
    /// Serves `device` as `export` on a new Unix socket at `socket` (mode 0600) with `opts`.
    pub(crate) async fn start(
        socket: &Path,
        export: &str,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
    ) -> Result<Self> {
        let (socket, export) = (socket.to_owned(), export.to_owned());
        tokio::task::spawn_blocking(move || {
            let server = Server::new(opts);
            let guard = ExportServer {
                server: Some(server.clone()),
            };
            server.add_export(Export {
                description: format!("rootfork sandbox {export}"),
                name: export,
                device,
            })?;
            server.listen_unix(&socket)?;
            Ok(guard)
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))?
    }

    /// Open client connections (for tests and metrics).
    #[allow(dead_code)]
    pub(crate) fn connections(&self) -> usize {
        self.server.as_ref().map_or(0, Server::connections)
    }

    /// The server's per-command counters and latency histograms so far.
    pub(crate) fn stats(&self) -> StatsSnapshot {
        self.server.as_ref().map(Server::stats).unwrap_or_default()
    }

    /// How long the oldest request waiting for the server has waited (see
    /// `rootfork_nbd::Server::oldest_request_age`); `None` when none is.
    pub(crate) fn oldest_request_age(&self) -> Option<Duration> {
        self.server.as_ref().and_then(Server::oldest_request_age)
    }

    /// Hand-over (blocking): stop listening and reading requests, answer the ones already read,
    /// close (see `rootfork_nbd::Server::hand_over`). Returns the final counters.
    pub(crate) fn hand_over(mut self) -> StatsSnapshot {
        let mut stats = StatsSnapshot::default();
        if let Some(s) = self.server.take() {
            s.hand_over(GRACE);
            stats = s.stats();
        }
        stats
    }

    /// Graceful shutdown (blocking): stop listening, drain, wait for in-flight requests, close.
    /// Returns the final counters (requests answered while draining included).
    pub(crate) fn shutdown(mut self) -> Result<StatsSnapshot> {
        let mut stats = StatsSnapshot::default();
        if let Some(s) = self.server.take() {
            s.shutdown(GRACE);
            stats = s.stats();
        }
        Ok(stats)
    }
}

impl Drop for ExportServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::ZERO);
        }
    }
}
