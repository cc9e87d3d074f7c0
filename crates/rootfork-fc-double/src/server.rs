//! Serving the double over HTTP/1.1 on a Unix socket with hyper 1.x.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::UnixListener;

use crate::double::{Answer, Double, MAX_BODY};

async fn respond(double: Arc<Double>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let answer = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => {
            let body = body.to_bytes();
            double.dispatch(&method, &path, &body)
        }
        Err(e) => Answer {
            status: 400,
            body: Some(json!({"fault_message": format!("cannot read the request body: {e}")})),
        },
    };
    let mut resp = Response::builder().status(answer.status);
    let body = match answer.body {
        Some(v) => {
            resp = resp.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    resp.body(Full::new(body)).expect("valid status and header")
}

/// Accepts connections on `listener` forever, answering each request with `double`.
pub async fn serve(listener: UnixListener, double: Arc<Double>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let double = double.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let double = double.clone();
                async move { Ok::<_, Infallible>(respond(double, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
