//! Masking throughput on a realistic batch: 10,000 rows × 8 text-format columns.
//!
//! - "column rules only": columns 1 (e-mail) and 3 (notes) masked whole, the others untouched.
//! - "with detectors": the same column rules, plus every detector on every other value.
//!
//! Each group reports rows/s and bytes/s, single-threaded.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use masking::detect::{Detector, Detectors};
use masking::strategy::{Masker, Strategy};
use masking::value::{Format, mask_detected, mask_whole, oid};

const ROWS: usize = 10_000;

/// Column types as a `RowDescription` would announce them.
const COLUMNS: [u32; 8] =
    [oid::TEXT, oid::TEXT, oid::TEXT, oid::TEXT, oid::NUMERIC, oid::TIMESTAMPTZ, oid::JSONB, oid::UUID];
/// Columns masked as a whole by column rules.
const WHOLE: [usize; 2] = [1, 3];

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const FIRST: &[&str] =
    &["Alice", "Bob", "Chloé", "David", "Emma", "Farid", "Grace", "Hiroshi", "Ines", "Jonas"];
const LAST: &[&str] =
    &["Martin", "Smith", "Müller", "García", "Nakamura", "Okafor", "Rossi", "Dubois", "Kowalski"];
const STREETS: &[&str] =
    &["Oak Street", "Rue de la Paix", "Hauptstraße", "Calle Mayor", "Elm Avenue", "High Street"];
const CITIES: &[&str] = &["Springfield", "Lyon", "Berlin", "Madrid", "Leeds", "Osaka"];
const NOTES: &[&str] = &[
    "Customer asked about the annual plan and a discount for nonprofits.",
    "Renewal due next quarter; send the updated contract before the end of the month.",
    "Escalated: invoice 2024-118 was paid twice, refund approved by finance.",
    "Prefers e-mail contact. Do not call before 10am local time.",
    "Migrated from the legacy billing system on 2023-11-02, no issues reported.",
    "Requested SSO setup; waiting on their IT team for the metadata file.",
];

fn card(rng: &mut Rng) -> String {
    let mut d: Vec<u32> = vec![4];
    for _ in 0..14 {
        d.push(u32::try_from(rng.next() % 10).unwrap_or(0));
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &v)| {
            if k % 2 == 0 {
                let x = v * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                v
            }
        })
        .sum();
    d.push((10 - sum % 10) % 10);
    let s: String = d.iter().map(|v| char::from(b'0' + u8::try_from(*v).unwrap_or(0))).collect();
    format!("{} {} {} {}", &s[..4], &s[4..8], &s[8..12], &s[12..])
}

fn row(rng: &mut Rng, i: usize) -> Vec<Vec<u8>> {
    let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
    let name = format!("{first} {last}");
    let email = format!("{}.{}{}@example.com", first.to_lowercase(), last.to_lowercase(), i % 97);
    let address = format!("{} {}, {}", 1 + rng.below(9999), rng.pick(STREETS), rng.pick(CITIES));
    let mut note = rng.pick(NOTES).to_owned();
    match rng.below(100) {
        0..=2 => {
            note.push_str(&format!(" Call back on ({}) 555-{:04}.", 200 + rng.below(800), rng.below(10_000)))
        }
        3..=4 => note.push_str(&format!(" Card on file {} expires 12/27.", card(rng))),
        _ => {}
    }
    let amount = format!("{}.{:02}", rng.below(100_000), rng.below(100));
    let ts = format!(
        "2024-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        1 + rng.below(12),
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1_000_000)
    );
    let json = format!(
        r#"{{"plan": "{}", "seats": {}, "trial": {}}}"#,
        rng.pick(&["free", "pro", "enterprise"]),
        1 + rng.below(500),
        rng.below(2) == 1
    );
    let (a, b) = (rng.next(), rng.next());
    let uuid = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) | 0x8000,
        b & 0xffff_ffff_ffff
    );
    [name, email, address, note, amount, ts, json, uuid].into_iter().map(String::into_bytes).collect()
}

fn batch() -> Vec<Vec<Vec<u8>>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..ROWS).map(|i| row(&mut rng, i)).collect()
}

fn column_rules(masker: &Masker, rows: &[Vec<Vec<u8>>]) -> usize {
    let mut out = 0;
    for row in rows {
        for &c in &WHOLE {
            out += mask_whole(masker, COLUMNS[c], Format::Text, &row[c]).map_or(0, |v| v.len());
        }
    }
    out
}

fn with_detectors(detectors: &Detectors, masker: &Masker, rows: &[Vec<Vec<u8>>]) -> usize {
    let mut out = 0;
    for row in rows {
        for (c, value) in row.iter().enumerate() {
            out += if WHOLE.contains(&c) {
                mask_whole(masker, COLUMNS[c], Format::Text, value).map_or(0, |v| v.len())
            } else {
                match mask_detected(detectors, masker, COLUMNS[c], Format::Text, value) {
                    Ok(Some(v)) => v.len(),
                    Ok(None) => value.len(),
                    Err(_) => 0,
                }
            };
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let rows = batch();
    let bytes: usize = rows.iter().flatten().map(Vec::len).sum();
    let masker = Masker::new(Strategy::Hash, b"bench-key");
    let detectors = Detectors::new(&Detector::ALL);
    let hits = rows
        .iter()
        .flatten()
        .filter(|v| std::str::from_utf8(v).is_ok_and(|t| !detectors.scan(t).is_empty()))
        .count();
    eprintln!("batch: {ROWS} rows, {bytes} bytes, {hits} values with detector hits");

    let mut g = c.benchmark_group("column rules only");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("rows", |b| b.iter(|| column_rules(&masker, black_box(&rows))));
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("bytes", |b| b.iter(|| column_rules(&masker, black_box(&rows))));
    g.finish();

    let mut g = c.benchmark_group("with detectors");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("rows", |b| b.iter(|| with_detectors(&detectors, &masker, black_box(&rows))));
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("bytes", |b| b.iter(|| with_detectors(&detectors, &masker, black_box(&rows))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
