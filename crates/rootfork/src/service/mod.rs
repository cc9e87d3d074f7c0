//! The gRPC edge: thin adapters from the generated service traits to [`Core`]'s operations
//! (one file per service), the conversions between wire messages and the daemon's own types
//! (`convert.rs`), the access check (`access.rs`) and [`serve`], which runs all four services
//! on one listener.

mod access;
pub mod convert;
mod devices;
mod events;
mod sandboxes;
mod templates;

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;

pub use access::Access;

use crate::api::v1::{devices_server, events_server, sandboxes_server, templates_server};
use crate::daemon::core::Core;

/// The API, over the daemon's shared state.
#[derive(Debug, Clone)]
pub struct Api {
    core: Arc<Core>,
}

impl Api {
    /// The API of `core`.
    pub fn new(core: Arc<Core>) -> Api {
        Api { core }
    }
}

/// Serves every service of `api` on `incoming`, each request checked by `access`, until `stop`
/// completes.
pub async fn serve<I, IO, IE>(
    api: Api,
    access: Access,
    incoming: I,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tonic::transport::Server::builder()
        .add_service(templates_server::TemplatesServer::with_interceptor(
            api.clone(),
            access.clone(),
        ))
        .add_service(sandboxes_server::SandboxesServer::with_interceptor(
            api.clone(),
            access.clone(),
        ))
        .add_service(devices_server::DevicesServer::with_interceptor(
            api.clone(),
            access.clone(),
        ))
        .add_service(events_server::EventsServer::with_interceptor(api, access))
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}
