//! The cross-check of two API descriptions: whether the built-in description agrees with a full
//! Swagger document (Firecracker's `firecracker.yaml`). Every path and method must exist on both
//! sides with the same operation id, path parameters and body (definition, required or not), and
//! every definition must have the same type, required fields, property names, property types,
//! enums, bounds, integer formats, array items and `additionalProperties` (absent and `false`
//! both refuse unknown fields). Descriptions, examples and defaults are not compared; nor are
//! string formats, which the validator does not check.

use std::collections::BTreeSet;
use std::fmt;

use crate::spec::{Additional, Operation, PathItem, Schema, Spec};

/// One point on which the two descriptions differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    /// Where: `PUT /drives/{drive_id}`, `Drive.rate_limiter`, ...
    pub at: String,
    /// How they differ.
    pub what: String,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.what)
    }
}

struct Out(Vec<Disagreement>);

impl Out {
    fn add(&mut self, at: &str, what: impl Into<String>) {
        self.0.push(Disagreement {
            at: at.to_owned(),
            what: what.into(),
        });
    }

    fn differ<T: fmt::Debug + PartialEq>(&mut self, at: &str, what: &str, ours: T, theirs: T) {
        if ours != theirs {
            self.add(at, format!("{what}: ours {ours:?}, theirs {theirs:?}"));
        }
    }
}

/// Every disagreement between `ours` and `theirs` (empty when they agree).
pub fn compare(ours: &Spec, theirs: &Spec) -> Vec<Disagreement> {
    let mut out = Out(Vec::new());
    compare_paths(ours, theirs, &mut out);
    for (name, schema) in &ours.definitions {
        match theirs.definitions.get(name) {
            Some(t) => compare_schema(schema, t, name, &mut out),
            None => out.add(name, "described by us, not in theirs"),
        }
    }
    for name in theirs.definitions.keys() {
        if !ours.definitions.contains_key(name) {
            out.add(name, "in theirs, not described by us");
        }
    }
    out.0
}

fn find<'a>(spec: &'a Spec, template: &str) -> Option<&'a PathItem> {
    spec.paths.iter().find(|p| p.template == template)
}

fn compare_paths(ours: &Spec, theirs: &Spec, out: &mut Out) {
    for item in &ours.paths {
        for (method, op) in &item.operations {
            let at = format!("{method} {}", item.template);
            match find(theirs, &item.template).and_then(|t| t.operations.get(method)) {
                Some(t) => compare_operation(op, t, &at, out),
                None => out.add(&at, "described by us, not in theirs"),
            }
        }
    }
    for item in &theirs.paths {
        for method in item.operations.keys() {
            if !find(ours, &item.template).is_some_and(|o| o.operations.contains_key(method)) {
                out.add(
                    &format!("{method} {}", item.template),
                    "in theirs, not described by us",
                );
            }
        }
    }
}

fn path_parameters(op: &Operation) -> BTreeSet<&str> {
    op.parameters
        .iter()
        .filter(|p| p.location == "path")
        .map(|p| p.name.as_str())
        .collect()
}

fn compare_operation(ours: &Operation, theirs: &Operation, at: &str, out: &mut Out) {
    out.differ(at, "operation id", &ours.operation_id, &theirs.operation_id);
    out.differ(
        at,
        "path parameters",
        path_parameters(ours),
        path_parameters(theirs),
    );
    match (ours.body(), theirs.body()) {
        (None, None) => {}
        (Some(_), None) => out.add(at, "we take a body, theirs does not"),
        (None, Some(_)) => out.add(at, "theirs takes a body, ours does not"),
        (Some(o), Some(t)) => {
            out.differ(at, "body required", o.required, t.required);
            match (&o.schema, &t.schema) {
                (Some(os), Some(ts)) => compare_schema(os, ts, &format!("{at} body"), out),
                (os, ts) => out.differ(at, "body schema", os.is_some(), ts.is_some()),
            }
        }
    }
}

fn effective_type(s: &Schema) -> Option<&str> {
    s.ty.as_deref()
        .or((!s.properties.is_empty() || s.additional.is_some()).then_some("object"))
}

fn enum_set(s: &Schema) -> Option<BTreeSet<String>> {
    s.enumeration
        .as_ref()
        .map(|e| e.iter().map(|v| v.to_string()).collect())
}

enum Extra<'a> {
    Refused,
    Allowed,
    Matching(&'a Schema),
}

fn extra(s: &Schema) -> Extra<'_> {
    match &s.additional {
        None | Some(Additional::Allowed(false)) => Extra::Refused,
        Some(Additional::Allowed(true)) => Extra::Allowed,
        Some(Additional::Schema(a)) => Extra::Matching(a),
    }
}

fn compare_schema(ours: &Schema, theirs: &Schema, at: &str, out: &mut Out) {
    if ours.reference.is_some() || theirs.reference.is_some() {
        out.differ(at, "$ref", &ours.reference, &theirs.reference);
        return;
    }
    let ty = effective_type(ours);
    out.differ(at, "type", ty, effective_type(theirs));
    if matches!(ty, Some("integer") | Some("number")) {
        out.differ(at, "format", &ours.format, &theirs.format);
    }
    out.differ(at, "minimum", ours.minimum, theirs.minimum);
    out.differ(at, "maximum", ours.maximum, theirs.maximum);
    out.differ(at, "enum", enum_set(ours), enum_set(theirs));
    let required = |s: &Schema| s.required.iter().cloned().collect::<BTreeSet<_>>();
    out.differ(at, "required", required(ours), required(theirs));
    let names = |s: &Schema| s.properties.keys().cloned().collect::<BTreeSet<_>>();
    out.differ(at, "properties", names(ours), names(theirs));
    for (name, o) in &ours.properties {
        if let Some(t) = theirs.properties.get(name) {
            compare_schema(o, t, &format!("{at}.{name}"), out);
        }
    }
    match (&ours.items, &theirs.items) {
        (Some(o), Some(t)) => compare_schema(o, t, &format!("{at}[]"), out),
        (o, t) => out.differ(at, "array items", o.is_some(), t.is_some()),
    }
    match (extra(ours), extra(theirs)) {
        (Extra::Matching(o), Extra::Matching(t)) => compare_schema(o, t, &format!("{at}.*"), out),
        (o, t) => {
            let kind = |e: &Extra| match e {
                Extra::Refused => "refused",
                Extra::Allowed => "allowed",
                Extra::Matching(_) => "must match a schema",
            };
            out.differ(at, "additional properties", kind(&o), kind(&t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::description;
    use crate::builder::{reference, string, PUT};

    type Mutation = Box<dyn FnOnce(&mut Spec)>;

    fn disagreements(mutate: impl FnOnce(&mut Spec)) -> Vec<String> {
        let mut ours = description();
        mutate(&mut ours);
        compare(&ours, &description())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn drive(spec: &mut Spec) -> &mut Schema {
        spec.definitions.get_mut("Drive").unwrap()
    }

    #[test]
    fn the_description_agrees_with_itself() {
        assert_eq!(disagreements(|_| {}), Vec::<String>::new());
    }

    #[test]
    fn each_kind_of_difference_is_reported() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|s| drive(s).required.retain(|r| r != "is_root_device")),
                "Drive: required",
            ),
            (
                Box::new(|s| {
                    drive(s).properties.remove("socket");
                }),
                "Drive: properties",
            ),
            (
                Box::new(|s| {
                    drive(s).properties.insert("cache_type".into(), string());
                }),
                "Drive.cache_type: enum",
            ),
            (
                Box::new(|s| {
                    drive(s)
                        .properties
                        .insert("rate_limiter".into(), reference("TokenBucket"));
                }),
                "Drive.rate_limiter: $ref",
            ),
            (
                Box::new(|s| {
                    let m = s.definitions.get_mut("MachineConfiguration").unwrap();
                    m.properties.get_mut("vcpu_count").unwrap().maximum = Some(64.0);
                }),
                "MachineConfiguration.vcpu_count: maximum",
            ),
            (
                Box::new(|s| {
                    let t = s.definitions.get_mut("TokenBucket").unwrap();
                    t.properties.get_mut("size").unwrap().format = Some("int32".into());
                }),
                "TokenBucket.size: format",
            ),
            (
                Box::new(|s| {
                    let m = s.definitions.get_mut("Metrics").unwrap();
                    m.additional = Some(Additional::Allowed(true));
                }),
                "Metrics: additional properties",
            ),
            (
                Box::new(|s| {
                    s.definitions.remove("VsockOverride");
                }),
                "VsockOverride: in theirs, not described by us",
            ),
            (
                Box::new(|s| s.paths.retain(|p| p.template != "/vsock")),
                "PUT /vsock: in theirs, not described by us",
            ),
            (
                Box::new(|s| {
                    let item = s.paths.iter_mut().find(|p| p.template == "/boot-source");
                    let op = item.unwrap().operations.get_mut(PUT).unwrap();
                    op.parameters[0].schema = Some(reference("Drive"));
                }),
                "PUT /boot-source body: $ref",
            ),
            (
                Box::new(|s| {
                    let item = s.paths.iter_mut().find(|p| p.template == "/boot-source");
                    let op = item.unwrap().operations.get_mut(PUT).unwrap();
                    op.parameters[0].required = false;
                }),
                "PUT /boot-source: body required",
            ),
            (
                Box::new(|s| {
                    let item = s.paths.iter_mut().find(|p| p.template == "/logger");
                    let op = item.unwrap().operations.get_mut(PUT).unwrap();
                    op.operation_id = "putLog".into();
                }),
                "PUT /logger: operation id",
            ),
        ];
        for (mutate, want) in cases {
            let found = disagreements(mutate);
            assert!(
                found.iter().any(|d| d.starts_with(want)),
                "{want} not reported; got {found:?}"
            );
        }
    }
}
