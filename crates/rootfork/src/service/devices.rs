//! `rootfork.v1.Devices`: the kernel's `/dev/nbdN` slots.

use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::{self, devices_server};

#[tonic::async_trait]
impl devices_server::Devices for Api {
    async fn list_devices(
        &self,
        _: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        let core = self.core.clone();
        let list = tokio::task::spawn_blocking(move || core.list_devices())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(list.into()))
    }
}
