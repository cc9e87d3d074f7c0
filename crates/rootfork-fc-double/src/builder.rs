//! A small DSL for writing an API description as Rust data: schema constructors ([`string`],
//! [`integer`], [`reference()`], ...), named definitions ([`object`] with `required`/`optional`
//! properties), endpoints ([`endpoint`] with an optional body definition), and [`ApiBuilder`],
//! which assembles them into the [`Spec`] the double validates against.
//!
//! Objects refuse unknown properties (Swagger's `additionalProperties: false`, which is also what
//! an absent `additionalProperties` means to the validator) unless [`any_object`] or [`map_of`]
//! says otherwise.

use std::collections::BTreeMap;

use crate::spec::{Additional, Operation, Parameter, PathItem, Schema, Spec};

/// `GET`.
pub const GET: &str = "GET";
/// `PUT`.
pub const PUT: &str = "PUT";
/// `PATCH`.
pub const PATCH: &str = "PATCH";

fn typed(ty: &str) -> Schema {
    Schema {
        ty: Some(ty.to_owned()),
        ..Schema::default()
    }
}

/// A string.
pub fn string() -> Schema {
    typed("string")
}

/// A boolean.
pub fn boolean() -> Schema {
    typed("boolean")
}

/// An integer without a declared width.
pub fn integer() -> Schema {
    typed("integer")
}

/// A 32-bit signed integer.
pub fn int32() -> Schema {
    Schema {
        format: Some("int32".to_owned()),
        ..integer()
    }
}

/// A 64-bit signed integer.
pub fn int64() -> Schema {
    Schema {
        format: Some("int64".to_owned()),
        ..integer()
    }
}

/// An array of `items`.
pub fn array(items: Schema) -> Schema {
    Schema {
        items: Some(Box::new(items)),
        ..typed("array")
    }
}

/// A string that must be one of `values`.
pub fn one_of(values: &[&str]) -> Schema {
    Schema {
        enumeration: Some(values.iter().map(|v| (*v).into()).collect()),
        ..string()
    }
}

/// A reference to the definition `name`.
pub fn reference(name: &str) -> Schema {
    Schema {
        reference: Some(format!("#/definitions/{name}")),
        ..Schema::default()
    }
}

/// An object with any properties of any type.
pub fn any_object() -> Schema {
    Schema {
        additional: Some(Additional::Allowed(true)),
        ..typed("object")
    }
}

/// An object whose properties, whatever their names, all match `values`.
pub fn map_of(values: Schema) -> Schema {
    Schema {
        additional: Some(Additional::Schema(Box::new(values))),
        ..typed("object")
    }
}

impl Schema {
    /// With an inclusive lower bound.
    pub fn at_least(mut self, min: f64) -> Self {
        self.minimum = Some(min);
        self
    }

    /// With an inclusive upper bound.
    pub fn at_most(mut self, max: f64) -> Self {
        self.maximum = Some(max);
        self
    }
}

/// A named definition (`#/definitions/<name>`).
#[derive(Debug, Clone)]
pub struct Definition {
    name: String,
    schema: Schema,
}

/// A definition that is an object refusing unknown properties; add them with
/// [`Definition::required`] and [`Definition::optional`].
pub fn object(name: &str) -> Definition {
    definition(name, typed("object"))
}

/// A definition that is any schema (e.g. a named enum).
pub fn definition(name: &str, schema: Schema) -> Definition {
    Definition {
        name: name.to_owned(),
        schema,
    }
}

impl Definition {
    /// Adds a property that must be present.
    pub fn required(mut self, property: &str, schema: Schema) -> Self {
        self.schema.required.push(property.to_owned());
        self.optional(property, schema)
    }

    /// Adds a property that may be absent.
    pub fn optional(mut self, property: &str, schema: Schema) -> Self {
        self.schema.properties.insert(property.to_owned(), schema);
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One operation: a method on a path template, its operation id and its body.
#[derive(Debug, Clone)]
pub struct Endpoint {
    method: String,
    template: String,
    operation_id: String,
    body: Option<(String, bool)>,
}

/// The operation `operation_id`, `method` on `template` (`{name}` segments are path
/// parameters), without a body until [`Endpoint::body`] or [`Endpoint::optional_body`].
pub fn endpoint(method: &str, template: &str, operation_id: &str) -> Endpoint {
    Endpoint {
        method: method.to_owned(),
        template: template.to_owned(),
        operation_id: operation_id.to_owned(),
        body: None,
    }
}

impl Endpoint {
    /// Takes a required JSON body matching the definition `name`.
    pub fn body(mut self, name: &str) -> Self {
        self.body = Some((name.to_owned(), true));
        self
    }

    /// Takes an optional JSON body matching the definition `name`.
    pub fn optional_body(mut self, name: &str) -> Self {
        self.body = Some((name.to_owned(), false));
        self
    }
}

/// Mistakes in a description.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    /// The same method on the same path twice.
    #[error("{0} is described twice")]
    DuplicateEndpoint(String),
    /// The same definition name twice.
    #[error("the definition {0} is described twice")]
    DuplicateDefinition(String),
    /// A `$ref` to a definition that is not described.
    #[error("{0}")]
    Unresolved(String),
}

/// Assembles endpoints and definitions into a [`Spec`].
#[derive(Debug, Clone)]
pub struct ApiBuilder {
    version: String,
    endpoints: Vec<Endpoint>,
    definitions: Vec<Definition>,
}

/// An empty description of API version `version`.
pub fn api(version: &str) -> ApiBuilder {
    ApiBuilder {
        version: version.to_owned(),
        endpoints: Vec::new(),
        definitions: Vec::new(),
    }
}

impl ApiBuilder {
    /// Adds endpoints.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = Endpoint>) -> Self {
        self.endpoints.extend(endpoints);
        self
    }

    /// Adds definitions.
    pub fn definitions(mut self, definitions: impl IntoIterator<Item = Definition>) -> Self {
        self.definitions.extend(definitions);
        self
    }

    /// The spec; refuses duplicates and references to undescribed definitions.
    pub fn build(self) -> Result<Spec, BuildError> {
        let mut definitions = BTreeMap::new();
        for d in self.definitions {
            if definitions.insert(d.name.clone(), d.schema).is_some() {
                return Err(BuildError::DuplicateDefinition(d.name));
            }
        }
        let mut templates: Vec<(String, BTreeMap<String, Operation>)> = Vec::new();
        for e in self.endpoints {
            let index = match templates.iter().position(|(t, _)| *t == e.template) {
                Some(i) => i,
                None => {
                    templates.push((e.template.clone(), BTreeMap::new()));
                    templates.len() - 1
                }
            };
            let what = format!("{} {}", e.method, e.template);
            let operation = operation(&e);
            if templates[index].1.insert(e.method, operation).is_some() {
                return Err(BuildError::DuplicateEndpoint(what));
            }
        }
        let spec = Spec {
            version: self.version,
            paths: templates
                .into_iter()
                .map(|(t, ops)| PathItem::new(t, ops))
                .collect(),
            definitions,
        };
        spec.check_refs().map_err(BuildError::Unresolved)?;
        Ok(spec)
    }
}

fn operation(e: &Endpoint) -> Operation {
    let probe = PathItem::new(e.template.clone(), BTreeMap::new());
    let mut parameters: Vec<Parameter> = probe
        .parameters()
        .map(|name| Parameter {
            name: name.to_owned(),
            location: "path".to_owned(),
            required: true,
            schema: None,
        })
        .collect();
    if let Some((name, required)) = &e.body {
        parameters.push(Parameter {
            name: "body".to_owned(),
            location: "body".to_owned(),
            required: *required,
            schema: Some(reference(name)),
        });
    }
    Operation {
        operation_id: e.operation_id.clone(),
        parameters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::validate;
    use serde_json::json;

    fn small() -> ApiBuilder {
        api("0.1")
            .endpoints([
                endpoint(GET, "/", "describe"),
                endpoint(PUT, "/things/{thing_id}", "putThing").body("Thing"),
                endpoint(PATCH, "/things/{thing_id}", "patchThing").optional_body("Thing"),
            ])
            .definitions([
                object("Thing")
                    .required("thing_id", string())
                    .optional("count", int64().at_least(1.0).at_most(8.0))
                    .optional("kind", reference("Kind"))
                    .optional("tags", array(string()))
                    .optional("labels", map_of(string()))
                    .optional("free", any_object()),
                definition("Kind", one_of(&["A", "B"])),
            ])
    }

    #[test]
    fn builds_paths_parameters_bodies_and_definitions() {
        let spec = small().build().unwrap();
        assert_eq!(spec.version, "0.1");
        let (item, params) = spec.find_path("/things/t1").unwrap();
        assert_eq!(params["thing_id"], "t1");
        let put = &item.operations[PUT];
        assert_eq!(put.operation_id, "putThing");
        assert_eq!(put.parameters[0].location, "path");
        assert!(put.body().unwrap().required);
        assert!(!item.operations[PATCH].body().unwrap().required);
        assert!(spec.find_path("/").unwrap().0.operations[GET]
            .body()
            .is_none());
        let thing = spec.definitions["Thing"].clone();
        validate(
            &spec,
            &thing,
            &json!({"thing_id": "t", "count": 8, "kind": "B", "tags": ["x"],
                    "labels": {"a": "b"}, "free": {"x": [1]}}),
        )
        .unwrap();
        for bad in [
            json!({}),
            json!({"thing_id": "t", "count": 0}),
            json!({"thing_id": "t", "kind": "C"}),
            json!({"thing_id": "t", "labels": {"a": 1}}),
            json!({"thing_id": "t", "extra": 1}),
        ] {
            assert!(validate(&spec, &thing, &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_duplicates_and_dangling_references() {
        let e = small()
            .endpoints([endpoint(GET, "/", "again")])
            .build()
            .unwrap_err();
        assert_eq!(e, BuildError::DuplicateEndpoint("GET /".into()));
        let e = small().definitions([object("Thing")]).build().unwrap_err();
        assert_eq!(e, BuildError::DuplicateDefinition("Thing".into()));
        let e = small()
            .endpoints([endpoint(PUT, "/other", "putOther").body("Missing")])
            .build()
            .unwrap_err();
        assert!(matches!(e, BuildError::Unresolved(m) if m.contains("Missing")));
    }
}
