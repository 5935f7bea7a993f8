//! Rust source read just far enough to find module paths: comments and the
//! insides of literals blanked ([`strip`]), then [`tokens`].

/// `src` with every comment and the inside of every string and character
/// literal replaced by spaces, byte for byte and newlines kept, so offsets and
/// line numbers still match `src`.
pub fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = block_comment_end(b, i);
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let end = string_end(b, i + 1);
                blank(&mut out, i + 1, end.saturating_sub(1).max(i + 1));
                i = end;
            }
            b'\'' => match char_literal_end(b, i) {
                Some(end) => {
                    blank(&mut out, i + 1, end - 1);
                    i = end;
                }
                // A lifetime or a label.
                None => i += 1,
            },
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident_continue(b[i]) {
                    i += 1;
                }
                // Raw strings: r"…", r#"…"#, br…, cr…  (`b"…"`, `b'…'` and
                // `c"…"` are read as strings and characters next time round.)
                if matches!(&b[start..i], b"r" | b"br" | b"cr") {
                    if let Some((content, close, end)) = raw_string(b, i) {
                        blank(&mut out, content, close);
                        i = end;
                    }
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("only whole literals and comments were blanked")
}

fn blank(out: &mut [u8], from: usize, to: usize) {
    let to = to.min(out.len());
    for c in &mut out[from..to] {
        if *c != b'\n' {
            *c = b' ';
        }
    }
}

fn block_comment_end(b: &[u8], start: usize) -> usize {
    let (mut depth, mut j) = (0usize, start);
    while j < b.len() {
        if b[j..].starts_with(b"/*") {
            depth += 1;
            j += 2;
        } else if b[j..].starts_with(b"*/") {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// The index after the `"` that closes a string whose contents start at `from`.
fn string_end(b: &[u8], from: usize) -> usize {
    let mut j = from;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return j + 1,
            _ => j += 1,
        }
    }
    b.len()
}

/// `(contents start, closing quote, index after the literal)` of a raw
/// string whose `#`s or `"` start at `at`; `None` for a raw identifier.
fn raw_string(b: &[u8], at: usize) -> Option<(usize, usize, usize)> {
    let hashes = b[at..].iter().take_while(|&&c| c == b'#').count();
    if b.get(at + hashes) != Some(&b'"') {
        return None;
    }
    let content = at + hashes + 1;
    let mut k = content;
    while k < b.len() {
        if b[k] == b'"' && b[k + 1..].iter().take_while(|&&c| c == b'#').count() >= hashes {
            return Some((content, k, k + 1 + hashes));
        }
        k += 1;
    }
    Some((content, b.len(), b.len()))
}

/// The index after a character literal starting at `b[at] == '\''`; `None`
/// when it is a lifetime or a label.
fn char_literal_end(b: &[u8], at: usize) -> Option<usize> {
    let first = *b.get(at + 1)?;
    if first == b'\\' {
        // '\n', '\'', '\\', '\x7f', '\u{…}': the closing quote after the escape.
        let close = b[at + 3..].iter().position(|&c| c == b'\'')?;
        return Some(at + 3 + close + 1);
    }
    let width = match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    };
    (b.get(at + 1 + width) == Some(&b'\'')).then_some(at + 2 + width)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_continue(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// A token of stripped code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    /// Any other character but whitespace (a number is one `0`).
    Punct(u8),
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    /// Byte offset in the source.
    pub at: usize,
}

impl Token {
    pub fn is_ident(&self, name: &str) -> bool {
        matches!(&self.tok, Tok::Ident(s) if s == name)
    }

    pub fn is_punct(&self, c: u8) -> bool {
        self.tok == Tok::Punct(c)
    }
}

/// The tokens of code already [`strip`]ped.
pub fn tokens(code: &str) -> Vec<Token> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident_continue(b[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(code[start..i].to_string()),
                at: start,
            });
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (is_ident_continue(b[i])) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Punct(b'0'),
                at: start,
            });
        } else if b[i..].starts_with(b"::") {
            out.push(Token {
                tok: Tok::PathSep,
                at: i,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(c),
                at: i,
            });
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_literals_are_blanked_in_place() {
        let src = "use crate::a; // crate::b\n/* crate::c /* nested */ crate::d */ x\n\
                   let s = \"crate::e \\\" crate::f\"; let r = r#\"crate::g \"# ;\n\
                   let c = '\"'; let l: &'static str = b\"crate::h\"; let q = '\\'';\n\
                   let u = 'é'; fn f<'a>(x: &'a str) {} r#type crate::i";
        let code = strip(src);
        assert_eq!(code.len(), src.len());
        assert_eq!(code.lines().count(), src.lines().count());
        for hidden in ["crate::b", "crate::c", "crate::d", "crate::e", "crate::f"] {
            assert!(!code.contains(hidden), "{hidden} left in {code}");
        }
        for hidden in ["crate::g", "crate::h"] {
            assert!(!code.contains(hidden), "{hidden} left in {code}");
        }
        for kept in [
            "use crate::a;",
            " x\n",
            "fn f<'a>(x: &'a str) {}",
            "crate::i",
        ] {
            assert!(code.contains(kept), "{kept} lost from {code}");
        }
    }

    #[test]
    fn tokens_keep_paths_and_offsets() {
        let code = "use crate::{a::B, c};";
        let toks = tokens(code);
        assert!(toks[0].is_ident("use"));
        assert!(toks[1].is_ident("crate"));
        assert_eq!(toks[2].tok, Tok::PathSep);
        assert!(toks[3].is_punct(b'{'));
        assert_eq!(toks[4].at, code.find("a::").unwrap());
        assert_eq!(toks.len(), 11);
    }
}
