//! The Prometheus endpoint: `GET /metrics` over HTTP/1.1 (hyper), on a loopback TCP port or a
//! Unix socket. Off unless configured (`metrics.listen`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;

use crate::config::MetricsListen;
use crate::daemon::core::Core;
use crate::paced_incoming::PacedIncoming;

/// Where the endpoint ended up.
#[derive(Debug, Clone)]
pub enum Bound {
    /// TCP (with the real port when 0 was asked for).
    Tcp(SocketAddr),
    /// A Unix socket.
    Unix(PathBuf),
}

fn respond(core: &Core, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"only GET /metrics is served\n",
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(core.render_metrics())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

fn serve_conn<S>(core: Arc<Core>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let core = core.clone();
            async move {
                // Scraping walks every sandbox and sysfs; keep it off the async threads.
                let r = tokio::task::spawn_blocking(move || respond(&core, &req)).await;
                Ok::<_, Infallible>(r.unwrap_or_else(|_| {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"internal error\n")));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }))
            }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .await
        {
            tracing::debug!("metrics connection: {e}");
        }
    });
}

/// Binds the endpoint and serves it until `stop` fires; `Ok(None)` when it is off.
pub async fn start(
    listen: &MetricsListen,
    core: Arc<Core>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<Option<(Bound, tokio::task::JoinHandle<()>)>> {
    match listen {
        MetricsListen::Off => Ok(None),
        MetricsListen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            let bound = l.local_addr()?;
            let mut incoming = PacedIncoming::new("metrics (tcp)", TcpListenerStream::new(l));
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(Ok(s)) = incoming.next() => serve_conn(core.clone(), s),
                        _ = stop.changed() => return,
                    }
                }
            });
            Ok(Some((Bound::Tcp(bound), task)))
        }
        MetricsListen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = crate::unix_listener::bind_with_mode(path, 0o600)?;
            let p = path.clone();
            let mut incoming = PacedIncoming::new("metrics (unix)", UnixListenerStream::new(l));
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(Ok(s)) = incoming.next() => serve_conn(core.clone(), s),
                        _ = stop.changed() => {
                            let _ = std::fs::remove_file(&p);
                            return;
                        }
                    }
                }
            });
            Ok(Some((Bound::Unix(path.clone()), task)))
        }
    }
}
