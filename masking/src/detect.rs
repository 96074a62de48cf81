//! PII detectors: find e-mail addresses, phone numbers, payment cards, IBANs, SSNs, IP addresses,
//! JWTs and API keys in a text, each candidate confirmed by a validator (Luhn, mod-97, address
//! parsing, base64url decoding…) so that identifiers, amounts, dates and versions survive.
//!
//! The hot path is built for texts without PII: one byte pass computes which detectors could
//! possibly match (an e-mail needs `@`, a card needs 13 digits…), then one [`RegexSet`] pass tells
//! which candidate patterns occur, and only then the per-detector regexes and validators run.
//!
//! Hits never contain `"` or `\` and never start inside a backslash escape, so replacing a hit in
//! a JSON string, an XML text or a PostgreSQL array literal keeps the document well formed.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use regex::{Regex, RegexSet};

/// One kind of personal or secret data that can be found in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    /// An e-mail address (`alice@example.com`).
    Email,
    /// A phone number in E.164 (`+14155552671`) or a common national format (`(415) 555-2671`).
    Phone,
    /// A payment card number (known issuer prefix, Luhn check digit).
    CreditCard,
    /// An international bank account number (country length, mod-97 check).
    Iban,
    /// A US social security number written `AAA-GG-SSSS`.
    Ssn,
    /// A dotted-quad IPv4 address.
    Ipv4,
    /// An IPv6 address, compressed or not.
    Ipv6,
    /// A JSON Web Token (three base64url segments, header with `"alg"`).
    Jwt,
    /// A cloud or SaaS API key of a well-known shape (AWS, GitHub, Slack, Stripe, OpenAI…).
    ApiKey,
}

impl Detector {
    /// Every detector, in declaration order.
    pub const ALL: [Detector; 9] = [
        Detector::Email,
        Detector::Phone,
        Detector::CreditCard,
        Detector::Iban,
        Detector::Ssn,
        Detector::Ipv4,
        Detector::Ipv6,
        Detector::Jwt,
        Detector::ApiKey,
    ];

    /// The name used in policies and in masked output (`credit_card`).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::CreditCard => "credit_card",
            Detector::Iban => "iban",
            Detector::Ssn => "ssn",
            Detector::Ipv4 => "ipv4",
            Detector::Ipv6 => "ipv6",
            Detector::Jwt => "jwt",
            Detector::ApiKey => "api_key",
        }
    }

    const fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A detector name that is not one of [`Detector::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown detector `{name}`; valid detectors are: email, phone, credit_card, iban, ssn, ipv4, ipv6, jwt, api_key"
)]
pub struct UnknownDetector {
    /// The name that was given.
    pub name: String,
}

impl FromStr for Detector {
    type Err = UnknownDetector;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Detector::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDetector { name: s.to_owned() })
    }
}

/// One confirmed finding: `text[start..end]` (byte offsets) is a value of kind `detector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// What was found. When findings of two detectors overlap they are merged into one hit
    /// labelled with the longer finding's detector.
    pub detector: Detector,
    /// Byte offset of the first byte (always on a character boundary).
    pub start: usize,
    /// Byte offset one past the last byte (always on a character boundary).
    pub end: usize,
}

/// A compiled set of detectors. Cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct Detectors {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: u16,
    list: Vec<Detector>,
    /// Candidate patterns of the enabled detectors; `None` when no detector is enabled.
    set: Option<RegexSet>,
    /// Detector bit of each pattern of `set`.
    set_bits: Vec<u16>,
    run: Regex,
    email: Regex,
    ipv6: Regex,
    jwt: Regex,
    api_key: Regex,
    iban: Regex,
}

impl fmt::Debug for Detectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Detectors").field(&self.inner.list).finish()
    }
}

/// A run of digits joined by at most two of ` .()-`, with an optional leading `+`, `+(` or `(`:
/// the candidates of the numeric detectors (phone, card, SSN, IPv4), split into groups later.
const RUN: &str = r"(?:\+\(?|\()?[0-9](?:[ .()\-]{0,2}[0-9])*\)?";
const EMAIL: &str = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+";
const IPV6: &str = r"[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f.:]*";
const JWT: &str = r"e[A-Za-z0-9_\-]{13,}\.[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*";
const API_KEY: &str = concat!(
    r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}",
    r"|xox[baprs]-[A-Za-z0-9\-]{10,}|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
    r"|sk-[A-Za-z0-9_\-]{20,}|AIza[0-9A-Za-z_\-]{35}|glpat-[A-Za-z0-9_\-]{20}"
);
const IBAN: &str = r"[A-Z]{2}[0-9]{2} ?[A-Z0-9]{4}";
/// Necessary conditions for the numeric detectors (their validators accept nothing else).
const PHONE_SET: &str = concat!(
    r"\+\(?[0-9]|\([0-9]{3}\)|[0-9]{3}[ .\-][0-9]{3}[ .\-][0-9]{4}",
    r"|0[1-9][0-9]{0,3}(?:\)? ?|-)[0-9]{2}"
);
const CARD_SET: &str = r"[0-9](?:[ \-]?[0-9]){12,18}";
const SSN_SET: &str = r"[0-9]{3}-[0-9]{2}-[0-9]{4}";
const IPV4_SET: &str = r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}";

const NUMERIC: u16 =
    Detector::Phone.bit() | Detector::CreditCard.bit() | Detector::Ssn.bit() | Detector::Ipv4.bit();

/// After this many candidates rejected for their left boundary, API-key scanning resumes after
/// each candidate instead of one byte later (bounds the work on adversarial texts).
const RETRY_BUDGET: u32 = 16;

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).expect("built-in detector patterns compile")
}

impl Detectors {
    /// Compiles the given detectors (duplicates are ignored). Compile once and clone.
    #[must_use]
    pub fn new(detectors: &[Detector]) -> Detectors {
        let mut list: Vec<Detector> = detectors.to_vec();
        list.sort_unstable();
        list.dedup();
        let enabled = list.iter().fold(0, |acc, d| acc | d.bit());
        let mut patterns = Vec::new();
        let mut set_bits = Vec::new();
        for &d in &list {
            let pattern = match d {
                Detector::Email => EMAIL,
                Detector::Phone => PHONE_SET,
                Detector::CreditCard => CARD_SET,
                Detector::Iban => IBAN,
                Detector::Ssn => SSN_SET,
                Detector::Ipv4 => IPV4_SET,
                Detector::Ipv6 => IPV6,
                Detector::Jwt => JWT,
                Detector::ApiKey => API_KEY,
            };
            patterns.push(pattern);
            set_bits.push(d.bit());
        }
        let set = if patterns.is_empty() {
            None
        } else {
            Some(RegexSet::new(&patterns).expect("built-in detector patterns compile"))
        };
        Detectors {
            inner: Arc::new(Inner {
                enabled,
                list,
                set,
                set_bits,
                run: compile(RUN),
                email: compile(EMAIL),
                ipv6: compile(IPV6),
                jwt: compile(JWT),
                api_key: compile(API_KEY),
                iban: compile(IBAN),
            }),
        }
    }

    /// True when no detector is enabled: [`Detectors::scan`] never finds anything.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.inner.list.is_empty()
    }

    /// The enabled detectors, sorted, without duplicates.
    #[must_use]
    pub fn detectors(&self) -> &[Detector] {
        &self.inner.list
    }

    /// Finds every confirmed hit in `text`: sorted by offset, non-overlapping.
    #[must_use]
    pub fn scan(&self, text: &str) -> Vec<Hit> {
        let mut out = Vec::new();
        self.scan_into(text, &mut out);
        out
    }

    /// Like [`Detectors::scan`], but clears and fills `out`, so a caller can reuse one buffer.
    pub fn scan_into(&self, text: &str, out: &mut Vec<Hit>) {
        self.scan_admitted(text, prefilter(text.as_bytes()), out);
    }

    /// [`Detectors::scan_into`] for the detectors `admitted` (the prefilter's answer).
    fn scan_admitted(&self, text: &str, admitted: u16, out: &mut Vec<Hit>) {
        out.clear();
        let inner = &*self.inner;
        let possible = admitted & inner.enabled;
        if possible == 0 {
            return;
        }
        let Some(set) = &inner.set else { return };
        let mut matched = [false; Detector::ALL.len()];
        let matched = &mut matched[..inner.set_bits.len()];
        if !set.matches_read_at(matched, text, 0) {
            return;
        }
        let mut want = 0;
        for (&m, &bit) in matched.iter().zip(&inner.set_bits) {
            if m {
                want |= bit;
            }
        }
        want &= possible;
        if want == 0 {
            return;
        }
        if want & NUMERIC != 0 {
            inner.scan_numeric(text, want, out);
        }
        if want & Detector::Email.bit() != 0 {
            inner.scan_email(text, out);
        }
        if want & Detector::Ipv6.bit() != 0 {
            inner.scan_ipv6(text, out);
        }
        if want & Detector::Jwt.bit() != 0 {
            inner.scan_jwt(text, out);
        }
        if want & Detector::ApiKey.bit() != 0 {
            inner.scan_api_key(text, out);
        }
        if want & Detector::Iban.bit() != 0 {
            inner.scan_iban(text, out);
        }
        merge(out);
    }
}

/// One pass over the bytes: the detectors that could match at all.
fn prefilter(b: &[u8]) -> u16 {
    let (mut digits, mut colons, mut dots, mut dashes) = (0u32, 0u32, 0u32, 0u32);
    let (mut at, mut api_key, mut phone, mut iban) = (false, false, false, false);
    let (mut prev3, mut prev2, mut prev) = (0u8, 0u8, 0u8);
    // Digits in the current run of digits joined by at most two of ` .()-` (a numeric
    // candidate, [`RUN`], lies within one such run), and the most in any run.
    let (mut run, mut gap, mut longest_run) = (0u32, 3u32, 0u32);
    for &c in b {
        match c {
            b'0'..=b'9' => {
                run = if gap <= 2 { run + 1 } else { 1 };
                gap = 0;
                longest_run = longest_run.max(run);
            }
            b' ' | b'.' | b'(' | b')' | b'-' => gap = gap.saturating_add(1),
            _ => gap = 3,
        }
        match c {
            b'0'..=b'9' => digits += 1,
            b'@' => at = true,
            b':' => colons += 1,
            b'.' => dots += 1,
            b'-' => dashes += 1,
            _ => {}
        }
        // Every API key pattern holds one of these: `AK`, `AS`, `AI` (AKIA, ASIA, AIza),
        // `h?_` (gh?_), `b_p` (github_pat_), `xox`, `k_l`/`k_t` (sk_live_, pk_test_, ...),
        // `sk-` and `at-` (glpat-).
        api_key |= matches!(
            (prev2, prev, c),
            (_, b'A', b'K' | b'S' | b'I')
                | (b'x', b'o', b'x')
                | (b'b', b'_', b'p')
                | (b'h', b'p' | b'o' | b'u' | b's' | b'r', b'_')
                | (b'k', b'_', b'l' | b't')
                | (b's', b'k', b'-')
                | (b'a', b't', b'-')
        );
        // The phone candidates hold `+` before a digit or `(`, `(` before three digits, a digit,
        // one of ` .-` and a digit, or `0` before a nonzero digit.
        let digit = c.is_ascii_digit();
        phone |= (prev == b'+' && (digit || c == b'('))
            || (prev3 == b'(' && prev2.is_ascii_digit() && prev.is_ascii_digit() && digit)
            || (prev2.is_ascii_digit() && matches!(prev, b' ' | b'.' | b'-') && digit)
            || (prev == b'0' && matches!(c, b'1'..=b'9'));
        // An IBAN starts with two capital letters and two digits.
        iban |= prev3.is_ascii_uppercase() && prev2.is_ascii_uppercase() && prev.is_ascii_digit() && digit;
        prev3 = prev2;
        prev2 = prev;
        prev = c;
    }
    let len = b.len();
    let mut bits = 0;
    let mut set = |cond: bool, d: Detector| {
        if cond {
            bits |= d.bit();
        }
    };
    set(at && dots > 0, Detector::Email);
    set(longest_run >= 7 && phone, Detector::Phone);
    set(longest_run >= 13, Detector::CreditCard);
    set(iban && len >= 15, Detector::Iban);
    set(digits >= 9 && dashes >= 2, Detector::Ssn);
    set(digits >= 4 && dots >= 3, Detector::Ipv4);
    set(colons >= 2, Detector::Ipv6);
    set(dots >= 2 && len >= 18, Detector::Jwt);
    set(len >= 15 && api_key, Detector::ApiKey);
    bits
}

/// Sorts hits and merges overlapping ones (the longer finding names the merged hit).
fn merge(out: &mut Vec<Hit>) {
    if out.len() < 2 {
        return;
    }
    out.sort_unstable_by_key(|h| (h.start, std::cmp::Reverse(h.end)));
    let mut w = 0;
    let mut r = 0;
    while r < out.len() {
        let h = out[r];
        r += 1;
        if w > 0 && h.start < out[w - 1].end {
            let last = &mut out[w - 1];
            if h.end - h.start > last.end - last.start {
                last.detector = h.detector;
            }
            last.end = last.end.max(h.end);
        } else {
            out[w] = h;
            w += 1;
        }
    }
    out.truncate(w);
}

/// Moves `start` past a backslash escape (`\n`, `\uXXXX`) that covers it, so that replacing the
/// hit never breaks an escape of a JSON string or an array literal.
fn escape_safe_start(b: &[u8], start: usize) -> usize {
    let lo = start.saturating_sub(6);
    let Some(k) = (lo..start).rev().find(|&k| b[k] == b'\\') else { return start };
    let run = b[..=k].iter().rev().take_while(|&&c| c == b'\\').count();
    if run % 2 == 0 {
        return start;
    }
    let escape_end = if b.get(k + 1) == Some(&b'u') { k + 6 } else { k + 2 };
    escape_end.max(start)
}

fn push(b: &[u8], out: &mut Vec<Hit>, detector: Detector, start: usize, end: usize) {
    let start = escape_safe_start(b, start);
    // Every hit is ASCII, so any offset inside it is a character boundary.
    if start < end {
        out.push(Hit { detector, start, end });
    }
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn prev_byte(b: &[u8], i: usize) -> Option<u8> {
    i.checked_sub(1).and_then(|j| b.get(j).copied())
}

/// The digit groups of one numeric run.
struct Run<'a> {
    b: &'a [u8],
    start: usize,
    end: usize,
    groups: &'a [(usize, usize)],
}

impl Run<'_> {
    fn len(&self, i: usize) -> usize {
        self.groups[i].1 - self.groups[i].0
    }

    fn digits(&self, i: usize) -> &[u8] {
        &self.b[self.groups[i].0..self.groups[i].1]
    }

    /// The separator between group `i` and group `i + 1`.
    fn sep(&self, i: usize) -> &[u8] {
        &self.b[self.groups[i].1..self.groups[i + 1].0]
    }

    fn plus(&self) -> bool {
        self.b.get(self.start) == Some(&b'+')
    }

    /// Group `i` is not glued to more digits on its left by `-` or `.` and not inside a word.
    fn free_left(&self, i: usize, allow_paren: bool) -> bool {
        if i == 0 {
            let prefix = &self.b[self.start..self.groups[0].0];
            (prefix.is_empty() || (allow_paren && prefix == b"("))
                && !prev_byte(self.b, self.start).is_some_and(|c| is_word(c) || c == b'.')
        } else {
            !self.sep(i - 1).iter().any(|&c| c == b'-' || c == b'.')
        }
    }

    /// Group `j` is not glued to more digits on its right by `-` or `.` and not inside a word.
    fn free_right(&self, j: usize) -> bool {
        if j + 1 == self.groups.len() {
            !self.b.get(self.end).is_some_and(|&c| is_word(c))
        } else {
            !self.sep(j).iter().any(|&c| c == b'-' || c == b'.')
        }
    }

    fn card(&self, i: usize) -> Option<usize> {
        let n = self.groups.len();
        let mut buf = [0u8; 19];
        let mut count = 0;
        let mut sep: Option<&[u8]> = None;
        let mut best = None;
        for j in i..n.min(i + 5) {
            if j > i {
                let s = self.sep(j - 1);
                if (s != b" " && s != b"-") || sep.is_some_and(|p| p != s) {
                    break;
                }
                sep = Some(s);
                // Groups of a written card number have 3 or more digits (the last may be shorter).
                if self.len(j - 1) < 3 {
                    break;
                }
            }
            let d = self.digits(j);
            if count + d.len() > 19 {
                break;
            }
            buf[count..count + d.len()].copy_from_slice(d);
            count += d.len();
            if count >= 13 && card_valid(&buf[..count]) {
                best = Some(j);
            }
        }
        best
    }

    fn ssn(&self, i: usize) -> bool {
        i + 2 < self.groups.len()
            && (self.len(i), self.len(i + 1), self.len(i + 2)) == (3, 2, 4)
            && self.sep(i) == b"-"
            && self.sep(i + 1) == b"-"
            && self.free_left(i, true)
            && self.free_right(i + 2)
            && ssn_valid(self.digits(i), self.digits(i + 1), self.digits(i + 2))
    }

    fn ipv4(&self, i: usize) -> bool {
        if i + 3 >= self.groups.len() || !(i..i + 3).all(|k| self.sep(k) == b".") {
            return false;
        }
        if !(i..=i + 3).all(|k| self.len(k) <= 3 && (self.len(k) == 1 || self.digits(k)[0] != b'0')) {
            return false;
        }
        // Not part of a longer dotted run (`1.2.3.4.5`) nor of a word (`v1.2.3.4`).
        let (s, e) = (self.groups[i].0, self.groups[i + 3].1);
        let left_ok = !prev_byte(self.b, s).is_some_and(|c| is_word(c) || c == b'.' || c == b'+');
        let right_ok = match self.b.get(e) {
            Some(&c) if is_word(c) => false,
            Some(b'.') => !self.b.get(e + 1).is_some_and(u8::is_ascii_digit),
            _ => true,
        };
        left_ok
            && right_ok
            && std::str::from_utf8(&self.b[self.groups[i].0..self.groups[i + 3].1])
                .ok()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
                .is_some()
    }

    /// A phone number starting at group `i`: its byte span.
    fn phone(&self, i: usize) -> Option<(usize, usize, usize)> {
        let n = self.groups.len();
        if i == 0 && self.plus() {
            if prev_byte(self.b, self.start).is_some_and(is_word) {
                return None;
            }
            let mut count = 0;
            let mut last = None;
            for j in 0..n {
                count += self.len(j);
                if count > 15 {
                    break;
                }
                if count >= 8 {
                    last = Some(j);
                }
            }
            return last.map(|j| (self.start, self.groups[j].1, j));
        }
        let lens = |k: usize| if k < n { self.len(k) } else { 0 };
        let same_sep = |from: usize, to: usize, allowed: &[&[u8]]| {
            let first = self.sep(from);
            allowed.contains(&first) && (from..to).all(|k| self.sep(k) == first)
        };
        // (415) 555-2671
        let open = self.groups[i].0.checked_sub(1).is_some_and(|k| self.b[k] == b'(');
        let paren = open && i + 1 < n && matches!(self.sep(i), b")" | b") ") && self.free_left(i, true);
        if paren
            && (lens(i), lens(i + 1), lens(i + 2)) == (3, 3, 4)
            && matches!(self.sep(i + 1), b"-" | b" " | b".")
            && self.free_right(i + 2)
        {
            return Some((self.groups[i].0 - 1, self.groups[i + 2].1, i + 2));
        }
        let plain = self.free_left(i, false);
        let seps: &[&[u8]] = &[b"-", b".", b" "];
        // 415-555-2671, 415.555.2671, 415 555 2671
        if plain
            && (lens(i), lens(i + 1), lens(i + 2)) == (3, 3, 4)
            && same_sep(i, i + 2, seps)
            && self.free_right(i + 2)
        {
            return Some((self.groups[i].0, self.groups[i + 2].1, i + 2));
        }
        // 1-800-555-1234
        if plain
            && (lens(i), lens(i + 1), lens(i + 2), lens(i + 3)) == (1, 3, 3, 4)
            && self.digits(i) == b"1"
            && same_sep(i, i + 3, seps)
            && self.free_right(i + 3)
        {
            return Some((self.groups[i].0, self.groups[i + 3].1, i + 3));
        }
        // A trunk prefix (`0` then 1-4 digits), then one group of 5-8 digits or 2-4 groups of
        // 2-4 digits: 020 7946 0958, (020) 7946 0958, 06 12 34 56 78, 0151-12345678.
        let first = self.digits(i);
        if !(plain || paren) || !(2..=5).contains(&first.len()) || first[0] != b'0' || first[1] == b'0' {
            return None;
        }
        let (mut count, mut all_small, mut sep) = (first.len(), true, None::<&[u8]>);
        let mut best = None;
        for j in i + 1..n.min(i + 5) {
            let s = self.sep(j - 1);
            if !(paren && j == i + 1) {
                if (s != b" " && s != b"-") || sep.is_some_and(|p| p != s) {
                    break;
                }
                sep = Some(s);
            }
            let len = self.len(j);
            count += len;
            all_small &= (2..=4).contains(&len);
            let following = j - i;
            if len > 8 || (following >= 2 && !all_small) {
                break;
            }
            let shape = if following == 1 { (5..=8).contains(&len) } else { all_small };
            if shape && (9..=12).contains(&count) && self.free_right(j) {
                best = Some(j);
            }
        }
        let start = if paren { self.groups[i].0 - 1 } else { self.groups[i].0 };
        best.map(|j| (start, self.groups[j].1, j))
    }
}

impl Inner {
    fn scan_numeric(&self, text: &str, want: u16, out: &mut Vec<Hit>) {
        let b = text.as_bytes();
        let mut groups: Vec<(usize, usize)> = Vec::new();
        for m in self.run.find_iter(text) {
            groups.clear();
            let mut i = m.start();
            while i < m.end() {
                if b[i].is_ascii_digit() {
                    let g = i;
                    while i < m.end() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    groups.push((g, i));
                } else {
                    i += 1;
                }
            }
            let run = Run { b, start: m.start(), end: m.end(), groups: &groups };
            let (mut next_card, mut next_phone) = (0, 0);
            for g in 0..groups.len() {
                if want & Detector::CreditCard.bit() != 0
                    && g >= next_card
                    && let Some(j) = run.card(g)
                {
                    push(b, out, Detector::CreditCard, groups[g].0, groups[j].1);
                    next_card = j + 1;
                }
                if want & Detector::Ssn.bit() != 0 && run.ssn(g) {
                    push(b, out, Detector::Ssn, groups[g].0, groups[g + 2].1);
                }
                if want & Detector::Ipv4.bit() != 0 && run.ipv4(g) {
                    push(b, out, Detector::Ipv4, groups[g].0, groups[g + 3].1);
                }
                if want & Detector::Phone.bit() != 0
                    && g >= next_phone
                    && let Some((s, e, j)) = run.phone(g)
                {
                    push(b, out, Detector::Phone, s, e);
                    next_phone = j + 1;
                }
            }
        }
    }

    fn scan_email(&self, text: &str, out: &mut Vec<Hit>) {
        let b = text.as_bytes();
        for m in self.email.find_iter(text) {
            if let Some((s, e)) = email_span(b, m.start(), m.end()) {
                push(b, out, Detector::Email, s, e);
            }
        }
    }

    fn scan_ipv6(&self, text: &str, out: &mut Vec<Hit>) {
        let b = text.as_bytes();
        for m in self.ipv6.find_iter(text) {
            if let Some((s, e)) = ipv6_span(b, m.start(), m.end()) {
                push(b, out, Detector::Ipv6, s, e);
            }
        }
    }

    fn scan_jwt(&self, text: &str, out: &mut Vec<Hit>) {
        let b = text.as_bytes();
        for m in self.jwt.find_iter(text) {
            let header_end =
                b[m.start()..m.end()].iter().position(|&c| c == b'.').map_or(m.end(), |p| m.start() + p);
            // The header is JSON, so its base64url starts with `e`; try each `e` of the first
            // segment (a token glued to a preceding word starts later than the regex match).
            let mut s = m.start();
            while header_end - s >= 14 && s - m.start() < JWT_START_WINDOW {
                if b[s] == b'e' && jwt_header_ok(&b[s..header_end]) {
                    push(b, out, Detector::Jwt, s, m.end());
                    break;
                }
                s += 1;
            }
        }
    }

    fn scan_api_key(&self, text: &str, out: &mut Vec<Hit>) {
        let b = text.as_bytes();
        let mut pos = 0;
        let mut budget = RETRY_BUDGET;
        while let Some(m) = self.api_key.find_at(text, pos) {
            let (s, e) = (m.start(), m.end());
            let left_ok = !prev_byte(b, s).is_some_and(|c| c.is_ascii_alphanumeric());
            let fixed = b[s..].starts_with(b"AKIA")
                || b[s..].starts_with(b"ASIA")
                || (b[s..].starts_with(b"gh") && !b[s..].starts_with(b"github_pat_"));
            let extended = b[s..].starts_with(b"AIza") || b[s..].starts_with(b"glpat-");
            let right_ok = match b.get(e) {
                Some(&c) if fixed => !c.is_ascii_alphanumeric(),
                Some(&c) if extended => !(c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
                _ => true,
            };
            if left_ok && right_ok {
                push(b, out, Detector::ApiKey, s, e);
                pos = e;
            } else if budget > 0 {
                // A key inside the rejected candidate starts after a `-` or `_` of it.
                budget -= 1;
                pos = b[s..e].iter().position(|&c| c == b'-' || c == b'_').map_or(e, |p| s + p + 1);
            } else {
                pos = e;
            }
        }
    }

    fn scan_iban(&self, text: &str, out: &mut Vec<Hit>) {
        let b = text.as_bytes();
        let mut pos = 0;
        while let Some(m) = self.iban.find_at(text, pos) {
            if let Some(e) = iban_end(b, m.start()) {
                push(b, out, Detector::Iban, m.start(), e);
                pos = e;
            } else {
                // The candidate is ASCII, so the next byte is a character boundary.
                pos = m.start() + 1;
            }
        }
    }
}

/// Luhn check and a known issuer prefix with a length that issuer uses.
fn card_valid(d: &[u8]) -> bool {
    let n = d.len();
    let num = |k: usize| d[..k].iter().fold(0u32, |acc, &c| acc * 10 + u32::from(c - b'0'));
    let p2 = num(2);
    let p3 = num(3);
    let p4 = num(4);
    let brand_ok = match d[0] {
        b'4' => matches!(n, 13 | 16 | 19),
        b'5' => (51..=55).contains(&p2) && n == 16,
        b'2' => (2221..=2720).contains(&p4) && n == 16,
        b'3' => match p2 {
            34 | 37 => n == 15,
            35 => (3528..=3589).contains(&p4) && (16..=19).contains(&n),
            30 | 36 | 38 | 39 => (14..=19).contains(&n),
            _ => false,
        },
        b'6' => (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3) || p2 == 62) && (16..=19).contains(&n),
        _ => false,
    };
    brand_ok && luhn(d)
}

/// The Luhn (mod 10) check over ASCII digits.
fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, &c) in d.iter().rev().enumerate() {
        let mut v = u32::from(c - b'0');
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn ssn_valid(area: &[u8], group: &[u8], serial: &[u8]) -> bool {
    area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
}

/// The confirmed e-mail inside a candidate of the `EMAIL` pattern.
fn email_span(b: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let at = start + b[start..end].iter().position(|&c| c == b'@')?;
    let mut s = escape_safe_start(b, start);
    while s < at && b[s] == b'.' {
        s += 1;
    }
    let local = &b[s..at];
    if local.is_empty() || local.len() > 64 || local.ends_with(b".") || local.windows(2).any(|w| w == b"..") {
        return None;
    }
    // Drop trailing labels until the last one is an alphabetic TLD (`a@b.com.42` → `a@b.com`).
    let mut e = end;
    loop {
        let domain = &b[at + 1..e];
        let dot = domain.iter().rposition(|&c| c == b'.')?;
        let tld = &domain[dot + 1..];
        if tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic) {
            break;
        }
        e = at + 1 + dot;
    }
    let domain = &b[at + 1..e];
    let labels_ok = domain.len() <= 253
        && domain
            .split(|&c| c == b'.')
            .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with(b"-") && !l.ends_with(b"-"));
    labels_ok.then_some((s, e))
}

/// The confirmed IPv6 address inside a hex/colon/dot run.
fn ipv6_span(b: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let mut s = start;
    while s < end && b[s] == b'.' {
        s += 1;
    }
    if prev_byte(b, s).is_some_and(|c| is_word(c) || c == b':') || b.get(end).is_some_and(|&c| is_word(c)) {
        return None;
    }
    let mut e = end;
    for _ in 0..3 {
        let cand = &b[s..e];
        if cand.iter().filter(|&&c| c == b':').count() < 2 {
            return None;
        }
        if std::str::from_utf8(cand).ok().and_then(|t| t.parse::<Ipv6Addr>().ok()).is_some() {
            return Some((s, e));
        }
        match cand.last() {
            Some(b'.' | b':') => e -= 1,
            _ => return None,
        }
    }
    None
}

fn b64url(c: u8) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    }))
}

/// How far into a JWT candidate its real start is looked for (a token glued to a word).
const JWT_START_WINDOW: usize = 64;
/// How much of a JWT header is decoded to find `"alg"` (it comes first or nearly first).
const JWT_HEADER_PREFIX: usize = 1024;

/// The segment is unpadded base64url of a JSON object mentioning `"alg"` near its start.
fn jwt_header_ok(seg: &[u8]) -> bool {
    // `{` encodes as `e` followed by a character worth 48 or more (`w`-`z`, digits, `-`, `_`).
    if seg.len() % 4 == 1
        || seg.first() != Some(&b'e')
        || seg.get(1).and_then(|&c| b64url(c)).is_none_or(|v| v < 48)
    {
        return false;
    }
    let mut decoded = Vec::with_capacity(JWT_HEADER_PREFIX * 3 / 4 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in seg.iter().take(JWT_HEADER_PREFIX) {
        let Some(v) = b64url(c) else { return false };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            decoded.push(((acc >> bits) & 0xff) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    decoded.starts_with(b"{") && decoded.windows(5).any(|w| w == b"\"alg\"")
}

/// IBAN length per country (ISO 13616 registry: SEPA countries and most others).
fn iban_len(cc: &[u8]) -> Option<usize> {
    Some(match cc {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FO" | b"GL" | b"NL" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"XK" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"PL" | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        _ => return None,
    })
}

/// The end of a valid IBAN starting at `s` (compact, or in groups of four separated by spaces).
fn iban_end(b: &[u8], s: usize) -> Option<usize> {
    if prev_byte(b, s).is_some_and(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let len = iban_len(b.get(s..s + 2)?)?;
    let mut buf = [0u8; 34];
    let mut spaced = None;
    let mut i = s;
    for (count, slot) in buf.iter_mut().enumerate().take(len) {
        if count > 0 && count.is_multiple_of(4) {
            let space = b.get(i) == Some(&b' ');
            if *spaced.get_or_insert(space) != space {
                return None;
            }
            i += usize::from(space);
        }
        let c = *b.get(i)?;
        if !(c.is_ascii_uppercase() || c.is_ascii_digit()) {
            return None;
        }
        *slot = c;
        i += 1;
    }
    if b.get(i).is_some_and(u8::is_ascii_alphanumeric) {
        return None;
    }
    let (head, tail) = buf[..len].split_at(4);
    let mut r = 0u32;
    for &c in tail.iter().chain(head) {
        r = if c.is_ascii_digit() {
            (r * 10 + u32::from(c - b'0')) % 97
        } else {
            (r * 100 + u32::from(c - b'A') + 10) % 97
        };
    }
    (r == 1).then_some(i)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all() -> Detectors {
        Detectors::new(&Detector::ALL)
    }

    fn found(text: &str) -> Vec<(Detector, &str)> {
        all().scan(text).into_iter().map(|h| (h.detector, &text[h.start..h.end])).collect()
    }

    fn finds(text: &str, d: Detector, what: &str) {
        assert_eq!(found(text), vec![(d, what)], "in {text:?}");
    }

    /// Every hit in `text`, with the prefilter's answer or with every detector admitted.
    fn scanned(text: &str, admit_all: bool) -> Vec<Hit> {
        let mut out = Vec::new();
        let admitted = if admit_all { u16::MAX } else { prefilter(text.as_bytes()) };
        all().scan_admitted(text, admitted, &mut out);
        out
    }

    fn nothing(text: &str) {
        assert_eq!(found(text), vec![], "in {text:?}");
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_valid_ones() {
        for d in Detector::ALL {
            assert_eq!(d.as_str().parse::<Detector>(), Ok(d));
        }
        let e = "ip".parse::<Detector>().unwrap_err();
        assert!(e.to_string().contains("credit_card, iban"), "{e}");
    }

    #[test]
    fn emails() {
        finds("contact alice@example.com today", Detector::Email, "alice@example.com");
        finds(r#"{"email":"a@b.co"}"#, Detector::Email, "a@b.co");
        finds("x.y+tag@mail.example.org.", Detector::Email, "x.y+tag@mail.example.org");
        finds(r#"{"n":"line\nbob@example.com"}"#, Detector::Email, "bob@example.com");
        nothing("user@localhost");
        nothing("a@b.c1");
        nothing("a..b@example.com");
        nothing("@example.com");
    }

    #[test]
    fn phones() {
        finds("call (415) 555-2671 now", Detector::Phone, "(415) 555-2671");
        finds("call 415-555-2671", Detector::Phone, "415-555-2671");
        finds("415.555.2671", Detector::Phone, "415.555.2671");
        finds("tel +44 20 7946 0958", Detector::Phone, "+44 20 7946 0958");
        finds("tel:+14155552671", Detector::Phone, "+14155552671");
        finds("020 7946 0958", Detector::Phone, "020 7946 0958");
        finds("+1 (415) 555-2671", Detector::Phone, "+1 (415) 555-2671");
        finds("1-800-555-1234", Detector::Phone, "1-800-555-1234");
        finds("(020) 7946 0958", Detector::Phone, "(020) 7946 0958");
        finds("portable 06 12 34 56 78", Detector::Phone, "06 12 34 56 78");
        finds("tel. 0151-12345678", Detector::Phone, "0151-12345678");
        nothing("01 02 2024");
        nothing("ISBN 978-3-16-148410-0");
        nothing("2024-01-15");
        nothing("order 4155552671");
        nothing("amount 1234.56");
        nothing("v415-555-2671x");
        nothing("+1234567");
    }

    #[test]
    fn cards() {
        finds("card 4111 1111 1111 1111 exp", Detector::CreditCard, "4111 1111 1111 1111");
        finds("4111-1111-1111-1111", Detector::CreditCard, "4111-1111-1111-1111");
        finds("4111111111111111", Detector::CreditCard, "4111111111111111");
        finds("amex 378282246310005", Detector::CreditCard, "378282246310005");
        finds("mc 5555555555554444", Detector::CreditCard, "5555555555554444");
        finds("ref 12 4111 1111 1111 1111", Detector::CreditCard, "4111 1111 1111 1111");
        nothing("4111111111111112");
        nothing("41111111111111110000");
        nothing("order 1234567890123456");
        nothing("4111 1111-1111 1111");
    }

    #[test]
    fn ibans() {
        finds("IBAN GB82 WEST 1234 5698 7654 32 please", Detector::Iban, "GB82 WEST 1234 5698 7654 32");
        finds("GB82WEST12345698765432", Detector::Iban, "GB82WEST12345698765432");
        finds("DE89370400440532013000", Detector::Iban, "DE89370400440532013000");
        nothing("GB82 WEST 1234 5698 7654 33");
        nothing("GB82WEST12345698765432X");
        nothing("XX82WEST12345698765432");
    }

    #[test]
    fn ssns() {
        finds("ssn 123-45-6789", Detector::Ssn, "123-45-6789");
        nothing("000-12-3456");
        nothing("666-12-3456");
        nothing("912-12-3456");
        nothing("123-00-4567");
        nothing("123-45-0000");
        nothing("123456789");
        nothing("1-123-45-6789");
    }

    #[test]
    fn ipv4s() {
        finds("from 192.168.1.10 at", Detector::Ipv4, "192.168.1.10");
        finds("10.0.0.1:5432", Detector::Ipv4, "10.0.0.1");
        finds("net 10.0.0.0/8", Detector::Ipv4, "10.0.0.0");
        nothing("1.2.3.4.5");
        nothing("192.168.001.1");
        nothing("256.1.1.1");
        nothing("version 1.2.3");
    }

    #[test]
    fn ipv6s() {
        finds("addr 2001:db8::1 ok", Detector::Ipv6, "2001:db8::1");
        finds("[fe80::1ff:fe23:4567:890a]:443", Detector::Ipv6, "fe80::1ff:fe23:4567:890a");
        finds("::ffff:192.0.2.1", Detector::Ipv6, "::ffff:192.0.2.1");
        nothing("12:30:45");
        nothing("2024-01-15T12:30:45Z");
        nothing("std::fmt::Display");
        nothing("00:1A:2B:3C:4D:5E");
    }

    #[test]
    fn jwts() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        finds(&format!("Bearer {jwt}"), Detector::Jwt, jwt);
        finds(&format!(r#"{{"t":"{jwt}"}}"#), Detector::Jwt, jwt);
        nothing("eyJub3RhbGciOjF9xx.abc.def");
        nothing("example.domain.com and more text");
    }

    #[test]
    fn identifiers_with_underscores_and_dashes_skip_the_api_key_patterns() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "UPDATE user_accounts SET last_login = now() WHERE account_id = 7",
            "select my-col, other_col from some_schema.some_table",
        ] {
            assert_eq!(prefilter(sql.as_bytes()) & Detector::ApiKey.bit(), 0, "{sql}");
        }
    }

    #[test]
    fn capitalised_keywords_and_plain_numbers_skip_the_phone_and_iban_patterns() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 612345;",
            "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 512345;",
            "INSERT INTO t VALUES (45, 3, 512345, -4321, CURRENT_TIMESTAMP);",
            // Enough digits, and `0` before a nonzero digit, but no run of seven.
            "UPDATE pgbench_accounts SET abalance = abalance + 1234 WHERE aid = 105034;",
        ] {
            assert_eq!(
                prefilter(sql.as_bytes()) & (Detector::Phone.bit() | Detector::Iban.bit()),
                0,
                "{sql}"
            );
        }
        // Still admitted: a phone number, an IBAN.
        assert_ne!(prefilter(b"call +1 415 555 2671 now") & Detector::Phone.bit(), 0);
        assert_ne!(prefilter(b"pay to DE89 3704 0044 0532 0130 00") & Detector::Iban.bit(), 0);
    }

    #[test]
    fn api_keys() {
        finds("aws AKIAIOSFODNN7EXAMPLE", Detector::ApiKey, "AKIAIOSFODNN7EXAMPLE");
        let gh = format!("ghp_{}", "a1".repeat(18));
        finds(&gh, Detector::ApiKey, &gh);
        finds("sk_live_4eC39HqLyjWDarjtT1zdp7dc", Detector::ApiKey, "sk_live_4eC39HqLyjWDarjtT1zdp7dc");
        finds("key=sk-proj-abcdefghijklmnopqrstuvwx", Detector::ApiKey, "sk-proj-abcdefghijklmnopqrstuvwx");
        finds("task-sk-abcdefghijklmnopqrstuvwx", Detector::ApiKey, "sk-abcdefghijklmnopqrstuvwx");
        finds("xoxb-123456789012-abcdefghij", Detector::ApiKey, "xoxb-123456789012-abcdefghij");
        let pat = format!("github_pat_{}", "A1_b".repeat(6));
        finds(&pat, Detector::ApiKey, &pat);
        let google = format!("AIza{}", "x".repeat(35));
        finds(&google, Detector::ApiKey, &google);
        finds("glpat-abcdefghij0123456789", Detector::ApiKey, "glpat-abcdefghij0123456789");
        finds("pk_test_abcdefghij0123456789", Detector::ApiKey, "pk_test_abcdefghij0123456789");
        nothing("AKIAIOSFODNN7EXAMPLEX");
        nothing("ask-abcdefghijklmnopqrstuvwxyz");
    }

    #[test]
    fn json_hits_never_touch_quotes_or_escapes() {
        let text = r#"{"e":"alice@example.com","n":1,"x":"\u0041bob@example.com\\"}"#;
        for h in all().scan(text) {
            let s = &text[h.start..h.end];
            assert!(!s.contains('"') && !s.contains('\\'), "{s}");
            assert!(!text[..h.start].ends_with('\\'));
        }
        assert_eq!(all().scan(text).len(), 2);
    }

    #[test]
    fn only_enabled_detectors_run() {
        let d = Detectors::new(&[Detector::Email, Detector::Email]);
        assert_eq!(d.detectors(), &[Detector::Email]);
        assert!(d.scan("4111 1111 1111 1111").is_empty());
        assert!(Detectors::new(&[]).is_empty());
        assert!(Detectors::new(&[]).scan("a@example.com").is_empty());
    }

    #[test]
    fn overlapping_hits_are_merged() {
        let text = "::ffff:192.0.2.1";
        let hits = all().scan(text);
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].start, hits[0].end), (0, text.len()));
    }

    /// A card number with a valid prefix and check digit.
    pub(crate) fn card_strategy() -> impl Strategy<Value = String> {
        let prefixes = prop::sample::select(vec![
            ("4", 16),
            ("4", 13),
            ("51", 16),
            ("55", 16),
            ("2221", 16),
            ("2720", 16),
            ("34", 15),
            ("37", 15),
            ("6011", 16),
            ("65", 16),
            ("644", 19),
            ("3530", 16),
            ("36", 14),
            ("62", 17),
        ]);
        (prefixes, prop::collection::vec(0u8..10, 19)).prop_map(|((p, len), body)| {
            let mut d: Vec<u8> = p.bytes().collect();
            d.extend(body.iter().take(len - 1 - p.len()).map(|v| b'0' + v));
            d.push(b'0');
            for check in b'0'..=b'9' {
                *d.last_mut().unwrap() = check;
                if luhn(&d) {
                    break;
                }
            }
            String::from_utf8(d).unwrap()
        })
    }

    fn group(card: &str, sep: &str) -> String {
        let chunks: Vec<String> =
            card.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        chunks.join(sep)
    }

    pub(crate) fn iban_strategy() -> impl Strategy<Value = String> {
        let countries =
            prop::sample::select(vec!["GB", "DE", "FR", "NL", "NO", "CH", "ES", "IT", "BE", "MT"]);
        (countries, prop::collection::vec(0u8..36, 30)).prop_map(|(cc, body)| {
            let len = iban_len(cc.as_bytes()).unwrap();
            let bban: String = body
                .iter()
                .take(len - 4)
                .map(|&v| if v < 10 { char::from(b'0' + v) } else { char::from(b'A' + v - 10) })
                .collect();
            let mut r = 0u32;
            for c in format!("{bban}{cc}00").bytes() {
                r = if c.is_ascii_digit() {
                    (r * 10 + u32::from(c - b'0')) % 97
                } else {
                    (r * 100 + u32::from(c - b'A') + 10) % 97
                };
            }
            format!("{cc}{:02}{bban}", 98 - r)
        })
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-z]{1,8}"
    }

    proptest! {
        #[test]
        fn valid_cards_are_found_anywhere(card in card_strategy(), pre in word(), post in word(), sep in prop::sample::select(vec!["", " ", "-"])) {
            let shown = if sep.is_empty() { card.clone() } else { group(&card, sep) };
            let text = format!("{pre} {shown} {post}");
            prop_assert_eq!(found(&text), vec![(Detector::CreditCard, shown.as_str())]);
        }

        #[test]
        fn one_changed_digit_breaks_a_card(card in card_strategy(), pos in 0usize..19, delta in 1u8..10) {
            let mut d = card.into_bytes();
            let pos = pos % d.len();
            d[pos] = b'0' + (d[pos] - b'0' + delta) % 10;
            let text = String::from_utf8(d).unwrap();
            prop_assert!(!found(&text).iter().any(|(det, _)| *det == Detector::CreditCard), "{}", text);
        }

        #[test]
        fn valid_ibans_are_found(iban in iban_strategy(), spaced: bool, pre in word()) {
            let shown = if spaced { group(&iban, " ") } else { iban.clone() };
            let text = format!("{pre} {shown}.");
            prop_assert_eq!(found(&text), vec![(Detector::Iban, shown.as_str())]);
        }

        #[test]
        fn mutated_ibans_are_not_found(iban in iban_strategy(), pos in 4usize..34, delta in 1u8..10) {
            let mut d = iban.into_bytes();
            let pos = 4 + pos % (d.len() - 4);
            if d[pos].is_ascii_digit() {
                d[pos] = b'0' + (d[pos] - b'0' + delta) % 10;
            } else {
                d[pos] = b'A' + (d[pos] - b'A' + delta) % 26;
            }
            let text = String::from_utf8(d).unwrap();
            prop_assert!(!found(&text).iter().any(|(det, _)| *det == Detector::Iban), "{}", text);
        }

        #[test]
        fn valid_ssns_are_found(area in 1u32..900, group in 1u32..100, serial in 1u32..10000, pre in word()) {
            prop_assume!(area != 666);
            let ssn = format!("{area:03}-{group:02}-{serial:04}");
            let text = format!("{pre}: {ssn}");
            prop_assert_eq!(found(&text), vec![(Detector::Ssn, ssn.as_str())]);
        }

        #[test]
        fn any_ipv4_is_found(ip: Ipv4Addr, pre in word()) {
            let shown = ip.to_string();
            let text = format!("{pre} {shown}, ok");
            prop_assert_eq!(found(&text), vec![(Detector::Ipv4, shown.as_str())]);
        }

        #[test]
        fn any_ipv6_is_found(ip: Ipv6Addr, pre in word()) {
            let shown = ip.to_string();
            let text = format!("{pre} {shown} ok");
            let hits = found(&text);
            prop_assert_eq!(hits.len(), 1);
            prop_assert_eq!(hits[0].1, shown.as_str());
        }

        /// The prefilter must admit every text the API key pattern matches (it only saves the
        /// regex work for texts that cannot hold a key): keys drawn from the pattern itself,
        /// between arbitrary words, and whatever random text around `_`, `-` and capitals holds.
        #[test]
        fn the_prefilter_admits_every_api_key(key in API_KEY, pre in "[A-Za-z0-9_ -]{0,12}", post in "[A-Za-z0-9_ -]{0,12}") {
            let text = format!("{pre}{key}{post}");
            prop_assert!(prefilter(text.as_bytes()) & Detector::ApiKey.bit() != 0, "{}", text);
        }

        /// Phone and IBAN candidates drawn from the detectors' own patterns, between arbitrary
        /// words: the prefilter hides none of what a full scan finds.
        #[test]
        fn the_prefilter_hides_no_phone_or_iban(
            phone in PHONE_SET, iban in IBAN, pre in "[A-Za-z0-9 ().+-]{0,12}", post in "[A-Za-z0-9 ().+-]{0,12}",
        ) {
            for text in [format!("{pre}{phone}{post}"), format!("{pre}{iban}{post}"), format!("{pre} {phone} {iban}")] {
                prop_assert_eq!(scanned(&text, false), scanned(&text, true), "{}", text);
            }
        }

        #[test]
        fn the_prefilter_hides_nothing_in_random_text(text in "[A-Z0-9a-z +().-]{15,40}") {
            prop_assert_eq!(scanned(&text, false), scanned(&text, true), "{}", text);
        }

        /// What the prefilter rules out is never found: texts of numbers, separators and a
        /// few letters and signs scan the same with every detector admitted.
        #[test]
        fn the_prefilter_changes_no_finding(text in "[0-9 .()+:@eAKDEa-]{0,48}") {
            prop_assert_eq!(scanned(&text, false), scanned(&text, true), "{}", text);
        }

        #[test]
        fn the_prefilter_never_hides_an_api_key_match(text in "[AKISaghipousrxbkltz_ -]{15,60}") {
            let regex = compile(API_KEY);
            if regex.is_match(&text) {
                prop_assert!(prefilter(text.as_bytes()) & Detector::ApiKey.bit() != 0, "{}", text);
            }
        }

        #[test]
        fn alphabetic_text_has_no_hits(text in "[A-Za-z ,;!?'()]{0,200}") {
            prop_assert!(all().scan(&text).is_empty());
        }

        #[test]
        fn hits_are_sorted_disjoint_and_quote_free(text in "\\PC{0,120}") {
            let hits = all().scan(&text);
            for w in hits.windows(2) {
                prop_assert!(w[0].end <= w[1].start);
            }
            for h in hits {
                let s = text.get(h.start..h.end).unwrap();
                prop_assert!(!s.is_empty() && !s.contains('"') && !s.contains('\\'));
            }
        }
    }
}
