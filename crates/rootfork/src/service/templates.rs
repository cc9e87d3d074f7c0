//! `rootfork.v1.Templates`: import (streamed progress), list, delete.

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::{self, templates_server};
use crate::daemon::model::Caller;

#[tonic::async_trait]
impl templates_server::Templates for Api {
    type ImportTemplateStream = ReceiverStream<Result<v1::ImportTemplateProgress, Status>>;

    async fn import_template(
        &self,
        req: Request<v1::ImportTemplateRequest>,
    ) -> Result<Response<Self::ImportTemplateStream>, Status> {
        let caller = req
            .extensions()
            .get::<Caller>()
            .copied()
            .unwrap_or(Caller::Local);
        let req = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let mut last = std::time::Instant::now();
            let r = core.import_template_blocking(
                &req.name,
                std::path::Path::new(&req.source_path),
                caller,
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
                    template: Some(t.into()),
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
            templates: self
                .core
                .list_templates()
                .into_iter()
                .map(Into::into)
                .collect(),
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
