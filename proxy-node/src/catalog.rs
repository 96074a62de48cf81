//! Catalog lookups on the target: how volatile a called function is.
//!
//! A function that is not a known read-only built-in is judged by `pg_proc.provolatile`:
//! immutable or stable functions cannot write (PostgreSQL runs them read-only), volatile ones
//! have an unknown effect. Unqualified names are judged by their most volatile overload in any
//! schema, so `search_path` cannot make a volatile function look stable. Lookups go over a
//! side connection to the same target and are cached per session, and dropped whenever the
//! session runs DDL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use proto::policy::Connection;
use tokio::io::AsyncWriteExt;

use crate::policy::FunctionRef;
use crate::upstream::{self, Upstream, UpstreamError};
use crate::wire::postgres::messages::{read_data_row, read_error_fields};

const VOLATILITY_SQL: &str = "SELECT coalesce(max(p.provolatile::text), 'v') \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE p.proname = $1 AND ($2::text IS NULL OR n.nspname = $2)";

/// Cached entries live this long at most.
const TTL: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Catalog {
    conn: Option<Upstream>,
    cache: HashMap<FunctionRef, (bool, Instant)>,
}

impl Catalog {
    /// Forget what was looked up (after DDL).
    pub fn invalidate(&mut self) {
        self.cache.clear();
    }

    /// Is `f` known not to be volatile? Lookup failures count as volatile.
    pub async fn read_only(
        &mut self,
        target: &Connection,
        f: &FunctionRef,
        timeout: Duration,
        max: usize,
    ) -> bool {
        if let Some((ro, at)) = self.cache.get(f)
            && at.elapsed() < TTL
        {
            return *ro;
        }
        let ro = match self.lookup(target, f, timeout, max).await {
            Ok(v) => v != 'v',
            Err(e) => {
                tracing::warn!(error = %e, function = %f, "catalog lookup failed; treating the function as volatile");
                self.conn = None;
                false
            }
        };
        self.cache.insert(f.clone(), (ro, Instant::now()));
        ro
    }

    async fn lookup(
        &mut self,
        target: &Connection,
        f: &FunctionRef,
        timeout: Duration,
        max: usize,
    ) -> Result<char, UpstreamError> {
        if self.conn.is_none() {
            self.conn = Some(upstream::connect(target, &[], timeout, max, true).await?);
        }
        let up = self.conn.as_mut().ok_or_else(|| UpstreamError::Protocol("no catalog connection".into()))?;
        let mut out = BytesMut::new();
        message(&mut out, b'P', |b| {
            b.put_u8(0);
            b.put_slice(VOLATILITY_SQL.as_bytes());
            b.put_u8(0);
            b.put_i16(0);
        });
        message(&mut out, b'B', |b| {
            b.put_u8(0);
            b.put_u8(0);
            b.put_i16(0);
            b.put_i16(2);
            for v in [Some(f.name.as_str()), f.schema.as_deref()] {
                match v {
                    Some(v) => {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v.as_bytes());
                    }
                    None => b.put_i32(-1),
                }
            }
            b.put_i16(0);
        });
        message(&mut out, b'E', |b| {
            b.put_u8(0);
            b.put_i32(0);
        });
        message(&mut out, b'S', |_| {});
        tokio::time::timeout(timeout, async {
            up.stream.write_all(&out).await?;
            let mut answer = None;
            let mut error = None;
            loop {
                let fr = up.read_frame(max).await?;
                match fr.tag {
                    b'D' => {
                        answer = read_data_row(&fr.body)
                            .and_then(|v| v.first().copied().flatten().and_then(|b| b.first().copied()))
                            .map(char::from);
                    }
                    b'E' => error = Some(read_error_fields(&fr.body)),
                    b'Z' => break,
                    _ => {}
                }
            }
            match (answer, error) {
                (_, Some((code, message))) => Err(UpstreamError::Rejected { code, message }),
                (Some(v), None) => Ok(v),
                (None, None) => Err(UpstreamError::Protocol("empty catalog answer".into())),
            }
        })
        .await
        .map_err(|_| UpstreamError::Timeout("catalog lookup".into()))?
    }
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    body(&mut b);
    out.put_u8(tag);
    out.put_i32(b.len() as i32 + 4);
    out.put_slice(&b);
}
