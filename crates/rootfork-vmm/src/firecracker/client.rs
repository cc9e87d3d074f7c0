//! The Firecracker API client: HTTP/1.1 over the API Unix socket with hyper 1.x, one connection
//! per request (Firecracker serves few, short requests; a fresh connection never goes stale).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::error::ApiError;
use super::models::*;
use crate::drive::{DriveAccess, RootDrive};

/// Tuning of the root drive beyond what [`RootDrive`] fixes (device, path, access).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootDriveOptions {
    /// Caching strategy (`Writeback` makes guest flushes reach the overlay).
    pub cache_type: Option<CacheType>,
    /// I/O engine.
    pub io_engine: Option<IoEngine>,
    /// Rate limiter.
    pub rate_limiter: Option<RateLimiter>,
    /// Boot partition UUID, if the root is a partition.
    pub partuuid: Option<String>,
}

/// The API body for a root drive: `path_on_host` is always the stable path.
pub fn root_drive_body(drive: &RootDrive, options: &RootDriveOptions) -> Drive {
    Drive {
        drive_id: RootDrive::DRIVE_ID.to_owned(),
        is_root_device: true,
        path_on_host: Some(drive.stable_path().to_api_string()),
        is_read_only: Some(drive.access() == DriveAccess::ReadOnly),
        partuuid: options.partuuid.clone(),
        cache_type: options.cache_type,
        io_engine: options.io_engine,
        rate_limiter: options.rate_limiter,
        socket: None,
    }
}

/// A client of one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
}

fn check_id(id: &str) -> Result<&str, ApiError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(id)
    } else {
        Err(ApiError::InvalidId(id.to_owned()))
    }
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

impl FirecrackerClient {
    /// Default time allowed for one request.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A client for the API socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        FirecrackerClient {
            socket: socket.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the status and body. Non-2xx answers become
    /// [`ApiError::Api`] with the `fault_message`.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let name = method_name(&method);
        let exchange = self.exchange(method, path, body);
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                method: name,
                path: path.to_owned(),
                timeout_ms: self.timeout.as_millis() as u64,
            })??;
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = serde_json::from_slice::<ApiErrorBody>(&bytes)
            .map(|b| b.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(ApiError::Api {
            method: name,
            path: path.to_owned(),
            status: status.as_u16(),
            fault_message,
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let name = method_name(&method);
        let transport = |source| ApiError::Transport {
            method: name,
            path: path.to_owned(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(transport)?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| ApiError::InvalidRequest(path.to_owned()))?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(transport)?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(transport)?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        driver.abort();
        result
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<(), ApiError> {
        let body = serde_json::to_vec(body).map_err(|source| ApiError::Encode {
            path: path.to_owned(),
            source,
        })?;
        self.raw(method, path, Some(body)).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let bytes = self.raw(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode {
            method: "GET",
            path: path.to_owned(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
            source,
        })
    }

    /// `GET /`: instance information.
    pub async fn describe_instance(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version").await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), ApiError> {
        self.send(Method::PUT, "/boot-source", boot).await
    }

    /// `PUT /drives/{drive_id}` for any drive.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ApiError> {
        let path = format!("/drives/{}", check_id(&drive.drive_id)?);
        self.send(Method::PUT, &path, drive).await
    }

    /// `PUT /drives/rootfs` for the root drive, with the stable path as `path_on_host`.
    pub async fn put_root_drive(
        &self,
        drive: &RootDrive,
        options: &RootDriveOptions,
    ) -> Result<(), ApiError> {
        self.put_drive(&root_drive_body(drive, options)).await
    }

    /// `PATCH /drives/{drive_id}` (post-boot).
    pub async fn patch_drive(&self, drive: &PartialDrive) -> Result<(), ApiError> {
        let path = format!("/drives/{}", check_id(&drive.drive_id)?);
        self.send(Method::PATCH, &path, drive).await
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, cfg: &MachineConfiguration) -> Result<(), ApiError> {
        self.send(Method::PUT, "/machine-config", cfg).await
    }

    /// `PUT /entropy` (pre-boot).
    pub async fn put_entropy(&self, device: &EntropyDevice) -> Result<(), ApiError> {
        self.send(Method::PUT, "/entropy", device).await
    }

    /// `GET /machine-config`.
    pub async fn get_machine_config(&self) -> Result<MachineConfiguration, ApiError> {
        self.get("/machine-config").await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), ApiError> {
        let path = format!("/network-interfaces/{}", check_id(&iface.iface_id)?);
        self.send(Method::PUT, &path, iface).await
    }

    /// `PATCH /network-interfaces/{iface_id}` (post-boot).
    pub async fn patch_network_interface(
        &self,
        iface: &PartialNetworkInterface,
    ) -> Result<(), ApiError> {
        let path = format!("/network-interfaces/{}", check_id(&iface.iface_id)?);
        self.send(Method::PATCH, &path, iface).await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.send(Method::PUT, "/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `PUT /actions` `InstanceStart`.
    pub async fn instance_start(&self) -> Result<(), ApiError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PUT /actions` `SendCtrlAltDel`.
    pub async fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        self.action(ActionType::SendCtrlAltDel).await
    }

    /// `PUT /actions` `FlushMetrics`.
    pub async fn flush_metrics(&self) -> Result<(), ApiError> {
        self.action(ActionType::FlushMetrics).await
    }

    /// `PUT /snapshot/create` (VM paused).
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.send(Method::PUT, "/snapshot/create", params).await
    }

    /// `PUT /snapshot/load` (fresh process).
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.send(Method::PUT, "/snapshot/load", params).await
    }

    /// `PATCH /vm`.
    pub async fn set_vm_state(&self, state: VmState) -> Result<(), ApiError> {
        self.send(Method::PATCH, "/vm", &Vm { state }).await
    }

    /// `PATCH /vm` `Paused`.
    pub async fn pause(&self) -> Result<(), ApiError> {
        self.set_vm_state(VmState::Paused).await
    }

    /// `PATCH /vm` `Resumed`.
    pub async fn resume(&self) -> Result<(), ApiError> {
        self.set_vm_state(VmState::Resumed).await
    }

    /// `PUT /logger`.
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), ApiError> {
        self.send(Method::PUT, "/logger", logger).await
    }

    /// `PUT /metrics`.
    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), ApiError> {
        self.send(Method::PUT, "/metrics", metrics).await
    }

    /// `PUT /mmds/config`.
    pub async fn put_mmds_config(&self, cfg: &MmdsConfig) -> Result<(), ApiError> {
        self.send(Method::PUT, "/mmds/config", cfg).await
    }

    /// `PUT /mmds`: replaces the metadata store.
    pub async fn put_mmds(&self, data: &serde_json::Value) -> Result<(), ApiError> {
        self.send(Method::PUT, "/mmds", data).await
    }

    /// `PATCH /mmds`: merges into the metadata store (JSON merge patch).
    pub async fn patch_mmds(&self, patch: &serde_json::Value) -> Result<(), ApiError> {
        self.send(Method::PATCH, "/mmds", patch).await
    }

    /// `GET /mmds`.
    pub async fn get_mmds(&self) -> Result<serde_json::Value, ApiError> {
        self.get("/mmds").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = FirecrackerClient::new(dir.path().join("none.sock"));
        assert!(matches!(
            c.describe_instance().await,
            Err(ApiError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let _server = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let c = FirecrackerClient::new(&sock).with_timeout(Duration::from_millis(100));
        assert!(matches!(
            c.instance_start().await,
            Err(ApiError::Timeout {
                timeout_ms: 100,
                ..
            })
        ));
    }

    async fn one_shot(response: &'static [u8]) -> (tempfile::TempDir, FirecrackerClient) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(response).await.unwrap();
        });
        (dir, FirecrackerClient::new(&sock))
    }

    #[tokio::test]
    async fn fault_messages_and_bad_bodies_are_typed() {
        let (_d, c) = one_shot(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 29\r\n\r\n{\"fault_message\": \"no drive\"}",
        )
        .await;
        match c.instance_start().await {
            Err(ApiError::Api {
                status: 400,
                fault_message,
                path,
                ..
            }) => {
                assert_eq!(fault_message, "no drive");
                assert_eq!(path, "/actions");
            }
            other => panic!("{other:?}"),
        }
        let (_d, c) = one_shot(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nnope!").await;
        let e = c.instance_start().await.unwrap_err();
        assert_eq!(e.fault_message(), Some("nope!"));
        let (_d, c) = one_shot(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
        assert!(matches!(
            c.describe_instance().await,
            Err(ApiError::Decode { .. })
        ));
        let (_d, c) = one_shot(b"garbage\r\n\r\n").await;
        assert!(matches!(
            c.describe_instance().await,
            Err(ApiError::Transport { .. })
        ));
    }

    #[tokio::test]
    async fn ids_that_do_not_fit_a_url_are_refused_before_sending() {
        let c = FirecrackerClient::new("/nonexistent.sock");
        let mut d = Drive {
            drive_id: "../x".into(),
            is_root_device: false,
            path_on_host: None,
            is_read_only: None,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
        assert!(matches!(c.put_drive(&d).await, Err(ApiError::InvalidId(_))));
        d.drive_id = String::new();
        assert!(matches!(c.put_drive(&d).await, Err(ApiError::InvalidId(_))));
    }
}
