//! Connecting to the daemon: over its Unix socket (the default: `STATE/api.sock` where STATE is
//! `$ROOTFORK_STATE_DIR`, else `$XDG_STATE_HOME/rootfork`, else `./.rootfork`) or over TCP with a
//! bearer token. Every client carries the same interceptor type, so the CLI code is the same for
//! both transports.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::api::v1::{
    devices_client::DevicesClient, events_client::EventsClient, sandboxes_client::SandboxesClient,
    templates_client::TemplatesClient,
};
use crate::config::{api_socket_in, default_state_dir};

/// The daemon's default API socket, as the client computes it.
pub fn default_api_socket() -> PathBuf {
    let state = match std::env::var_os("ROOTFORK_STATE_DIR") {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        _ => default_state_dir(),
    };
    let state = if state.is_absolute() {
        state
    } else {
        std::env::current_dir().unwrap_or_default().join(state)
    };
    api_socket_in(&state)
}

/// Where the API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiTarget {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `http://HOST:PORT`, with a bearer token.
    Tcp {
        /// The URL.
        url: String,
        /// The token.
        token: Option<String>,
    },
}

impl ApiTarget {
    /// Parses `--api`: `tcp://HOST:PORT` or a socket path.
    pub fn parse(s: &str, token: Option<String>) -> ApiTarget {
        match s.strip_prefix("tcp://") {
            Some(hp) => ApiTarget::Tcp {
                url: format!("http://{hp}"),
                token,
            },
            None => ApiTarget::Unix(PathBuf::from(s)),
        }
    }
}

/// Why the client could not reach the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the socket path.
    #[error("the rootfork daemon is not running: there is no API socket at {0} (start it with `rootfork serve`, or point --api / ROOTFORK_API at its socket)")]
    NoSocket(PathBuf),
    /// The socket exists but nobody answers.
    #[error("the rootfork daemon is not answering on {path}: {source} (is it running? a stale socket is removed by the next `rootfork serve`)")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("cannot connect to the rootfork daemon at {target}: {message}")]
    Other {
        /// Where.
        target: String,
        /// Why.
        message: String,
    },
}

/// Adds `authorization: Bearer TOKEN` when there is a token.
#[derive(Clone, Debug)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Auth>;

/// One client per service over one connection.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Templates.
    pub templates: TemplatesClient<Svc>,
    /// Sandboxes.
    pub sandboxes: SandboxesClient<Svc>,
    /// Devices.
    pub devices: DevicesClient<Svc>,
    /// Events.
    pub events: EventsClient<Svc>,
}

async fn unix_channel(path: &Path) -> Result<Channel, ClientError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::NoSocket(path.to_owned()))
        }
        _ => {}
    }
    // Probe once so the message is precise (tonic's error would be "transport error").
    if let Err(e) = tokio::net::UnixStream::connect(path).await {
        return Err(ClientError::Refused {
            path: path.to_owned(),
            source: e,
        });
    }
    let p = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://rootfork.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| ClientError::Other {
            target: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Connects.
pub async fn connect(target: &ApiTarget) -> Result<Clients, ClientError> {
    let (ch, token) = match target {
        ApiTarget::Unix(p) => (unix_channel(p).await?, None),
        ApiTarget::Tcp { url, token } => {
            let ch = Endpoint::from_shared(url.clone())
                .map_err(|e| ClientError::Other {
                    target: url.clone(),
                    message: e.to_string(),
                })?
                .connect()
                .await
                .map_err(|e| ClientError::Other {
                    target: url.clone(),
                    message: format!("{e} (is the daemon's TCP API on?)"),
                })?;
            (ch, token.clone())
        }
    };
    let auth = Auth(match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Other {
                    target: "token".into(),
                    message: "the token contains characters not allowed in a header".into(),
                })?,
        ),
        None => None,
    });
    Ok(Clients {
        templates: TemplatesClient::with_interceptor(ch.clone(), auth.clone()),
        sandboxes: SandboxesClient::with_interceptor(ch.clone(), auth.clone()),
        devices: DevicesClient::with_interceptor(ch.clone(), auth.clone()),
        events: EventsClient::with_interceptor(ch, auth),
    })
}
