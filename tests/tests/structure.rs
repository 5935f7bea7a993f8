//! The workspace's structure (issue 16), checked by reading the sources:
//! no import circle among a crate's top-level modules or among the children
//! of any folder module, no source file over 600 lines (tests not counted),
//! and a README that names only paths that exist. See
//! `remora_tests::structure` for how the module graph is built.
//!
//! ```text
//! cargo test -p remora-tests --test structure -- --nocapture
//! ```
//!
//! prints each crate's layers (layer 0 names no other module; a `{…}` is a
//! circle) and fails listing every circle, with one example site per edge.

use std::path::{Path, PathBuf};

use remora_tests::structure::{check, named_paths};

/// The crates whose modules must import one way: every library crate of
/// the product.
const CRATES: [&str; 5] = [
    "proto",
    "proxy",
    "proxy/resilience",
    "proxy/telemetry",
    "control-plane",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds tests/")
        .to_path_buf()
}

#[test]
fn modules_import_one_way_and_files_stay_short() {
    let report = check(&workspace(), &CRATES);
    println!("{}", report.text);
    assert!(
        report.problems.is_empty(),
        "{} problem(s):\n\n{}",
        report.problems.len(),
        report.problems.join("\n\n")
    );
}

#[test]
fn the_readme_names_only_paths_that_exist() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let missing: Vec<String> = named_paths(&root, &readme)
        .into_iter()
        .filter(|(_, exists)| !exists)
        .map(|(path, _)| path)
        .collect();
    assert!(
        missing.is_empty(),
        "README.md names paths that are not in the repository (paths are from \
         the repository's root): {missing:?}"
    );
}
