//! The double itself: each request is matched against the API description, its body validated,
//! and, when valid, handed to the model of the VMM ([`DoubleState`]); the answer is reported.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::report::Reporter;
use crate::spec::Spec;
use crate::state::{DoubleState, Reply};
use crate::validate::validate;

/// Largest request body accepted (Firecracker's default API payload limit).
pub const MAX_BODY: usize = 51_200;

/// The double: the spec plus the model.
#[derive(Debug)]
pub struct Double {
    spec: Spec,
    state: Mutex<DoubleState>,
}

/// An answer: HTTP status and optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl Answer {
    fn fault(message: impl Into<String>) -> Self {
        Answer {
            status: 400,
            body: Some(json!({"fault_message": message.into()})),
        }
    }
}

impl Double {
    /// A fresh double for instance `id`.
    pub fn new(spec: Spec, id: String, report: Reporter) -> Self {
        let state = DoubleState::new(id, spec.version.clone(), report);
        Double {
            spec,
            state: Mutex::new(state),
        }
    }

    /// Validates and handles one request; reports it.
    pub fn dispatch(&self, method: &str, path: &str, body: &[u8]) -> Answer {
        let answer = self.answer(method, path, body);
        let state = self.state.lock();
        state.reporter().event(json!({
            "event": "request",
            "method": method,
            "path": path,
            "status": answer.status,
            "fault_message": answer.body.as_ref().and_then(|b| b.get("fault_message")).cloned(),
        }));
        answer
    }

    fn answer(&self, method: &str, path: &str, body: &[u8]) -> Answer {
        let invalid = || {
            Answer::fault(format!(
                "Invalid request method and/or path: {method} {path}."
            ))
        };
        let Some((item, params)) = self.spec.find_path(path) else {
            return invalid();
        };
        let Some(op) = item.operations.get(method) else {
            return invalid();
        };
        let body = match (op.body(), body.is_empty()) {
            (None, true) => None,
            (None, false) => {
                return Answer::fault(format!("{method} {path} does not take a request body."))
            }
            (Some(p), true) if p.required => {
                return Answer::fault(format!("{method} {path} requires a JSON body."))
            }
            (Some(_), true) => None,
            (Some(p), false) => {
                let value: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => {
                        return Answer::fault(format!(
                            "An error occurred when deserializing the json body of a request: {e}."
                        ))
                    }
                };
                if let Some(schema) = &p.schema {
                    if let Err(e) = validate(&self.spec, schema, &value) {
                        return Answer::fault(format!(
                            "An error occurred when deserializing the json body of a request: {e}."
                        ));
                    }
                }
                Some(value)
            }
        };
        let params: BTreeMap<String, String> = params;
        match self.state.lock().handle(&op.operation_id, &params, body) {
            Ok(Reply::NoContent) => Answer {
                status: 204,
                body: None,
            },
            Ok(Reply::Json(v)) => Answer {
                status: 200,
                body: Some(v),
            },
            Err(message) => Answer::fault(message),
        }
    }
}
