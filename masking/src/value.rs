//! Type-aware masking of one PostgreSQL value, in text or binary format.
//!
//! Two operations:
//! - [`mask_whole`]: a masked column; the value becomes a text value (see [`masked_type`]).
//! - [`mask_detected`]: detectors run on a value of any column; hits are replaced so that the
//!   value stays a valid value of its own type (JSON stays JSON, an `int8` stays an `int8`, an
//!   `inet` stays an `inet`). A value without hits passes through untouched.
//!
//! Both fail closed: a value that cannot be decoded or scanned is an error, never raw bytes.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::detect::{Detectors, Hit};
use crate::strategy::{Masker, Strategy};

/// The wire format of a value (format code 0 or 1 in `RowDescription` / `Bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Format code 0: the type's text output.
    Text,
    /// Format code 1: the type's binary send format.
    Binary,
}

impl Format {
    /// The format of a wire format code: 0 is text, 1 is binary, anything else is invalid.
    #[must_use]
    pub fn from_code(code: i16) -> Option<Format> {
        match code {
            0 => Some(Format::Text),
            1 => Some(Format::Binary),
            _ => None,
        }
    }

    /// The wire format code (0 or 1).
    #[must_use]
    pub fn code(self) -> i16 {
        match self {
            Format::Text => 0,
            Format::Binary => 1,
        }
    }
}

/// OIDs of the built-in PostgreSQL types this module knows (`pg_type.oid`).
pub mod oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `name`
    pub const NAME: u32 = 19;
    /// `int8`
    pub const INT8: u32 = 20;
    /// `int2`
    pub const INT2: u32 = 21;
    /// `int4`
    pub const INT4: u32 = 23;
    /// `text`
    pub const TEXT: u32 = 25;
    /// `oid`
    pub const OID: u32 = 26;
    /// `json`
    pub const JSON: u32 = 114;
    /// `xml`
    pub const XML: u32 = 142;
    /// `cidr`
    pub const CIDR: u32 = 650;
    /// `float4`
    pub const FLOAT4: u32 = 700;
    /// `float8`
    pub const FLOAT8: u32 = 701;
    /// `unknown` (untyped literals)
    pub const UNKNOWN: u32 = 705;
    /// `inet`
    pub const INET: u32 = 869;
    /// `text[]`
    pub const TEXT_ARRAY: u32 = 1009;
    /// `varchar[]`
    pub const VARCHAR_ARRAY: u32 = 1015;
    /// `int8[]`
    pub const INT8_ARRAY: u32 = 1016;
    /// `bpchar` (`char(n)`)
    pub const BPCHAR: u32 = 1042;
    /// `varchar`
    pub const VARCHAR: u32 = 1043;
    /// `date`
    pub const DATE: u32 = 1082;
    /// `time`
    pub const TIME: u32 = 1083;
    /// `timestamp`
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `interval`
    pub const INTERVAL: u32 = 1186;
    /// `numeric[]`
    pub const NUMERIC_ARRAY: u32 = 1231;
    /// `numeric`
    pub const NUMERIC: u32 = 1700;
    /// `uuid`
    pub const UUID: u32 = 2950;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
    /// `json[]`
    pub const JSON_ARRAY: u32 = 199;
    /// `xml[]`
    pub const XML_ARRAY: u32 = 143;
    /// `cidr[]`
    pub const CIDR_ARRAY: u32 = 651;
    /// `bool[]`
    pub const BOOL_ARRAY: u32 = 1000;
    /// `bytea[]`
    pub const BYTEA_ARRAY: u32 = 1001;
    /// `name[]`
    pub const NAME_ARRAY: u32 = 1003;
    /// `int2[]`
    pub const INT2_ARRAY: u32 = 1005;
    /// `int4[]`
    pub const INT4_ARRAY: u32 = 1007;
    /// `bpchar[]`
    pub const BPCHAR_ARRAY: u32 = 1014;
    /// `float4[]`
    pub const FLOAT4_ARRAY: u32 = 1021;
    /// `float8[]`
    pub const FLOAT8_ARRAY: u32 = 1022;
    /// `oid[]`
    pub const OID_ARRAY: u32 = 1028;
    /// `inet[]`
    pub const INET_ARRAY: u32 = 1041;
    /// `timestamp[]`
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    /// `date[]`
    pub const DATE_ARRAY: u32 = 1182;
    /// `time[]`
    pub const TIME_ARRAY: u32 = 1183;
    /// `timestamptz[]`
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    /// `interval[]`
    pub const INTERVAL_ARRAY: u32 = 1187;
    /// `uuid[]`
    pub const UUID_ARRAY: u32 = 2951;
    /// `jsonb[]`
    pub const JSONB_ARRAY: u32 = 3807;
}

/// Why a value could not be masked. The proxy refuses the value rather than pass it through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// The bytes are not a valid value of the announced type.
    #[error("cannot decode a value of type {oid} for masking: {reason}")]
    Decode {
        /// The announced type.
        oid: u32,
        /// What is wrong with the bytes.
        reason: String,
    },
    /// The type has no decoder here in the value's format.
    #[error("cannot mask a value of type {oid} in binary format; request text format for this column")]
    Unsupported {
        /// The announced type.
        oid: u32,
    },
}

fn decode_err(oid: u32, reason: impl Into<String>) -> MaskError {
    MaskError::Decode { oid, reason: reason.into() }
}

/// The type a `RowDescription` must announce for a column masked as a whole: text-like types
/// keep their type, everything else becomes `text` (`[redacted]` is not an integer).
#[must_use]
pub fn masked_type(oid: u32) -> u32 {
    match oid {
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN => oid,
        _ => oid::TEXT,
    }
}

/// Masks a whole value. The result is a valid value of [`masked_type`]`(oid)` in `format` (the
/// binary format of text is its UTF-8 bytes).
///
/// In binary format, `timestamptz` is rendered in UTC (`+00`): its hash equals the hash of the
/// text format only for sessions whose `TimeZone` is UTC.
///
/// # Errors
/// With `partial` and `hash`, the value's text form is needed: a value that is not valid UTF-8
/// (text format) or whose binary format cannot be decoded is an error. `redact` never fails.
pub fn mask_whole(masker: &Masker, oid: u32, format: Format, raw: &[u8]) -> Result<Vec<u8>, MaskError> {
    if masker.strategy() == Strategy::Redact {
        return Ok(masker.mask_text("").into_bytes());
    }
    let text = text_form(oid, format, raw)?;
    Ok(masker.mask_text(&text).into_bytes())
}

/// How [`mask_detected`] treats a type.
enum Kind {
    /// Cannot hold detectable text (nor can arrays of it): passed through.
    Opaque,
    /// Text (possibly JSON, XML or an array literal) in both formats.
    Text,
    Json,
    Jsonb,
    /// A text array literal (text format only).
    TextArray,
    /// An `int8[]` / `numeric[]` literal (text format only).
    NumberArray,
    /// A `json[]` / `jsonb[]` literal (text format only).
    JsonArray,
    /// An `inet[]` / `cidr[]` literal (text format only).
    InetArray,
    Int8,
    Numeric,
    Inet,
    /// Unknown to this module: scanned as text in text format, refused in binary format.
    Other,
}

fn kind(oid: u32) -> Kind {
    match oid {
        oid::BOOL
        | oid::INT2
        | oid::INT4
        | oid::OID
        | oid::FLOAT4
        | oid::FLOAT8
        | oid::DATE
        | oid::TIME
        | oid::TIMESTAMP
        | oid::TIMESTAMPTZ
        | oid::INTERVAL
        | oid::UUID
        | oid::BYTEA
        | oid::BOOL_ARRAY
        | oid::BYTEA_ARRAY
        | oid::INT2_ARRAY
        | oid::INT4_ARRAY
        | oid::OID_ARRAY
        | oid::FLOAT4_ARRAY
        | oid::FLOAT8_ARRAY
        | oid::DATE_ARRAY
        | oid::TIME_ARRAY
        | oid::TIMESTAMP_ARRAY
        | oid::TIMESTAMPTZ_ARRAY
        | oid::INTERVAL_ARRAY
        | oid::UUID_ARRAY => Kind::Opaque,
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN | oid::XML => Kind::Text,
        oid::JSON => Kind::Json,
        oid::JSONB => Kind::Jsonb,
        oid::TEXT_ARRAY | oid::VARCHAR_ARRAY | oid::NAME_ARRAY | oid::BPCHAR_ARRAY | oid::XML_ARRAY => {
            Kind::TextArray
        }
        oid::INT8_ARRAY | oid::NUMERIC_ARRAY => Kind::NumberArray,
        oid::JSON_ARRAY | oid::JSONB_ARRAY => Kind::JsonArray,
        oid::INET_ARRAY | oid::CIDR_ARRAY => Kind::InetArray,
        oid::INT8 => Kind::Int8,
        oid::NUMERIC => Kind::Numeric,
        oid::INET | oid::CIDR => Kind::Inet,
        _ => Kind::Other,
    }
}

/// Runs `detectors` on one value of any column and masks what they find, keeping the value a
/// valid value of its own type in its own format. `Ok(None)`: nothing found, send the original
/// bytes unchanged (nothing is allocated).
///
/// # Errors
/// A text value that is not valid UTF-8, a binary value that does not decode, or (with a
/// non-empty detector set) a binary value of a type that cannot be scanned, such as records and
/// types unknown to this module: [`MaskError::Unsupported`]. Binary arrays are masked element by
/// element.
pub fn mask_detected(
    detectors: &Detectors,
    masker: &Masker,
    oid: u32,
    format: Format,
    raw: &[u8],
) -> Result<Option<Vec<u8>>, MaskError> {
    if detectors.is_empty() {
        return Ok(None);
    }
    let mut hits = Vec::new();
    match (kind(oid), format) {
        (Kind::Opaque, _) => Ok(None),
        (k @ (Kind::Text | Kind::Json), _)
        | (
            k @ (Kind::Jsonb
            | Kind::TextArray
            | Kind::NumberArray
            | Kind::JsonArray
            | Kind::InetArray
            | Kind::Other),
            Format::Text,
        ) => {
            let text = utf8(oid, raw)?;
            detectors.scan_into(text, &mut hits);
            if hits.is_empty() {
                return Ok(None);
            }
            let numbers = match k {
                Kind::Json | Kind::Jsonb => Numbers::Json,
                Kind::NumberArray => Numbers::ArrayElements,
                Kind::JsonArray => Numbers::Digits,
                Kind::InetArray => Numbers::InetElements,
                _ => Numbers::None,
            };
            Ok(Some(replace_hits(text, &hits, masker, numbers).into_bytes()))
        }
        (Kind::TextArray | Kind::NumberArray | Kind::JsonArray | Kind::InetArray, Format::Binary) => {
            mask_binary_array(detectors, masker, oid, raw, 0)
        }
        (Kind::Jsonb, Format::Binary) => {
            let text = jsonb_text(raw)?;
            detectors.scan_into(text, &mut hits);
            if hits.is_empty() {
                return Ok(None);
            }
            let mut out = vec![1u8];
            out.extend_from_slice(replace_hits(text, &hits, masker, Numbers::Json).as_bytes());
            Ok(Some(out))
        }
        (Kind::Int8 | Kind::Numeric, _) => {
            let text = text_form(oid, format, raw)?;
            detectors.scan_into(&text, &mut hits);
            if hits.is_empty() {
                return Ok(None);
            }
            let digits: String = hits.iter().map(|h| &text[h.start..h.end]).collect();
            let n = masker.mask_digits(&digits);
            Ok(Some(match (format, oid) {
                (Format::Text, _) => n.to_string().into_bytes(),
                (Format::Binary, oid::INT8) => {
                    let v = i64::try_from(n).map_err(|_| decode_err(oid, "masked number out of range"))?;
                    v.to_be_bytes().to_vec()
                }
                (Format::Binary, _) => numeric_binary(&n.to_string())
                    .ok_or_else(|| decode_err(oid, "cannot encode the masked number"))?,
            }))
        }
        (Kind::Inet, _) => {
            let text = text_form(oid, format, raw)?;
            detectors.scan_into(&text, &mut hits);
            if hits.is_empty() {
                return Ok(None);
            }
            Ok(Some(match format {
                Format::Text => zero_inet(&text).into_bytes(),
                Format::Binary => {
                    let mut out = raw.to_vec();
                    out.iter_mut().skip(4).for_each(|b| *b = 0);
                    out
                }
            }))
        }
        (Kind::Other, Format::Binary) => Err(MaskError::Unsupported { oid }),
    }
}

fn utf8(oid: u32, raw: &[u8]) -> Result<&str, MaskError> {
    std::str::from_utf8(raw).map_err(|_| decode_err(oid, "the value is not valid UTF-8"))
}

fn jsonb_text(raw: &[u8]) -> Result<&str, MaskError> {
    match raw.split_first() {
        Some((1, rest)) => utf8(oid::JSONB, rest),
        Some((v, _)) => Err(decode_err(oid::JSONB, format!("unsupported jsonb binary version {v}"))),
        None => Err(decode_err(oid::JSONB, "empty jsonb value")),
    }
}

/// Where a hit outside a string must become a number rather than a masked string.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numbers {
    /// Plain text: every hit becomes [`Masker::mask_hit`].
    None,
    /// JSON: hits outside strings are inside numbers; the whole number is replaced by a number.
    Json,
    /// An `int8[]` / `numeric[]` literal: the element holding a hit becomes a number.
    ArrayElements,
    /// JSON nested in an array literal: an all-digit hit becomes a number (valid both inside a
    /// JSON string and as a JSON number), any other hit a masked string.
    Digits,
    /// An `inet[]` / `cidr[]` literal: the element holding a hit becomes the zero address.
    InetElements,
}

/// The zero address of the family of an `inet` / `cidr` text, keeping its prefix length.
fn zero_inet(text: &str) -> String {
    let (addr, prefix) = text.split_once('/').map_or((text, None), |(a, p)| (a, Some(p)));
    let zero = if addr.contains(':') { "::" } else { "0.0.0.0" };
    match prefix {
        Some(p) => format!("{zero}/{p}"),
        None => zero.to_owned(),
    }
}

/// Which bytes belong to a token (JSON number, array element).
type ByteClass = fn(u8) -> bool;

fn json_number_byte(c: u8) -> bool {
    c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-')
}

fn array_element_byte(c: u8) -> bool {
    !(matches!(c, b'{' | b'}' | b',' | b'"') || c.is_ascii_whitespace())
}

fn replace_hits(text: &str, hits: &[Hit], masker: &Masker, numbers: Numbers) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16 * hits.len());
    let mut copied = 0;
    // JSON string state, advanced up to each hit.
    let (mut pos, mut in_str, mut escaped) = (0, false, false);
    for h in hits {
        let (token, inet): (Option<ByteClass>, bool) = match numbers {
            Numbers::None => (None, false),
            Numbers::ArrayElements => (Some(array_element_byte), false),
            Numbers::InetElements => (Some(array_element_byte), true),
            Numbers::Digits => {
                let digits = b[h.start..h.end].iter().all(u8::is_ascii_digit);
                (digits.then_some(json_number_byte as ByteClass), false)
            }
            Numbers::Json => {
                while pos < h.start {
                    let c = b[pos];
                    if escaped {
                        escaped = false;
                    } else if in_str && c == b'\\' {
                        escaped = true;
                    } else if c == b'"' {
                        in_str = !in_str;
                    }
                    pos += 1;
                }
                ((!in_str).then_some(json_number_byte as ByteClass), false)
            }
        };
        if let Some(token) = token {
            // Replace the whole number (or array element) holding the hit.
            let mut s = h.start;
            while s > copied && token(b[s - 1]) {
                s -= 1;
            }
            let mut e = h.end;
            while e < b.len() && token(b[e]) {
                e += 1;
            }
            if s < copied {
                continue;
            }
            out.push_str(&text[copied..s]);
            if inet {
                out.push_str(&zero_inet(&text[s..e]));
            } else {
                let _ = write!(out, "{}", masker.mask_digits(&text[h.start..h.end]));
            }
            copied = e;
        } else {
            if h.start < copied {
                continue;
            }
            out.push_str(&text[copied..h.start]);
            out.push_str(&masker.mask_hit(h.detector, &text[h.start..h.end]));
            copied = h.end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The text form of a value: the raw bytes in text format, decoded from binary format.
fn text_form(oid: u32, format: Format, raw: &[u8]) -> Result<Cow<'_, str>, MaskError> {
    if format == Format::Text {
        return utf8(oid, raw).map(Cow::Borrowed);
    }
    let err = |reason: &str| decode_err(oid, reason);
    let fixed = |n: usize| -> Result<&[u8], MaskError> {
        if raw.len() == n { Ok(raw) } else { Err(err(&format!("expected {n} bytes, got {}", raw.len()))) }
    };
    Ok(Cow::Owned(match oid {
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN | oid::JSON | oid::XML => {
            return utf8(oid, raw).map(Cow::Borrowed);
        }
        oid::JSONB => return jsonb_text(raw).map(Cow::Borrowed),
        oid::BOOL => match fixed(1)?[0] {
            0 => "f".to_owned(),
            1 => "t".to_owned(),
            _ => return Err(err("a bool is 0 or 1")),
        },
        oid::INT2 => i16::from_be_bytes(array(fixed(2)?)).to_string(),
        oid::INT4 => i32::from_be_bytes(array(fixed(4)?)).to_string(),
        oid::OID => u32::from_be_bytes(array(fixed(4)?)).to_string(),
        oid::INT8 => i64::from_be_bytes(array(fixed(8)?)).to_string(),
        oid::FLOAT4 => pg_float(f64::from(f32::from_be_bytes(array(fixed(4)?))), true),
        oid::FLOAT8 => pg_float(f64::from_be_bytes(array(fixed(8)?)), false),
        oid::NUMERIC => numeric_text(raw).map_err(err)?,
        oid::DATE => match i32::from_be_bytes(array(fixed(4)?)) {
            i32::MAX => "infinity".to_owned(),
            i32::MIN => "-infinity".to_owned(),
            days => {
                let (y, m, d) = civil_from_days(i64::from(days) + PG_EPOCH_DAYS);
                with_era(format!("{:04}-{m:02}-{d:02}", era_year(y)), y)
            }
        },
        oid::TIME => {
            let us = i64::from_be_bytes(array(fixed(8)?));
            if !(0..=86_400_000_000).contains(&us) {
                return Err(err("time of day out of range"));
            }
            clock(us)
        }
        oid::TIMESTAMP | oid::TIMESTAMPTZ => match i64::from_be_bytes(array(fixed(8)?)) {
            i64::MAX => "infinity".to_owned(),
            i64::MIN => "-infinity".to_owned(),
            us => {
                let days = us.div_euclid(86_400_000_000);
                let (y, m, d) = civil_from_days(days + PG_EPOCH_DAYS);
                let tz = if oid == oid::TIMESTAMPTZ { "+00" } else { "" };
                let t = clock(us.rem_euclid(86_400_000_000));
                with_era(format!("{:04}-{m:02}-{d:02} {t}{tz}", era_year(y)), y)
            }
        },
        oid::UUID => {
            let h = hex::encode(fixed(16)?);
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        }
        oid::BYTEA => format!("\\x{}", hex::encode(raw)),
        oid::INET | oid::CIDR => inet_text(raw).map_err(err)?,
        _ => return Err(MaskError::Unsupported { oid }),
    }))
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Days from 1970-01-01 to PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, u32::try_from(m).unwrap_or(1), u32::try_from(d).unwrap_or(1))
}

/// Years before 1 are shown as `0001 BC` for year 0, and so on.
fn era_year(y: i64) -> i64 {
    if y <= 0 { 1 - y } else { y }
}

fn with_era(s: String, y: i64) -> String {
    if y <= 0 { s + " BC" } else { s }
}

/// `HH:MM:SS[.ffffff]` of microseconds since midnight, trailing zeros of the fraction dropped.
fn clock(us: i64) -> String {
    let secs = us / 1_000_000;
    let frac = us % 1_000_000;
    let mut s = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac != 0 {
        let f = format!("{frac:06}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s
}

/// PostgreSQL's float output (shortest exact digits, exponent outside `1e-4..1e15`, or
/// `1e-4..1e6` for `float4`).
fn pg_float(v: f64, single: bool) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    #[allow(clippy::cast_possible_truncation)]
    let sci = if single { format!("{:e}", v as f32) } else { format!("{v:e}") };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let limit = if single { 6 } else { 15 };
    if exp < -4 || exp >= limit {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else if single {
        #[allow(clippy::cast_possible_truncation)]
        let f = v as f32;
        f.to_string()
    } else {
        v.to_string()
    }
}

const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// The text of a binary `numeric` (`ndigits`, `weight`, `sign`, `dscale`, base-10000 digits).
fn numeric_text(raw: &[u8]) -> Result<String, &'static str> {
    if raw.len() < 8 {
        return Err("a numeric has an 8-byte header");
    }
    let word = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    let ndigits = usize::from(word(0));
    let weight = i64::from(i16::from_be_bytes([raw[2], raw[3]]));
    let (sign, dscale) = (word(4), usize::from(word(6)));
    if ndigits > 0x7FFF || raw.len() != 8 + 2 * ndigits {
        return Err("numeric length does not match its digit count");
    }
    match sign {
        NUMERIC_NAN => return Ok("NaN".to_owned()),
        NUMERIC_PINF => return Ok("Infinity".to_owned()),
        NUMERIC_NINF => return Ok("-Infinity".to_owned()),
        0 | NUMERIC_NEG => {}
        _ => return Err("invalid numeric sign"),
    }
    if dscale > 0x3FFF {
        return Err("invalid numeric display scale");
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| word(8 + 2 * i)).collect();
    if digits.iter().any(|&d| d > 9999) {
        return Err("numeric digit out of range");
    }
    let digit = |k: i64| usize::try_from(k).ok().and_then(|k| digits.get(k)).copied().unwrap_or(0);
    let mut s = String::new();
    if sign == NUMERIC_NEG && !digits.iter().all(|&d| d == 0) {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        let _ = write!(s, "{}", digit(0));
        for k in 1..=weight {
            let _ = write!(s, "{:04}", digit(k));
        }
    }
    if dscale > 0 {
        s.push('.');
        let start = s.len();
        let mut p = 1;
        while s.len() - start < dscale {
            let _ = write!(s, "{:04}", digit(weight + p));
            p += 1;
        }
        s.truncate(start + dscale);
    }
    Ok(s)
}

/// The binary `numeric` of a decimal text (`-123.4500`, `NaN`, `Infinity`); `None` if invalid.
fn numeric_binary(text: &str) -> Option<Vec<u8>> {
    let header = |ndigits: u16, weight: i16, sign: u16, dscale: u16| {
        let mut v = Vec::with_capacity(8 + 2 * usize::from(ndigits));
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        v
    };
    match text {
        "NaN" => return Some(header(0, 0, NUMERIC_NAN, 0)),
        "Infinity" => return Some(header(0, 0, NUMERIC_PINF, 0)),
        "-Infinity" => return Some(header(0, 0, NUMERIC_NINF, 0)),
        _ => {}
    }
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let dscale = u16::try_from(frac.len()).ok().filter(|&d| d <= 0x3FFF)?;
    let int = int.trim_start_matches('0');
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let all: Vec<u8> = std::iter::repeat_n(b'0', int_pad)
        .chain(int.bytes())
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', frac_pad))
        .collect();
    let mut groups: Vec<u16> =
        all.chunks(4).map(|c| c.iter().fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'))).collect();
    let mut weight = i64::try_from((int_pad + int.len()) / 4).ok()? - 1;
    let lead = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..lead);
    weight -= i64::try_from(lead).ok()?;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let (weight, sign) = if groups.is_empty() { (0, 0) } else { (weight, if neg { NUMERIC_NEG } else { 0 }) };
    let mut out = header(u16::try_from(groups.len()).ok()?, i16::try_from(weight).ok()?, sign, dscale);
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

/// The text of a binary `inet` / `cidr`: family, bits, is_cidr, address length, address.
fn inet_text(raw: &[u8]) -> Result<String, &'static str> {
    let [family, bits, is_cidr, len, addr @ ..] = raw else { return Err("truncated inet value") };
    let (addr, max) = match (family, len, addr.len()) {
        (2, 4, 4) => (Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string(), 32),
        (3, 16, 16) => (Ipv6Addr::from(array::<16>(addr)).to_string(), 128),
        _ => return Err("invalid inet family or address length"),
    };
    if *bits > max || *is_cidr > 1 {
        return Err("invalid inet prefix length");
    }
    Ok(if *is_cidr == 1 || *bits != max { format!("{addr}/{bits}") } else { addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Detector;
    use crate::detect::tests::card_strategy;
    use crate::strategy::Strategy;
    use proptest::prelude::*;

    fn all() -> Detectors {
        Detectors::new(&Detector::ALL)
    }

    fn redact() -> Masker {
        Masker::new(Strategy::Redact, b"k")
    }

    fn detected(m: &Masker, oid: u32, format: Format, raw: &[u8]) -> Option<Vec<u8>> {
        mask_detected(&all(), m, oid, format, raw).unwrap()
    }

    fn text(v: Option<Vec<u8>>) -> String {
        String::from_utf8(v.expect("masked")).unwrap()
    }

    #[test]
    fn text_hits_are_replaced_and_clean_values_pass() {
        let m = redact();
        assert_eq!(
            text(detected(&m, oid::TEXT, Format::Text, b"mail alice@example.com now")),
            "mail [redacted:email] now"
        );
        assert_eq!(detected(&m, oid::TEXT, Format::Text, b"nothing to see"), None);
        assert_eq!(
            detected(&m, 99_999, Format::Text, b"citext bob@example.com"),
            Some(b"citext [redacted:email]".to_vec())
        );
        assert!(mask_detected(&all(), &m, oid::TEXT, Format::Text, b"\xff\xfe").is_err());
        assert_eq!(mask_detected(&Detectors::new(&[]), &m, 99_999, Format::Binary, b"x"), Ok(None));
    }

    #[test]
    fn json_stays_json() {
        let m = redact();
        let out = text(detected(&m, oid::JSON, Format::Text, br#"{"e":"alice@example.com","n":1}"#));
        assert_eq!(out, r#"{"e":"[redacted:email]","n":1}"#);
        let out = text(detected(&m, oid::JSON, Format::Text, br#"{"card": 4111111111111111, "s": "x\"y"}"#));
        assert_eq!(out, r#"{"card": 0, "s": "x\"y"}"#);
        let hashed = Masker::new(Strategy::Hash, b"k");
        let out = text(detected(&hashed, oid::JSON, Format::Text, br#"{"c":-4111111111111111.0}"#));
        assert!(
            out.starts_with(r#"{"c":"#)
                && out.ends_with('}')
                && out[5..out.len() - 1].bytes().all(|c| c.is_ascii_digit()),
            "{out}"
        );
    }

    #[test]
    fn jsonb_binary_keeps_its_version_byte() {
        let m = redact();
        let out = detected(&m, oid::JSONB, Format::Binary, b"\x01{\"ip\": \"10.1.2.3\"}").unwrap();
        assert_eq!(out, b"\x01{\"ip\": \"[redacted:ipv4]\"}");
        assert!(mask_detected(&all(), &m, oid::JSONB, Format::Binary, b"\x02{}").is_err());
    }

    #[test]
    fn binary_int8_with_a_card_round_trips() {
        let raw = 4_111_111_111_111_111i64.to_be_bytes();
        assert_eq!(detected(&redact(), oid::INT8, Format::Binary, &raw), Some(0i64.to_be_bytes().to_vec()));
        let partial = Masker::new(Strategy::Partial { keep: 4 }, b"k");
        assert_eq!(detected(&partial, oid::INT8, Format::Binary, &raw), Some(1111i64.to_be_bytes().to_vec()));
        assert_eq!(text(detected(&partial, oid::INT8, Format::Text, b"4111111111111111")), "1111");
        assert_eq!(detected(&partial, oid::INT8, Format::Binary, &42i64.to_be_bytes()), None);
        let hashed = Masker::new(Strategy::Hash, b"k");
        let h = detected(&hashed, oid::INT8, Format::Binary, &raw).unwrap();
        let v = i64::from_be_bytes(h.try_into().unwrap());
        assert!((0..1_000_000_000_000_000).contains(&v));
        assert!(mask_detected(&all(), &hashed, oid::INT8, Format::Binary, &[1, 2, 3]).is_err());
    }

    #[test]
    fn binary_numeric_with_a_card_is_replaced() {
        let raw = numeric_binary("4111111111111111.00").unwrap();
        let out =
            detected(&Masker::new(Strategy::Partial { keep: 4 }, b""), oid::NUMERIC, Format::Binary, &raw);
        assert_eq!(numeric_text(&out.unwrap()).unwrap(), "1111");
    }

    #[test]
    fn inet_hits_become_the_zero_address() {
        let m = redact();
        assert_eq!(text(detected(&m, oid::INET, Format::Text, b"192.168.1.5/24")), "0.0.0.0/24");
        assert_eq!(text(detected(&m, oid::INET, Format::Text, b"2001:db8::1")), "::");
        let raw = [2, 24, 1, 4, 10, 1, 2, 0];
        assert_eq!(inet_text(&raw).unwrap(), "10.1.2.0/24");
        assert_eq!(detected(&m, oid::CIDR, Format::Binary, &raw), Some(vec![2, 24, 1, 4, 0, 0, 0, 0]));
        let v6 = [&[3u8, 128, 0, 16][..], &Ipv6Addr::LOCALHOST.octets()].concat();
        assert_eq!(inet_text(&v6).unwrap(), "::1");
        assert_eq!(
            detected(&m, oid::INET, Format::Binary, &v6),
            Some([&[3u8, 128, 0, 16][..], &[0; 16]].concat())
        );
    }

    #[test]
    fn opaque_types_pass_and_unknown_binary_types_are_refused() {
        let m = redact();
        assert_eq!(detected(&m, oid::INT4, Format::Binary, &7i32.to_be_bytes()), None);
        assert_eq!(detected(&m, oid::UUID, Format::Text, b"4111-1111-1111-1111"), None);
        for o in [2249, 99_999] {
            assert_eq!(
                mask_detected(&all(), &m, o, Format::Binary, b"x"),
                Err(MaskError::Unsupported { oid: o })
            );
        }
        let e = MaskError::Unsupported { oid: 1234 }.to_string();
        assert_eq!(
            e,
            "cannot mask a value of type 1234 in binary format; request text format for this column"
        );
    }

    #[test]
    fn arrays_in_text_format() {
        let m = redact();
        assert_eq!(
            text(detected(&m, oid::TEXT_ARRAY, Format::Text, br#"{a@example.com,"x y 123-45-6789"}"#)),
            r#"{[redacted:email],"x y [redacted:ssn]"}"#
        );
        assert_eq!(
            text(detected(&m, oid::INT8_ARRAY, Format::Text, b"{1,4111111111111111,NULL}")),
            "{1,0,NULL}"
        );
        assert_eq!(
            text(detected(&m, oid::INET_ARRAY, Format::Text, b"{10.1.2.3/8,2001:db8::1}")),
            "{0.0.0.0/8,::}"
        );
        assert_eq!(
            text(detected(
                &m,
                oid::JSONB_ARRAY,
                Format::Text,
                br#"{"{\"n\": 4111111111111111, \"e\": \"a@example.com\"}"}"#
            )),
            r#"{"{\"n\": 0, \"e\": \"[redacted:email]\"}"}"#
        );
        assert_eq!(detected(&m, oid::UUID_ARRAY, Format::Binary, b"\x00"), None);
        assert_eq!(detected(&m, oid::INT4_ARRAY, Format::Text, b"{1,2}"), None);
    }

    #[test]
    fn maskers_and_detectors_are_shareable() {
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<Masker>();
        shareable::<Detectors>();
    }

    #[test]
    fn whole_values() {
        let m = redact();
        assert_eq!(mask_whole(&m, oid::INT4, Format::Binary, &7i32.to_be_bytes()).unwrap(), b"[redacted]");
        assert_eq!(mask_whole(&m, 99_999, Format::Binary, b"\xff").unwrap(), b"[redacted]");
        assert_eq!(masked_type(oid::INT4), oid::TEXT);
        assert_eq!(masked_type(oid::VARCHAR), oid::VARCHAR);
        assert_eq!(masked_type(oid::JSONB), oid::TEXT);
        let p = Masker::new(Strategy::Partial { keep: 2 }, b"");
        let whole =
            |o: u32, raw: &[u8]| String::from_utf8(mask_whole(&p, o, Format::Binary, raw).unwrap()).unwrap();
        assert_eq!(whole(oid::INT8, &123_456i64.to_be_bytes()), "****56");
        assert_eq!(whole(oid::BOOL, &[1]), "*");
        assert_eq!(whole(oid::UUID, &[0xab; 16]), "**********************************ab");
        assert_eq!(whole(oid::BYTEA, b"\x01\x02\x03"), "******03");
        assert_eq!(whole(oid::JSONB, b"\x01{\"a\":12}"), "******2}");
        let h = Masker::new(Strategy::Hash, b"k");
        assert_eq!(
            mask_whole(&h, oid::INT8, Format::Binary, &42i64.to_be_bytes()).unwrap(),
            mask_whole(&h, oid::INT8, Format::Text, b"42").unwrap()
        );
        assert!(matches!(mask_whole(&h, 99_999, Format::Binary, b"x"), Err(MaskError::Unsupported { .. })));
        assert!(matches!(mask_whole(&h, oid::INT4, Format::Binary, b"x"), Err(MaskError::Decode { .. })));
        assert!(mask_whole(&h, oid::TEXT, Format::Text, b"\xff").is_err());
    }

    #[test]
    fn binary_text_forms_match_postgres() {
        let t = |o: u32, raw: &[u8]| text_form(o, Format::Binary, raw).unwrap().into_owned();
        assert_eq!(t(oid::DATE, &0i32.to_be_bytes()), "2000-01-01");
        assert_eq!(t(oid::DATE, &(-730_119i32).to_be_bytes()), "0001-01-01");
        assert_eq!(t(oid::DATE, &(-730_120i32).to_be_bytes()), "0001-12-31 BC");
        assert_eq!(t(oid::DATE, &8_780i32.to_be_bytes()), "2024-01-15");
        assert_eq!(
            t(oid::TIMESTAMP, &(86_400_000_000i64 + 1_500_000).to_be_bytes()),
            "2000-01-02 00:00:01.5"
        );
        assert_eq!(t(oid::TIMESTAMPTZ, &(-1i64).to_be_bytes()), "1999-12-31 23:59:59.999999+00");
        assert_eq!(t(oid::TIME, &(45_296_000_000i64).to_be_bytes()), "12:34:56");
        assert_eq!(t(oid::FLOAT8, &1.5f64.to_be_bytes()), "1.5");
        assert_eq!(t(oid::FLOAT8, &1e20f64.to_be_bytes()), "1e+20");
        assert_eq!(t(oid::FLOAT8, &0.00001234f64.to_be_bytes()), "1.234e-05");
        assert_eq!(t(oid::FLOAT4, &0.1f32.to_be_bytes()), "0.1");
        assert_eq!(t(oid::FLOAT4, &1e7f32.to_be_bytes()), "1e+07");
        assert_eq!(t(oid::FLOAT8, &f64::NEG_INFINITY.to_be_bytes()), "-Infinity");
        assert_eq!(t(oid::NUMERIC, &numeric_binary("-0.0001200").unwrap()), "-0.0001200");
        assert_eq!(numeric_binary("1234.56").unwrap(), [0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xd2, 0x15, 0xe0]);
        assert_eq!(numeric_binary("0").unwrap(), [0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(numeric_binary("10000").unwrap(), [0, 1, 0, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!(numeric_text(&numeric_binary("NaN").unwrap()).unwrap(), "NaN");
        assert!(numeric_text(&[0, 1, 0, 0, 0, 0, 0, 0]).is_err());
    }

    proptest! {
        #[test]
        fn numeric_round_trips_integers(v: i64) {
            let s = v.to_string();
            prop_assert_eq!(numeric_text(&numeric_binary(&s).unwrap()).unwrap(), s);
        }

        #[test]
        fn numeric_round_trips_decimals(v: i64, scale in 0usize..25) {
            let digits = v.unsigned_abs().to_string();
            let digits = format!("{}{digits}", "0".repeat((scale + 1).saturating_sub(digits.len())));
            let (int, frac) = digits.split_at(digits.len() - scale);
            let sign = if v < 0 { "-" } else { "" };
            let s = if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") };
            prop_assert_eq!(numeric_text(&numeric_binary(&s).unwrap()).unwrap(), s);
        }

        #[test]
        fn cards_never_survive_masking(card in card_strategy(), pre in "[a-z ]{0,12}", post in "[a-z ]{0,12}",
                                       s in prop::sample::select(vec!["redact", "partial", "hash"])) {
            let m = Masker::new(Strategy::parse(s).unwrap(), b"key");
            let raw = format!("{pre} {card} {post}");
            let out = text(mask_detected(&all(), &m, oid::TEXT, Format::Text, raw.as_bytes()).unwrap());
            prop_assert!(!out.contains(&card[..card.len() - 4]), "{}", out);
            prop_assert!(!out.contains(&card), "{}", out);
        }

        #[test]
        fn alphabetic_text_passes_untouched(t in "[A-Za-z ,.;!?'()-]{0,200}") {
            prop_assert_eq!(mask_detected(&all(), &redact(), oid::TEXT, Format::Text, t.as_bytes()), Ok(None));
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..64),
                                       o in prop::sample::select(vec![16u32, 17, 19, 20, 21, 23, 25, 26, 114, 142, 650, 700, 701, 705, 869, 1009, 1015, 1016, 1042, 1043, 1082, 1083, 1114, 1184, 1186, 1231, 1700, 2950, 3802, 99_999]),
                                       binary: bool, s in prop::sample::select(vec!["redact", "partial:3", "hash"])) {
            let m = Masker::new(Strategy::parse(s).unwrap(), b"k");
            let f = if binary { Format::Binary } else { Format::Text };
            let _ = mask_detected(&all(), &m, o, f, &raw);
            if let Ok(out) = mask_whole(&m, o, f, &raw) {
                prop_assert!(std::str::from_utf8(&out).is_ok());
            }
        }

        #[test]
        fn detected_text_masks_stay_utf8_and_keep_json_quotes(t in "\\PC{0,80}") {
            let json = format!("{{\"v\":\"{}\"}}", t.replace('\\', "\\\\").replace('"', "\\\""));
            if let Some(out) = mask_detected(&all(), &redact(), oid::JSON, Format::Text, json.as_bytes()).unwrap() {
                let out = String::from_utf8(out).unwrap();
                prop_assert!(out.starts_with("{\"v\":\"") && out.ends_with("\"}"), "{}", out);
                prop_assert_eq!(out.matches('"').count(), json.matches('"').count());
            }
        }
    }
}

/// Arrays nest at most this deep (PostgreSQL's MAXDIM is 6).
const MAX_ARRAY_DIMS: usize = 6;

/// Masks the elements of a binary-format array one by one, keeping the array's layout:
/// `ndim`, `has_null`, element OID, `ndim` × (length, lower bound), then each element as a
/// length (-1 for NULL) and that many bytes of the element type's binary format.
fn mask_binary_array(
    detectors: &Detectors,
    masker: &Masker,
    oid: u32,
    raw: &[u8],
    depth: usize,
) -> Result<Option<Vec<u8>>, MaskError> {
    let bad = |why: &str| decode_err(oid, why);
    if depth > 2 {
        return Err(MaskError::Unsupported { oid });
    }
    let word = |at: usize| -> Result<i32, MaskError> {
        raw.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_be_bytes)
            .ok_or_else(|| bad("truncated array"))
    };
    let ndim = usize::try_from(word(0)?).map_err(|_| bad("negative dimension count"))?;
    if ndim > MAX_ARRAY_DIMS {
        return Err(bad("too many dimensions"));
    }
    let elem = u32::from_be_bytes(word(8)?.to_be_bytes());
    let mut count: usize = usize::from(ndim > 0);
    for d in 0..ndim {
        let len = usize::try_from(word(12 + d * 8)?).map_err(|_| bad("negative dimension"))?;
        count = count.checked_mul(len).ok_or_else(|| bad("array too large"))?;
    }
    let header = 12 + ndim * 8;
    if raw.len() < header {
        return Err(bad("truncated array"));
    }
    let mut at = header;
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    for _ in 0..count {
        let len = word(at)?;
        at += 4;
        let Ok(len) = usize::try_from(len) else { continue };
        let value = raw.get(at..at + len).ok_or_else(|| bad("truncated array element"))?;
        let start = at;
        at += len;
        let masked = match kind(elem) {
            Kind::TextArray | Kind::NumberArray | Kind::JsonArray | Kind::InetArray => {
                mask_binary_array(detectors, masker, elem, value, depth + 1)?
            }
            _ => mask_detected(detectors, masker, elem, Format::Binary, value)?,
        };
        if let Some(new) = masked {
            let o = out.get_or_insert_with(|| Vec::with_capacity(raw.len() + 32));
            o.extend_from_slice(&raw[copied..start - 4]);
            let n = i32::try_from(new.len()).map_err(|_| bad("element too large"))?;
            o.extend_from_slice(&n.to_be_bytes());
            o.extend_from_slice(&new);
            copied = at;
        }
    }
    if at != raw.len() {
        return Err(bad("trailing bytes after the array"));
    }
    Ok(out.map(|mut o| {
        o.extend_from_slice(&raw[copied..]);
        o
    }))
}

#[cfg(test)]
mod array_tests {
    use super::*;
    use crate::detect::Detector;

    fn text_array(elems: &[Option<&str>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&i32::from(elems.iter().any(Option::is_none)).to_be_bytes());
        b.extend_from_slice(&oid::TEXT.to_be_bytes());
        b.extend_from_slice(&i32::try_from(elems.len()).unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&1i32.to_be_bytes());
        for e in elems {
            match e {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(s) => {
                    b.extend_from_slice(&i32::try_from(s.len()).unwrap_or(0).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn binary_text_arrays_are_masked_element_by_element() {
        let d = Detectors::new(&[Detector::Email]);
        let m = Masker::new(crate::strategy::Strategy::Redact, b"k");
        let raw = text_array(&[Some("a"), None, Some("mail bob@example.com now"), Some("z")]);
        let out =
            mask_detected(&d, &m, oid::TEXT_ARRAY, Format::Binary, &raw).expect("masks").expect("a hit");
        assert_eq!(out, text_array(&[Some("a"), None, Some("mail [redacted:email] now"), Some("z")]));
        let clean = text_array(&[Some("a"), Some("b")]);
        assert_eq!(mask_detected(&d, &m, oid::TEXT_ARRAY, Format::Binary, &clean), Ok(None));
        let empty = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25];
        assert_eq!(mask_detected(&d, &m, oid::TEXT_ARRAY, Format::Binary, &empty), Ok(None));
        for cut in 0..raw.len() {
            assert!(
                mask_detected(&d, &m, oid::TEXT_ARRAY, Format::Binary, &raw[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
