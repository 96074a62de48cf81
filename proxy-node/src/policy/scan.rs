//! PostgreSQL's lexical structure, just enough to find where the server and the parser could
//! read a text differently, so that such a text is refused before anything trusts the parse.
//!
//! The server's scanner (`scan.l`) ends an operator where `--` or `/*` begins inside it: `?--`
//! is `?` and a comment, `>/*` is `>` and a comment. sqlparser keeps such characters in the
//! operator, so what the server skips as a comment the parser reads as code, and a quote in
//! it opens a string that hides the statements after it (`SELECT '{}'::jsonb ?-- '` on one
//! line, a `DELETE` on the next). The scan below follows the server: strings (standard ones,
//! `E''` with backslash escapes, `B''`, `X''`, `N''`, `U&''`), quoted identifiers, dollar quotes,
//! nested block comments and line comments are skipped whole, and any operator with `--` or
//! `/*` after its first character is refused. It reads `standard_conforming_strings` as on: the
//! relay refuses texts with backslashes while it is off.
//!
//! It also finds `USING` followed by an operator other than `<` or `>` (`ORDER BY x USING @@`),
//! whose function the parser never reports.

/// What [`scan`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// The server and the parser could split the text differently.
    pub unreadable: Option<String>,
    /// An operator given after `USING`, which may run a user function.
    pub unknown: Option<String>,
}

fn is_op(c: u8) -> bool {
    b"~!@#^&|`?+-*/%<>=".contains(&c)
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_cont(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// The index just past a string or identifier quoted with `q` that starts at `from` (its
/// opening quote); a doubled quote is one quote, and with `backslash` a backslash escapes the
/// next byte. `None`: not closed.
fn skip_quoted(b: &[u8], from: usize, q: u8, backslash: bool) -> Option<usize> {
    let mut i = from + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            c if c == q => {
                if b.get(i + 1) == Some(&q) {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The index just past a block comment starting at `from` (its `/*`); comments nest.
fn skip_block_comment(b: &[u8], from: usize) -> usize {
    let (mut i, mut depth) = (from + 2, 1);
    while i < b.len() && depth > 0 {
        if b[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if b[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    i
}

/// Scan `sql` as the server would (see the module's documentation).
pub fn scan(sql: &str) -> Scan {
    let b = sql.as_bytes();
    let mut found = Scan::default();
    let unclosed = |what: &str| Scan {
        unreadable: Some(format!("an unterminated {what}: the server rejects it")),
        unknown: None,
    };
    let mut after_using = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        // A quote right after a prefix letter at a token's start (identifiers are consumed
        // whole below, so a letter here always starts one).
        let prefixed = |n: usize| b.get(i + n) == Some(&b'\'');
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => {
                i += 1;
                continue;
            }
            b'-' if next == Some(b'-') => {
                i += b[i..].iter().position(|&c| c == b'\n' || c == b'\r').unwrap_or(b.len() - i);
                continue;
            }
            b'/' if next == Some(b'*') => {
                i = skip_block_comment(b, i);
                continue;
            }
            b'\'' | b'"' => match skip_quoted(b, i, c, false) {
                Some(end) => i = end,
                None => return unclosed("quoted string or name"),
            },
            b'e' | b'E' if prefixed(1) => match skip_quoted(b, i + 1, b'\'', true) {
                Some(end) => i = end,
                None => return unclosed("E'' string"),
            },
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if prefixed(1) => {
                match skip_quoted(b, i + 1, b'\'', false) {
                    Some(end) => i = end,
                    None => return unclosed("string"),
                }
            }
            b'u' | b'U' if next == Some(b'&') && matches!(b.get(i + 2), Some(b'\'' | b'"')) => {
                match skip_quoted(b, i + 2, b[i + 2], false) {
                    Some(end) => i = end,
                    None => return unclosed("U& string or name"),
                }
            }
            b'$' if next.is_some_and(|c| c.is_ascii_digit()) => {
                i += 1 + b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            }
            b'$' => {
                let tag_len =
                    1 + b[i + 1..].iter().take_while(|&&c| ident_start(c) || c.is_ascii_digit()).count();
                let tag_ok = next.is_none_or(|c| ident_start(c) || c == b'$');
                if tag_ok && b.get(i + tag_len) == Some(&b'$') {
                    let tag = &b[i..=i + tag_len];
                    let body = i + tag.len();
                    match b[body..].windows(tag.len()).position(|w| w == tag) {
                        Some(at) => i = body + at + tag.len(),
                        None => return unclosed("dollar-quoted string"),
                    }
                } else {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let end = i + b[i..].iter().take_while(|&&c| ident_cont(c)).count();
                let word = &sql[i..end];
                if after_using && word.eq_ignore_ascii_case("operator") {
                    found.unknown.get_or_insert_with(|| {
                        "USING OPERATOR(…): the operator may run a user function".into()
                    });
                }
                after_using = word.eq_ignore_ascii_case("using");
                i = end;
                continue;
            }
            c if c.is_ascii_digit() || (c == b'.' && next.is_some_and(|c| c.is_ascii_digit())) => {
                i += b[i..]
                    .iter()
                    .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_')
                    .count();
                // An exponent's sign: `1e-5`.
                if matches!(b[i - 1], b'e' | b'E') && matches!(b.get(i), Some(b'+' | b'-')) {
                    i += 1 + b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                }
            }
            c if is_op(c) => {
                let end = i + b[i..].iter().take_while(|&&c| is_op(c)).count();
                let run = &b[i..end];
                if (1..run.len()).any(|k| run[k..].starts_with(b"--") || run[k..].starts_with(b"/*")) {
                    return Scan {
                        unreadable: Some(format!(
                            "the operator `{}` runs into a comment: the server and the gateway would read the text after it differently",
                            String::from_utf8_lossy(run)
                        )),
                        unknown: None,
                    };
                }
                if after_using && run != b"<" && run != b">" {
                    found.unknown.get_or_insert_with(|| {
                        format!(
                            "USING {}: an operator other than < or > may run a user function",
                            String::from_utf8_lossy(run)
                        )
                    });
                }
                i = end;
            }
            _ => i += 1,
        }
        after_using = false;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreadable(sql: &str) -> bool {
        scan(sql).unreadable.is_some()
    }

    #[test]
    fn operators_that_run_into_comments_are_refused() {
        for sql in [
            "SELECT '{}'::jsonb ?-- '\nversion(); DELETE FROM orders; --'",
            "SELECT id FROM orders ORDER BY id USING >/*, '*/; DELETE FROM orders; --'",
            "SELECT 1 +/* x */ 2",
            "SELECT 1 <=-- x\n",
            "SELECT -/* c */1",
        ] {
            assert!(unreadable(sql), "{sql}");
        }
    }

    #[test]
    fn strings_names_and_comments_are_skipped_whole() {
        for sql in [
            "SELECT '<!-- not a comment -->'",
            "SELECT E'\\'<!--', 'a''+--'",
            "SELECT \"x+--y\" FROM t",
            "SELECT U&'d\\0061t+/*a' UESCAPE '\\'",
            "SELECT $f$ 1 +-- 2 $f$, $$ ?/* $$",
            "SELECT 1 -- a line comment with <-- arrows\n",
            "SELECT 1 /* nested /* +-- */ still ?/* */ + 2",
            "SELECT 1 --- three dashes start a comment",
            "SELECT a$b FROM t WHERE x = $1 AND y = -1 AND z = 1e-5 AND w <> -2",
            "SELECT x FROM t ORDER BY x USING <, y USING >",
            "SELECT * FROM a JOIN b USING (id)",
            "DELETE FROM a USING b WHERE a.id = b.id",
        ] {
            assert_eq!(scan(sql), Scan::default(), "{sql}");
        }
    }

    #[test]
    fn operators_after_using_are_unknown() {
        for sql in
            ["SELECT x FROM t ORDER BY x USING @@", "SELECT x FROM t ORDER BY x USING OPERATOR(public.<)"]
        {
            let s = scan(sql);
            assert!(s.unreadable.is_none() && s.unknown.is_some(), "{sql}: {s:?}");
        }
    }

    #[test]
    fn unterminated_quotes_are_refused() {
        for sql in ["SELECT 'a", "SELECT \"a", "SELECT E'a\\'", "SELECT $x$ a", "SELECT U&'a"] {
            assert!(unreadable(sql), "{sql}");
        }
    }
}
