//! Reading policy documents: multi-document YAML (or JSON) into a
//! `serde_json::Value` with duplicate keys and deep nesting refused, then into
//! the typed [`Spec`] of its kind, with errors that name the field.
//! [`Document::from_parts`] reads one back from the parts the store and
//! the snapshot carry.

use super::flow_depth;
use super::model::{Document, Kind, Metadata, Spec, API_VERSION};
use super::validate::validate;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

impl Document {
    /// Rebuilds a document from a kind, its metadata and its spec as JSON (the
    /// form the store and the snapshot carry), validating it again.
    pub fn from_parts(
        kind: Kind,
        namespace: &str,
        name: &str,
        spec_json: &str,
    ) -> Result<Document, String> {
        let spec: serde_json::Value =
            serde_json::from_str(spec_json).map_err(|e| format!("spec: {e}"))?;
        let metadata = Metadata {
            name: name.to_string(),
            namespace: namespace.to_string(),
            labels: BTreeMap::new(),
        };
        let doc = Document {
            spec: parse_spec(kind, spec)?,
            metadata,
        };
        validate(&doc)?;
        Ok(doc)
    }
}

/// Why a document was refused: where it is and which field is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: document {document}{what}: {field}: {message}")]
pub struct ValidationError {
    pub file: String,
    /// 1-based index of the document within its file.
    pub document: usize,
    /// " (Kind namespace/name)" when known.
    pub what: String,
    pub field: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_json::Value>,
    spec: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// How deep a policy document may nest mappings and sequences (flow or
/// block). Real documents need fewer than ten levels; the limit keeps the
/// YAML scanner, whose cost grows with the square of the flow nesting, in
/// linear time.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Parses every document of one YAML file. The first invalid document fails the
/// whole file. A key given twice in one mapping is refused (YAML forbids it),
/// and so is nesting deeper than [`MAX_NESTING_DEPTH`]; both errors name the
/// field and the limit.
///
/// CPU-bound (a megabyte takes tens of milliseconds): async callers should run
/// it on a blocking thread.
pub fn parse_documents(file: &str, content: &str) -> Result<Vec<Document>, ValidationError> {
    if let Err(at) = flow_depth::check(content, MAX_NESTING_DEPTH) {
        return Err(ValidationError {
            file: file.to_string(),
            document: document_at_line(content, at.line),
            what: String::new(),
            field: "(yaml)".into(),
            message: format!(
                "flow collections ([...] and {{...}}) nested more than {MAX_NESTING_DEPTH} deep \
                 at line {} column {} (the nesting limit is {MAX_NESTING_DEPTH})",
                at.line, at.column
            ),
        });
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(content).enumerate() {
        let index = i + 1;
        let err = |what: &str, field: &str, message: String| ValidationError {
            file: file.to_string(),
            document: index,
            what: what.to_string(),
            field: field.to_string(),
            message,
        };
        let path = std::cell::RefCell::new(Vec::new());
        let problem = std::cell::RefCell::new(None);
        let seed = JsonSeed {
            depth: 0,
            path: &path,
            problem: &problem,
        };
        let value: serde_json::Value = match serde::de::DeserializeSeed::deserialize(seed, de) {
            Ok(v) => v,
            Err(e) => {
                // The position the YAML library gives is where the
                // collection being read starts.
                let at = e
                    .location()
                    .map(|l| {
                        format!(
                            " (in the collection at line {} column {})",
                            l.line(),
                            l.column()
                        )
                    })
                    .unwrap_or_default();
                let field = render_path(&path.borrow());
                return Err(match problem.take() {
                    Some(message) => err("", &field, format!("{message}{at}")),
                    None if e.to_string().starts_with("recursion limit exceeded") => err(
                        "",
                        &field,
                        format!(
                            "nested more than {MAX_NESTING_DEPTH} deep{at} (the nesting limit \
                             is {MAX_NESTING_DEPTH})"
                        ),
                    ),
                    None => err("", "(yaml)", e.to_string()),
                });
            }
        };
        if value.is_null() {
            continue; // an empty document, such as after a trailing `---`
        }
        let raw: RawDocument = serde_json::from_value(value)
            .map_err(|e| err("", "(document)", format!("not a mapping: {e}")))?;
        if let Some(extra) = raw.rest.keys().next() {
            return Err(err("", extra, "unknown top-level field".into()));
        }
        match raw.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(err(
                    "",
                    "apiVersion",
                    format!("expected {API_VERSION}, got {other}"),
                ))
            }
            None => return Err(err("", "apiVersion", "missing".into())),
        }
        let kind_s = raw.kind.ok_or_else(|| err("", "kind", "missing".into()))?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind_s)
            .ok_or_else(|| {
                err(
                    "",
                    "kind",
                    format!(
                        "unknown kind {kind_s:?} (one of {})",
                        Kind::ALL.map(|k| k.as_str()).join(", ")
                    ),
                )
            })?;
        let metadata: Metadata = match raw.metadata {
            None => return Err(err("", "metadata", "missing".into())),
            Some(m) => serde_path_to_error::deserialize(m)
                .map_err(|e| err("", &format!("metadata.{}", e.path()), e.inner().to_string()))?,
        };
        let what = format!(" ({kind} {}/{})", metadata.namespace, metadata.name);
        let spec = raw
            .spec
            .ok_or_else(|| err(&what, "spec", "missing".into()))?;
        let spec = parse_spec(kind, spec).map_err(|m| split_field(&what, m, &err))?;
        let doc = Document { metadata, spec };
        validate(&doc).map_err(|m| split_field(&what, m, &err))?;
        docs.push(doc);
    }
    Ok(docs)
}

/// The 1-based index of the document that holds 1-based `line`: one more than
/// the `---` lines before it that separate documents (a `---` on the first
/// content line only starts the first one).
fn document_at_line(content: &str, line: usize) -> usize {
    let mut document = 1;
    let mut content_seen = false;
    for text in content.lines().take(line.saturating_sub(1)) {
        let marker = text == "---" || text.starts_with("--- ") || text.starts_with("---\t");
        if marker && content_seen {
            document += 1;
        }
        if !marker && !text.trim().is_empty() && !text.trim_start().starts_with('#') {
            content_seen = true;
        }
    }
    document
}

/// One step of the path to a value: a mapping key or a sequence index.
enum Step {
    Key(String),
    Index(usize),
}

/// `spec.rules[1].backends`, as field names are shown elsewhere.
fn render_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        "(document)".into()
    } else {
        out
    }
}

/// Builds a `serde_json::Value` from YAML as `serde_json::Value::deserialize`
/// does, but refuses a key given twice in one mapping (where that would keep
/// the last value silently) and nesting deeper than [`MAX_NESTING_DEPTH`].
/// `path` follows the value being built, so after an error it names where;
/// `problem` holds the error's own message (the YAML library adds its path
/// and position to whatever a visitor reports).
struct JsonSeed<'a> {
    depth: usize,
    path: &'a std::cell::RefCell<Vec<Step>>,
    problem: &'a std::cell::RefCell<Option<String>>,
}

impl JsonSeed<'_> {
    fn nested(&self) -> Self {
        JsonSeed {
            depth: self.depth + 1,
            path: self.path,
            problem: self.problem,
        }
    }

    fn enter<E: serde::de::Error>(&self) -> Result<(), E> {
        if self.depth >= MAX_NESTING_DEPTH {
            let message =
                format!("nested more than {MAX_NESTING_DEPTH} deep (the nesting limit is {MAX_NESTING_DEPTH})");
            *self.problem.borrow_mut() = Some(message.clone());
            return Err(E::custom(message));
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonSeed<'_> {
    type Value = serde_json::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonSeed<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v)
            .map_or(serde_json::Value::Null, serde_json::Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.enter()?;
        let mut out = Vec::new();
        loop {
            self.path.borrow_mut().push(Step::Index(out.len()));
            match seq.next_element_seed(self.nested())? {
                Some(v) => out.push(v),
                None => {
                    self.path.borrow_mut().pop();
                    return Ok(serde_json::Value::Array(out));
                }
            }
            self.path.borrow_mut().pop();
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.enter()?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let duplicate = out.contains_key(&key);
            self.path.borrow_mut().push(Step::Key(key.clone()));
            if duplicate {
                let message = format!(
                    "duplicate key {key:?}: it is given more than once in the same mapping"
                );
                *self.problem.borrow_mut() = Some(message.clone());
                return Err(serde::de::Error::custom(message));
            }
            let value = map.next_value_seed(self.nested())?;
            self.path.borrow_mut().pop();
            out.insert(key, value);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// Messages from `parse_spec`/`validate` are "field: message".
fn split_field(
    what: &str,
    m: String,
    err: &dyn Fn(&str, &str, String) -> ValidationError,
) -> ValidationError {
    match m.split_once(": ") {
        Some((field, msg)) => err(what, field, msg.to_string()),
        None => err(what, "spec", m),
    }
}

pub(super) fn parse_spec(kind: Kind, spec: serde_json::Value) -> Result<Spec, String> {
    fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            };
            format!("{field}: {}", e.inner())
        })
    }
    Ok(match kind {
        Kind::Service => Spec::Service(de(spec)?),
        Kind::HttpRoute => Spec::HttpRoute(de(spec)?),
        Kind::DestinationPolicy => Spec::DestinationPolicy(de(spec)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(de(spec)?),
        Kind::RequestAuthentication => Spec::RequestAuthentication(de(spec)?),
        Kind::TelemetryPolicy => Spec::TelemetryPolicy(de(spec)?),
    })
}
