//! The workspace's structure, checked (issue 16): imports that run one way
//! and files of a readable size.
//!
//! [`check`] reads each crate's `src/` and builds its module graph from the
//! paths in the code: `use` trees (`use crate::{a::B, c}`), inline paths
//! (`crate::a::f()`, `super::b::C`), each resolved to the deepest module that
//! exists as a file or folder, through `pub use` re-exports (so `crate::Name`
//! counts as an edge to the module that defines `Name`). Edges between a
//! module and its own ancestors or descendants are not counted. Test code
//! (files named `tests.rs`, files under a `tests/` folder, files and inline
//! modules declared `#[cfg(test)] mod …`) is not part of the graph.
//!
//! It then asks, at the crate's top level and, within every folder module,
//! among that folder's direct children, for the strongly connected
//! components: any with more than one module is an import circle, a problem.
//! Every non-test source file over [`MAX_LINES`] lines (`#[cfg(test)]`
//! modules in it not counted) is one too. The report prints the layers
//! either way, so the check also shows the structure.

mod graph;
mod items;
mod lex;
mod readme;

pub use graph::Graph;
pub use readme::named_paths;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use items::{path_attribute, paths, test_modules, PathRef};
use lex::Token;

/// A source file longer than this, test modules not counted, is a problem.
pub const MAX_LINES: usize = 600;

/// What [`check`] found: the report (layers, sizes) and the problems in it.
#[derive(Debug, Default)]
pub struct Report {
    pub text: String,
    pub problems: Vec<String>,
}

/// Checks each crate (a directory holding `src/`, relative to `root`).
pub fn check(root: &Path, crates: &[&str]) -> Report {
    let mut report = Report::default();
    for dir in crates {
        let krate = Crate::read(root, Path::new(dir));
        krate.check(&mut report);
    }
    report
}

type ModPath = Vec<String>;

fn display(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

/// One `.rs` file of a crate's `src/`.
#[derive(Debug)]
struct Source {
    /// Relative to the workspace root.
    file: PathBuf,
    /// Its module; `None` for `main.rs`, the root of a crate of its own.
    module: Option<ModPath>,
    /// Lines, not counting `#[cfg(test)]` modules.
    lines: usize,
    test_only: bool,
    paths: Vec<PathRef>,
    /// Files this one declares as `#[cfg(test)] mod …;`.
    test_files: Vec<PathBuf>,
}

struct Crate {
    dir: PathBuf,
    sources: Vec<Source>,
    modules: BTreeSet<ModPath>,
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
}

impl Crate {
    fn read(root: &Path, dir: &Path) -> Crate {
        let src = root.join(dir).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        let mut sources: Vec<Source> = files
            .iter()
            .map(|f| {
                let rel = f.strip_prefix(&src).expect("under src");
                let text = std::fs::read_to_string(f)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
                Source::read(&dir.join("src").join(rel), rel, &text)
            })
            .collect();
        let test_files: BTreeSet<PathBuf> = sources
            .iter()
            .flat_map(|s| s.test_files.iter().cloned())
            .collect();
        for s in &mut sources {
            s.test_only |= test_files.contains(&s.file);
        }
        let modules: BTreeSet<ModPath> = sources
            .iter()
            .filter(|s| !s.test_only)
            .filter_map(|s| s.module.clone())
            .collect();
        let mut krate = Crate {
            dir: dir.to_path_buf(),
            sources,
            modules,
            reexports: BTreeMap::new(),
        };
        let mut reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>> = BTreeMap::new();
        for s in krate.sources.iter().filter(|s| !s.test_only) {
            let Some(module) = &s.module else { continue };
            for p in &s.paths {
                let (Some(name), Some(target)) = (&p.exported_as, krate.absolute(module, p)) else {
                    continue;
                };
                reexports
                    .entry(module.clone())
                    .or_default()
                    .insert(name.clone(), target);
            }
        }
        krate.reexports = reexports;
        krate
    }

    /// `p` as a path from the crate root; `None` for another crate's.
    fn absolute(&self, module: &[String], p: &PathRef) -> Option<ModPath> {
        let segs = &p.segments;
        let first = segs.first()?;
        match first.as_str() {
            "crate" => Some(segs[1..].to_vec()),
            "self" => Some([module, &segs[1..]].concat()),
            "super" => {
                let supers = segs.iter().take_while(|s| *s == "super").count();
                let base = &module[..module.len().saturating_sub(supers)];
                Some([base, &segs[supers..]].concat())
            }
            _ if p.in_use => {
                let child: ModPath = [module, &segs[..1]].concat();
                self.modules
                    .contains(&child)
                    .then(|| [module, &segs[..]].concat())
            }
            _ => None,
        }
    }

    /// The deepest module `path` names, through `pub use` re-exports.
    fn resolve(&self, path: &[String]) -> ModPath {
        let mut path = path.to_vec();
        // Bounded: re-exports could name each other in a circle.
        for _ in 0..16 {
            let module = self.deepest_module(&path);
            let reexported = path
                .get(module.len())
                .and_then(|name| self.reexports.get(module)?.get(name));
            match reexported {
                Some(target) if !target.starts_with(&path) => {
                    path = [target, &path[module.len() + 1..]].concat();
                }
                _ => break,
            }
        }
        self.deepest_module(&path).to_vec()
    }

    /// The longest start of `path` that is a module (the root at least).
    fn deepest_module<'p>(&self, path: &'p [String]) -> &'p [String] {
        let depth = (1..=path.len())
            .rev()
            .find(|&k| self.modules.contains(&path[..k]))
            .unwrap_or(0);
        &path[..depth]
    }

    fn check(&self, report: &mut Report) {
        let name = self.dir.display();
        let _ = writeln!(report.text, "\n{name}/src");
        for s in self.sources.iter().filter(|s| !s.test_only) {
            if s.lines > MAX_LINES {
                report.problems.push(format!(
                    "{} has {} lines (not counting its tests): keep files under {MAX_LINES}",
                    s.file.display(),
                    s.lines
                ));
            }
        }
        // Module-level edges, with where each comes from.
        let mut edges: Vec<(ModPath, ModPath, String)> = Vec::new();
        for s in self.sources.iter().filter(|s| !s.test_only) {
            let Some(from) = &s.module else { continue };
            for p in &s.paths {
                let Some(abs) = self.absolute(from, p) else {
                    continue;
                };
                let to = self.resolve(&abs);
                if to.starts_with(from) || from.starts_with(&to) {
                    continue;
                }
                let site = format!("{}:{} {}", s.file.display(), p.line, p.segments.join("::"));
                edges.push((from.clone(), to, site));
            }
        }
        // The crate's top level, then each folder module's children.
        let folders: BTreeSet<ModPath> = self
            .modules
            .iter()
            .filter(|m| !m.is_empty())
            .filter(|m| {
                self.modules
                    .iter()
                    .any(|c| c.len() > m.len() && c.starts_with(m))
            })
            .cloned()
            .collect();
        for parent in std::iter::once(Vec::new()).chain(folders) {
            let mut g = Graph::default();
            for m in self.modules.iter().filter(|m| m.len() == parent.len() + 1) {
                if m.starts_with(&parent) {
                    g.add_node(&m[parent.len()]);
                }
            }
            for (from, to, site) in &edges {
                let (Some(a), Some(b)) = (child_of(&parent, from), child_of(&parent, to)) else {
                    continue;
                };
                if a != b {
                    g.add_edge(a, b, || site.clone());
                }
            }
            let level = if parent.is_empty() {
                "top level".to_string()
            } else {
                format!("in {}", display(&parent))
            };
            let _ = writeln!(report.text, "  {level}:");
            for (i, layer) in g.layers().iter().enumerate() {
                let names: Vec<String> = layer
                    .iter()
                    .map(|c| match c.as_slice() {
                        [one] => one.clone(),
                        many => format!("{{{}}}", many.join(" ")),
                    })
                    .collect();
                let _ = writeln!(report.text, "    layer {i}: {}", names.join(", "));
            }
            for cycle in g.cycles() {
                let mut problem = format!(
                    "{name}/src, {level}: import circle among {{{}}}:",
                    cycle.join(", ")
                );
                for a in &cycle {
                    for b in &cycle {
                        if let Some(site) = g.site(a, b) {
                            let _ = write!(problem, "\n    {a} -> {b}  ({site})");
                        }
                    }
                }
                report.problems.push(problem);
            }
        }
    }
}

/// The child of `parent` that `module` is or lies under.
fn child_of<'m>(parent: &[String], module: &'m [String]) -> Option<&'m String> {
    if module.len() > parent.len() && module.starts_with(parent) {
        module.get(parent.len())
    } else {
        None
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

impl Source {
    /// `file` (from the workspace root) is `rel` in its crate's `src/`.
    fn read(file: &Path, rel: &Path, text: &str) -> Source {
        let mut dirs: Vec<String> = rel
            .parent()
            .into_iter()
            .flat_map(Path::components)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let stem = rel
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_name = rel.file_name().map(|s| s.to_string_lossy().into_owned());
        let test_only =
            file_name.as_deref() == Some("tests.rs") || dirs.iter().any(|d| d == "tests");
        let top = dirs.is_empty();
        let module = match stem.as_str() {
            "main" if top => None,
            "lib" if top => Some(Vec::new()),
            "mod" => Some(dirs.clone()),
            _ => {
                dirs.push(stem.clone());
                Some(dirs)
            }
        };
        // Where this file's `mod x;` children live.
        let dir = file.parent().unwrap_or(Path::new(""));
        let children = if matches!(stem.as_str(), "lib" | "main" | "mod") {
            dir.to_path_buf()
        } else {
            dir.join(&stem)
        };

        let code = lex::strip(text);
        let tokens = lex::tokens(&code);
        let blocks = test_modules(&tokens);
        let line_of = |at: usize| code[..at].matches('\n').count() + 1;
        let mut test_lines = 0;
        let mut test_files = Vec::new();
        for b in &blocks {
            test_lines += line_of(b.end) - line_of(b.start) + 1;
            if b.out_of_line {
                match path_attribute(&text[b.start..b.end]) {
                    Some(p) => test_files.push(dir.join(p)),
                    None => {
                        test_files.push(children.join(format!("{}.rs", b.name)));
                        test_files.push(children.join(&b.name).join("mod.rs"));
                    }
                }
            }
        }
        let outside: Vec<Token> = tokens
            .into_iter()
            .filter(|t| !blocks.iter().any(|b| (b.start..b.end).contains(&t.at)))
            .collect();
        let paths = paths(&outside)
            .into_iter()
            .map(|(mut p, at)| {
                p.line = line_of(at);
                p
            })
            .collect();
        Source {
            file: file.to_path_buf(),
            module,
            lines: text.lines().count().saturating_sub(test_lines),
            test_only,
            paths,
            test_files,
        }
    }
}

#[cfg(test)]
mod tests;
