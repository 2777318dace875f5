//! A structural check of a JSON value against a CRD's OpenAPI v3 schema:
//! types, required fields, enums, numeric bounds, string lengths, unknown fields (which the
//! apiserver would silently prune, so they are almost always a typo), maps
//! and arrays. It exists so that sample resources and the objects the
//! operator writes can be checked against the generated CRD schema in plain
//! unit tests, without an apiserver. CEL rules are not evaluated here.

use serde_json::Value;

/// Every way `value` breaks `schema`, as `path: problem` lines; empty when
/// it conforms. At the root, `apiVersion`, `kind` and `metadata` are allowed
/// even though the CRD schema does not list them.
pub fn validate(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, value, "", true, &mut errors);
    errors
}

fn check(schema: &Value, value: &Value, path: &str, root: bool, errors: &mut Vec<String>) {
    let here = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errors.push(format!("{here}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{here}: must be an integer or a string"));
        }
        return;
    }
    if let Some(any) = schema["anyOf"].as_array() {
        let ok = any.iter().any(|branch| {
            let mut e = Vec::new();
            check(branch, value, path, root, &mut e);
            e.is_empty()
        });
        if !ok {
            errors.push(format!("{here}: matches none of the allowed forms"));
        }
    }
    if let Some(ty) = schema["type"].as_str() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{here}: must be of type {ty}, found {value}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(format!(
            "{here}: {value} is not one of {}",
            names.join(", ")
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema["minimum"].as_f64()
            && n < min
        {
            errors.push(format!("{here}: {n} is below the minimum {min}"));
        }
        if let Some(max) = schema["maximum"].as_f64()
            && n > max
        {
            errors.push(format!("{here}: {n} is above the maximum {max}"));
        }
    }
    if let Some(text) = value.as_str() {
        // The API server counts characters, not bytes.
        let len = text.chars().count() as u64;
        if let Some(min) = schema["minLength"].as_u64()
            && len < min
        {
            errors.push(format!("{here}: shorter than {min} characters"));
        }
        if let Some(max) = schema["maxLength"].as_u64()
            && len > max
        {
            errors.push(format!("{here}: longer than {max} characters"));
        }
    }
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
            if let Some(required) = schema["required"].as_array() {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(format!("{}: required field is missing", join(path, r)));
                    }
                }
            }
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, v) in map {
                let p = join(path, key);
                if let Some(s) = properties.and_then(|props| props.get(key)) {
                    check(s, v, &p, false, errors);
                } else if let Some(s) = additional {
                    check(s, v, &p, false, errors);
                } else if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                } else if !preserve {
                    errors.push(format!("{p}: unknown field"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(item_schema, v, &format!("{path}[{i}]"), false, errors);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_each_kind_of_problem_with_its_path() {
        let schema = json!({
            "type": "object",
            "required": ["a"],
            "properties": {
                "a": {"type": "integer", "minimum": 1.0},
                "b": {"type": "string", "enum": ["X", "Y"]},
                "m": {"type": "object", "additionalProperties": {"type": "string"}},
                "l": {"type": "array", "items": {"type": "boolean"}},
                "o": {"type": "string", "nullable": true},
                "s": {"type": "string", "minLength": 2, "maxLength": 3}
            }
        });
        assert!(validate(&schema, &json!({"a": 2, "b": "X", "o": null})).is_empty());
        let errors = validate(
            &schema,
            &json!({"b": "Z", "m": {"k": 1}, "l": [true, 3], "zz": 1, "kind": "K"}),
        );
        assert_eq!(
            errors,
            [
                "a: required field is missing",
                "b: \"Z\" is not one of \"X\", \"Y\"",
                "l[1]: must be of type boolean, found 3",
                "m.k: must be of type string, found 1",
                "zz: unknown field",
            ]
        );
        assert_eq!(
            validate(&schema, &json!({"a": 0})),
            ["a: 0 is below the minimum 1"]
        );
        assert!(validate(&schema, &json!({"a": 1, "s": "éé"})).is_empty());
        assert_eq!(
            validate(&schema, &json!({"a": 1, "s": "x"})),
            ["s: shorter than 2 characters"]
        );
        assert_eq!(
            validate(&schema, &json!({"a": 1, "s": "wxyz"})),
            ["s: longer than 3 characters"]
        );
    }
}
