//! Validation of a JSON request body against a schema of the spec, as strictly as Firecracker's
//! own deserializer: every required field present, no unknown fields, types, enums and integer
//! bounds checked, `$ref`s followed, and no `null` where a value is expected.

use serde_json::Value;

use crate::spec::{Additional, Schema, Spec};

/// Validates `value` against `schema`; the error names the JSON path of the first problem.
pub fn validate(spec: &Spec, schema: &Schema, value: &Value) -> Result<(), String> {
    check(spec, schema, value, "body", 0)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn enum_matches(allowed: &Value, v: &Value) -> bool {
    match (allowed, v) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

fn enum_text(allowed: &Value) -> String {
    match allowed {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const MAX_DEPTH: usize = 64;

fn check(spec: &Spec, schema: &Schema, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{at}: nested too deeply"));
    }
    if let Some(r) = &schema.reference {
        let target = spec
            .resolve(r)
            .ok_or_else(|| format!("{at}: the spec has no definition {r}"))?;
        return check(spec, target, v, at, depth + 1);
    }
    let ty = schema.ty.as_deref().or(
        if !schema.properties.is_empty() || schema.additional.is_some() {
            Some("object")
        } else {
            None
        },
    );
    match ty {
        Some("object") => check_object(spec, schema, v, at, depth)?,
        Some("array") => {
            let Value::Array(items) = v else {
                return Err(mismatch(at, "array", v));
            };
            if let Some(item) = &schema.items {
                for (i, e) in items.iter().enumerate() {
                    check(spec, item, e, &format!("{at}[{i}]"), depth + 1)?;
                }
            }
        }
        Some("string") if !v.is_string() => return Err(mismatch(at, "string", v)),
        Some("boolean") if !v.is_boolean() => return Err(mismatch(at, "boolean", v)),
        Some("integer") => check_integer(schema, v, at)?,
        Some("number") => {
            let n = v.as_f64().ok_or_else(|| mismatch(at, "number", v))?;
            check_bounds(schema, n, at)?;
        }
        Some("string") | Some("boolean") => {}
        Some(other) => return Err(format!("{at}: the spec uses unsupported type {other:?}")),
        None if v.is_null() => return Err(mismatch(at, "a value", v)),
        None => {}
    }
    if let Some(allowed) = &schema.enumeration {
        if !allowed.iter().any(|a| enum_matches(a, v)) {
            let names: Vec<String> = allowed.iter().map(enum_text).collect();
            return Err(format!(
                "{at}: unknown variant {v}, expected one of {}",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

fn mismatch(at: &str, want: &str, v: &Value) -> String {
    format!(
        "{at}: invalid type: expected {want}, found {}",
        type_name(v)
    )
}

fn check_integer(schema: &Schema, v: &Value, at: &str) -> Result<(), String> {
    let Value::Number(n) = v else {
        return Err(mismatch(at, "integer", v));
    };
    let (lo, hi) = match schema.format.as_deref() {
        Some("int32") => (i32::MIN as i128, i32::MAX as i128),
        Some("int64") => (i64::MIN as i128, i64::MAX as i128),
        _ => (i64::MIN as i128, u64::MAX as i128),
    };
    let i: i128 = if let Some(i) = n.as_i64() {
        i.into()
    } else if let Some(u) = n.as_u64() {
        u.into()
    } else {
        return Err(mismatch(at, "integer", v));
    };
    if i < lo || i > hi {
        return Err(format!(
            "{at}: {i} is out of range for {}",
            schema.format.as_deref().unwrap_or("an integer")
        ));
    }
    check_bounds(schema, i as f64, at)
}

fn check_bounds(schema: &Schema, n: f64, at: &str) -> Result<(), String> {
    if let Some(min) = schema.minimum {
        if n < min {
            return Err(format!("{at}: {n} is below the minimum {min}"));
        }
    }
    if let Some(max) = schema.maximum {
        if n > max {
            return Err(format!("{at}: {n} is above the maximum {max}"));
        }
    }
    Ok(())
}

fn check_object(
    spec: &Spec,
    schema: &Schema,
    v: &Value,
    at: &str,
    depth: usize,
) -> Result<(), String> {
    let Value::Object(map) = v else {
        return Err(mismatch(at, "object", v));
    };
    for req in &schema.required {
        if !map.contains_key(req) {
            return Err(format!("{at}: missing field `{req}`"));
        }
    }
    for (key, value) in map {
        let here = format!("{at}.{key}");
        if let Some(prop) = schema.properties.get(key) {
            check(spec, prop, value, &here, depth + 1)?;
            continue;
        }
        match &schema.additional {
            Some(Additional::Allowed(true)) => {}
            Some(Additional::Schema(s)) => check(spec, s, value, &here, depth + 1)?,
            Some(Additional::Allowed(false)) | None => {
                let known: Vec<&str> = schema.properties.keys().map(String::as_str).collect();
                return Err(format!(
                    "{at}: unknown field `{key}`, expected one of {}",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SPEC: &str = r##"
swagger: "2.0"
info: { version: "t" }
paths: {}
definitions:
  Bucket:
    type: object
    required: [size]
    properties:
      size: { type: integer, format: int64, minimum: 0 }
  Thing:
    type: object
    required: [id, flag]
    properties:
      id: { type: string }
      flag: { type: boolean }
      kind: { type: string, enum: [A, "2M"] }
      count: { type: integer, minimum: 1, maximum: 32 }
      small: { type: integer, format: int32 }
      bucket: { $ref: "#/definitions/Bucket" }
      list: { type: array, items: { type: string } }
      props: { type: object, additionalProperties: { type: string } }
  Free:
    type: object
    additionalProperties: true
"##;

    fn thing(v: Value) -> Result<(), String> {
        let spec = Spec::parse(SPEC).unwrap();
        let s = spec.definitions["Thing"].clone();
        validate(&spec, &s, &v)
    }

    #[test]
    fn accepts_valid_bodies() {
        thing(json!({"id": "a", "flag": true})).unwrap();
        thing(
            json!({"id": "a", "flag": false, "kind": "2M", "count": 32, "small": -5,
                     "bucket": {"size": 0}, "list": ["x"], "props": {"k": "v"}}),
        )
        .unwrap();
        let spec = Spec::parse(SPEC).unwrap();
        validate(
            &spec,
            &spec.definitions["Free"],
            &json!({"any": {"thing": [1]}}),
        )
        .unwrap();
    }

    #[test]
    fn rejects_each_kind_of_mistake() {
        let cases = [
            (json!({"flag": true}), "missing field `id`"),
            (
                json!({"id": "a", "flag": true, "extra": 1}),
                "unknown field `extra`",
            ),
            (
                json!({"id": 1, "flag": true}),
                "body.id: invalid type: expected string",
            ),
            (json!({"id": "a", "flag": "yes"}), "expected boolean"),
            (json!({"id": "a", "flag": null}), "found null"),
            (
                json!({"id": "a", "flag": true, "kind": "B"}),
                "unknown variant",
            ),
            (
                json!({"id": "a", "flag": true, "count": 0}),
                "below the minimum",
            ),
            (
                json!({"id": "a", "flag": true, "count": 33}),
                "above the maximum",
            ),
            (
                json!({"id": "a", "flag": true, "count": 1.5}),
                "expected integer",
            ),
            (
                json!({"id": "a", "flag": true, "small": 3_000_000_000u64}),
                "out of range",
            ),
            (
                json!({"id": "a", "flag": true, "bucket": {}}),
                "body.bucket: missing field `size`",
            ),
            (
                json!({"id": "a", "flag": true, "bucket": {"size": -1}}),
                "below the minimum",
            ),
            (
                json!({"id": "a", "flag": true, "list": [1]}),
                "body.list[0]",
            ),
            (
                json!({"id": "a", "flag": true, "props": {"k": 1}}),
                "body.props.k",
            ),
            (json!([1]), "expected object"),
        ];
        for (body, want) in cases {
            let err = thing(body.clone()).unwrap_err();
            assert!(err.contains(want), "{body}: {err} does not contain {want}");
        }
    }
}
