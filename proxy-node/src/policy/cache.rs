//! A node-wide cache of [`classify`]: agents repeat the same statements, so each text is parsed
//! once, not once per execution.
//!
//! Three levels:
//! - by exact text (prepared and extended-protocol statements, whose values come as parameters);
//! - by token stream with small integer literals set to `0` (simple-protocol statements that
//!   differ only in such numbers, like `... WHERE id = 42`). [`classify`] is a function of the
//!   tokens the parser reads (sqlparser's parser never looks at the text itself), and what it
//!   reports (operations, tables, functions, effects) holds no literal values; only integer
//!   literals of up to 18 digits are folded, which every parser rule that takes a number accepts
//!   whatever their value. Strings, identifiers, other numbers and comments stay in the key.
//! - before both, the same folding done on the text without tokenizing it, for
//!   the texts where that is plainly the same thing ([`fold_plain_text`]): only letters, digits,
//!   blanks and a few punctuation marks, no quotes, comments, `$`, `?` or `:`; a run of digits
//!   folds only when both its neighbours are blanks or operators. Two texts with the same such
//!   key differ only in integer literals, so they have the same folded tokens, and so the same
//!   classification. Such a text is only ever cached under that key. Tokenizing was the biggest
//!   cost of a cache hit.
//!
//! Each level is bounded; when full, it starts over.

use std::sync::{Arc, Mutex};

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::{Classification, classify};

/// Entries per level before it starts over.
const CAPACITY: usize = 4096;
/// Longer statements are classified every time (they are rarely repeated, and big keys cost).
const MAX_TEXT: usize = 8 * 1024;

/// The cache. Share one per node.
#[derive(Default)]
pub struct ClassifyCache {
    by_text: Mutex<crate::Map<Box<str>, Arc<Classification>>>,
    by_tokens: Mutex<crate::Map<Vec<Token>, Arc<Classification>>>,
    by_folded_text: Mutex<crate::Map<Box<str>, Arc<Classification>>>,
}

impl ClassifyCache {
    /// [`classify`]`(sql)`, from the cache when the statement was seen before.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        if sql.len() > MAX_TEXT {
            return Arc::new(classify(sql));
        }
        // A text folded without tokenizing is only ever cached under its folded key. The key
        // is built in a buffer kept per thread, and copied only into a new entry.
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let hit = KEY.with_borrow_mut(|key| {
            if !fold_plain_text(sql, key) {
                return None;
            }
            if let Some(c) = lock(&self.by_folded_text).get(key.as_str()) {
                return Some(c.clone());
            }
            let c = Arc::new(classify(sql));
            insert(&self.by_folded_text, key.as_str().into(), c.clone());
            Some(c)
        });
        if let Some(c) = hit {
            return c;
        }
        if let Some(c) = lock(&self.by_text).get(sql) {
            return c.clone();
        }
        match sql.bytes().any(|b| b.is_ascii_digit()).then(|| folded_tokens(sql)).flatten() {
            Some(key) => cached(&self.by_tokens, key, sql),
            None => {
                let c = Arc::new(classify(sql));
                insert(&self.by_text, sql.into(), c.clone());
                c
            }
        }
    }
}

/// The classification cached in `m` under `key`, or `sql`'s, cached there now.
fn cached<K: std::hash::Hash + Eq>(
    m: &Mutex<crate::Map<K, Arc<Classification>>>,
    key: K,
    sql: &str,
) -> Arc<Classification> {
    if let Some(c) = lock(m).get(&key) {
        return c.clone();
    }
    let c = Arc::new(classify(sql));
    insert(m, key, c.clone());
    c
}

fn lock<K, V>(m: &Mutex<crate::Map<K, V>>) -> std::sync::MutexGuard<'_, crate::Map<K, V>> {
    // A panic elsewhere cannot leave a half-inserted entry: keep using the map.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn insert<K: std::hash::Hash + Eq>(
    m: &Mutex<crate::Map<K, Arc<Classification>>>,
    k: K,
    v: Arc<Classification>,
) {
    let mut m = lock(m);
    if m.len() >= CAPACITY {
        m.clear();
    }
    m.insert(k, v);
}

/// Characters next to which a run of digits is a whole integer literal, to the server and to
/// sqlparser alike (blanks and operators; not `.`, letters, `_`, `$`, quotes, `:` or `?`).
const fn delimits_number(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t'
            | b'\n'
            | b'\r'
            | b'('
            | b')'
            | b','
            | b'='
            | b'<'
            | b'>'
            | b'+'
            | b'-'
            | b'*'
            | b'/'
            | b'%'
            | b';'
            | b'['
            | b']'
    )
}

/// What a byte is to [`fold_plain_text`]: a digit, part of a word (ASCII letters, `_`, `.`),
/// a [`delimits_number`] character, or anything else (the text is then not plain).
const DIGIT: u8 = 0;
const WORD: u8 = 1;
const DELIMITER: u8 = 2;
const OTHER: u8 = 3;
static CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = if c.is_ascii_digit() {
            DIGIT
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b'.' {
            WORD
        } else if delimits_number(c) {
            DELIMITER
        } else {
            OTHER
        };
        i += 1;
    }
    t
};

/// [`fold_plain_text`] into a new string.
#[cfg(test)]
fn folded_text(sql: &str) -> Option<String> {
    let mut out = String::new();
    fold_plain_text(sql, &mut out).then_some(out)
}

/// `sql` with every integer literal of at most 18 digits set to `0`, found without
/// tokenizing, into `out` (cleared first), in one pass over the text; `false` unless `sql` is
/// simple enough for that to be certain, and has such a literal.
///
/// Simple enough: ASCII letters, digits, `_`, `.` and the [`delimits_number`] characters only,
/// and no comment (`--`, `/*`). Without quotes, comments, `$`, `?`, `:` or backslashes, every
/// byte of the text is in a word, a number, an operator or a blank; a maximal run of digits
/// whose neighbours both delimit numbers (or are the ends of the text) can then only be a whole
/// integer literal (not part of a name like `t1`, a decimal like `1.5`, an exponent like `1e5`,
/// `0x1F`, `1_000`, or a parameter like `$1`).
fn fold_plain_text(sql: &str, out: &mut String) -> bool {
    out.clear();
    let b = sql.as_bytes();
    // `copied` bytes of `sql` are in `out`.
    let (mut copied, mut folded, mut prev, mut i) = (0, false, 0u8, 0);
    while i < b.len() {
        let c = b[i];
        let class = CLASS[usize::from(c)];
        if class == WORD {
            prev = c;
            i += 1;
            continue;
        }
        if class == DIGIT {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let before = start.checked_sub(1).map(|p| b[p]);
            let after = b.get(i).copied();
            if i - start <= 18 && before.is_none_or(delimits_number) && after.is_none_or(delimits_number) {
                out.push_str(&sql[copied..start]);
                out.push('0');
                copied = i;
                folded = true;
            }
            prev = b'0';
            continue;
        }
        if class == OTHER || (prev == b'-' && c == b'-') || (prev == b'/' && c == b'*') {
            return false;
        }
        prev = c;
        i += 1;
    }
    if folded {
        out.push_str(&sql[copied..]);
    }
    folded
}

/// The tokens sqlparser reads in `sql`, with integer literals of at most 18 digits set to `0`;
/// `None` if it does not tokenize, or has no such literal (the exact text is the better key).
fn folded_tokens(sql: &str) -> Option<Vec<Token>> {
    let mut tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let mut folded = false;
    for t in &mut tokens {
        if let Token::Number(n, long) = t
            && (1..=18).contains(&n.len())
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            *t = Token::Number("0".into(), *long);
            folded = true;
        }
    }
    folded.then_some(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_differing_only_in_integers_share_an_entry_and_classify_the_same() {
        let cache = ClassifyCache::default();
        // Plain text: folded without tokenizing.
        let a = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 12345");
        assert_eq!(lock(&cache.by_folded_text).len(), 1);
        let b = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7");
        assert_eq!(lock(&cache.by_folded_text).len(), 1, "the second text is a hit");
        assert_eq!(a, b);
        assert_eq!(*a, classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7"));
        // With a string literal: folded by the tokenizer.
        let a = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 12345 AND filler = 'x'");
        assert_eq!(lock(&cache.by_tokens).len(), 1);
        let b = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7 AND filler = 'x'");
        assert_eq!(lock(&cache.by_tokens).len(), 1, "the second text is a hit");
        assert_eq!(a, b);
        assert_eq!(lock(&cache.by_folded_text).len(), 1);
    }

    #[test]
    fn anything_but_small_integers_stays_in_the_key() {
        let cache = ClassifyCache::default();
        for (first, second) in [
            // Strings decide what set_config does.
            (
                "SELECT set_config('application_name', 'x', false), 1",
                "SELECT set_config('role', 'x', false), 1",
            ),
            // Identifiers with digits are names, not numbers.
            ("SELECT * FROM t1 WHERE a = 1", "DELETE FROM t2 WHERE a = 1"),
            // A number the parser cannot take as a count stays what it is.
            ("FETCH 5 FROM c1", "FETCH 1.5 FROM c1"),
            ("FETCH 5 FROM c1", "FETCH 99999999999999999999999 FROM c1"),
            // Comments are tokens too: a different text, a different key.
            ("SELECT 1 /* a */", "SELECT 1 /* b */; DROP TABLE t"),
        ] {
            let a = cache.classify(first);
            let b = cache.classify(second);
            assert_eq!(*a, classify(first), "{first}");
            assert_eq!(*b, classify(second), "{second}");
        }
    }

    #[test]
    fn exact_texts_without_digits_are_cached_and_both_levels_stay_bounded() {
        let cache = ClassifyCache::default();
        let q = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        assert_eq!(*cache.classify(q), classify(q));
        assert!(lock(&cache.by_text).contains_key(q));
        let letters =
            |i: usize| -> String { i.to_string().bytes().map(|d| (d - b'0' + b'a') as char).collect() };
        for i in 0..(CAPACITY + 10) {
            cache.classify(&format!("SELECT x{i} FROM t WHERE a = 1"));
            cache.classify(&format!("SELECT {} FROM t", letters(i)));
        }
        assert!(lock(&cache.by_tokens).len() <= CAPACITY);
        assert!(lock(&cache.by_text).len() <= CAPACITY);
    }

    #[test]
    fn text_folding_takes_only_whole_integers_of_plain_text() {
        assert_eq!(
            folded_text("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = 0;")
        );
        assert_eq!(
            folded_text("SELECT a[1],-2,(3) FROM t LIMIT 10 OFFSET 5").as_deref(),
            Some("SELECT a[0],-0,(0) FROM t LIMIT 0 OFFSET 0")
        );
        // Digits that are not a whole integer literal stay as they are.
        assert_eq!(
            folded_text("SELECT 1.5, .5, 1e5, 0x1F, 1_000, t1.c2, 7 FROM t3").as_deref(),
            Some("SELECT 1.5, .5, 1e5, 0x1F, 1_000, t1.c2, 0 FROM t3")
        );
        assert_eq!(
            folded_text("SELECT 1234567890123456789, 1").as_deref(),
            Some("SELECT 1234567890123456789, 0")
        );
        // Nothing to fold, or not plain enough to fold without the tokenizer.
        for sql in [
            "SELECT a FROM t",
            "SELECT t1 FROM t2",
            "SELECT 1 -- 2",
            "SELECT 1 /* 2 */",
            "SELECT '1', 2",
            "SELECT \"1\", 2",
            "SELECT $1, 2",
            "SELECT $$1$$, 2",
            "SELECT ?1, 2",
            "SELECT 1::int, 2",
            "SELECT E'\\1', 2",
            "SELECT 1 @ 2",
            "SELECT 1 # 2",
            "SELECT 1 \u{e9} 2",
            "SELECT 1\u{b}, 2",
        ] {
            assert_eq!(folded_text(sql), None, "{sql}");
        }
    }

    /// Statements that differ only in numbers, in every place a number can go and next to every
    /// character that could make digits something else, classify through the cache exactly as
    /// without it, in whatever order they arrive.
    #[test]
    fn the_cache_never_answers_for_a_different_statement() {
        let templates = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
            "SELECT * FROM t WHERE a IN ({},{}) LIMIT {} OFFSET {}",
            "SELECT a[{}] FROM t{}",
            "SELECT {} FROM t; DELETE FROM t WHERE id = {}",
            "UPDATE t SET a = a + {} WHERE id = {}",
            "INSERT INTO t VALUES ({}, {})",
            "FETCH {} FROM c1",
            "SELECT {}e{} FROM t",
            "SELECT x.{} FROM t x",
            "SELECT {}_{} FROM t",
            "DELETE FROM t{} WHERE a = {}",
            "SELECT pg_sleep({})",
            "SELECT {}-{}*{}/{}%{}",
            "SELECT 1 FROM t{}e",
        ];
        let values = [
            "0",
            "1",
            "42",
            "007",
            "123456789012345678",
            "1234567890123456789",
            "1.5",
            ".5",
            "x",
            "0x1F",
            "",
        ];
        let cache = ClassifyCache::default();
        let mut n = 0;
        for (round, t) in templates.iter().cycle().take(templates.len() * 4).enumerate() {
            for i in 0..values.len() {
                let mut sql = String::new();
                let mut k = i + round;
                for (j, part) in t.split("{}").enumerate() {
                    if j > 0 {
                        sql.push_str(values[k % values.len()]);
                        k = k * 7 + 3;
                    }
                    sql.push_str(part);
                }
                assert_eq!(*cache.classify(&sql), classify(&sql), "{sql}");
                n += 1;
            }
        }
        assert!(n > 400);
        assert!(lock(&cache.by_folded_text).len() > 10, "the text level was used");
    }

    #[test]
    fn unparsable_text_is_cached_as_unparsed() {
        let cache = ClassifyCache::default();
        let c = cache.classify("SELEC 1 FROM");
        assert!(c.unparsed.is_some());
        assert!(cache.classify("SELEC 2 FROM").unparsed.is_some());
    }
}
