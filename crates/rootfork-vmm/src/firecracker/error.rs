//! Errors of the Firecracker API client: transport, API refusals (with Firecracker's
//! `fault_message`) and undecodable answers.

use std::path::PathBuf;

/// An error talking to the Firecracker API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API socket could not be reached.
    #[error("cannot connect to the API socket {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, malformed response...).
    #[error("{method} {path}: transport error: {source}")]
    Transport {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// No answer within the client's timeout.
    #[error("{method} {path}: no answer within {timeout_ms} ms")]
    Timeout {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// Firecracker refused the request.
    #[error("{method} {path}: HTTP {status}: {fault_message}")]
    Api {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// HTTP status code.
        status: u16,
        /// Firecracker's `fault_message` (or the raw body if it sent none).
        fault_message: String,
    },
    /// A request body could not be encoded.
    #[error("{path}: cannot encode the request: {source}")]
    Encode {
        /// Request path.
        path: String,
        /// The encoder error.
        #[source]
        source: serde_json::Error,
    },
    /// A response body could not be decoded.
    #[error("{method} {path}: cannot decode the answer {body:?}: {source}")]
    Decode {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// The body received.
        body: String,
        /// The decoder error.
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be built (a path that is not a valid URI).
    #[error("cannot build the request for {0:?}")]
    InvalidRequest(String),
    /// A resource id that cannot be put in a URL path.
    #[error("invalid resource id {0:?}: only ASCII letters, digits and '_' are allowed")]
    InvalidId(String),
}

impl ApiError {
    /// Firecracker's `fault_message`, if this is an API refusal.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            ApiError::Api { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }
}
