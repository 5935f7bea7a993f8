//! What a change does to the policy state: the new state, one result line per
//! document ("HTTPRoute/shop/backend configured"), the history summary, and the
//! YAML rendering and unified diff of versions. Pure functions, no I/O.

use crate::human;
use crate::policy::store::State;
use remora_proto::policy::{Document, ResourceKey};
use std::collections::BTreeMap;

/// The most changes a history summary names before it says "and N more".
const SUMMARY_MAX_ITEMS: usize = 10;

/// The outcome of planning a change against the current state.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The state after the change.
    pub state: State,
    /// One line per document touched: "<Kind>/<namespace>/<name> <verb>".
    pub results: Vec<String>,
    /// The changed documents only, for the history.
    pub summary: String,
    /// false when the new state equals the current one.
    pub changed: bool,
}

/// A document's fate in a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Created => "created",
            Verb::Configured => "configured",
            Verb::Unchanged => "unchanged",
            Verb::Deleted => "deleted",
        }
    }
}

fn plan(state: State, changes: Vec<(ResourceKey, Verb)>) -> Plan {
    let results = changes
        .iter()
        .map(|(key, verb)| format!("{key} {}", verb.as_str()))
        .collect();
    let changed: Vec<String> = changes
        .iter()
        .filter(|(_, verb)| *verb != Verb::Unchanged)
        .map(|(key, verb)| format!("{key} {}", verb.as_str()))
        .collect();
    Plan {
        state,
        results,
        summary: summarize(&changed),
        changed: !changed.is_empty(),
    }
}

fn summarize(items: &[String]) -> String {
    if items.len() <= SUMMARY_MAX_ITEMS {
        return items.join(", ");
    }
    format!(
        "{}, and {} more",
        items[..SUMMARY_MAX_ITEMS].join(", "),
        items.len() - SUMMARY_MAX_ITEMS
    )
}

/// Two documents of one apply name the same resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} is defined twice: in {first} and in {second}")]
pub struct DuplicateDocument {
    pub key: ResourceKey,
    pub first: String,
    pub second: String,
}

/// Upserts `docs` (each with the name of the file it came from) into `current`.
pub fn plan_apply(current: &State, docs: &[(String, Document)]) -> Result<Plan, DuplicateDocument> {
    let mut seen: BTreeMap<ResourceKey, &str> = BTreeMap::new();
    let mut state = current.clone();
    let mut changes = Vec::with_capacity(docs.len());
    for (file, doc) in docs {
        let key = doc.key();
        if let Some(first) = seen.insert(key.clone(), file) {
            return Err(DuplicateDocument {
                key,
                first: first.to_string(),
                second: file.clone(),
            });
        }
        let value = doc.to_value();
        let verb = match current.get(&key) {
            None => Verb::Created,
            Some(old) if *old == value => Verb::Unchanged,
            Some(_) => Verb::Configured,
        };
        state.insert(key.clone(), value);
        changes.push((key, verb));
    }
    Ok(plan(state, changes))
}

/// Removes `key`; `None` when it is not in force.
pub fn plan_delete(current: &State, key: &ResourceKey) -> Option<Plan> {
    let mut state = current.clone();
    state.remove(key)?;
    Some(plan(state, vec![(key.clone(), Verb::Deleted)]))
}

/// Restores `target` as the state in force.
pub fn plan_restore(current: &State, target: &State) -> Plan {
    let mut changes = Vec::new();
    for (key, value) in target {
        match current.get(key) {
            None => changes.push((key.clone(), Verb::Created)),
            Some(old) if old != value => changes.push((key.clone(), Verb::Configured)),
            Some(_) => {}
        }
    }
    for key in current.keys() {
        if !target.contains_key(key) {
            changes.push((key.clone(), Verb::Deleted));
        }
    }
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    plan(target.clone(), changes)
}

/// A unified diff of two versions' YAML renderings; empty when they are equal.
pub fn unified_diff(from_version: u64, from: &State, to_version: u64, to: &State) -> String {
    // Every document of each state as YAML, sorted by key.
    let old = human::yaml(from.values());
    let new = human::yaml(to.values());
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("version {from_version}"),
            &format!("version {to_version}"),
        )
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::policy::parse_documents;

    fn docs(yaml: &str) -> Vec<(String, Document)> {
        parse_documents("f.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|d| ("f.yaml".to_string(), d))
            .collect()
    }

    fn svc(name: &str, port: u16) -> String {
        format!("apiVersion: remora.dev/v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{port: {port}, protocol: http}}]}}\n")
    }

    #[test]
    fn apply_reports_created_configured_and_unchanged() {
        let first = plan_apply(&State::new(), &docs(&svc("a", 1))).unwrap();
        assert_eq!(first.results, vec!["Service/shop/a created"]);
        assert!(first.changed);

        let yaml = format!("{}---\n{}", svc("a", 2), svc("b", 1));
        let second = plan_apply(&first.state, &docs(&yaml)).unwrap();
        assert_eq!(
            second.results,
            vec!["Service/shop/a configured", "Service/shop/b created"]
        );
        assert_eq!(
            second.summary,
            "Service/shop/a configured, Service/shop/b created"
        );

        let third = plan_apply(&second.state, &docs(&svc("b", 1))).unwrap();
        assert_eq!(third.results, vec!["Service/shop/b unchanged"]);
        assert!(!third.changed);
        assert_eq!(third.state, second.state);
    }

    #[test]
    fn apply_refuses_the_same_resource_twice() {
        let yaml = format!("{}---\n{}", svc("a", 1), svc("a", 2));
        let err = plan_apply(&State::new(), &docs(&yaml)).unwrap_err();
        assert_eq!(err.key.to_string(), "Service/shop/a");
    }

    #[test]
    fn delete_and_restore() {
        let yaml = format!("{}---\n{}", svc("a", 1), svc("b", 1));
        let full = plan_apply(&State::new(), &docs(&yaml)).unwrap().state;
        let key = docs(&svc("a", 1))[0].1.key();
        let deleted = plan_delete(&full, &key).unwrap();
        assert_eq!(deleted.results, vec!["Service/shop/a deleted"]);
        assert!(plan_delete(&deleted.state, &key).is_none());

        let restored = plan_restore(&deleted.state, &full);
        assert_eq!(restored.state, full);
        assert_eq!(restored.summary, "Service/shop/a created");
        assert!(!plan_restore(&full, &full).changed);
    }

    #[test]
    fn summaries_are_bounded() {
        let items: Vec<String> = (0..15).map(|i| i.to_string()).collect();
        assert!(summarize(&items).ends_with("9, and 5 more"));
    }

    #[test]
    fn diff_shows_changed_lines() {
        let a = plan_apply(&State::new(), &docs(&svc("a", 1)))
            .unwrap()
            .state;
        let b = plan_apply(&a, &docs(&svc("a", 2))).unwrap().state;
        let diff = unified_diff(1, &a, 2, &b);
        assert!(diff.contains("--- version 1"), "{diff}");
        assert!(diff.contains("+++ version 2"), "{diff}");
        assert!(diff.contains("-  - port: 1"), "{diff}");
        assert!(diff.contains("+  - port: 2"), "{diff}");
        assert_eq!(unified_diff(1, &a, 1, &a), "");
    }
}
