//! What the double knows of an API: the paths with their operations, each operation's body
//! schema, and the schema definitions, in Swagger 2.0's shape. It comes from the built-in
//! description ([`crate::api`]) or from a Swagger document ([`crate::swagger`]).

use std::collections::BTreeMap;

use serde::Deserialize;

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
    pub enumeration: Option<Vec<serde_json::Value>>,
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
    /// A path item for `template` (`{name}` segments are parameters).
    pub fn new(template: impl Into<String>, operations: BTreeMap<String, Operation>) -> Self {
        let template = template.into();
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
        PathItem {
            template,
            segments,
            operations,
        }
    }

    /// The names of the path parameters, in order.
    pub fn parameters(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(p) => Some(p.as_str()),
            Segment::Literal(_) => None,
        })
    }

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

/// An API description.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `info.version`.
    pub version: String,
    /// Paths in document order of their templates.
    pub paths: Vec<PathItem>,
    /// `definitions`.
    pub definitions: BTreeMap<String, Schema>,
}

impl Spec {
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

    /// Checks that every `$ref` resolves.
    pub fn check_refs(&self) -> Result<(), String> {
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
