//! What [`super`] reads out of a file's tokens: the paths it names and its
//! `#[cfg(test)]` modules.

use super::lex::{Tok, Token};

/// A path named in the code.
#[derive(Debug, Clone)]
pub(super) struct PathRef {
    pub segments: Vec<String>,
    /// In a `use` declaration (so it may start with a child module's name).
    pub in_use: bool,
    /// The name a `pub use` binds (its alias or last segment).
    pub exported_as: Option<String>,
    pub line: usize,
}

/// A `#[cfg(test)] mod name { … }` or `#[cfg(test)] mod name;` item.
#[derive(Debug)]
pub(super) struct TestModule {
    pub name: String,
    /// Byte range from the `#` of `#[cfg(test)]` to the end of the item.
    pub start: usize,
    pub end: usize,
    pub out_of_line: bool,
}

pub(super) fn test_modules(t: &[Token]) -> Vec<TestModule> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let is = |i: usize, s: &str| match t.get(i).map(|x| &x.tok) {
        Some(Tok::Ident(id)) => id == s,
        Some(Tok::Punct(c)) => s.len() == 1 && s.as_bytes()[0] == *c,
        _ => false,
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        if !CFG_TEST.iter().enumerate().all(|(k, s)| is(i + k, s)) {
            i += 1;
            continue;
        }
        let start = t[i].at;
        let mut j = i + CFG_TEST.len();
        // Further attributes, then a visibility.
        while is(j, "#") && is(j + 1, "[") {
            j = after_group(t, j + 1);
        }
        if is(j, "pub") {
            j += 1;
            if is(j, "(") {
                j = after_group(t, j);
            }
        }
        let (true, Some(Tok::Ident(name))) = (is(j, "mod"), t.get(j + 1).map(|x| &x.tok)) else {
            i = j.max(i + 1);
            continue;
        };
        let name = name.clone();
        j += 2;
        let (end, out_of_line) = if is(j, ";") {
            (t[j].at + 1, true)
        } else if is(j, "{") {
            let close = after_group(t, j);
            (t.get(close - 1).map_or(usize::MAX, |x| x.at + 1), false)
        } else {
            i = j;
            continue;
        };
        out.push(TestModule {
            name,
            start,
            end,
            out_of_line,
        });
        i = j.max(i + 1);
        while i < t.len() && t[i].at < end {
            i += 1;
        }
    }
    out
}

/// The index after the bracket that closes the one at `open`.
fn after_group(t: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (k, tok) in t.iter().enumerate().skip(open) {
        match tok.tok {
            Tok::Punct(b'(' | b'[' | b'{') => depth += 1,
            Tok::Punct(b')' | b']' | b'}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    t.len()
}

/// `#[path = "x.rs"]` in an item's text.
pub(super) fn path_attribute(item: &str) -> Option<&str> {
    let at = item.find("#[path")?;
    let rest = &item[at..];
    let open = rest.find('"')? + 1;
    let close = open + rest[open..].find('"')?;
    Some(&rest[open..close])
}

/// Every path the tokens name that may point into the crate: `use` trees
/// (expanded) and inline paths starting `crate::`, `self::` or `super::`;
/// with the offset where each starts.
pub(super) fn paths(t: &[Token]) -> Vec<(PathRef, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let prev_is_path = i > 0 && (t[i - 1].tok == Tok::PathSep || t[i - 1].is_punct(b'$'));
        if t[i].is_ident("use") {
            let public = is_public(t, i);
            let at = t[i].at;
            let mut j = i + 1;
            if t.get(j).is_some_and(|x| x.tok == Tok::PathSep) {
                j += 1;
            }
            let mut leaves = Vec::new();
            use_tree(t, &mut j, Vec::new(), &mut leaves);
            for (segments, alias) in leaves {
                let exported_as = public
                    .then(|| alias.or_else(|| exported_name(&segments)))
                    .flatten();
                let p = PathRef {
                    segments,
                    in_use: true,
                    exported_as,
                    line: 0,
                };
                out.push((p, at));
            }
            i = j.max(i + 1);
        } else if !prev_is_path
            && ["crate", "self", "super"].iter().any(|k| t[i].is_ident(k))
            && t.get(i + 1).is_some_and(|x| x.tok == Tok::PathSep)
        {
            let at = t[i].at;
            let mut j = i;
            let mut leaves = Vec::new();
            use_tree(t, &mut j, Vec::new(), &mut leaves);
            for (segments, _) in leaves {
                let p = PathRef {
                    segments,
                    in_use: false,
                    exported_as: None,
                    line: 0,
                };
                out.push((p, at));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Whether the `use` at `i` is `pub` or `pub(…)`.
fn is_public(t: &[Token], i: usize) -> bool {
    match i.checked_sub(1).map(|k| &t[k]) {
        Some(x) if x.is_ident("pub") => true,
        Some(x) if x.is_punct(b')') => {
            let open = (0..i - 1).rev().find(|&k| t[k].is_punct(b'('));
            open.is_some_and(|k| k > 0 && t[k - 1].is_ident("pub"))
        }
        _ => false,
    }
}

/// The name `pub use a::b::C;` binds (`C`); none for a glob.
fn exported_name(segments: &[String]) -> Option<String> {
    match segments {
        [.., last] if last == "*" => None,
        [.., parent, last] if last == "self" => Some(parent.clone()),
        [.., last] => Some(last.clone()),
        [] => None,
    }
}

/// Reads a use tree (or an inline path) at `t[*i]`, pushing each leaf path
/// with its `as` alias.
fn use_tree(
    t: &[Token],
    i: &mut usize,
    mut prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, Option<String>)>,
) {
    loop {
        let Some(tok) = t.get(*i) else {
            if !prefix.is_empty() {
                out.push((prefix, None));
            }
            return;
        };
        match &tok.tok {
            Tok::Ident(s) => {
                prefix.push(s.clone());
                *i += 1;
                if t.get(*i).is_some_and(|x| x.tok == Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                let mut alias = None;
                if t.get(*i).is_some_and(|x| x.is_ident("as")) {
                    if let Some(Tok::Ident(a)) = t.get(*i + 1).map(|x| &x.tok) {
                        alias = Some(a.clone());
                    }
                    *i += 2;
                }
                out.push((prefix, alias));
                return;
            }
            Tok::Punct(b'{') => {
                *i += 1;
                while let Some(x) = t.get(*i) {
                    if x.is_punct(b'}') {
                        *i += 1;
                        return;
                    }
                    let before = *i;
                    use_tree(t, i, prefix.clone(), out);
                    if t.get(*i).is_some_and(|x| x.is_punct(b',')) || *i == before {
                        *i += 1;
                    }
                }
                return;
            }
            Tok::Punct(b'*') => {
                prefix.push("*".to_string());
                *i += 1;
                out.push((prefix, None));
                return;
            }
            _ => {
                if !prefix.is_empty() {
                    out.push((prefix, None));
                }
                return;
            }
        }
    }
}
