//! Loading a full Swagger 2.0 document (Firecracker's `firecracker.yaml`) into a [`Spec`], for
//! `--spec FILE` / `$ROOTFORK_FC_SPEC` and for the cross-check of the built-in description.
//! Nothing in the repository needs such a file: the double uses [`crate::api::description`]
//! unless told otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spec::{Operation, PathItem, Schema, Spec};

/// The environment variable naming an external Swagger document.
pub const SPEC_ENV: &str = "ROOTFORK_FC_SPEC";

/// Errors loading the spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read the Firecracker API spec {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or not shaped like a Swagger 2.0 document.
    #[error("cannot parse the Firecracker API spec {path}: {reason}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct Document {
    swagger: String,
    info: Info,
    paths: BTreeMap<String, BTreeMap<String, serde_yaml::Value>>,
    definitions: BTreeMap<String, Schema>,
}

#[derive(Deserialize)]
struct Info {
    version: String,
}

const METHODS: &[&str] = &["get", "put", "patch", "post", "delete", "head", "options"];

/// The file `$ROOTFORK_FC_SPEC` names, if it is set (and not empty).
pub fn external_spec_path() -> Option<PathBuf> {
    std::env::var_os(SPEC_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Spec {
    /// Reads and parses the Swagger document at `path`.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| SpecError::Parse {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses a Swagger 2.0 document.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: Document = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if doc.swagger != "2.0" {
            return Err(format!("expected swagger 2.0, found {:?}", doc.swagger));
        }
        let mut paths = Vec::new();
        for (template, item) in doc.paths {
            let mut operations = BTreeMap::new();
            for (method, value) in item {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let op: Operation = serde_yaml::from_value(value)
                    .map_err(|e| format!("{method} {template}: {e}"))?;
                operations.insert(method.to_ascii_uppercase(), op);
            }
            paths.push(PathItem::new(template, operations));
        }
        let spec = Spec {
            version: doc.info.version,
            paths,
            definitions: doc.definitions,
        };
        spec.check_refs()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r##"
swagger: "2.0"
info: { version: "9" }
paths:
  /:
    get: { operationId: describe, responses: { 200: { description: ok } } }
  /drives/{drive_id}:
    put:
      operationId: putDrive
      parameters:
        - { name: drive_id, in: path, required: true, type: string }
        - { name: body, in: body, required: true, schema: { $ref: "#/definitions/D" } }
  /drives/special:
    get: { operationId: special }
definitions:
  D: { type: object, properties: { x: { type: string } } }
"##;

    #[test]
    fn paths_match_with_parameters_and_literals_win() {
        let spec = Spec::parse(MINI).unwrap();
        assert_eq!(spec.version, "9");
        let (item, params) = spec.find_path("/drives/rootfs").unwrap();
        assert_eq!(item.template, "/drives/{drive_id}");
        assert_eq!(params["drive_id"], "rootfs");
        let op = &item.operations["PUT"];
        assert_eq!(op.operation_id, "putDrive");
        assert!(op.body().unwrap().required);
        assert_eq!(
            spec.find_path("/drives/special").unwrap().0.template,
            "/drives/special"
        );
        assert!(spec.find_path("/drives/").is_none());
        assert!(spec.find_path("/drives/a/b").is_none());
        assert_eq!(spec.find_path("/").unwrap().0.template, "/");
    }

    #[test]
    fn malformed_specs_are_refused() {
        assert!(
            Spec::parse("swagger: \"3.0\"\ninfo: {version: x}\npaths: {}\ndefinitions: {}")
                .unwrap_err()
                .contains("2.0")
        );
        let bad_ref = MINI.replace("#/definitions/D", "#/definitions/Nope");
        assert!(Spec::parse(&bad_ref).unwrap_err().contains("unresolved"));
        assert!(Spec::parse("not: [yaml").is_err());
        assert!(matches!(
            Spec::load(Path::new("/nonexistent/firecracker.yaml")),
            Err(SpecError::Read { .. })
        ));
    }
}
