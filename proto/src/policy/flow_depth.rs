//! How deep a YAML text nests flow collections (`[...]`, `{...}`), measured
//! the way libyaml's scanner (under serde_yaml_ng) tokenizes it, in one pass
//! and without building anything.
//!
//! libyaml's scanner spends time proportional to the flow depth on every
//! token, so 200 KB of nested `[` or `{a: ` takes it close to a minute
//! before any recursion limit is checked. This pass runs first and refuses
//! such a text in time linear in its length.
//!
//! It follows libyaml's token boundaries: quoted scalars (and their escapes),
//! plain scalars (which end differently in block and flow context, and
//! continue on lines indented past the enclosing block), block scalars
//! (whose extent depends on the block indentation, tracked as libyaml does),
//! comments, anchors, tags, directives and document markers. Where libyaml
//! would stop with an error, it stops too: libyaml never scans past that
//! point, so nothing after it can cost anything. So what it reports is never
//! less than the depth libyaml reaches.

/// Where the flow nesting first went deeper than allowed (1-based line and
/// column, counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
}

/// Checks that flow collections nest at most `limit` deep.
pub fn check(text: &str, limit: usize) -> Result<(), TooDeep> {
    // The reader refuses control characters before the scanner gets to
    // them: nothing after the first one is ever scanned.
    let end = text
        .bytes()
        .position(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f)
        .unwrap_or(text.len());
    let mut scan = Scanner {
        b: &text.as_bytes()[..end],
        i: 0,
        line: 0,
        col: 0,
        flow: 0,
        limit,
        indent: -1,
        indents: Vec::new(),
        allowed: true,
        key: None,
    };
    match scan.run() {
        Err(Stop::TooDeep(at)) => Err(at),
        Ok(()) | Err(Stop::Error) => Ok(()),
    }
}

enum Stop {
    /// libyaml would fail here: nothing after it is scanned.
    Error,
    TooDeep(TooDeep),
}

/// A possible simple key in block context (flow level 0).
#[derive(Clone, Copy)]
struct Key {
    line: usize,
    index: usize,
    col: i64,
    required: bool,
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    line: usize,
    /// In characters, as libyaml counts.
    col: i64,
    flow: usize,
    limit: usize,
    /// The block indentation (libyaml's `parser->indent`) and the stack below it.
    indent: i64,
    indents: Vec<i64>,
    allowed: bool,
    key: Option<Key>,
}

type Step = Result<(), Stop>;

const ERROR: Step = Err(Stop::Error);

impl Scanner<'_> {
    fn at(&self, k: usize) -> u8 {
        self.b.get(self.i + k).copied().unwrap_or(0)
    }

    fn is_z(&self, k: usize) -> bool {
        self.i + k >= self.b.len()
    }

    fn is_break(&self, k: usize) -> bool {
        match self.at(k) {
            b'\r' | b'\n' => !self.is_z(k),
            0xC2 => self.at(k + 1) == 0x85,
            0xE2 => self.at(k + 1) == 0x80 && matches!(self.at(k + 2), 0xA8 | 0xA9),
            _ => false,
        }
    }

    fn is_blank(&self, k: usize) -> bool {
        matches!(self.at(k), b' ' | b'\t') && !self.is_z(k)
    }

    fn is_blankz(&self, k: usize) -> bool {
        self.is_z(k) || self.is_blank(k) || self.is_break(k)
    }

    fn is_breakz(&self, k: usize) -> bool {
        self.is_z(k) || self.is_break(k)
    }

    /// One character.
    fn skip(&mut self) {
        let width = match self.at(0) {
            b if b < 0x80 => 1,
            b if b >= 0xF0 => 4,
            b if b >= 0xE0 => 3,
            _ => 2,
        };
        self.i = (self.i + width).min(self.b.len());
        self.col += 1;
    }

    /// One line break (CR LF counts as one).
    fn skip_line(&mut self) {
        if self.at(0) == b'\r' && self.at(1) == b'\n' {
            self.i += 2;
        } else {
            self.skip();
        }
        self.line += 1;
        self.col = 0;
    }

    fn document_marker(&self) -> bool {
        self.col == 0
            && ((self.at(0) == b'-' && self.at(1) == b'-' && self.at(2) == b'-')
                || (self.at(0) == b'.' && self.at(1) == b'.' && self.at(2) == b'.'))
            && self.is_blankz(3)
    }

    fn roll(&mut self, col: i64) {
        if self.flow == 0 && self.indent < col {
            self.indents.push(self.indent);
            self.indent = col;
        }
    }

    fn unroll(&mut self, col: i64) {
        if self.flow == 0 {
            while self.indent > col {
                self.indent = self.indents.pop().unwrap_or(-1);
            }
        }
    }

    fn save_key(&mut self) -> Step {
        if self.allowed && self.flow == 0 {
            self.remove_key()?;
            self.key = Some(Key {
                line: self.line,
                index: self.i,
                col: self.col,
                required: self.indent == self.col,
            });
        }
        Ok(())
    }

    fn remove_key(&mut self) -> Step {
        if self.flow == 0 && self.key.take().is_some_and(|k| k.required) {
            return ERROR;
        }
        Ok(())
    }

    fn stale_key(&mut self) -> Step {
        if let Some(k) = self.key {
            if k.line < self.line || k.index + 1024 < self.i {
                if k.required {
                    return ERROR;
                }
                self.key = None;
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Step {
        loop {
            self.skip_to_next_token();
            self.stale_key()?;
            self.unroll(self.col);
            if self.is_z(0) {
                return Ok(());
            }
            let c = self.at(0);
            if self.col == 0 && c == b'%' {
                // A directive takes its line, line break included.
                self.unroll(-1);
                self.remove_key()?;
                self.allowed = false;
                while !self.is_breakz(0) {
                    self.skip();
                }
                if self.is_break(0) {
                    self.skip_line();
                }
                continue;
            }
            if self.document_marker() {
                if self.flow > 0 {
                    // The parser refuses a document marker inside a flow collection.
                    return ERROR;
                }
                self.unroll(-1);
                self.remove_key()?;
                self.allowed = false;
                for _ in 0..3 {
                    self.skip();
                }
                continue;
            }
            match c {
                b'[' | b'{' => {
                    self.save_key()?;
                    self.flow += 1;
                    if self.flow > self.limit {
                        return Err(Stop::TooDeep(TooDeep {
                            line: self.line + 1,
                            column: usize::try_from(self.col).unwrap_or(0) + 1,
                        }));
                    }
                    self.allowed = true;
                    self.skip();
                }
                b']' | b'}' => {
                    self.remove_key()?;
                    self.flow = self.flow.saturating_sub(1);
                    self.allowed = false;
                    self.skip();
                }
                b',' => {
                    self.remove_key()?;
                    self.allowed = true;
                    self.skip();
                }
                b'-' if self.is_blankz(1) => {
                    if self.flow == 0 {
                        if !self.allowed {
                            return ERROR;
                        }
                        self.roll(self.col);
                    }
                    self.remove_key()?;
                    self.allowed = true;
                    self.skip();
                }
                b'?' if self.flow > 0 || self.is_blankz(1) => {
                    if self.flow == 0 {
                        if !self.allowed {
                            return ERROR;
                        }
                        self.roll(self.col);
                    }
                    self.remove_key()?;
                    self.allowed = self.flow == 0;
                    self.skip();
                }
                b':' if self.flow > 0 || self.is_blankz(1) => {
                    self.value()?;
                    self.skip();
                }
                b'*' | b'&' => {
                    self.save_key()?;
                    self.allowed = false;
                    self.anchor()?;
                }
                b'!' => {
                    self.save_key()?;
                    self.allowed = false;
                    self.tag()?;
                }
                b'|' | b'>' if self.flow == 0 => {
                    self.remove_key()?;
                    self.allowed = true;
                    self.block_scalar()?;
                }
                b'\'' | b'"' => {
                    self.save_key()?;
                    self.allowed = false;
                    self.quoted(c == b'\'')?;
                }
                _ if self.plain_start() => {
                    self.save_key()?;
                    self.allowed = false;
                    self.plain()?;
                }
                _ => return ERROR,
            }
        }
    }

    fn skip_to_next_token(&mut self) {
        loop {
            if self.col == 0 && self.at(0) == 0xEF && self.at(1) == 0xBB && self.at(2) == 0xBF {
                self.skip();
            }
            while !self.is_z(0)
                && (self.at(0) == b' ' || ((self.flow > 0 || !self.allowed) && self.at(0) == b'\t'))
            {
                self.skip();
            }
            if self.at(0) == b'#' && !self.is_z(0) {
                while !self.is_breakz(0) {
                    self.skip();
                }
            }
            if !self.is_break(0) {
                return;
            }
            self.skip_line();
            if self.flow == 0 {
                self.allowed = true;
            }
        }
    }

    /// `:` as a value indicator.
    fn value(&mut self) -> Step {
        if self.flow > 0 {
            // Flow context: no indentation; no simple key after it.
            self.allowed = false;
            return Ok(());
        }
        if let Some(k) = self.key.take() {
            self.roll(k.col);
            self.allowed = false;
        } else {
            if !self.allowed {
                return ERROR;
            }
            self.roll(self.col);
            self.allowed = true;
        }
        Ok(())
    }

    fn plain_start(&self) -> bool {
        let c = self.at(0);
        !(self.is_blankz(0) || b"-?:,[]{}#&*!|>'\"%@`".contains(&c))
            || (c == b'-' && !self.is_blank(1))
            || (self.flow == 0 && matches!(c, b'?' | b':') && !self.is_blankz(1))
    }

    fn anchor(&mut self) -> Step {
        self.skip();
        let start = self.i;
        while !self.is_z(0)
            && (self.at(0).is_ascii_alphanumeric() || matches!(self.at(0), b'_' | b'-'))
        {
            self.skip();
        }
        if self.i == start || !(self.is_blankz(0) || b"?:,]}%@`".contains(&self.at(0))) {
            return ERROR;
        }
        Ok(())
    }

    fn tag(&mut self) -> Step {
        if self.at(1) == b'<' {
            self.skip();
            self.skip();
            while !self.is_z(0) && is_uri_char(self.at(0), true) {
                self.skip();
            }
            if self.at(0) != b'>' || self.is_z(0) {
                return ERROR;
            }
            self.skip();
        } else {
            self.skip();
            while !self.is_z(0) && is_uri_char(self.at(0), false) {
                self.skip();
            }
        }
        if !self.is_blankz(0) && (self.flow == 0 || self.at(0) != b',') {
            return ERROR;
        }
        Ok(())
    }

    fn quoted(&mut self, single: bool) -> Step {
        let quote = if single { b'\'' } else { b'"' };
        self.skip();
        loop {
            if self.document_marker() || self.is_z(0) {
                return ERROR;
            }
            while !self.is_blankz(0) {
                if single && self.at(0) == b'\'' && self.at(1) == b'\'' {
                    self.skip();
                    self.skip();
                } else if self.at(0) == quote {
                    break;
                } else if !single && self.at(0) == b'\\' && self.is_break(1) {
                    self.skip();
                    self.skip_line();
                    break;
                } else if !single && self.at(0) == b'\\' {
                    // The escaped character; hex digits after x, u, U are
                    // ordinary characters to this scan.
                    self.skip();
                    if self.is_z(0) {
                        return ERROR;
                    }
                    self.skip();
                } else {
                    self.skip();
                }
            }
            if self.at(0) == quote && !self.is_z(0) {
                self.skip();
                return Ok(());
            }
            while self.is_blank(0) || self.is_break(0) {
                if self.is_blank(0) {
                    self.skip();
                } else {
                    self.skip_line();
                }
            }
        }
    }

    fn plain(&mut self) -> Step {
        let indent = self.indent + 1;
        let mut leading_blanks = false;
        loop {
            if self.document_marker() || self.at(0) == b'#' {
                break;
            }
            while !self.is_blankz(0) {
                let c = self.at(0);
                if self.flow > 0 && c == b':' && b",?[]{}".contains(&self.at(1)) && !self.is_z(1) {
                    return ERROR;
                }
                if (c == b':' && self.is_blankz(1)) || (self.flow > 0 && b",[]{}".contains(&c)) {
                    break;
                }
                leading_blanks = false;
                self.skip();
            }
            if !(self.is_blank(0) || self.is_break(0)) {
                break;
            }
            while self.is_blank(0) || self.is_break(0) {
                if self.is_blank(0) {
                    if leading_blanks && self.col < indent && self.at(0) == b'\t' {
                        return ERROR;
                    }
                    self.skip();
                } else {
                    self.skip_line();
                    leading_blanks = true;
                }
            }
            if self.flow == 0 && self.col < indent {
                break;
            }
        }
        if leading_blanks {
            self.allowed = true;
        }
        Ok(())
    }

    fn block_scalar(&mut self) -> Step {
        self.skip();
        let mut increment = 0i64;
        let digit = |c: u8| c.is_ascii_digit();
        if matches!(self.at(0), b'+' | b'-') {
            self.skip();
            if digit(self.at(0)) {
                if self.at(0) == b'0' {
                    return ERROR;
                }
                increment = i64::from(self.at(0) - b'0');
                self.skip();
            }
        } else if digit(self.at(0)) {
            if self.at(0) == b'0' {
                return ERROR;
            }
            increment = i64::from(self.at(0) - b'0');
            self.skip();
            if matches!(self.at(0), b'+' | b'-') {
                self.skip();
            }
        }
        while self.is_blank(0) {
            self.skip();
        }
        if self.at(0) == b'#' {
            while !self.is_breakz(0) {
                self.skip();
            }
        }
        if !self.is_breakz(0) {
            return ERROR;
        }
        if self.is_break(0) {
            self.skip_line();
        }
        let mut indent = if increment > 0 {
            if self.indent >= 0 {
                self.indent + increment
            } else {
                increment
            }
        } else {
            0
        };
        self.block_breaks(&mut indent)?;
        while self.col == indent && !self.is_z(0) {
            while !self.is_breakz(0) {
                self.skip();
            }
            if self.is_z(0) {
                break;
            }
            self.skip_line();
            self.block_breaks(&mut indent)?;
        }
        Ok(())
    }

    /// The empty lines of a block scalar; settles its indentation when not given.
    fn block_breaks(&mut self, indent: &mut i64) -> Step {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || self.col < *indent) && self.at(0) == b' ' && !self.is_z(0) {
                self.skip();
            }
            max_indent = max_indent.max(self.col);
            if (*indent == 0 || self.col < *indent) && self.at(0) == b'\t' && !self.is_z(0) {
                return ERROR;
            }
            if !self.is_break(0) {
                break;
            }
            self.skip_line();
        }
        if *indent == 0 {
            *indent = max_indent.max(self.indent + 1).max(1);
        }
        Ok(())
    }
}

/// Characters of a tag (libyaml's URI characters; `[`, `]` and `,` only
/// inside `!<...>`).
fn is_uri_char(c: u8, verbatim: bool) -> bool {
    c.is_ascii_alphanumeric()
        || b"_-;/?:@&=+$.%!~*'()".contains(&c)
        || (verbatim && b",[]".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str, limit: usize) -> bool {
        check(text, limit).is_ok()
    }

    #[test]
    fn flow_nesting_is_counted() {
        assert!(depth_ok("[[[]]]", 3));
        assert!(!depth_ok("[[[[]]]]", 3));
        assert_eq!(
            check("a: [[[[1]]]]", 3),
            Err(TooDeep { line: 1, column: 7 })
        );
        assert!(!depth_ok(&"{a: ".repeat(100), 64));
        assert!(depth_ok(&"[1], ".repeat(10_000), 2));
        assert!(depth_ok("- [a, {b: [c]}]\n- [d]\n", 3));
    }

    #[test]
    fn brackets_in_scalars_do_not_count() {
        for text in [
            "a: \"[[[[\"\n",
            "a: '[[[['\n",
            "a: '['']]]][[[['\n",
            "a: \"\\\"[[[[\"\n",
            "a: b[[[[\n",
            "a: b [[[[\n",
            "# [[[[\n",
            "a: [x] # [[[[\n",
            "a: |\n  [[[[\n  [[[[\nb: 1\n",
            "- >-\n   [[[[\n",
            "a: &x1 b\nc: !t [[d]]\n",
            "a: b\n  c [[[[\n",
            "[a[b]",
        ] {
            assert!(depth_ok(text, 3), "{text:?}");
        }
    }

    #[test]
    fn brackets_that_libyaml_reads_as_flow_do_count() {
        for text in [
            // A `]` in a quoted scalar closes nothing.
            &"[\"]\", ".repeat(10),
            &"['a]', ".repeat(10),
            // After a block scalar ends, what follows is read again.
            &format!("a: |\n  x\nb: {}", "[".repeat(10)),
            &format!("- - |\n    x\n  - {}", "[".repeat(10)),
            &format!("key:\n |\n \"\nother: {}", "[".repeat(10)),
            // A plain scalar's continuation line is not a token start.
            &format!("key: a\n  \"\nother: {}", "[".repeat(10)),
            // Tags end where libyaml ends them.
            &format!("[!t,{}", "[".repeat(10)),
            &format!("a: !t {}", "[".repeat(10)),
            // Comments need a token boundary, not whitespace.
            &format!("[a,#x\n{}", "[".repeat(10)),
        ] {
            assert!(!depth_ok(text, 5), "{text:?}");
        }
    }

    #[test]
    fn what_libyaml_refuses_ends_the_scan() {
        // A tab cannot start a token: libyaml stops there.
        assert!(depth_ok(&format!("a: 1\n\t{}", "[".repeat(10)), 5));
        // So does a control character.
        assert!(depth_ok(&format!("a: 1\u{1}{}", "[".repeat(10)), 5));
    }

    #[test]
    #[allow(
        clippy::disallowed_methods,
        reason = "\"quickly\" is a bound on real time"
    )]
    fn a_megabyte_of_anything_is_scanned_quickly() {
        let started = std::time::Instant::now();
        for text in [
            "[".repeat(1 << 20),
            "{a: ".repeat(1 << 18),
            "- ".repeat(1 << 19),
            "a: \"".repeat(1 << 18),
            " ".repeat(1 << 20),
        ] {
            let _ = check(&text, 64);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
