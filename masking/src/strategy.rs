//! What a masked value becomes: `redact`, `partial` (keep the last characters) or a keyed `hash`
//! that is stable per value and key, so joins and group-bys over masked columns still work.

use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::detect::Detector;

/// How a value (or a detected part of a value) is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Replace by `[redacted]` (`[redacted:email]` for a detected part).
    Redact,
    /// Star every character except the last `keep` ones; values of `2 * keep` characters or fewer
    /// are starred entirely.
    Partial {
        /// How many trailing characters stay visible.
        keep: usize,
    },
    /// Replace by `h:` and 16 hex digits of HMAC-SHA256(key, value).
    Hash,
}

/// How many characters `partial` keeps when no count is given.
pub const DEFAULT_KEEP: usize = 4;

/// A strategy name that is not `redact`, `partial`, `partial:N` or `hash`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown masking strategy `{given}`; expected `redact`, `partial`, `partial:N` (N characters kept) or `hash`"
)]
pub struct StrategyParseError {
    /// The text that was given.
    pub given: String,
}

impl Strategy {
    /// Parses `redact`, `partial` (keeps 4), `partial:N` or `hash`.
    ///
    /// # Errors
    /// Any other text, including a `partial:` count that is not a non-negative integer.
    pub fn parse(s: &str) -> Result<Strategy, StrategyParseError> {
        let err = || StrategyParseError { given: s.to_owned() };
        match s.trim() {
            "redact" => Ok(Strategy::Redact),
            "hash" => Ok(Strategy::Hash),
            "partial" => Ok(Strategy::Partial { keep: DEFAULT_KEEP }),
            other => {
                let n = other.strip_prefix("partial:").ok_or_else(err)?;
                let keep = n.trim().parse::<usize>().map_err(|_| err())?;
                Ok(Strategy::Partial { keep })
            }
        }
    }
}

impl FromStr for Strategy {
    type Err = StrategyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::parse(s)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Redact => f.write_str("redact"),
            Strategy::Partial { keep } => write!(f, "partial:{keep}"),
            Strategy::Hash => f.write_str("hash"),
        }
    }
}

/// Applies one [`Strategy`] with one secret key. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Masker {
    strategy: Strategy,
    /// HMAC state with the key already absorbed; cloned for every value.
    mac: Hmac<Sha256>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Masker").field("strategy", &self.strategy).finish_non_exhaustive()
    }
}

impl Masker {
    /// A masker for `strategy`; `key` is the secret of the keyed hash (any length).
    #[must_use]
    pub fn new(strategy: Strategy, key: &[u8]) -> Masker {
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
        Masker { strategy, mac }
    }

    /// The strategy this masker applies.
    #[must_use]
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Masks a whole value.
    #[must_use]
    pub fn mask_text(&self, s: &str) -> String {
        match self.strategy {
            Strategy::Redact => "[redacted]".to_owned(),
            Strategy::Partial { keep } => partial(s, keep),
            Strategy::Hash => self.hash(s),
        }
    }

    /// Masks a substring found by `detector`. The output never contains `"` or `\` when the
    /// input does not (detector hits never do), so it can replace a hit inside JSON.
    #[must_use]
    pub fn mask_hit(&self, detector: Detector, s: &str) -> String {
        match self.strategy {
            Strategy::Redact => format!("[redacted:{}]", detector.as_str()),
            Strategy::Partial { keep } => partial(s, keep),
            Strategy::Hash => self.hash(s),
        }
    }

    /// Masks the digits of a number found by a detector into another number, for columns (and
    /// JSON numbers) that must stay numeric: `redact` gives 0, `partial` the last `keep` digits
    /// as a number, `hash` a stable number of at most 15 digits derived from the keyed hash.
    #[must_use]
    pub fn mask_digits(&self, digits: &str) -> u64 {
        match self.strategy {
            Strategy::Redact => 0,
            Strategy::Partial { keep } => {
                let all: Vec<u8> = digits.bytes().filter(u8::is_ascii_digit).collect();
                if all.len() <= keep.saturating_mul(2) {
                    return 0;
                }
                // At most 18 digits: the result must fit an int8.
                let kept = &all[all.len() - keep.min(all.len()).min(18)..];
                kept.iter().fold(0u64, |acc, &c| acc * 10 + u64::from(c - b'0'))
            }
            Strategy::Hash => {
                let tag = self.tag(digits);
                u64::from_be_bytes([tag[0], tag[1], tag[2], tag[3], tag[4], tag[5], tag[6], tag[7]])
                    % 1_000_000_000_000_000
            }
        }
    }

    fn tag(&self, s: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(s.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn hash(&self, s: &str) -> String {
        let tag = self.tag(s);
        format!("h:{}", hex::encode(&tag[..8]))
    }
}

/// Stars all but the last `keep` characters; short values (`2 * keep` characters or fewer) are
/// starred entirely so they never reveal most of themselves.
fn partial(s: &str, keep: usize) -> String {
    let n = s.chars().count();
    if n <= keep.saturating_mul(2) {
        return "*".repeat(n);
    }
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        out.push(if i < n - keep { '*' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strategies_parse_and_display() {
        assert_eq!(Strategy::parse("redact"), Ok(Strategy::Redact));
        assert_eq!(Strategy::parse("hash"), Ok(Strategy::Hash));
        assert_eq!(Strategy::parse("partial"), Ok(Strategy::Partial { keep: 4 }));
        assert_eq!(Strategy::parse("partial:2"), Ok(Strategy::Partial { keep: 2 }));
        for s in [Strategy::Redact, Strategy::Hash, Strategy::Partial { keep: 7 }] {
            assert_eq!(Strategy::parse(&s.to_string()), Ok(s));
        }
        for bad in ["", "Redact", "partial:", "partial:-1", "partial:x", "sha256"] {
            let e = Strategy::parse(bad).unwrap_err();
            assert!(e.to_string().contains("`partial:N`"), "{e}");
        }
    }

    #[test]
    fn redact_names_the_detector() {
        let m = Masker::new(Strategy::Redact, b"k");
        assert_eq!(m.mask_text("alice"), "[redacted]");
        assert_eq!(m.mask_hit(Detector::Email, "a@b.co"), "[redacted:email]");
        assert_eq!(m.mask_digits("4111111111111111"), 0);
    }

    #[test]
    fn partial_keeps_the_tail_of_long_values_only() {
        let m = Masker::new(Strategy::Partial { keep: 4 }, b"k");
        assert_eq!(m.mask_text("4111111111111111"), "************1111");
        assert_eq!(m.mask_text("12345678"), "********");
        assert_eq!(m.mask_text("héllo wörld"), "*******örld");
        assert_eq!(m.mask_text(""), "");
        assert_eq!(m.mask_digits("4111111111110042"), 42);
        assert_eq!(m.mask_digits("1234"), 0);
        assert_eq!(Masker::new(Strategy::Partial { keep: 0 }, b"").mask_text("abc"), "***");
    }

    #[test]
    fn debug_hides_the_key() {
        let m = Masker::new(Strategy::Hash, b"super-secret");
        assert!(!format!("{m:?}").contains("secret"));
    }

    proptest! {
        #[test]
        fn hash_is_stable_and_keyed(v in "\\PC{0,40}", k1 in prop::collection::vec(any::<u8>(), 1..32), k2 in prop::collection::vec(any::<u8>(), 1..32)) {
            let a = Masker::new(Strategy::Hash, &k1);
            let h = a.mask_text(&v);
            prop_assert_eq!(&h, &a.clone().mask_text(&v));
            prop_assert_eq!(&h, &a.mask_hit(Detector::Ssn, &v));
            prop_assert!(h.len() == 18 && h.starts_with("h:"));
            prop_assert!(a.mask_digits(&v) < 1_000_000_000_000_000);
            if k1 != k2 {
                prop_assert_ne!(h, Masker::new(Strategy::Hash, &k2).mask_text(&v));
            }
        }

        #[test]
        fn partial_never_reveals_more_than_keep(v in "\\PC{0,40}", keep in 0usize..8) {
            let out = Masker::new(Strategy::Partial { keep }, b"").mask_text(&v);
            prop_assert_eq!(out.chars().count(), v.chars().count());
            prop_assert!(out.chars().filter(|&c| c != '*').count() <= keep);
        }

        #[test]
        fn hit_masks_never_add_quotes_or_backslashes(v in "[^\"\\\\]{0,40}", s in prop::sample::select(vec!["redact", "partial", "partial:1", "hash"])) {
            let m = Masker::new(Strategy::parse(s).unwrap(), b"k");
            for d in Detector::ALL {
                let out = m.mask_hit(d, &v);
                prop_assert!(!out.contains('"') && !out.contains('\\'));
            }
        }
    }
}
