//! Who may call the API: anyone who can open the Unix socket (its mode is the check), or on
//! TCP a client that sends `authorization: Bearer TOKEN`. TCP requests are marked
//! [`Caller::Remote`] (a request extension) for the operations that treat them differently.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::daemon::model::Caller;

/// The access check of one listener.
#[derive(Clone)]
pub enum Access {
    /// The Unix socket: the file mode already decided.
    Local,
    /// TCP: exactly this bearer token.
    Bearer(Arc<str>),
}

impl Access {
    /// Accepts exactly `token`.
    pub fn bearer(token: &str) -> Access {
        Access::Bearer(token.into())
    }
}

impl tonic::service::Interceptor for Access {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Access::Bearer(token) = self else {
            return Ok(req);
        };
        let mut req = req;
        req.extensions_mut().insert(Caller::Remote);
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_auth(v: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = v {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn bearer_needs_the_exact_token() {
        let mut a = Access::bearer("s3cret");
        let ok = a.call(with_auth(Some("Bearer s3cret"))).unwrap();
        assert_eq!(ok.extensions().get::<Caller>(), Some(&Caller::Remote));
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
        ] {
            let e = a.call(with_auth(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn local_lets_everything_through() {
        let ok = Access::Local.call(with_auth(None)).unwrap();
        assert_eq!(ok.extensions().get::<Caller>(), None);
    }
}
