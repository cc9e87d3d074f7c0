//! Loading Firecracker's OpenAPI (Swagger 2.0) document into what the double needs: the paths
//! with their operations, each operation's body schema, and the schema definitions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// `additionalProperties`: a flag or a schema for the extra values.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Additional {
    /// `true` allows any extra property; `false` none.
    Allowed(bool),
    /// Extra properties must match this schema.
    Schema(Box<Schema>),
}

/// A JSON schema as Swagger 2.0 writes it (the subset the Firecracker spec uses).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Schema {
    /// `$ref: "#/definitions/Name"`.
    #[serde(rename = "$ref")]
    pub reference: Option<String>,
    /// `type`.
    #[serde(rename = "type")]
    pub ty: Option<String>,
    /// Required property names.
    #[serde(default)]
    pub required: Vec<String>,
    /// Declared properties.
    #[serde(default)]
    pub properties: BTreeMap<String, Schema>,
    /// `additionalProperties`.
    #[serde(rename = "additionalProperties")]
    pub additional: Option<Additional>,
    /// Array item schema.
    pub items: Option<Box<Schema>>,
    /// Allowed values.
    #[serde(rename = "enum")]
    pub enumeration: Option<Vec<serde_yaml::Value>>,
    /// Inclusive lower bound.
    pub minimum: Option<f64>,
    /// Inclusive upper bound.
    pub maximum: Option<f64>,
    /// `format` (`int32`/`int64` bound integers; other formats are descriptive here).
    pub format: Option<String>,
}

/// A parameter of an operation.
#[derive(Debug, Clone, Deserialize)]
pub struct Parameter {
    /// Its name.
    pub name: String,
    /// `body` or `path`.
    #[serde(rename = "in")]
    pub location: String,
    /// Whether it must be present.
    #[serde(default)]
    pub required: bool,
    /// The body schema (`in: body`).
    pub schema: Option<Schema>,
}

/// One operation (method on a path).
#[derive(Debug, Clone, Deserialize)]
pub struct Operation {
    /// `operationId`.
    #[serde(rename = "operationId")]
    pub operation_id: String,
    /// Parameters.
    #[serde(default)]
    pub parameters: Vec<Parameter>,
}

impl Operation {
    /// The body parameter, if the operation takes one.
    pub fn body(&self) -> Option<&Parameter> {
        self.parameters.iter().find(|p| p.location == "body")
    }
}

/// A path template with its operations.
#[derive(Debug, Clone)]
pub struct PathItem {
    /// The template, e.g. `/drives/{drive_id}`.
    pub template: String,
    segments: Vec<Segment>,
    /// Operations by upper-case method.
    pub operations: BTreeMap<String, Operation>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
}

impl PathItem {
    /// Matches a request path, returning the path parameters.
    pub fn matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        let parts: Vec<&str> = if path == "/" {
            Vec::new()
        } else {
            path.trim_start_matches('/').split('/').collect()
        };
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut params = BTreeMap::new();
        for (seg, part) in self.segments.iter().zip(parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) if part.is_empty() => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), part.to_owned());
                }
            }
        }
        Some(params)
    }
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

/// The loaded spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `info.version`.
    pub version: String,
    /// Paths in document order of their templates.
    pub paths: Vec<PathItem>,
    /// `definitions`.
    pub definitions: BTreeMap<String, Schema>,
}

const METHODS: &[&str] = &["get", "put", "patch", "post", "delete", "head", "options"];

impl Spec {
    /// Reads and parses the spec at `path`.
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

    /// Parses a spec document.
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
            let segments = template
                .trim_start_matches('/')
                .split('/')
                .filter(|s| !s.is_empty())
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(p) => Segment::Param(p.to_owned()),
                        None => Segment::Literal(s.to_owned()),
                    },
                )
                .collect();
            paths.push(PathItem {
                template,
                segments,
                operations,
            });
        }
        let spec = Spec {
            version: doc.info.version,
            paths,
            definitions: doc.definitions,
        };
        spec.check_refs()?;
        Ok(spec)
    }

    /// Resolves `#/definitions/Name`.
    pub fn resolve(&self, reference: &str) -> Option<&Schema> {
        reference
            .strip_prefix("#/definitions/")
            .and_then(|name| self.definitions.get(name))
    }

    /// Finds the path item matching `path` (literal segments win over parameters).
    pub fn find_path(&self, path: &str) -> Option<(&PathItem, BTreeMap<String, String>)> {
        let mut best: Option<(&PathItem, BTreeMap<String, String>)> = None;
        for item in &self.paths {
            if let Some(params) = item.matches(path) {
                if !matches!(&best, Some((_, p)) if p.len() <= params.len()) {
                    best = Some((item, params));
                }
            }
        }
        best
    }

    fn check_refs(&self) -> Result<(), String> {
        fn walk(spec: &Spec, s: &Schema, at: &str) -> Result<(), String> {
            if let Some(r) = &s.reference {
                if spec.resolve(r).is_none() {
                    return Err(format!("{at}: unresolved $ref {r}"));
                }
            }
            for (k, p) in &s.properties {
                walk(spec, p, &format!("{at}.{k}"))?;
            }
            if let Some(i) = &s.items {
                walk(spec, i, &format!("{at}[]"))?;
            }
            if let Some(Additional::Schema(a)) = &s.additional {
                walk(spec, a, &format!("{at}.*"))?;
            }
            Ok(())
        }
        for (name, s) in &self.definitions {
            walk(self, s, name)?;
        }
        for item in &self.paths {
            for (m, op) in &item.operations {
                if let Some(s) = op.body().and_then(|b| b.schema.as_ref()) {
                    walk(self, s, &format!("{m} {}", item.template))?;
                }
            }
        }
        Ok(())
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
