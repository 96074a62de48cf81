//! Text renderings for people: the session list and a session's transcript.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use comfy_table::{Table, presets};
use proto::events::{Envelope, Event, ResultCapture, Timestamp};

use super::SessionSummary;

/// At most this many captured result rows are shown per response.
const MAX_ROWS_SHOWN: usize = 20;
/// Longer cell values are cut.
const MAX_CELL_CHARS: usize = 60;

/// A table of sessions, one per line.
pub fn render_sessions(sessions: &[SessionSummary]) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header(vec![
        "SESSION",
        "STARTED",
        "DURATION",
        "PRINCIPAL",
        "GROUPS",
        "CONNECTION",
        "REQUESTS",
        "DENIED",
        "HELD",
    ]);
    for s in sessions {
        let duration = match s.ended_at {
            Some(end) => format_duration_us(end.as_micros().saturating_sub(s.started_at.as_micros())),
            None => "open".to_string(),
        };
        table.add_row(vec![
            s.id.to_string(),
            format_time(s.started_at),
            duration,
            or_dash(&s.principal),
            or_dash(&s.groups.join(",")),
            or_dash(&s.connection),
            s.requests.to_string(),
            s.denied.to_string(),
            s.held.to_string(),
        ]);
    }
    let mut out = table.to_string();
    out.push('\n');
    out
}

/// A readable transcript of a session, one event per line, with time offsets from its first event.
///
/// Recorded text is the agent's (statements, and through errors and results, the target's): it
/// is printed through [`printable`], so that it cannot move the cursor, erase or reorder what is
/// shown, and a statement's further lines are marked ([`CONTINUED`]) so that none passes for an
/// entry of its own.
pub fn render_replay(events: &[Envelope]) -> String {
    let mut out = String::new();
    let Some(first) = events.first() else {
        return "no events\n".to_string();
    };
    let _ = writeln!(out, "session {} (started {})", first.session, first.at);
    let origin = first.at.as_micros();
    let mut hold_seq: HashMap<uuid::Uuid, u64> = HashMap::new();
    for env in events {
        let offset = format!("+{:.3}s", env.at.as_micros().saturating_sub(origin) as f64 / 1e6);
        let line = match &env.event {
            Event::SessionStarted { principal, connection, protocol, client_addr, node, policy_version } => {
                format!(
                    "session started: principal {} (groups: {}) on connection {} via {} from {}, node {}, \
                     policy v{policy_version}",
                    or_dash(&principal.subject),
                    or_dash(&principal.groups.join(", ")),
                    printable(connection),
                    printable(protocol),
                    printable(client_addr),
                    printable(node),
                )
            }
            Event::SessionEnded { reason } => format!("session ended: {}", printable(reason)),
            Event::RequestReceived { seq, statement, .. } => {
                let lines: Vec<_> = statement.split('\n').map(printable).collect();
                format!("#{seq} > {}", lines.join(CONTINUED))
            }
            Event::PolicyDecided { seq, decision, rule, operations, tables, reason, policy_version } => {
                let mut line = format!(
                    "#{seq} policy: {decision} (rule: {}; operations: {}; tables: {}; policy v{policy_version})",
                    or_dash(rule.as_deref().unwrap_or("")),
                    or_dash(&operations.join(", ")),
                    or_dash(&tables.join(", ")),
                );
                if !reason.is_empty() {
                    let _ = write!(line, ": {}", printable(reason));
                }
                line
            }
            Event::HoldRequested(h) => {
                hold_seq.insert(h.hold_id, h.seq);
                format!(
                    "#{} hold requested: hold {} by rule {}, approvers {} (min {}), expires {}",
                    h.seq,
                    h.hold_id,
                    printable(&h.rule),
                    or_dash(&h.approvers.groups.join(", ")),
                    h.approvers.min,
                    h.expires_at,
                )
            }
            Event::PolicyApplied { version, author, digest } => {
                format!(
                    "policy version {version} applied by {} (sha256 {})",
                    printable(author),
                    printable(digest)
                )
            }
            Event::GrantDecided(g) => format!(
                "grant {}: {} may use {} under rule {} until {} (granted by {})",
                g.grant_id,
                printable(&g.principal),
                printable(&g.connection),
                printable(&g.rule),
                g.until,
                printable(&g.granted_by)
            ),
            Event::GrantRevoked(r) => format!(
                "grant {} revoked by {}{}",
                r.grant_id,
                printable(&r.revoked_by),
                r.reason.as_deref().map(|x| format!(": {}", printable(x))).unwrap_or_default()
            ),
            Event::HoldDecided(d) => {
                let seq = hold_seq.get(&d.hold_id).map_or_else(|| "#?".to_string(), |s| format!("#{s}"));
                let mut line = format!("{seq} hold decided: {} by {}", d.outcome, printable(&d.decided_by));
                if let Some(reason) = &d.reason {
                    let _ = write!(line, " (reason: {})", printable(reason));
                }
                line
            }
            Event::ResponseSent { seq, rows, duration_us, command_tag, error, result } => {
                let mut line = format!("#{seq} < ");
                match error {
                    Some(e) => {
                        let _ = write!(line, "error {}: {}", printable(&e.code), printable(&e.message));
                    }
                    None => {
                        let _ = write!(line, "{rows} row{}", if *rows == 1 { "" } else { "s" });
                    }
                }
                let _ = write!(
                    line,
                    " in {}",
                    format_duration_us(i64::try_from(*duration_us).unwrap_or(i64::MAX))
                );
                if let Some(tag) = command_tag {
                    let _ = write!(line, " ({})", printable(tag));
                }
                if let Some(result) = result {
                    for table_line in render_result(result).lines() {
                        let _ = write!(line, "\n           {table_line}");
                    }
                }
                line
            }
        };
        let _ = writeln!(out, "{offset:>10} {line}");
    }
    out
}

/// What starts each further line of a multi-line statement: under the statement, past the
/// offset column, and marked, so that it never reads as an entry.
const CONTINUED: &str = "\n           ┆ ";

/// `text` made safe to print on a terminal: C0 control characters (newline too: callers that
/// keep lines split first), DEL and C1 control characters are written as `\x1b`, and characters
/// that reorder or hide text (bidirectional marks, embeddings, overrides and isolates; line and
/// paragraph separators) as `\u{202e}`. Everything else is kept as recorded.
pub(crate) fn printable(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            || matches!(c, '\u{2028}' | '\u{2029}')
    };
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            c if u32::from(c) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

fn render_result(result: &ResultCapture) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::ASCII_FULL_CONDENSED)
        .set_header(result.columns.iter().map(|c| printable(c).into_owned()));
    for row in result.rows.iter().take(MAX_ROWS_SHOWN) {
        table.add_row(row.iter().map(|v| match v {
            Some(v) => cut(&printable(v)),
            None => "NULL".to_string(),
        }));
    }
    let mut out = table.to_string();
    let hidden = result.rows.len().saturating_sub(MAX_ROWS_SHOWN);
    if hidden > 0 {
        let _ = write!(out, "\n... {hidden} more rows");
    }
    if result.truncated {
        out.push_str("\n(capture truncated)");
    }
    out
}

fn cut(v: &str) -> String {
    if v.chars().count() <= MAX_CELL_CHARS {
        v.to_string()
    } else {
        let mut s: String = v.chars().take(MAX_CELL_CHARS - 1).collect();
        s.push('…');
        s
    }
}

/// [`printable`], or `-` when empty.
fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".to_string() } else { printable(s).into_owned() }
}

fn format_time(t: Timestamp) -> String {
    humantime::format_rfc3339_seconds(t.to_system_time()).to_string()
}

fn format_duration_us(us: i64) -> String {
    let us = us.max(0);
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::{Decision, ErrorInfo, Principal};
    use uuid::Uuid;

    #[test]
    fn replay_shows_statements_decisions_and_results() {
        let session = Uuid::now_v7();
        let env = |at: i64, event: Event| {
            let mut e = Envelope::new(session, event);
            e.at = Timestamp(1_000_000 + at);
            e
        };
        let events = vec![
            env(
                0,
                Event::SessionStarted {
                    principal: Principal {
                        subject: "agent-1".into(),
                        groups: vec!["agents".into()],
                        kind: "oidc".into(),
                    },
                    connection: "shop".into(),
                    protocol: "postgres".into(),
                    client_addr: "127.0.0.1:1".into(),
                    node: "n1".into(),
                    policy_version: 2,
                },
            ),
            env(
                1_500,
                Event::RequestReceived {
                    seq: 1,
                    statement: "select id from users".into(),
                    parameters: Default::default(),
                },
            ),
            env(
                2_000,
                Event::PolicyDecided {
                    seq: 1,
                    decision: Decision::Allow,
                    rule: Some("reads".into()),
                    operations: ["select".into()].into(),
                    tables: ["users".into()].into(),
                    reason: "".into(),
                    policy_version: 2,
                },
            ),
            env(
                3_000,
                Event::ResponseSent {
                    seq: 1,
                    rows: 1,
                    duration_us: 900,
                    command_tag: Some("SELECT 1".into()),
                    error: None,
                    result: Some(ResultCapture {
                        columns: vec!["id".into()],
                        rows: vec![vec![Some("42".into())], vec![None]],
                        truncated: true,
                    }),
                },
            ),
            env(
                4_000,
                Event::ResponseSent {
                    seq: 2,
                    rows: 0,
                    duration_us: 10,
                    command_tag: None,
                    error: Some(ErrorInfo { code: "42P01".into(), message: "no such table".into() }),
                    result: None,
                },
            ),
            env(2_000_000, Event::SessionEnded { reason: "client closed".into() }),
        ];
        let text = render_replay(&events);
        for needle in [
            "agent-1",
            "agents",
            "shop",
            "+0.000s",
            "+0.002s",
            "#1 > select id from users",
            "#1 policy: allow (rule: reads",
            "#1 < 1 row in 900µs (SELECT 1)",
            "| 42 ",
            "NULL",
            "(capture truncated)",
            "error 42P01: no such table",
            "+2.000s session ended: client closed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    /// An agent's allowed statement carries a carriage return, an "erase line" escape and a
    /// newline to print a fake denial; other recorded fields carry escapes and bidi overrides.
    /// The transcript shows them all as escapes: each entry is one line starting with its offset,
    /// and a statement's further lines are marked as such.
    #[test]
    fn recorded_text_cannot_fake_or_hide_transcript_lines() {
        let session = Uuid::now_v7();
        let env = |at: i64, event: Event| {
            let mut e = Envelope::new(session, event);
            e.at = Timestamp(1_000_000 + at);
            e
        };
        let attack = "DELETE FROM users /*\r\x1b[2K#7 > select 1\n   +0.010s #8 policy: deny (rule: x) */";
        let events = vec![
            env(
                0,
                Event::RequestReceived { seq: 7, statement: attack.into(), parameters: Default::default() },
            ),
            env(
                1,
                Event::PolicyDecided {
                    seq: 7,
                    decision: Decision::Allow,
                    rule: Some("r\x1b]0;title\x07".into()),
                    operations: ["delete\u{9b}2J".into()].into(),
                    tables: ["users\u{202e}sresu".into()].into(),
                    reason: "ok\u{2066}\x7f".into(),
                    policy_version: 1,
                },
            ),
            env(
                2,
                Event::ResponseSent {
                    seq: 7,
                    rows: 1,
                    duration_us: 1,
                    command_tag: Some("DELETE 1\r".into()),
                    error: Some(ErrorInfo { code: "XX000".into(), message: "a\nb\x1b[1A".into() }),
                    result: Some(ResultCapture {
                        columns: vec!["c\x1b[31m".into()],
                        rows: vec![vec![Some("v\u{202d}\n+0.020s #9".into())]],
                        truncated: false,
                    }),
                },
            ),
        ];
        let text = render_replay(&events);
        let bidi = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        assert!(!text.chars().any(|c| (c.is_control() && c != '\n') || bidi(c)), "{text:?}");
        let entries: Vec<&str> = text.lines().skip(1).filter(|l| !l.starts_with("           ")).collect();
        assert_eq!(entries.len(), events.len(), "one line per entry:\n{text}");
        assert!(entries.iter().all(|l| l.trim_start().starts_with("+0.000s #7 ")), "{text}");
        for needle in [
            "#7 > DELETE FROM users /*\\x0d\\x1b[2K#7 > select 1\n           ┆    +0.010s #8 policy: deny",
            "rule: r\\x1b]0;title\\x07",
            "delete\\x9b2J",
            "users\\u{202e}sresu",
            "ok\\u{2066}\\x7f",
            "error XX000: a\\x0ab\\x1b[1A",
            "(DELETE 1\\x0d)",
            "c\\x1b[31m",
            "v\\u{202d}\\x0a+0.020s #9",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(printable("plain, 'é' and ü"), Cow::Borrowed("plain, 'é' and ü"));
    }

    #[test]
    fn empty_replay_and_long_cells_do_not_panic() {
        assert_eq!(render_replay(&[]), "no events\n");
        assert_eq!(cut(&"é".repeat(100)).chars().count(), MAX_CELL_CHARS);
    }
}
