//! For every operation of the API description that takes a body, generated minimal and full
//! bodies pass the validator, while each missing required field, an unknown field and each
//! wrongly typed field are refused — against the built-in description, and also against the
//! Swagger document `$ROOTFORK_FC_SPEC` names when it is set.

use rootfork_fc_double::{description, external_spec_path, validate, Schema, Spec};

fn specs() -> Vec<(String, Spec)> {
    let mut specs = vec![("built-in".to_owned(), description())];
    if let Some(path) = external_spec_path() {
        specs.push((path.display().to_string(), Spec::load(&path).unwrap()));
    }
    specs
}

/// Builds a value satisfying `schema`: every property when `full`, only the required ones
/// otherwise.
fn sample(spec: &Spec, schema: &Schema, full: bool) -> serde_json::Value {
    use serde_json::{json, Value};
    if let Some(r) = &schema.reference {
        return sample(spec, spec.resolve(r).unwrap(), full);
    }
    if let Some(e) = schema.enumeration.as_ref().and_then(|e| e.first()) {
        return serde_json::to_value(e).unwrap();
    }
    match schema.ty.as_deref() {
        Some("string") => json!("x"),
        Some("boolean") => json!(true),
        Some("integer") | Some("number") => json!(schema.minimum.unwrap_or(1.0).max(1.0) as i64),
        Some("array") => Value::Array(
            schema
                .items
                .as_ref()
                .map(|i| vec![sample(spec, i, full)])
                .unwrap_or_default(),
        ),
        _ => {
            let mut map = serde_json::Map::new();
            for (k, p) in &schema.properties {
                if full || schema.required.contains(k) {
                    map.insert(k.clone(), sample(spec, p, full));
                }
            }
            Value::Object(map)
        }
    }
}

#[test]
fn the_validator_accepts_valid_and_rejects_broken_bodies_for_every_operation() {
    for (name, spec) in specs() {
        println!("every operation of the {name} description");
        every_operation(&spec);
    }
}

fn every_operation(spec: &Spec) {
    let mut checked = 0;
    for item in &spec.paths {
        for (method, op) in &item.operations {
            let Some(schema) = op.body().and_then(|b| b.schema.as_ref()) else {
                continue;
            };
            let what = format!("{method} {}", item.template);
            let resolved: &Schema = match &schema.reference {
                Some(r) => spec.resolve(r).unwrap(),
                None => schema,
            };
            for full in [false, true] {
                let body = sample(spec, schema, full);
                validate(spec, schema, &body)
                    .unwrap_or_else(|e| panic!("{what}: valid {body} refused: {e}"));
            }
            let full = sample(spec, schema, true);
            let serde_json::Value::Object(map) = &full else {
                continue;
            };
            for req in &resolved.required {
                let mut broken = map.clone();
                broken.remove(req);
                let e = validate(spec, schema, &broken.into()).unwrap_err();
                assert!(e.contains(&format!("missing field `{req}`")), "{what}: {e}");
            }
            if resolved.additional.is_none() {
                let mut broken = map.clone();
                broken.insert("zz_not_in_the_spec".into(), serde_json::json!(1));
                let e = validate(spec, schema, &broken.into()).unwrap_err();
                assert!(
                    e.contains("unknown field `zz_not_in_the_spec`"),
                    "{what}: {e}"
                );
            }
            for (k, v) in map {
                let wrong = if v.is_string() {
                    serde_json::json!(17)
                } else {
                    serde_json::json!("not the right type")
                };
                let mut broken = map.clone();
                broken.insert(k.clone(), wrong);
                let e = validate(spec, schema, &broken.into()).unwrap_err();
                assert!(e.contains(&format!("body.{k}")), "{what}: {e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} operations with bodies found");
}
