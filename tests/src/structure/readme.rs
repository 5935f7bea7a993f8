//! The paths a Markdown file names, checked against the tree.

use std::collections::BTreeSet;
use std::path::Path;

/// Every path to a file or folder of the repository that `markdown` names,
/// and whether it exists under `root`: words with a `/` that start with one
/// of the repository's top-level entries or with `src/`, or that end in a
/// source or document extension. URLs, absolute paths and outputs that
/// scripts write (`target/`, `bench/results/`) are left out.
pub fn named_paths(root: &Path, markdown: &str) -> Vec<(String, bool)> {
    const EXTENSIONS: [&str; 10] = [
        ".rs", ".sh", ".toml", ".md", ".yaml", ".yml", ".py", ".json", ".proto", ".lock",
    ];
    const GENERATED: [&str; 2] = ["target/", "bench/results/"];
    let top: BTreeSet<String> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let word_char = |c: char| c.is_ascii_alphanumeric() || "_./*-".contains(c);
    for word in markdown.split(|c: char| !word_char(c)) {
        let word = word.trim_end_matches('.');
        if !word.contains('/') || word.starts_with('/') || word.contains("//") {
            continue;
        }
        let path = word.trim_start_matches("./");
        let first = path.split('/').next().unwrap_or_default();
        let named =
            top.contains(first) || first == "src" || EXTENSIONS.iter().any(|e| path.ends_with(e));
        if named && !GENERATED.iter().any(|g| path.starts_with(g)) {
            seen.insert(path.to_string());
        }
    }
    seen.into_iter()
        .map(|p| {
            let exists = if p.contains('*') {
                glob_exists(root, &p)
            } else {
                root.join(&p).exists()
            };
            (p, exists)
        })
        .collect()
}

/// Whether `pattern` (with `*` in its last part only) matches a file.
fn glob_exists(root: &Path, pattern: &str) -> bool {
    let (dir, last) = pattern.rsplit_once('/').unwrap_or(("", pattern));
    let (before, after) = last.split_once('*').unwrap_or((last, ""));
    std::fs::read_dir(root.join(dir)).is_ok_and(|d| {
        d.filter_map(Result::ok).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(before) && name.ends_with(after.trim_start_matches('*'))
        })
    })
}
