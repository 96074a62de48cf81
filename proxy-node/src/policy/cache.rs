//! A node-wide cache of [`classify`]: agents repeat the same statements, so each text is parsed
//! once, not once per execution.
//!
//! Two levels:
//! - by exact text (prepared and extended-protocol statements, whose values come as parameters);
//! - by token stream with small integer literals set to `0` (simple-protocol statements that
//!   differ only in such numbers, like `... WHERE id = 42`). [`classify`] is a function of the
//!   tokens the parser reads (sqlparser's parser never looks at the text itself), and what it
//!   reports (operations, tables, functions, effects) holds no literal values; only integer
//!   literals of up to 18 digits are folded, which every parser rule that takes a number accepts
//!   whatever their value. Strings, identifiers, other numbers and comments stay in the key.
//!
//! Each level is bounded; when full, it starts over.

use std::collections::HashMap;
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
    by_text: Mutex<HashMap<Box<str>, Arc<Classification>>>,
    by_tokens: Mutex<HashMap<Vec<Token>, Arc<Classification>>>,
}

impl ClassifyCache {
    /// [`classify`]`(sql)`, from the cache when the statement was seen before.
    pub fn classify(&self, sql: &str) -> Classification {
        if sql.len() > MAX_TEXT {
            return classify(sql);
        }
        if let Some(c) = lock(&self.by_text).get(sql) {
            return (**c).clone();
        }
        let key = if sql.bytes().any(|b| b.is_ascii_digit()) { folded_tokens(sql) } else { None };
        if let Some(key) = &key
            && let Some(c) = lock(&self.by_tokens).get(key)
        {
            return (**c).clone();
        }
        let c = Arc::new(classify(sql));
        match key {
            Some(key) => insert(&self.by_tokens, key, c.clone()),
            None => insert(&self.by_text, sql.into(), c.clone()),
        }
        Arc::unwrap_or_clone(c)
    }
}

fn lock<K, V>(m: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    // A panic elsewhere cannot leave a half-inserted entry: keep using the map.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn insert<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, Arc<Classification>>>, k: K, v: Arc<Classification>) {
    let mut m = lock(m);
    if m.len() >= CAPACITY {
        m.clear();
    }
    m.insert(k, v);
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
        let a = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 12345");
        assert_eq!(lock(&cache.by_tokens).len(), 1);
        let b = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7");
        assert_eq!(lock(&cache.by_tokens).len(), 1, "the second text is a hit");
        assert_eq!(a, b);
        assert_eq!(a, classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7"));
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
            assert_eq!(a, classify(first), "{first}");
            assert_eq!(b, classify(second), "{second}");
        }
    }

    #[test]
    fn exact_texts_without_digits_are_cached_and_both_levels_stay_bounded() {
        let cache = ClassifyCache::default();
        let q = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        assert_eq!(cache.classify(q), classify(q));
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
    fn unparsable_text_is_cached_as_unparsed() {
        let cache = ClassifyCache::default();
        let c = cache.classify("SELEC 1 FROM");
        assert!(c.unparsed.is_some());
        assert!(cache.classify("SELEC 2 FROM").unparsed.is_some());
    }
}
