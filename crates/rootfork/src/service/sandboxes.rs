//! `rootfork.v1.Sandboxes`: create, get, list, pause, resume, delete, fork. Operations that change a
//! sandbox run in a task of their own, so a client that goes away mid-call never leaves one half
//! done.

use std::future::Future;

use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::{self, sandboxes_server};
use crate::daemon::spec::SandboxSpec;
use crate::error::DaemonError;

/// Runs `op` to completion in its own task, whatever happens to the caller.
async fn detached<T: Send + 'static>(
    what: &'static str,
    op: impl Future<Output = Result<T, DaemonError>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(op)
        .await
        .map_err(|e| Status::internal(format!("{what} task: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl sandboxes_server::Sandboxes for Api {
    async fn create_sandbox(
        &self,
        req: Request<v1::CreateSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let spec = SandboxSpec::try_from(req.get_ref()).map_err(DaemonError::from);
        let spec = self.core.recorded("create_sandbox", spec)?;
        let core = self.core.clone();
        let sb = detached("create", async move { core.create_sandbox(spec).await }).await?;
        Ok(Response::new(sb.into()))
    }

    async fn get_sandbox(
        &self,
        req: Request<v1::GetSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let sb = self.core.get_sandbox(&req.into_inner().id)?;
        Ok(Response::new(sb.into()))
    }

    async fn list_sandboxes(
        &self,
        req: Request<v1::ListSandboxesRequest>,
    ) -> Result<Response<v1::ListSandboxesResponse>, Status> {
        let req = req.into_inner();
        let all = if req.paused_in_store {
            self.core.list_store_sandboxes().await?
        } else {
            self.core.list_sandboxes(req.include_deleted)
        };
        Ok(Response::new(v1::ListSandboxesResponse {
            sandboxes: all.into_iter().map(Into::into).collect(),
        }))
    }

    async fn pause_sandbox(
        &self,
        req: Request<v1::PauseSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let core = self.core.clone();
        let id = req.into_inner().id;
        let sb = detached("pause", async move { core.pause_sandbox(&id).await }).await?;
        Ok(Response::new(sb.into()))
    }

    async fn resume_sandbox(
        &self,
        req: Request<v1::ResumeSandboxRequest>,
    ) -> Result<Response<v1::Sandbox>, Status> {
        let core = self.core.clone();
        let req = req.into_inner();
        let sb = detached("resume", async move {
            core.resume_sandbox(&req.id, req.wait).await
        })
        .await?;
        Ok(Response::new(sb.into()))
    }

    async fn delete_sandbox(
        &self,
        req: Request<v1::DeleteSandboxRequest>,
    ) -> Result<Response<v1::DeleteSandboxResponse>, Status> {
        let core = self.core.clone();
        let id = req.into_inner().id;
        let deleted = detached("delete", async move { core.delete_sandbox(&id).await }).await?;
        Ok(Response::new(v1::DeleteSandboxResponse { deleted }))
    }

    async fn fork_sandbox(
        &self,
        req: Request<v1::ForkSandboxRequest>,
    ) -> Result<Response<v1::ForkSandboxResponse>, Status> {
        let core = self.core.clone();
        let r = req.into_inner();
        let forks = detached("fork", async move {
            let prefix = Some(r.id_prefix.as_str()).filter(|p| !p.is_empty());
            core.fork_sandbox(&r.id, r.count, prefix).await
        })
        .await?;
        Ok(Response::new(v1::ForkSandboxResponse {
            sandboxes: forks.into_iter().map(Into::into).collect(),
        }))
    }
}
