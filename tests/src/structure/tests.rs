use super::items::{paths, test_modules};
use super::*;

/// A crate `demo/` under a temp dir, from `(path under src/, text)` pairs.
fn fixture(files: &[(&str, String)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("a temp dir");
    for (path, text) in files {
        let path = root.path().join("demo/src").join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    root
}

fn lines(n: usize) -> String {
    "let _ = 1;\n".repeat(n)
}

fn demo() -> tempfile::TempDir {
    fixture(&[
        (
            "lib.rs",
            "pub mod big;\npub mod body;\npub mod io;\npub mod observe;\npub mod outbound;\n\
             pub mod pool;\npub mod registry;\npub mod small;\npub use io::Conn;\n"
                .into(),
        ),
        // The paths in a comment, a string and a test module are not edges
        // (each would close a circle with body -> io or outbound -> io).
        (
            "io.rs",
            "pub struct Conn; // crate::body::X\nconst S: &str = \"crate::body\";\n\
             #[cfg(test)]\nmod tests {\n    use crate::outbound::http;\n}\n"
                .into(),
        ),
        ("body.rs", "use crate::{observe::Pending, io};\n".into()),
        (
            "observe.rs",
            "pub struct Pending(crate::pool::Checkin);\n".into(),
        ),
        // `crate::Conn` is io's (a re-export); `super::body` is a sibling.
        (
            "pool.rs",
            "use crate::Conn;\npub struct Checkin;\nfn f() { let _ = super::body::X; }\n".into(),
        ),
        (
            "outbound/mod.rs",
            "mod http;\nmod retry;\nuse crate::outbound::http::H;\n".into(),
        ),
        (
            "outbound/http.rs",
            "use super::retry::R;\npub struct H;\n".into(),
        ),
        (
            "outbound/retry.rs",
            "use crate::outbound::http::H;\nuse crate::io::Conn as C;\npub struct R;\n".into(),
        ),
        ("big.rs", lines(MAX_LINES + 1)),
        (
            "small.rs",
            format!(
                "{}#[cfg(test)]\nmod tests {{\n{}}}\n",
                lines(10),
                lines(MAX_LINES)
            ),
        ),
        (
            "registry.rs",
            format!(
                "{}#[cfg(test)]\n#[path = \"registry_tests.rs\"]\nmod tests;\n",
                lines(MAX_LINES - 1)
            ),
        ),
        (
            "registry_tests.rs",
            format!("use crate::big;\nuse crate::outbound;\n{}", lines(900)),
        ),
        ("main.rs", "fn main() { remora_demo::run(); }\n".into()),
    ])
}

#[test]
fn circles_at_each_level_and_long_files_are_found_and_nothing_else() {
    let root = demo();
    let report = check(root.path(), &["demo"]);
    let mut problems = report.problems.clone();
    problems.sort();
    assert_eq!(problems.len(), 3, "{problems:#?}\n{}", report.text);
    assert!(
        problems[0].starts_with("demo/src, in outbound: import circle among {http, retry}:"),
        "{problems:#?}"
    );
    assert!(problems[0].contains("http -> retry  (demo/src/outbound/http.rs:1 super::retry::R)"));
    assert!(problems[0]
        .contains("retry -> http  (demo/src/outbound/retry.rs:1 crate::outbound::http::H)"));
    assert!(
        problems[1].starts_with("demo/src, top level: import circle among {body, observe, pool}:"),
        "{problems:#?}"
    );
    assert!(problems[1].contains("pool -> body  (demo/src/pool.rs:3 super::body::X)"));
    assert!(problems[1].contains("observe -> pool  (demo/src/observe.rs:1 crate::pool::Checkin)"));
    assert_eq!(
        problems[2],
        format!(
            "demo/src/big.rs has {} lines (not counting its tests): keep files under {MAX_LINES}",
            MAX_LINES + 1
        )
    );
}

#[test]
fn the_report_shows_the_layers() {
    let root = demo();
    let text = check(root.path(), &["demo"]).text;
    let want = "\ndemo/src\n  top level:\n    layer 0: big, io, registry, small\n    \
                layer 1: {body observe pool}, outbound\n  in outbound:\n    layer 0: {http retry}\n";
    assert_eq!(text, want);
}

#[test]
fn use_trees_expand_to_every_leaf_with_its_alias() {
    let code = lex::strip(
        "pub(crate) use crate::{a::{self, B as C}, d::*, e};\nuse ::std::fmt;\n\
         fn f() { crate::g::h::<u8>(); $crate::no::edge; x::crate_not; }\n",
    );
    let found: Vec<(String, Option<String>, usize)> = paths(&lex::tokens(&code))
        .into_iter()
        .map(|(p, at)| (p.segments.join("::"), p.exported_as, at))
        .collect();
    let names: Vec<(&str, Option<&str>)> = found
        .iter()
        .map(|(p, e, _)| (p.as_str(), e.as_deref()))
        .collect();
    assert_eq!(
        names,
        [
            ("crate::a::self", Some("a")),
            ("crate::a::B", Some("C")),
            ("crate::d::*", None),
            ("crate::e", Some("e")),
            ("std::fmt", None),
            ("crate::g::h", None),
        ]
    );
}

#[test]
fn test_modules_are_found_whole() {
    let src = "fn a() {}\n#[cfg(test)]\n#[allow(clippy::x)]\npub(crate) mod tests {\n    fn b() { if true { } }\n}\nfn c() {}\n#[cfg(test)]\nfn helper() {}\n";
    let code = lex::strip(src);
    let blocks = test_modules(&lex::tokens(&code));
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].name, "tests");
    assert!(!blocks[0].out_of_line);
    assert_eq!(
        &src[blocks[0].start..blocks[0].end],
        "#[cfg(test)]\n#[allow(clippy::x)]\npub(crate) mod tests {\n    fn b() { if true { } }\n}"
    );
}

#[test]
fn markdown_paths_are_checked_against_the_tree() {
    let root = fixture(&[("lib.rs", String::new())]);
    let md = "Read `demo/src/lib.rs` and `demo/src/gone.rs`, see demo/src/. Not \
              https://example.com/x/y.json, /etc/hosts, remora.dev/v1, target/release/x \
              or bench/results/latest.md; but src/inbound.rs and demo/src/*.rs.";
    let found = named_paths(root.path(), md);
    assert_eq!(
        found,
        [
            ("demo/src/".to_string(), true),
            ("demo/src/*.rs".to_string(), true),
            ("demo/src/gone.rs".to_string(), false),
            ("demo/src/lib.rs".to_string(), true),
            ("src/inbound.rs".to_string(), false),
        ]
    );
}
