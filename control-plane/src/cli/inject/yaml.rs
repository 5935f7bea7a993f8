//! Small helpers for building and reading YAML values.

use serde_yaml_ng::{Mapping, Value};

pub(super) fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

pub(super) fn seq(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|i| s(i)).collect())
}

/// A mapping with its keys in the order given.
pub(super) fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::with_capacity(N);
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

pub(super) fn str_field<'a>(m: &'a Mapping, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

/// The string (or scalar) entries of a labels or annotations mapping.
pub(super) fn string_map(v: Option<&Value>) -> Vec<(String, String)> {
    let Some(m) = v.and_then(Value::as_mapping) else {
        return Vec::new();
    };
    m.iter()
        .filter_map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((k.as_str()?.to_owned(), v))
        })
        .collect()
}

pub(super) fn lookup<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// " (Kind namespace/name)", or what of it is known.
pub(super) fn describe(kind: &str, obj: &Mapping) -> String {
    let meta = obj.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    match (ns, name) {
        (Some(ns), Some(name)) => format!(" ({kind} {ns}/{name})"),
        (None, Some(name)) => format!(" ({kind} {name})"),
        _ => format!(" ({kind})"),
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
