//! The gRPC services: thin adapters from the generated traits to [`Core`]'s operations, plus the
//! bearer-token check used on TCP.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::v1::{self, devices_server, events_server, sandboxes_server, templates_server};
use crate::daemon::core::Core;
use crate::events::EventBus;

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

#[tonic::async_trait]
impl templates_server::Templates for Api {
    type ImportTemplateStream = ReceiverStream<Result<v1::ImportTemplateProgress, Status>>;

    async fn import_template(
        &self,
        req: Request<v1::ImportTemplateRequest>,
    ) -> Result<Response<Self::ImportTemplateStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let mut last = std::time::Instant::now();
            let r = core.import_template_blocking(
                &req.name,
                std::path::Path::new(&req.source_path),
                |done, total| {
                    // At most ~20 progress messages a second; the client may be slow.
                    if last.elapsed().as_millis() >= 50 || done == total {
                        last = std::time::Instant::now();
                        let _ = tx.try_send(Ok(v1::ImportTemplateProgress {
                            bytes_done: done,
                            bytes_total: total,
                            template: None,
                        }));
                    }
                },
            );
            let last_msg = match r {
                Ok(t) => Ok(v1::ImportTemplateProgress {
                    bytes_done: t.size_bytes,
                    bytes_total: t.size_bytes,
                    template: Some(t),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.blocking_send(last_msg);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_templates(
        &self,
        _: Request<v1::ListTemplatesRequest>,
    ) -> Result<Response<v1::ListTemplatesResponse>, Status> {
        Ok(Response::new(v1::ListTemplatesResponse {
            templates: self.core.list_templates(),
        }))
    }

    async fn delete_template(
        &self,
        req: Request<v1::DeleteTemplateRequest>,
    ) -> Result<Response<v1::DeleteTemplateResponse>, Status> {
        let deleted = self.core.delete_template(&req.into_inner().name)?;
        Ok(Response::new(v1::DeleteTemplateResponse { deleted }))
    }
}

#[tonic::async_trait]
impl sandboxes_server::Sandboxes for Api {
    async fn create_sandbox(
        &self,
        req: Request<v1::CreateSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        // The create runs to completion (or failure) even if the client goes away, so that a
        // half-made sandbox is never left behind by a cancelled call.
        let core = self.core.clone();
        let req = req.into_inner();
        let r = tokio::spawn(async move { core.create_sandbox(req).await })
            .await
            .map_err(|e| Status::internal(format!("create task: {e}")))?;
        Ok(Response::new(r?))
    }

    async fn get_sandbox(
        &self,
        req: Request<v1::GetSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        Ok(Response::new(self.core.get_sandbox(&req.into_inner().id)?))
    }

    async fn list_sandboxes(
        &self,
        req: Request<v1::ListSandboxesRequest>,
    ) -> Result<Response<v1::ListSandboxesResponse>, Status> {
        Ok(Response::new(v1::ListSandboxesResponse {
            sandboxes: self.core.list_sandboxes(req.into_inner().include_deleted),
        }))
    }

    async fn pause_sandbox(
        &self,
        req: Request<v1::PauseSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let core = self.core.clone();
        let id = req.into_inner().id;
        let r = tokio::spawn(async move { core.pause_sandbox(&id).await })
            .await
            .map_err(|e| Status::internal(format!("pause task: {e}")))?;
        Ok(Response::new(r?))
    }

    async fn resume_sandbox(
        &self,
        req: Request<v1::ResumeSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let core = self.core.clone();
        let id = req.into_inner().id;
        let r = tokio::spawn(async move { core.resume_sandbox(&id).await })
            .await
            .map_err(|e| Status::internal(format!("resume task: {e}")))?;
        Ok(Response::new(r?))
    }

    async fn delete_sandbox(
        &self,
        req: Request<v1::DeleteSandboxRequest>,
    ) -> Result<Response<v1::DeleteSandboxResponse>, Status> {
        let core = self.core.clone();
        let id = req.into_inner().id;
        let deleted = tokio::spawn(async move { core.delete_sandbox(&id).await })
            .await
            .map_err(|e| Status::internal(format!("delete task: {e}")))??;
        Ok(Response::new(v1::DeleteSandboxResponse { deleted }))
    }
}

#[tonic::async_trait]
impl devices_server::Devices for Api {
    async fn list_devices(
        &self,
        _: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        let core = self.core.clone();
        let r = tokio::task::spawn_blocking(move || core.kernel.list())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(r))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl events_server::Events for Api {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let filter = req.into_inner().sandbox;
        if !filter.is_empty() {
            crate::names::sandbox_id(&filter)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let mut rx = self.core.events.subscribe();
        let stream = async_stream(move |tx| async move {
            loop {
                let item = match rx.recv().await {
                    Ok(ev) => {
                        if !filter.is_empty() && ev.sandbox != filter {
                            continue;
                        }
                        ev
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let mut b = EventBus::event(v1::EventKind::Error)
                            .message(format!("this watcher fell behind and missed {n} events"));
                        if !filter.is_empty() {
                            b = b.sandbox(&filter);
                        }
                        b.build()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task: the task gets a sender and ends when the receiver is dropped.
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::Event, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(ReceiverStream::new(rx))
}

/// Checks `authorization: Bearer TOKEN` (TCP only).
#[derive(Clone)]
pub struct BearerCheck {
    token: Arc<str>,
}

impl BearerCheck {
    /// Accepts exactly `token`.
    pub fn new(token: &str) -> BearerCheck {
        BearerCheck {
            token: token.into(),
        }
    }
}

impl tonic::service::Interceptor for BearerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), self.token.as_bytes()));
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
