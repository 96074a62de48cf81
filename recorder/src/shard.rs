//! Static session sharding: `shard = "K/N"` makes a recorder write only the sessions of shard K
//! out of N, so that N groups of replicas split the archive between them and no session is
//! written by two of them.
//!
//! - A session's shard is `u64::from_be_bytes(SHA-256(uuid bytes)[0..8]) % N`: the first 8 bytes
//!   of the SHA-256 of the session id's 16 bytes, big-endian, modulo N. It depends on nothing but
//!   the id (no process-random hashing), so every replica, in any version or language, agrees.
//!   (The id's own leading bytes are a UUIDv7 timestamp and counter, which would put sessions
//!   started in the same millisecond on one shard.)
//! - Shard K of N reads through its own durable consumer, `recorder-K-of-N`, over every session
//!   event, and acks the deliveries of other shards at once without writing them: their own
//!   consumer sees every message too. `0/1` (the default) is everything, through the durable
//!   `recorder` ([`proto::subjects::RECORDER_DURABLE`]), so a deployment that adds the setting
//!   later keeps its position in the stream.
//! - Several processes with the same `K/N` share that durable consumer (redundancy); the
//!   recorder's conditional writes keep that correct.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Shard `index` of `count` (`0 <= index < count`). Written `K/N` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

/// A `shard` value that is not `K/N` with `0 <= K < N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recorder.shard: expected K/N with 0 <= K < N, got {0:?}")]
pub struct ShardError(pub String);

impl Shard {
    /// Every session: `0/1`.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`.
    pub fn new(index: u32, count: u32) -> Result<Self, ShardError> {
        if count == 0 || index >= count {
            return Err(ShardError(format!("{index}/{count}")));
        }
        Ok(Self { index, count })
    }

    /// K.
    pub fn index(self) -> u32 {
        self.index
    }

    /// N.
    pub fn count(self) -> u32 {
        self.count
    }

    /// The shard (0..count) a session belongs to: the first 8 bytes of SHA-256 of the id's bytes,
    /// big-endian, modulo `count`.
    pub fn of(session: Uuid, count: u32) -> u32 {
        let digest = Sha256::digest(session.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let shard = u64::from_be_bytes(first) % u64::from(count.max(1));
        u32::try_from(shard).expect("less than a u32")
    }

    /// Whether this shard writes `session`.
    pub fn owns(self, session: Uuid) -> bool {
        self.count == 1 || Self::of(session, self.count) == self.index
    }

    /// The durable consumer this shard reads through: `recorder` for `0/1`, else
    /// `recorder-K-of-N`.
    pub fn durable_name(self) -> String {
        if self.count == 1 {
            proto::subjects::RECORDER_DURABLE.to_string()
        } else {
            format!("{}-{}-of-{}", proto::subjects::RECORDER_DURABLE, self.index, self.count)
        }
    }
}

impl Default for Shard {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ShardError(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let number = |t: &str| {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse::<u32>().ok()
        };
        let (Some(k), Some(n)) = (number(k), number(n)) else { return Err(bad()) };
        Self::new(k, n).map_err(|_| bad())
    }
}

impl<'de> Deserialize<'de> for Shard {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_bad_ones_are_named() {
        for (text, index, count) in
            [("0/1", 0, 1), ("0/2", 0, 2), ("1/2", 1, 2), ("6/7", 6, 7), (" 2 / 3 ", 2, 3)]
        {
            let shard: Shard = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((shard.index(), shard.count()), (index, count), "{text}");
        }
        for text in [
            "3/2",
            "2/2",
            "0/0",
            "1",
            "",
            "/",
            "a/2",
            "1/b",
            "-1/2",
            "1/2/3",
            "+1/2",
            "1.0/2",
            "99999999999/2",
        ] {
            let e = text.parse::<Shard>().expect_err(text);
            assert_eq!(e.to_string(), format!("recorder.shard: expected K/N with 0 <= K < N, got {text:?}"));
        }
        assert_eq!(
            "3/2".parse::<Shard>().expect_err("bad").to_string(),
            r#"recorder.shard: expected K/N with 0 <= K < N, got "3/2""#
        );
        assert_eq!(Shard::default(), Shard::ALL);
        assert_eq!("1/2".parse::<Shard>().expect("good").to_string(), "1/2");
    }

    #[test]
    fn durable_names_keep_the_unsharded_name() {
        assert_eq!(Shard::ALL.durable_name(), "recorder");
        assert_eq!(Shard::new(1, 2).expect("good").durable_name(), "recorder-1-of-2");
        assert_eq!(Shard::new(0, 3).expect("good").durable_name(), "recorder-0-of-3");
    }

    #[test]
    fn the_shard_of_a_session_is_stable_and_every_session_has_exactly_one() {
        // Pinned: the function must never change, or a rolling upgrade would write sessions twice
        // (or not at all).
        let id = Uuid::parse_str("0193c1a2-7b4e-7cde-8f01-23456789abcd").expect("uuid");
        let digest = Sha256::digest(id.as_bytes());
        let expected = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        for n in 1..=9u32 {
            assert_eq!(u64::from(Shard::of(id, n)), expected % u64::from(n));
        }
        // UUIDv7s made in one burst (same millisecond) still spread over the shards, and each
        // session is owned by exactly one shard.
        let ids: Vec<Uuid> = (0..400).map(|_| Uuid::now_v7()).collect();
        for n in [2u32, 3, 5] {
            let mut per = vec![0usize; n as usize];
            for id in &ids {
                let owners: Vec<u32> =
                    (0..n).filter(|&k| Shard::new(k, n).expect("good").owns(*id)).collect();
                assert_eq!(owners.len(), 1, "{id} owned by {owners:?}");
                per[owners[0] as usize] += 1;
            }
            assert!(per.iter().all(|&c| c >= 400 / n as usize / 2), "{n} shards: {per:?}");
        }
    }

    #[test]
    fn the_config_reads_shard_from_toml() {
        let cfg: crate::RecorderConfig = toml_like("shard = \"1/3\"").expect("parses");
        assert_eq!(cfg.shard, Shard::new(1, 3).expect("good"));
        let cfg: crate::RecorderConfig = toml_like("").expect("parses");
        assert_eq!(cfg.shard, Shard::ALL);
        let e = toml_like("shard = \"3/2\"").expect_err("3/2 is no shard");
        assert!(e.contains(r#"recorder.shard: expected K/N with 0 <= K < N, got "3/2""#), "{e}");
    }

    fn toml_like(text: &str) -> Result<crate::RecorderConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}
