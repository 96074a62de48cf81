//! Replicas racing on one session's manifest, interleaved deterministically: replica A finishes
//! the session first but its manifest write is held back until replica B has appended a chunk
//! and written its own manifest.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, ensure};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use proto::events::{Envelope, Event};
use tokio::sync::{Mutex, Notify};
use uuid::Uuid;

use crate::audit;
use crate::manifest::Manifest;
use crate::session::SessionState;
use crate::{Ctx, RecorderConfig, chunk, finalize, record_session};

type Fut<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;

/// A store whose first manifest write, once armed, waits until released.
#[derive(Debug)]
struct Gated {
    inner: Arc<dyn ObjectStore>,
    armed: AtomicBool,
    reached: Notify,
    release: Notify,
}

impl Gated {
    fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner, armed: AtomicBool::new(true), reached: Notify::new(), release: Notify::new() }
    }
}

impl fmt::Display for Gated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gated({})", self.inner)
    }
}

impl ObjectStore for Gated {
    fn put_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Fut<'f, PutResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            if location.filename() == Some("manifest.json") && self.armed.swap(false, Ordering::SeqCst) {
                self.reached.notify_one();
                self.release.notified().await;
            }
            self.inner.put_opts(location, payload, opts).await
        })
    }

    fn put_multipart_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l Path,
        opts: PutMultipartOptions,
    ) -> Fut<'f, Box<dyn MultipartUpload>>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.put_multipart_opts(location, opts))
    }

    fn get_opts<'s, 'l, 'f>(&'s self, location: &'l Path, options: GetOptions) -> Fut<'f, GetResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.get_opts(location, options))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_delimiter<'s, 'l, 'f>(&'s self, prefix: Option<&'l Path>) -> Fut<'f, ListResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.list_with_delimiter(prefix))
    }

    fn copy_opts<'s, 'a, 'b, 'f>(&'s self, from: &'a Path, to: &'b Path, options: CopyOptions) -> Fut<'f, ()>
    where
        's: 'f,
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        Box::pin(self.inner.copy_opts(from, to, options))
    }
}

fn ctx(store: Arc<dyn ObjectStore>) -> Ctx {
    Ctx {
        store,
        log: Mutex::new(None),
        signer: None,
        cfg: RecorderConfig::default(),
        conditional_update: AtomicBool::new(true),
    }
}

fn request(id: Uuid, seq: u64) -> Envelope {
    Envelope::new(
        id,
        Event::RequestReceived {
            seq,
            statement: format!("select {seq}").into(),
            parameters: Default::default(),
        },
    )
}

async fn stored_manifest(store: &dyn ObjectStore, state: &SessionState) -> Result<Manifest> {
    let path = chunk::manifest_path(&state.date, state.id);
    let bytes = store.get(&path).await.context("manifest")?.bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// A records the session's end and starts writing the manifest, held back while B appends the
/// rest (learning of the end from A's chunk) and writes the longer chain's manifest; then A's
/// write goes ahead. With `prior`, an incomplete manifest (as a timeout writes) is there first, so
/// that both replace a manifest rather than create one.
async fn race(store: Arc<dyn ObjectStore>, prior: bool) -> Result<()> {
    let id = Uuid::now_v7();
    let events: Vec<Envelope> = (1..=3)
        .map(|seq| request(id, seq))
        .chain([Envelope::new(id, Event::SessionEnded { reason: "client closed".into() })])
        .collect();
    let plain = ctx(store.clone());
    if prior {
        let mut state = None;
        record_session(&plain, id, &events[..1], &mut state).await.map_err(step)?;
        let mut state = state.context("state")?;
        finalize(&plain, &mut state).await?;
        ensure!(stored_manifest(store.as_ref(), &state).await?.incomplete, "an incomplete manifest first");
    }

    let gated = Arc::new(Gated::new(store.clone()));
    let a = ctx(gated.clone());
    let a_events = vec![events[0].clone(), events[1].clone(), events[3].clone()];
    let a_task = async {
        let mut state = None;
        record_session(&a, id, &a_events, &mut state).await.map_err(step)?;
        state.context("A's state")
    };
    let b_task = async {
        gated.reached.notified().await;
        let mut state = None;
        record_session(&plain, id, &events[2..3], &mut state).await.map_err(step)?;
        gated.release.notify_one();
        state.context("B's state")
    };
    let (a_state, b_state) = tokio::try_join!(a_task, b_task)?;

    let chunks = if prior { 3 } else { 2 };
    ensure!(b_state.next_index == chunks, "B appended after A: {b_state:?}");
    let m = stored_manifest(store.as_ref(), &b_state).await?;
    ensure!(
        m.chunks == chunks && m.events == 4 && !m.incomplete,
        "the manifest names the chain's end: {m:?}"
    );
    ensure!(a_state.next_index == chunks, "A followed the chain to its end");
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok(), "{}", report.render());
    ensure!(audit::read_session(store.as_ref(), id).await?.len() == 4, "every event once");
    Ok(())
}

fn step(e: crate::StepError) -> anyhow::Error {
    match e {
        crate::StepError::Store(e) => e.into(),
        crate::StepError::Encode(e) => e.into(),
    }
}

#[tokio::test]
async fn a_stale_manifest_never_replaces_a_longer_chains_when_creating() -> Result<()> {
    race(Arc::new(InMemory::new()), false).await
}

#[tokio::test]
async fn a_stale_manifest_never_replaces_a_longer_chains_when_updating() -> Result<()> {
    race(Arc::new(InMemory::new()), true).await
}

#[tokio::test]
async fn a_local_directory_without_conditional_updates_ends_at_the_chains_end() -> Result<()> {
    for prior in [false, true] {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path())?);
        race(store, prior).await?;
    }
    Ok(())
}

/// A manifest claiming a trillion chunks, planted before the session ends, does not keep the
/// recorder from writing the chain's own manifest and archive log entry: a recorder writes chunks
/// before their manifest, so one ahead of the chain that is not signed with our key was forged,
/// and is replaced. One signed with our key is genuine (its chunks were deleted since) and stays,
/// as evidence for `audit verify`.
#[tokio::test]
async fn a_manifest_ahead_of_the_chain_is_replaced_unless_signed_with_our_key() -> Result<()> {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let id = Uuid::now_v7();
    let key = crate::manifest::parse_signing_key(&"5c".repeat(32)).context("key")?;
    let signing = Ctx { signer: Some(key), ..ctx(store.clone()) };
    let mut state = None;
    record_session(&signing, id, &[request(id, 1)], &mut state).await.map_err(step)?;
    let date = state.as_ref().context("state")?.date.clone();
    let mut forged = state.as_ref().context("state")?.manifest();
    forged.chunks = 1_000_000_000_000;
    let path = chunk::manifest_path(&date, id);
    store.put(&path, forged.to_bytes().into()).await?;

    let end = Envelope::new(id, Event::SessionEnded { reason: "client closed".into() });
    record_session(&signing, id, &[end], &mut state).await.map_err(step)?;
    let state = state.context("state")?;
    let m = stored_manifest(store.as_ref(), &state).await?;
    ensure!(m.chunks == 2 && !m.incomplete, "the chain's own manifest replaced the forged one: {m:?}");
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok() && report.log_entries == 1, "{}", report.render());

    // Chunk 1 deleted: a recorder picking the session up again leaves the signed manifest be.
    store.delete(&chunk::chained_path(&date, id, 1)).await?;
    let mut again = SessionState::new(id, date);
    again.catch_up(store.as_ref()).await?;
    finalize(&signing, &mut again).await?;
    let kept = stored_manifest(store.as_ref(), &again).await?;
    ensure!(kept == m, "the signed manifest stays: {kept:?}");
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.render().contains("chunk 1 deleted from the end of the chain"), "{}", report.render());
    Ok(())
}
