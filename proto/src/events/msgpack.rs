//! A direct MessagePack encoder for the envelopes a proxy writes for every statement (a request,
//! its decision, its response), byte for byte what `rmp_serde`'s named encoding writes for them.
//!
//! Those three envelopes are most of what a proxy node spends on recording: through serde each
//! field goes through the generic serializer, about 3,000 instructions an envelope; written
//! straight they cost a fraction of that. Every other event still goes through `rmp_serde`
//! ([`super::encode`] and [`super::Batch`] fall back to it when [`encode_into`] declines), and
//! so does decoding. The tests hold the two encodings equal for every field of these variants.
//!
//! The rules are rmp's: a positive integer in the fewest bytes (fixint below 128, then u8, u16,
//! u32, u64), a non-negative i64 the same way, strings as fixstr/str8/str16/str32, binary as
//! bin8/16/32, maps and arrays as fix/16/32, a struct as a map of its field names, a struct
//! variant as a one-entry map from the variant's name to that struct, a unit variant as its
//! name, `None` as nil.

use super::{Decision, Envelope, ErrorInfo, Event, ResultCapture};

/// Appends `e` to `buf` and returns true, or returns false with `buf` as it was if `e` is not
/// one of the events this encoder writes (or holds something too long for MessagePack).
pub(super) fn encode_into(buf: &mut Vec<u8>, e: &Envelope) -> bool {
    if !matches!(
        e.event,
        Event::RequestReceived { .. } | Event::PolicyDecided { .. } | Event::ResponseSent { .. }
    ) {
        return false;
    }
    let mark = buf.len();
    let mut w = Writer { buf, ok: true };
    w.map(5);
    w.key("v");
    w.uint(u64::from(e.v));
    w.key("id");
    w.bin(e.id.as_bytes());
    w.key("session");
    w.bin(e.session.as_bytes());
    w.key("at");
    w.sint(e.at.0);
    w.key("event");
    w.map(1);
    match &e.event {
        Event::RequestReceived { seq, statement, parameters } => {
            w.key("request_received");
            // `parameters` is left out when empty (skip_serializing_if).
            w.map(if parameters.is_empty() { 2 } else { 3 });
            w.key("seq");
            w.uint(*seq);
            w.key("statement");
            w.str(statement);
            if !parameters.is_empty() {
                w.key("parameters");
                w.opt_strs(parameters);
            }
        }
        Event::PolicyDecided { seq, decision, rule, operations, tables, reason, policy_version } => {
            w.key("policy_decided");
            w.map(7);
            w.key("seq");
            w.uint(*seq);
            w.key("decision");
            w.str(decision_name(*decision));
            w.key("rule");
            match rule {
                Some(r) => w.str(r),
                None => w.nil(),
            }
            w.key("operations");
            w.strs(operations);
            w.key("tables");
            w.strs(tables);
            w.key("reason");
            w.str(reason);
            w.key("policy_version");
            w.uint(*policy_version);
        }
        Event::ResponseSent { seq, rows, duration_us, command_tag, error, result } => {
            w.key("response_sent");
            w.map(6);
            w.key("seq");
            w.uint(*seq);
            w.key("rows");
            w.uint(*rows);
            w.key("duration_us");
            w.uint(*duration_us);
            w.key("command_tag");
            match command_tag {
                Some(t) => w.str(t),
                None => w.nil(),
            }
            w.key("error");
            match error {
                Some(ErrorInfo { code, message }) => {
                    w.map(2);
                    w.key("code");
                    w.str(code);
                    w.key("message");
                    w.str(message);
                }
                None => w.nil(),
            }
            w.key("result");
            match result {
                Some(ResultCapture { columns, rows, truncated }) => {
                    w.map(3);
                    w.key("columns");
                    w.strs(columns);
                    w.key("rows");
                    w.len(rows.len(), 0x90, 0xdc);
                    for row in rows {
                        w.opt_strs(row);
                    }
                    w.key("truncated");
                    w.buf.push(if *truncated { 0xc3 } else { 0xc2 });
                }
                None => w.nil(),
            }
        }
        // Not one of the three (checked on entry): written by rmp_serde instead.
        _ => w.ok = false,
    }
    let ok = w.ok;
    if !ok {
        buf.truncate(mark);
    }
    ok
}

fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Allow => "allow",
        Decision::Hold => "hold",
        Decision::Deny => "deny",
    }
}

struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    /// False once something did not fit MessagePack's 32-bit lengths.
    ok: bool,
}

impl Writer<'_> {
    fn nil(&mut self) {
        self.buf.push(0xc0);
    }

    /// A marker, then a big-endian number.
    fn tagged(&mut self, marker: u8, be: &[u8]) {
        self.buf.push(marker);
        self.buf.extend_from_slice(be);
    }

    /// A map, array, or string header: `fix` holds lengths below `fix_max`; then the 8-bit
    /// form if there is one (`m8`), then the 16- and 32-bit forms, whose markers follow `m16`.
    fn header(&mut self, n: usize, fix: u8, fix_max: usize, m8: Option<u8>, m16: u8) {
        if n < fix_max {
            self.buf.push(fix | n as u8);
        } else if let (Some(m8), Ok(n)) = (m8, u8::try_from(n)) {
            self.tagged(m8, &[n]);
        } else if let Ok(n) = u16::try_from(n) {
            self.tagged(m16, &n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(n) {
            self.tagged(m16 + 1, &n.to_be_bytes());
        } else {
            self.ok = false;
        }
    }

    fn map(&mut self, n: usize) {
        self.header(n, 0x80, 16, None, 0xde);
    }

    fn len(&mut self, n: usize, fix: u8, m16: u8) {
        self.header(n, fix, 16, None, m16);
    }

    fn str(&mut self, s: &str) {
        self.header(s.len(), 0xa0, 32, Some(0xd9), 0xda);
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// A field name.
    fn key(&mut self, k: &'static str) {
        self.str(k);
    }

    fn bin(&mut self, b: &[u8]) {
        // bin8 for anything below 256 bytes: there is no fix form.
        self.header(b.len(), 0xc4, 0, Some(0xc4), 0xc5);
        self.buf.extend_from_slice(b);
    }

    fn strs(&mut self, v: &[String]) {
        self.len(v.len(), 0x90, 0xdc);
        for s in v {
            self.str(s);
        }
    }

    fn opt_strs(&mut self, v: &[Option<String>]) {
        self.len(v.len(), 0x90, 0xdc);
        for s in v {
            match s {
                Some(s) => self.str(s),
                None => self.nil(),
            }
        }
    }

    fn uint(&mut self, v: u64) {
        if v < 128 {
            self.buf.push(v as u8);
        } else if let Ok(v) = u8::try_from(v) {
            self.tagged(0xcc, &[v]);
        } else if let Ok(v) = u16::try_from(v) {
            self.tagged(0xcd, &v.to_be_bytes());
        } else if let Ok(v) = u32::try_from(v) {
            self.tagged(0xce, &v.to_be_bytes());
        } else {
            self.tagged(0xcf, &v.to_be_bytes());
        }
    }

    /// rmp writes a non-negative i64 as the unsigned number it is.
    fn sint(&mut self, v: i64) {
        if let Ok(v) = u64::try_from(v) {
            self.uint(v);
        } else if v >= -32 {
            self.buf.push(v as u8);
        } else if let Ok(v) = i8::try_from(v) {
            self.tagged(0xd0, &v.to_be_bytes());
        } else if let Ok(v) = i16::try_from(v) {
            self.tagged(0xd1, &v.to_be_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            self.tagged(0xd2, &v.to_be_bytes());
        } else {
            self.tagged(0xd3, &v.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use uuid::Uuid;

    use super::super::{Decision, Envelope, ErrorInfo, Event, ResultCapture, Timestamp};

    /// Lengths on each side of every MessagePack size class (fix, 8, 16 and 32 bits).
    const LENGTHS: [usize; 10] = [0, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536];
    /// Integers on each side of every size class.
    const UINTS: [u64; 11] =
        [0, 1, 127, 128, 255, 256, 65_535, 65_536, 4_294_967_295, 4_294_967_296, u64::MAX];
    const SINTS: [i64; 16] = [
        i64::MIN,
        -2_147_483_649,
        -2_147_483_648,
        -32_769,
        -32_768,
        -129,
        -128,
        -33,
        -32,
        -1,
        0,
        127,
        128,
        4_294_967_296,
        1_796_000_000_000_000,
        i64::MAX,
    ];

    fn text(n: usize) -> String {
        // Multi-byte characters too: lengths are in bytes.
        "é".repeat(n / 2) + &"x".repeat(n % 2)
    }

    fn events() -> Vec<Event> {
        let mut out = Vec::new();
        for &n in &LENGTHS {
            let strings: Vec<String> = (0..n.min(300)).map(|i| text(i % 40)).collect();
            let opts: Vec<Option<String>> = (0..n.min(300)).map(|i| (i % 3 != 0).then(|| text(i))).collect();
            out.push(Event::RequestReceived {
                seq: 1,
                statement: text(n).into(),
                parameters: opts.clone().into(),
            });
            out.push(Event::PolicyDecided {
                seq: 2,
                decision: Decision::Deny,
                rule: (n % 2 == 0).then(|| text(n).into()),
                operations: strings.clone().into(),
                tables: strings[..strings.len() / 2].to_vec().into(),
                reason: text(n).into(),
                policy_version: 9,
            });
            out.push(Event::ResponseSent {
                seq: 3,
                rows: n as u64,
                duration_us: 17,
                command_tag: (n % 2 == 1).then(|| text(n)),
                error: (n > 200).then(|| ErrorInfo { code: "42501".into(), message: text(n) }),
                result: Some(ResultCapture {
                    columns: strings.clone(),
                    rows: vec![opts.clone(); n.min(20)],
                    truncated: n > 100,
                }),
            });
        }
        for &v in &UINTS {
            out.push(Event::RequestReceived {
                seq: v,
                statement: "select 1".into(),
                parameters: Arc::new([]),
            });
            for decision in [Decision::Allow, Decision::Hold, Decision::Deny] {
                out.push(Event::PolicyDecided {
                    seq: v,
                    decision,
                    rule: None,
                    operations: Arc::new([]),
                    tables: Arc::new([]),
                    reason: "".into(),
                    policy_version: v,
                });
            }
            out.push(Event::ResponseSent {
                seq: v,
                rows: v,
                duration_us: v,
                command_tag: None,
                error: None,
                result: None,
            });
        }
        out
    }

    fn envelope(event: Event, at: i64) -> Envelope {
        Envelope { v: 1, id: Uuid::now_v7(), session: Uuid::now_v7(), at: Timestamp(at), event }
    }

    #[test]
    fn writes_what_rmp_serde_writes() {
        let mut checked = 0;
        for (i, event) in events().into_iter().enumerate() {
            let e = envelope(event, SINTS[i % SINTS.len()]);
            let mut mine = vec![0xee];
            assert!(super::encode_into(&mut mine, &e), "{:?}", e.event.kind());
            let theirs = rmp_serde::to_vec_named(&e).expect("rmp_serde encodes");
            assert_eq!(&mine[1..], &theirs[..], "{e:?}");
            assert_eq!(super::super::decode(&mine[1..]).expect("decodes"), e);
            checked += 1;
        }
        for &at in &SINTS {
            let e = envelope(
                Event::RequestReceived { seq: 1, statement: "s".into(), parameters: Arc::new([]) },
                at,
            );
            let mut mine = Vec::new();
            assert!(super::encode_into(&mut mine, &e));
            assert_eq!(mine, rmp_serde::to_vec_named(&e).expect("rmp_serde encodes"), "at = {at}");
            checked += 1;
        }
        assert!(checked > 60);
    }

    #[test]
    fn other_events_are_left_to_rmp_serde() {
        let e = envelope(Event::SessionEnded { reason: "bye".into() }, 5);
        let mut buf = vec![1, 2, 3];
        assert!(!super::encode_into(&mut buf, &e));
        assert_eq!(buf, [1, 2, 3]);
        // The public encoder still writes it, through serde.
        assert_eq!(super::super::encode(&e).expect("encodes"), rmp_serde::to_vec_named(&e).expect("encodes"));
    }
}
